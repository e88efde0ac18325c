"""Homography benchmark: corner-error AUC@3/5/10 px, share of matches within 3 px, matches and time per pair.

Examples:
    python eval/homography.py --hpatches datasets/hpatches-sequences-release --matcher outdoor.ckpt --config quadtree_b_outdoor
    python eval/homography.py --image-dir photos/ --num-pairs 200 --seed 0 --matcher lite --resize 640

HPatches layout: one folder per sequence with ``1.ppm`` .. ``6.ppm`` and ``H_1_2`` .. ``H_1_6`` (3x3 text
matrices mapping image 1 pixels to image k pixels); pairs are (1, k), k = 2..6. Generated pairs: for pair
``i`` the image ``i mod n`` of the sorted folder is warped by a random homography (each corner moved by
up to ``--max-shift`` of the image side) and changed photometrically; both are drawn from
``SeedSequence([seed, i])``, so a pair depends only on the seed, its index and its image (generator:
``matcher.data.homography.generate_homography_pair``).

Per pair the homography is estimated from the matches with OpenCV RANSAC (``--h-ransac-thr`` px); the
error is the mean distance of image0's four corners mapped by the estimate and by the truth, in pixels of
the ORIGINAL image1 (whatever ``--resize`` the matchers use). SIFT and ORB rows are always added.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Sequence

import cv2
import numpy as np

from matcher.evaluation import (
    Column,
    LoadedPair,
    add_common_arguments,
    finite_mean,
    long_side_argument,
    numerics_protocol,
    pairs_summary,
    report_run,
    run_script,
    run_script_pairs,
    size_summary,
    software_versions,
    timing_protocol,
)
from matcher.data.homography import (  # the generator lives in the package; re-exported here (see __all__)
    IMAGE_SUFFIXES,
    generate_homography_pair,
    list_images,
    photometric_change,
    random_homography,
)
from matcher.image_io import read_image_gray
from matcher.metrics import (
    HOMOGRAPHY_AUC_THRESHOLDS,
    estimate_homography,
    homography_auc,
    homography_corner_error,
    homography_match_accuracy,
)

__all__ = [
    "IMAGE_SUFFIXES", "generate_homography_pair", "list_images", "photometric_change", "random_homography",
    "hpatches_pairs", "read_homography", "load_hpatches_pair", "load_generated_pair", "evaluate_homography_pair",
    "summarize_homography", "build_parser", "main",
]

#: Distance (px) under which a match counts as correct for the accuracy column.
MATCH_ACCURACY_THR = 3.0

HOMOGRAPHY_COLUMNS = (
    Column("matcher", "Matcher", ""),
    Column("auc@3", "AUC@3px", ".2f"),
    Column("auc@5", "AUC@5px", ".2f"),
    Column("auc@10", "AUC@10px", ".2f"),
    Column("accuracy", "Acc.@3px (%)", ".2f"),
    Column("num_matches", "Matches", ".0f"),
    Column("time_ms", "ms/pair", ".1f"),
    Column("failed", "Failed", "d"),
    Column("skipped", "Skipped", "d"),
    Column("pairs", "Pairs", "d"),
)


# ----------------------------------------------------------------------------------------------- pair sources
def hpatches_pairs(root: str | Path) -> list[tuple[str, Path, Path, Path]]:
    """HPatches pairs ``(key, image1 path, image k path, H_1_k path)`` for every sequence folder (sorted) and
    k = 2..6. Files are not opened here: a missing one makes its pair fail to load (and be skipped)."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"HPatches folder not found: {root}")
    sequences = sorted(p for p in root.iterdir() if p.is_dir())
    if not sequences:
        raise FileNotFoundError(f"no sequence folders in {root}")
    pairs = []
    for seq in sequences:
        for k in range(2, 7):
            pairs.append((f"{seq.name}/1-{k}", seq / "1.ppm", seq / f"{k}.ppm", seq / f"H_1_{k}"))
    return pairs


def read_homography(path: str | Path) -> np.ndarray:
    """A 3x3 homography from a whitespace-separated text file; ValueError when malformed or singular."""
    try:
        H = np.loadtxt(path, dtype=np.float64)
    except (OSError, ValueError) as err:
        raise ValueError(f"cannot read homography {path}: {err}") from None
    if H.shape != (3, 3) or not np.isfinite(H).all() or abs(np.linalg.det(H)) < 1e-12:
        raise ValueError(f"{path} is not an invertible 3x3 matrix")
    return H


def load_hpatches_pair(pair: tuple[str, Path, Path, Path]) -> LoadedPair:
    """Read an HPatches pair: gray float images as stored and the true homography."""
    key, path0, path1, h_path = pair
    image0, image1 = read_image_gray(path0), read_image_gray(path1)
    return LoadedPair(key, image0, image1, {"H": read_homography(h_path), "hw0": image0.shape})


def load_generated_pair(images: Sequence[Path], index: int, seed: int, max_shift: float, photometric: bool) -> LoadedPair:
    """Generated pair ``index``: image ``index mod len(images)`` and :func:`generate_homography_pair` with
    seed ``[seed, index]``."""
    path = images[index % len(images)]
    image0, image1, H = generate_homography_pair(read_image_gray(path), [seed, index], max_shift, photometric)
    return LoadedPair(f"{seed}:{index}:{path.name}", image0, image1, {"H": H, "hw0": image0.shape})


