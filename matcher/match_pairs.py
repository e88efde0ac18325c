"""Match a list of image pairs and write keypoints and matches in hloc's h5 layout (for COLMAP).

    python -m matcher.match_pairs pairs.txt --image-dir images/ --out matches.h5 [--weights default]

``pairs.txt`` holds one pair per line, ``NAME0 NAME1`` relative to ``--image-dir`` (hloc's pairs format;
``#`` starts a comment). Two files are written:

- ``--out`` (matches): a group per pair ``NAME0/NAME1`` (slashes inside a name become ``-``, as hloc's
  ``names_to_pair``) with ``matches0`` ``(N0,)`` int32 (index into image1's keypoints, -1 = unmatched) and
  ``matching_scores0`` ``(N0,)`` float32, plus the raw per-pair matches (``raw_keypoints0/1``,
  ``raw_scores``) that let an interrupted run resume;
- ``--keypoints-out`` (features, default ``<out stem>-keypoints.h5``): a group per image name with
  ``keypoints`` ``(N, 2)`` float32 pixel (x, y), pixel centres at integers (hloc's convention).

A dense matcher finds different points in every pair; to give COLMAP tracks, each image's keypoints from
all its pairs are merged on a grid of ``--merge-px`` pixels (the merged point is the mean of its members),
and a pair keeps at most one match per merged keypoint (the most confident).

A pair that fails (an unreadable image, say) is listed and makes the exit status 1; its ``matches0`` holds no
match (-1 everywhere) and an image seen only in failed pairs gets no keypoints, so that hloc, which reads
every listed pair and image, can still import the rest. A rerun tries the failed pairs again.
"""

from __future__ import annotations

import argparse
import functools
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any, Sequence

import h5py
import numpy as np
from tqdm import tqdm

from .allocator import reuse_freed_memory
from .workers import MatcherPool, WorkerDied, submitted_ahead

RAW_KEYS = ("raw_keypoints0", "raw_keypoints1", "raw_scores")
#: Attribute of both files this tool writes: the matcher settings of the run (what a resumed run must match).
FINGERPRINT_ATTR = "matcher_fingerprint"


def names_to_pair(name0: str, name1: str) -> str:
    """hloc's h5 key of a pair."""
    return "/".join((name0.replace("/", "-"), name1.replace("/", "-")))