# ----------------------------------------------------------------------------------------------- metrics
def evaluate_homography_pair(prediction: dict[str, np.ndarray], truth: dict[str, Any], ransac_thr: float) -> dict[str, Any]:
    """Corner error of the RANSAC homography (inf when none) and the share of matches within 3 px."""
    kpts0, kpts1 = prediction["keypoints0"], prediction["keypoints1"]
    H_est = estimate_homography(kpts0, kpts1, cv2.RANSAC, ransac_thr)
    accuracy, _ = homography_match_accuracy(kpts0, kpts1, truth["H"], MATCH_ACCURACY_THR)
    return {"corner_error": homography_corner_error(H_est, truth["H"], tuple(truth["hw0"])), "accuracy": accuracy}


def summarize_homography(label: str, records: list[dict[str, Any]], skipped: int) -> dict[str, Any]:
    """Table row of one matcher: corner-error AUCs and match accuracy in percent, mean matches, ms per pair,
    failed (no homography) and skipped pairs."""
    aucs = homography_auc([r["corner_error"] for r in records], HOMOGRAPHY_AUC_THRESHOLDS)
    return {
        "matcher": label,
        **{k: 100.0 * v for k, v in aucs.items()},
        "accuracy": 100.0 * float(np.mean([r["accuracy"] for r in records])) if records else float("nan"),
        "num_matches": float(np.mean([r["num_matches"] for r in records])) if records else float("nan"),
        "time_ms": finite_mean(r["time_ms"] for r in records),
        "failed": int(sum(not np.isfinite(r["corner_error"]) for r in records)),
        "skipped": int(skipped),
        "pairs": len(records),
    }


def homography_protocol(args: argparse.Namespace, data_fingerprint: dict[str, Any], image_sizes: Any, num_pairs: int) -> dict[str, Any]:
    """The protocol block printed under the table; ``num_pairs`` is the number of pairs listed (HPatches) or
    generated (``--num-pairs``) before ``--max-pairs``, as in eval/pose.py."""
    return {
        "data": ", ".join(f"{k}={v}" for k, v in data_fingerprint.items()),
        "pairs": pairs_summary(num_pairs, args.max_pairs),
        "image sizes (original)": size_summary(image_sizes),
        "matcher resize": "none (original size)" if args.resize is None else f"long side {args.resize} px",
        "homography": f"cv2.findHomography, RANSAC, threshold {args.h_ransac_thr} px, confidence 0.995; fewer than 4 matches = failure",
        "corner error": "mean distance of image0's corners (0,0), (W-1,0), (W-1,H-1), (0,H-1) mapped by the estimate and by the truth, original image1 pixels; failure = infinity",
        "AUC": "area under the recall-vs-corner-error curve up to 3/5/10 px, divided by the threshold (same definition as the pose AUC), in percent",
        "accuracy": f"share of matches within {MATCH_ACCURACY_THR:g} px of the true homography's mapping, averaged over pairs (0 without matches), in percent",
        "time": timing_protocol(args),
        "numerics": numerics_protocol(args),
        "software": ", ".join(f"{k} {v}" for k, v in software_versions().items()),
    }


# ----------------------------------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--hpatches", default=None, help="HPatches sequences folder")
    source.add_argument("--image-dir", default=None, help="folder of images to generate homography pairs from")
    parser.add_argument("--num-pairs", type=int, default=100, help="generated pairs: how many")
    parser.add_argument("--seed", type=int, default=0, help="generated pairs: seed")
    parser.add_argument("--max-shift", type=float, default=0.15, help="generated pairs: corner shift bound (fraction of side)")
    parser.add_argument("--no-photometric", action="store_true", help="generated pairs: no photometric change")
    parser.add_argument("--resize", type=long_side_argument, default=None, help="long side the matchers resize images to (default: original)")
    parser.add_argument("--h-ransac-thr", type=float, default=3.0, help="homography RANSAC threshold in pixels")
    add_common_arguments(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the benchmark; prints the table and returns ``{"rows", "markdown", "json_path", "md_path",
    "computed", "cached", "skipped", "records"}``. Raises CacheMismatchError when a cache holds other
    settings."""
    args = build_parser().parse_args(argv)
    if args.hpatches:
        pairs = hpatches_pairs(args.hpatches)
        data_fingerprint: dict[str, Any] = {"source": "hpatches", "root": str(Path(args.hpatches).resolve())}
        num_pairs = len(pairs)

        def load(index: int) -> LoadedPair:
            return load_hpatches_pair(pairs[index])

        prefix = "homography-hpatches"
    else:
        images = list_images(args.image_dir)
        photometric = not args.no_photometric
        data_fingerprint = {
            "source": "generated",
            "image_dir": str(Path(args.image_dir).resolve()),
            "seed": args.seed,
            "max_shift": args.max_shift,
            "photometric": photometric,
        }
        num_pairs = args.num_pairs

        def load(index: int) -> LoadedPair:
            return load_generated_pair(images, index, args.seed, args.max_shift, photometric)

        prefix = "homography-generated"
    data_fingerprint["resize"] = args.resize
    listed = num_pairs
    if args.max_pairs is not None:
        num_pairs = min(num_pairs, args.max_pairs)
    run, labels = run_script_pairs(
        args,
        prefix,
        num_pairs,
        load,
        lambda pred, pair: evaluate_homography_pair(pred, pair.truth, args.h_ransac_thr),
        data_fingerprint,
        description=prefix,
    )
    rows = [summarize_homography(label, recs, len(run.skipped)) for label, recs in run.records.items()]
    title = f"Homography: {data_fingerprint['source']}"
    protocol = homography_protocol(args, data_fingerprint, run.image_sizes, listed)
    return report_run(args.out, prefix.replace("-", "_"), title, rows, HOMOGRAPHY_COLUMNS, protocol, run, labels)


if __name__ == "__main__":
    run_script(main)