def read_pairs(path: str | Path) -> list[tuple[str, str]]:
    """``NAME0 NAME1`` per line; blank lines and ``#`` comments skipped. ValueError names a bad line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"pairs file not found: {path}")
    pairs = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        if len(parts) < 2:
            raise ValueError(f"{path}:{number}: expected 'NAME0 NAME1', got {line!r}")
        pairs.append((parts[0], parts[1]))
    if not pairs:
        raise ValueError(f"no pairs in {path}")
    return list(dict.fromkeys(pairs))  # a pair listed twice is matched once


def merge_keypoints(points: np.ndarray, grid_px: float) -> tuple[np.ndarray, np.ndarray]:
    """Merge ``(N, 2)`` points that fall in the same ``grid_px`` cell.

    Returns the merged points ``(K, 2)`` (mean of each cell's members, in first-seen order of the cells)
    and for every input point the index of its merged point ``(N,)``.
    """
    if len(points) == 0:
        return np.zeros((0, 2), np.float32), np.zeros(0, np.int64)
    cells = np.round(points / grid_px).astype(np.int64)
    _, first, inverse = np.unique(cells, axis=0, return_index=True, return_inverse=True)
    inverse = inverse.reshape(-1)
    order = np.argsort(np.argsort(first))  # unique() sorts cells; renumber them by first appearance
    ids = order[inverse]
    sums = np.zeros((len(first), 2), np.float64)
    np.add.at(sums, ids, points)
    counts = np.bincount(ids, minlength=len(first))[:, None]
    return (sums / counts).astype(np.float32), ids


def pair_matches(ids0: np.ndarray, ids1: np.ndarray, scores: np.ndarray, num0: int) -> tuple[np.ndarray, np.ndarray]:
    """hloc's ``matches0`` / ``matching_scores0`` for one pair from per-match keypoint ids; when several
    matches share a keypoint (on either side) only the most confident survives."""
    matches0 = np.full(num0, -1, np.int32)
    scores0 = np.zeros(num0, np.float32)
    taken1: set[int] = set()
    for m in np.argsort(-scores, kind="stable"):
        i0, i1 = int(ids0[m]), int(ids1[m])
        if matches0[i0] >= 0 or i1 in taken1:
            continue
        matches0[i0], scores0[i0] = i1, scores[m]
        taken1.add(i1)
    return matches0, scores0


def _written_elsewhere(file: h5py.File) -> bool:
    """Whether ``file`` holds data this tool did not write (not empty, yet without our fingerprint)."""
    return FINGERPRINT_ATTR not in file.attrs and len(file.keys()) > 0


def _check_fingerprint(file: h5py.File, fingerprint: str, overwrite: bool) -> None:
    """Start an empty (or, with ``overwrite``, emptied) file; refuse one written with other settings or by
    another tool (an existing hloc matches file is never wiped without ``--overwrite``)."""
    if not overwrite and _written_elsewhere(file):
        raise ValueError(f"{file.filename} holds data this tool did not write; use --overwrite to replace it or another --out")
    stored = file.attrs.get(FINGERPRINT_ATTR)
    if overwrite or stored is None:
        for key in list(file.keys()):
            del file[key]
        file.attrs[FINGERPRINT_ATTR] = fingerprint
    elif stored != fingerprint:
        raise ValueError(
            f"{file.filename} was written by a different matcher or settings; use --overwrite to start again "
            "or another --out"
        )


def pending_pairs(pairs: Sequence[tuple[str, str]], out: h5py.File) -> list[tuple[str, str]]:
    """The pairs whose raw matches ``out`` does not hold yet (those a resumed run still has to match)."""
    return [p for p in pairs if names_to_pair(*p) + "/raw_scores" not in out]


def match_files(matcher: Any, image_dir: Path, name0: str, name1: str, resize: Any) -> tuple[np.ndarray, ...]:
    """The raw matches of one pair of image files, as float32 arrays in the order of :data:`RAW_KEYS`."""
    from .image_io import load_gray

    image0 = load_gray(str(image_dir / name0), name0)
    image1 = load_gray(str(image_dir / name1), name1)
    result = matcher.match(image0, image1, resize=resize)
    return tuple(np.asarray(result[k], np.float32) for k in ("keypoints0", "keypoints1", "confidence"))


def match_all(matcher: Any, pairs: Sequence[tuple[str, str]], image_dir: Path, out: h5py.File, resize: Any,
              pool: MatcherPool | None = None) -> list[str]:
    """Match every pair not yet in ``out`` and store its raw matches; returns one line per failed pair.
    With a ``pool`` (:class:`~matcher.workers.MatcherPool` whose workers hold the matcher as ``"matcher"``) the
    pairs are matched in its workers, a few ahead, and stored in order."""
    failures = []
    todo = pending_pairs(pairs, out)
    submit = lambda pair: None if pool is None else pool.submit(match_files, "matcher", image_dir, *pair, resize)  # noqa: E731
    jobs = submitted_ahead(todo, submit, 0 if pool is None else 2 * pool.workers)
    for (name0, name1), job in tqdm(jobs, total=len(todo), desc="matching", unit="pair", disable=None):
        try:
            raw = match_files(matcher, image_dir, name0, name1, resize) if job is None else MatcherPool.result(job)
        except (ValueError, FileNotFoundError) as err:
            failures.append(f"{name0} {name1}: {err}")
            continue
        group = out.require_group(names_to_pair(name0, name1))
        for key, value in zip(RAW_KEYS, raw):
            if key in group:
                del group[key]
            group.create_dataset(key, data=value)
        out.flush()  # a run killed here resumes after the last finished pair
    return failures


def matcher_for_pairs(weights: str | None, config: str | None, device: str, feature_dtype: str | None) -> tuple[Any, str]:
    """The model :func:`main` matches with, on ``device`` in ``feature_dtype`` (None: the config's), and a
    description of it (which weights, which precision)."""
    from .evaluation import set_feature_dtype
    from .model import matcher_with_description

    matcher, which = matcher_with_description(weights, config)
    matcher = matcher.to(device)
    set_feature_dtype(matcher, feature_dtype)
    return matcher, f"{which} (backbone + coarse transformer in {matcher.feature_dtype()})"


def build_matcher_for_pairs(weights: str | None, config: str | None, device: str, feature_dtype: str | None) -> dict[str, Any]:
    """``{"matcher": the model}`` of :func:`matcher_for_pairs`: what each worker builds."""
    return {"matcher": matcher_for_pairs(weights, config, device, feature_dtype)[0]}


def drop_unlisted_matches(pairs: Sequence[tuple[str, str]], out: h5py.File) -> int:
    """Remove ``matches0`` / ``matching_scores0`` of pairs matched by an earlier run but not in ``pairs``: they
    index that run's keypoints file, which this run replaces (their raw matches stay, so listing them again
    restores them). Returns how many pairs lost them."""
    listed = {names_to_pair(*p) for p in pairs}
    dropped = 0
    for key0, first in out.items():
        for key1, group in first.items() if isinstance(first, h5py.Group) else ():
            if f"{key0}/{key1}" in listed or not isinstance(group, h5py.Group) or "matches0" not in group:
                continue
            for key in ("matches0", "matching_scores0"):
                if key in group:
                    del group[key]
            dropped += 1
    return dropped


def write_hloc(
    pairs: Sequence[tuple[str, str]], out: h5py.File, keypoints_path: Path, merge_px: float, overwrite: bool = False
) -> dict[str, int]:
    """Merge each image's keypoints over its pairs, write the features file and every pair's matches0 (pairs
    of ``out`` outside ``pairs`` lose theirs: :func:`drop_unlisted_matches`; pairs not matched get no match).
    A features file this tool did not write is refused unless ``overwrite`` (:func:`check_keypoints_file`)."""
    if merge_px <= 0:
        raise ValueError(f"the keypoint merge grid must be positive, got {merge_px} px")
    check_keypoints_file(keypoints_path, overwrite)
    dropped = drop_unlisted_matches(pairs, out)
    matched = [names_to_pair(*p) + "/raw_scores" in out for p in pairs]
    done = [p for p, ok in zip(pairs, matched) if ok]
    failed = [p for p, ok in zip(pairs, matched) if not ok]
    per_image: dict[str, list[np.ndarray]] = defaultdict(list)
    for name0, name1 in done:
        group = out[names_to_pair(name0, name1)]
        per_image[name0].append(group["raw_keypoints0"][()])
        per_image[name1].append(group["raw_keypoints1"][()])
    merged, ids, offsets = {}, {}, defaultdict(int)
    for name, chunks in per_image.items():
        merged[name], ids[name] = merge_keypoints(np.concatenate(chunks), merge_px)
    for name in {name for pair in failed for name in pair} - set(merged):  # seen in failed pairs only
        merged[name] = np.zeros((0, 2), np.float32)
    with h5py.File(keypoints_path, "w") as features:
        features.attrs[FINGERPRINT_ATTR] = out.attrs.get(FINGERPRINT_ATTR, "")
        for name, points in merged.items():
            features.require_group(name).create_dataset("keypoints", data=points)
    for name0, name1 in failed:
        num0 = len(merged[name0])
        _write_matches(out.require_group(names_to_pair(name0, name1)), np.full(num0, -1, np.int32), np.zeros(num0, np.float32))
    total = 0
    for name0, name1 in done:  # same order as above: each pair's slice of an image's ids follows the last
        group = out[names_to_pair(name0, name1)]
        n = len(group["raw_scores"])
        ids0 = ids[name0][offsets[name0] : offsets[name0] + n]
        offsets[name0] += n
        ids1 = ids[name1][offsets[name1] : offsets[name1] + n]
        offsets[name1] += n
        matches0, scores0 = pair_matches(ids0, ids1, group["raw_scores"][()], len(merged[name0]))
        _write_matches(group, matches0, scores0)
        total += int((matches0 >= 0).sum())
    return {"pairs": len(done), "images": len(merged), "matches": total, "unlisted": dropped}


def _write_matches(group: h5py.Group, matches0: np.ndarray, scores0: np.ndarray) -> None:
    for key, value in (("matches0", matches0), ("matching_scores0", scores0)):
        if key in group:
            del group[key]
        group.create_dataset(key, data=value)


def check_keypoints_file(path: Path, overwrite: bool) -> None:
    """Refuse to replace an existing features file this tool did not write (hloc's own features, say)
    unless ``overwrite``; an empty file or one this tool wrote is replaced."""
    if overwrite or not path.exists():
        return
    try:
        with h5py.File(path, "r") as existing:
            foreign = _written_elsewhere(existing)
    except OSError:  # not an h5 file
        foreign = path.stat().st_size > 0
    if foreign:
        raise ValueError(f"{path} holds data this tool did not write; use --overwrite to replace it or another --keypoints-out")


def main(argv: list[str] | None = None) -> int:
    from .evaluation import (
        add_precision_arguments, add_workers_argument, canonical_json, device_argument, feature_dtype_argument, long_side_argument,
        matcher_fingerprint, workers_device_error,
    )

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("pairs", help="text file, one 'NAME0 NAME1' per line")
    p.add_argument("--image-dir", required=True, help="folder the image names are relative to")
    p.add_argument("--out", default="matches.h5", help="matches h5 (hloc layout)")
    p.add_argument("--keypoints-out", help="features h5 with the keypoints (default: <out stem>-keypoints.h5)")
    p.add_argument("--weights", help="shipped weights name or checkpoint path (default: the shipped default)")
    p.add_argument("--config", help="model config name, for a checkpoint without a .yaml beside it (needs --weights)")
    p.add_argument("--resize", type=long_side_argument, help="long side to resize to (default: the config's inference.resize)")
    p.add_argument("--merge-px", type=float, default=1.0, help="merge an image's keypoints on this grid (pixels, > 0)")
    p.add_argument("--device", default="cpu", type=device_argument, help="cpu, cuda or cuda:N")
    add_precision_arguments(p, default=None)
    p.add_argument("--overwrite", action="store_true", help="discard what --out already holds")
    add_workers_argument(p)
    args = p.parse_args(argv)
    if not args.merge_px > 0:
        p.error(f"--merge-px must be positive, got {args.merge_px}")
    if error := workers_device_error(args):
        p.error(error)

    out_path = Path(args.out)
    keypoints_path = Path(args.keypoints_out) if args.keypoints_out else out_path.with_name(f"{out_path.stem}-keypoints.h5")
    try:
        pairs = read_pairs(args.pairs)
        image_dir = Path(args.image_dir)
        if not image_dir.is_dir():
            raise FileNotFoundError(f"image folder not found: {image_dir}")
        matcher, which = matcher_for_pairs(args.weights, args.config, args.device, feature_dtype_argument(args))
        resize = args.resize if args.resize is not None else "config"
        # "coordinates": resized keypoints map back with pixel centres at integers (not by scaling, as before)
        fingerprint = canonical_json({**matcher_fingerprint(matcher, "matcher"), "resize": resize,
                                      "coordinates": "pixel centres"})
        out_path.parent.mkdir(parents=True, exist_ok=True)
        check_keypoints_file(keypoints_path, args.overwrite)  # before any matching: fail early
        with h5py.File(out_path, "a") as out:
            _check_fingerprint(out, fingerprint, args.overwrite)
            todo = len(pending_pairs(pairs, out))
            done = len(pairs) - todo
            if not done:
                print(f"matching {len(pairs)} pairs with {which}")
            elif todo:
                print(f"{len(pairs)} pairs: {done} already matched in {out_path} (resuming), "
                      f"matching the other {todo} with {which}")
            else:
                print(f"{done} of {len(pairs)} pairs already matched in {out_path}; nothing to match, writing the hloc files")
            pool = None
            if todo and args.workers > 1:
                build = functools.partial(build_matcher_for_pairs, args.weights, args.config, args.device,
                                          feature_dtype_argument(args))
                pool = MatcherPool(build, args.workers, args.device, reuse_memory=True)
            try:
                failures = match_all(matcher, pairs, image_dir, out, resize, pool)
            finally:
                if pool is not None:
                    pool.close()
            counts = write_hloc(pairs, out, keypoints_path, args.merge_px, args.overwrite)
    except (ValueError, FileNotFoundError, OSError, WorkerDied) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for line in failures:
        print(f"skipped {line}", file=sys.stderr)
    print(
        f"{counts['pairs']} pairs, {counts['images']} images, {counts['matches']} matches -> {out_path}, "
        f"keypoints -> {keypoints_path}"
        + (f"; {len(failures)} pairs failed (listed above; written without matches, a rerun tries them again)" if failures else "")
    )
    if counts["unlisted"]:
        print(f"{counts['unlisted']} pairs matched by an earlier run are not in {args.pairs}: their matches0 were removed "
              "(they indexed the replaced keypoints file; list them again to restore them)")
    return 1 if failures else 0


if __name__ == "__main__":
    reuse_freed_memory()  # process-wide malloc tuning, for command-line runs only (see matcher/allocator.py)
    sys.exit(main())
