"""Relative-pose benchmark: AUC@5/10/20, epipolar precision, matches and time per pair, LoFTR's protocol.

Examples:
    python eval/pose.py --dataset scannet --data-root datasets/scannet/test \\
        --npz datasets/scannet/index/scene_data/test/test.npz \\
        --intrinsics datasets/scannet/index/scene_data/test/intrinsics.npz \\
        --matcher indoor.ckpt --config quadtree_b_indoor
    python eval/pose.py --dataset megadepth --data-root datasets/megadepth \\
        --scene-info datasets/megadepth/index/scene_info_val_1500 --img-resize 832 \\
        --matcher outdoor.ckpt --config quadtree_b_outdoor   # QuadTree's test size (LoFTR's: 840, the default)
    python eval/pose.py --dataset synthetic --max-pairs 50 --matcher lite
    python eval/pose.py --dataset pairs --data-root images/ --pairs-file pairs_with_gt.txt

SIFT and ORB rows are always added (``--no-baselines`` drops them). Predictions are cached per matcher in
``OUT/cache/pose-DATASET-LABEL.h5``: an interrupted run resumes, and a re-run with another RANSAC threshold
reuses the matches; a cache made with another matcher or data setting is refused.

'pairs' file format (SuperGlue's pairs-with-ground-truth): one pair per line,
``name0 name1 rot0 rot1 K0(9 values) K1(9 values) T_0to1(16 values)``, images relative to --data-root,
row-major matrices, ``T_0to1`` mapping camera-0 points to camera 1. ``rot0 rot1`` are ignored: K and T must
describe the image files as stored. Blank lines and lines starting with '#' are skipped.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

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
from matcher.image_io import read_image_gray
from matcher.metrics import (
    POSE_AUC_THRESHOLDS,
    POSE_RANSAC_CONF,
    epipolar_precision_threshold,
    opencv_pose_warning,
    pose_auc,
)
from matcher.validation import pair_pose_metrics

#: Number of values on a line of a pairs-with-ground-truth file.
PAIRS_LINE_VALUES = 2 + 2 + 9 + 9 + 16

POSE_COLUMNS = (
    Column("matcher", "Matcher", ""),
    Column("auc@5", "AUC@5", ".2f"),
    Column("auc@10", "AUC@10", ".2f"),
    Column("auc@20", "AUC@20", ".2f"),
    Column("precision", "Prec. (%)", ".2f"),
    Column("num_matches", "Matches", ".0f"),
    Column("time_ms", "ms/pair", ".1f"),
    Column("failed", "Failed", "d"),
    Column("skipped", "Skipped", "d"),
    Column("pairs", "Pairs", "d"),
)


# ----------------------------------------------------------------------------------------------- pairs file
def parse_pairs_line(line: str) -> tuple[str, str, np.ndarray, np.ndarray, np.ndarray]:
    """One line of a pairs-with-ground-truth file -> ``(name0, name1, K0 (3, 3), K1 (3, 3), T_0to1 (4, 4))``.

    Raises ValueError when values are missing or not finite numbers, or the pose is not rigid.
    """
    tokens = line.split()
    if len(tokens) < PAIRS_LINE_VALUES:
        raise ValueError(f"missing pose: expected {PAIRS_LINE_VALUES} values, found {len(tokens)}")
    try:
        values = np.asarray(tokens[4:PAIRS_LINE_VALUES], np.float64)
    except ValueError:
        raise ValueError("intrinsics / pose values are not numbers") from None
    if not np.isfinite(values).all():
        raise ValueError("intrinsics / pose contain NaN or inf")
    K0, K1, T = values[:9].reshape(3, 3), values[9:18].reshape(3, 3), values[18:].reshape(4, 4)
    R = T[:3, :3]
    if not np.allclose(R @ R.T, np.eye(3), atol=1e-4) or not np.allclose(T[3], [0, 0, 0, 1]):
        raise ValueError("T_0to1 is not a rigid transform")
    return tokens[0], tokens[1], K0, K1, T


def read_pairs_file(path: str | Path) -> list[str]:
    """Non-empty, non-comment lines of a pairs file (parsed lazily, so one bad line only skips its pair)."""
    lines = Path(path).read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]


class PairsDataset:
    """Pairs listed in a SuperGlue-style pairs-with-ground-truth file; samples follow the project's dataset
    contract (``image0/1`` (1, H, W) float tensors, ``K0/K1``, ``T_0to1``, ``pair_names`` ...). Images are
    used at their stored size (no ``scale0/1``). Indexing raises ValueError for an unreadable image or a
    line without a valid pose."""

    def __init__(self, data_root: str | Path, pairs_file: str | Path) -> None:
        self.data_root = Path(data_root)
        self.lines = read_pairs_file(pairs_file)

    def __len__(self) -> int:
        return len(self.lines)

    def __getitem__(self, index: int) -> dict[str, Any]:
        line = self.lines[index]
        name0, name1, K0, K1, T = parse_pairs_line(line)
        images = [torch.from_numpy(read_image_gray(self.data_root / name))[None] for name in (name0, name1)]
        return {
            "image0": images[0],
            "image1": images[1],
            "K0": torch.from_numpy(K0),
            "K1": torch.from_numpy(K1),
            "T_0to1": torch.from_numpy(T),
            "dataset_name": "pairs",
            "scene_id": "pairs",
            "pair_id": index,
            "pair_names": (name0, name1),
        }


# ----------------------------------------------------------------------------------------------- datasets
def scene_info_files(paths: Sequence[str]) -> list[Path]:
    """MegaDepth scene-info arguments -> files: each path is a ``.npz`` file or a folder of them (sorted)."""
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            files.extend(sorted(p.glob("*.npz")))
        elif p.is_file():
            files.append(p)
        else:
            raise FileNotFoundError(f"scene info not found: {p}")
    if not files:
        raise FileNotFoundError(f"no scene info .npz files in {list(paths)}")
    return files


def dataset_class(module: str, name: str) -> type:
    """``matcher.data.<module>.<name>``, imported on demand; ImportError naming what is missing otherwise."""
    try:
        return getattr(importlib.import_module(f"matcher.data.{module}"), name)
    except (ImportError, AttributeError) as err:
        raise ImportError(f"--dataset {module} needs matcher.data.{module}.{name}, which is not available ({err})") from None


def build_dataset(args: argparse.Namespace) -> tuple[Any, dict[str, Any]]:
    """The dataset named by ``--dataset`` and the settings that decide its samples (cache fingerprint).

    Raises FileNotFoundError / ValueError for missing inputs, ImportError when the dataset module is absent.
    """
    root = Path(args.data_root).resolve() if args.data_root else None
    if args.dataset != "synthetic" and root is None:
        raise ValueError(f"--data-root is required for --dataset {args.dataset}")
    if args.dataset == "pairs":
        if not args.pairs_file:
            raise ValueError("--dataset pairs needs --pairs-file")
        pairs_file = Path(args.pairs_file).resolve()
        return PairsDataset(root, pairs_file), {"dataset": "pairs", "root": str(root), "pairs_file": str(pairs_file)}
    if args.dataset == "synthetic":
        SyntheticDataset = dataset_class("synthetic", "SyntheticDataset")
        length = args.max_pairs if args.max_pairs is not None else args.synthetic_pairs
        size = tuple(args.image_size)
        fingerprint = {"dataset": "synthetic", "image_size": list(size), "seed": args.seed}
        return SyntheticDataset("test", length, size, args.seed), fingerprint
    if args.dataset == "scannet":
        ScanNetDataset = dataset_class("scannet", "ScanNetDataset")
        npz = Path(args.npz or root / "test.npz").resolve()
        intrinsics = Path(args.intrinsics or root / "intrinsics.npz").resolve()
        for p in (npz, intrinsics):
            if not p.is_file():
                raise FileNotFoundError(f"ScanNet index file not found: {p}")
        fingerprint = {"dataset": "scannet", "root": str(root), "npz": str(npz), "intrinsics": str(intrinsics)}
        return ScanNetDataset(root, npz, intrinsics, mode="test"), fingerprint
    if args.dataset == "megadepth":
        from torch.utils.data import ConcatDataset

        MegaDepthDataset = dataset_class("megadepth", "MegaDepthDataset")
        files = scene_info_files(args.scene_info or [str(root / "scene_info")])
        scenes = [MegaDepthDataset(root, f, mode="test", img_resize=args.img_resize) for f in files]
        fingerprint = {
            "dataset": "megadepth",
            "root": str(root),
            "scene_info": [str(f.resolve()) for f in files],
            "img_resize": args.img_resize,
        }
        return ConcatDataset(scenes), fingerprint
    raise ValueError(f"unknown dataset {args.dataset!r}")


def _plain(value: Any) -> Any:
    """A tensor / numpy scalar or a 1-element batch list -> plain Python value (for pair keys)."""
    if isinstance(value, torch.Tensor):
        return value.item() if value.numel() == 1 else value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def pair_key(sample: dict[str, Any], index: int) -> str:
    """Stable identity of a sample for the cache: scene, pair id and image names (the index as fallback)."""
    parts = [_plain(sample.get(k)) for k in ("scene_id", "pair_id", "pair_names")]
    if all(p is None for p in parts):
        return f"index:{index}"
    return "|".join(str(p) for p in parts)


def valid_image(image: torch.Tensor, mask: torch.Tensor | None) -> np.ndarray:
    """Sample image ``(1, H, W)`` -> numpy ``(H', W')`` without the bottom-right zero padding marked by
    ``mask`` (full-resolution or coarse); cropping keeps pixel coordinates unchanged."""
    gray = image.detach().cpu().float().numpy().reshape(image.shape[-2:])
    if mask is None:
        return gray
    mask_np = mask.detach().cpu().numpy().reshape(mask.shape[-2:]).astype(bool)
    if not mask_np.any():
        raise ValueError("image mask is empty")
    step_y, step_x = gray.shape[0] / mask_np.shape[0], gray.shape[1] / mask_np.shape[1]
    rows = int(np.ceil((np.nonzero(mask_np.any(axis=1))[0][-1] + 1) * step_y))
    cols = int(np.ceil((np.nonzero(mask_np.any(axis=0))[0][-1] + 1) * step_x))
    return gray[:rows, :cols]


def load_sample_pair(dataset: Any, index: int) -> LoadedPair:
    """Dataset sample -> :class:`LoadedPair` with K0, K1, T_0to1 and the scales (resized -> K frame) as truth.

    Raises ValueError for a pose or intrinsics that are not finite (e.g. ScanNet's invalid poses)."""
    sample = dataset[index]
    truth = {k: sample[k].detach().cpu().double().numpy() for k in ("K0", "K1", "T_0to1")}
    truth["T_0to1"] = truth["T_0to1"].reshape(4, 4)
    for k in ("scale0", "scale1"):
        truth[k] = sample[k].detach().cpu().double().numpy().reshape(2) if k in sample else np.ones(2)
    if not all(np.isfinite(v).all() for v in truth.values()):
        raise ValueError("missing pose: K, T_0to1 or scale is not finite")
    image0 = valid_image(sample["image0"], sample.get("mask0"))
    image1 = valid_image(sample["image1"], sample.get("mask1"))
    return LoadedPair(pair_key(sample, index), image0, image1, truth)


# ----------------------------------------------------------------------------------------------- metrics
def evaluate_pose_pair(
    prediction: dict[str, np.ndarray], truth: dict[str, np.ndarray], ransac_thr: float, ransac_conf: float, epi_thr: float
) -> dict[str, Any]:
    """LoFTR's protocol on one pair (:func:`matcher.validation.pair_pose_metrics`, shared with training
    validation), keypoints scaled into the K frames, precision at the squared epipolar distance ``epi_thr``.
    Returns ``err_t``, ``err_R``, ``pose_error``, ``precision`` and ``inliers``."""
    kpts0 = prediction["keypoints0"].astype(np.float64) * truth["scale0"]
    kpts1 = prediction["keypoints1"].astype(np.float64) * truth["scale1"]
    metrics = pair_pose_metrics(kpts0, kpts1, truth["K0"], truth["K1"], truth["T_0to1"], ransac_thr, ransac_conf, epi_thr)
    return {k: metrics[k] for k in ("err_t", "err_R", "pose_error", "precision", "inliers")}


def summarize_pose(label: str, records: list[dict[str, Any]], skipped: int) -> dict[str, Any]:
    """Table row of one matcher: AUC@5/10/20 and precision in percent, mean matches, mean ms per pair
    (cached pairs count with the time measured when computed), failed (pose error inf), skipped pairs."""
    aucs = pose_auc([r["pose_error"] for r in records], POSE_AUC_THRESHOLDS)
    return {
        "matcher": label,
        **{k: 100.0 * v for k, v in aucs.items()},
        "precision": 100.0 * float(np.mean([r["precision"] for r in records])) if records else float("nan"),
        "num_matches": float(np.mean([r["num_matches"] for r in records])) if records else float("nan"),
        "time_ms": finite_mean(r["time_ms"] for r in records),
        "failed": int(sum(not np.isfinite(r["pose_error"]) for r in records)),
        "skipped": int(skipped),
        "pairs": len(records),
    }


def dropped_pairs(dataset: Any) -> int:
    """Pairs a dataset left out when it was built (MegaDepth: an image, K or pose missing in the scene info)."""
    return sum(getattr(part, "dropped_incomplete", 0) for part in getattr(dataset, "datasets", [dataset]))


def pose_protocol(
    args: argparse.Namespace, data_fingerprint: dict[str, Any], image_sizes: Any, num_pairs: int, dropped: int = 0
) -> dict[str, Any]:
    """The protocol block printed under the table."""
    pairs = pairs_summary(num_pairs, args.max_pairs)
    if dropped:
        pairs += f"; {dropped} more left out by the dataset (image, K or pose missing in its index)"
    return {
        "dataset": ", ".join(f"{k}={v}" for k, v in data_fingerprint.items()),
        "pairs": pairs,
        "image sizes given to the matchers": size_summary(image_sizes),
        "matcher resize": "none (the dataset's own resizing)" if args.resize is None else f"long side {args.resize} px",
        "keypoints": "scaled by the dataset's scale0/scale1 into the frames of K0/K1",
        "pose estimation": (
            f"cv2.findEssentialMat on K-normalised keypoints, RANSAC threshold {args.ransac_thr} px / "
            f"mean(fx0, fy1) as LoFTR, confidence {args.ransac_conf}; cv2.recoverPose on every candidate E, "
            "the one with the most inliers kept; fewer than 5 matches = failure"
        ),
        "pose error": (
            "max(rotation angle of R_est^T R_gt, angle between translation directions taken as min(e, 180 - e)); "
            "failure = infinity"
        ),
        "AUC": (
            "area under the recall-vs-error curve up to 5/10/20 degrees, divided by the threshold: errors sorted, "
            "curve from (0, 0) through (e_i, i/N), linear between errors below the threshold, flat after the last "
            "one; failures count in N, skipped pairs (unreadable, or without a finite pose) do not and are counted "
            "in the Skipped column; shown in percent"
        ),
        "precision": (
            f"share of matches with squared symmetric epipolar distance (normalised coordinates, true pose) "
            f"< {precision_threshold(args):g}, averaged over pairs (0 for a pair without matches), in percent"
        ),
        "time": timing_protocol(args),
        "numerics": numerics_protocol(args),
        "software": ", ".join(f"{k} {v}" for k, v in software_versions().items()),
        **({"warning": warning} if (warning := opencv_pose_warning()) else {}),
    }


# ----------------------------------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", required=True, choices=["scannet", "megadepth", "synthetic", "pairs"])
    parser.add_argument("--data-root", default=None, help="dataset root (image paths are relative to it)")
    parser.add_argument("--npz", default=None, help="ScanNet: test index npz (default DATA_ROOT/test.npz)")
    parser.add_argument("--intrinsics", default=None, help="ScanNet: intrinsics npz (default DATA_ROOT/intrinsics.npz)")
    parser.add_argument("--scene-info", nargs="+", default=None, help="MegaDepth: scene-info .npz files or folders")
    parser.add_argument("--img-resize", type=long_side_argument, default=840, help="MegaDepth: long side of the test images (LoFTR: 840; LoFTR-QuadTree: 832)")
    parser.add_argument("--pairs-file", default=None, help="pairs: SuperGlue-style pairs-with-ground-truth file")
    parser.add_argument("--image-size", type=int, nargs=2, default=[240, 320], metavar=("H", "W"), help="synthetic: image size")
    parser.add_argument("--synthetic-pairs", type=int, default=100, help="synthetic: number of pairs (or --max-pairs)")
    parser.add_argument("--seed", type=int, default=0, help="synthetic: scene seed")
    parser.add_argument("--resize", type=long_side_argument, default=None, help="long side the matchers resize images to (default: as given)")
    parser.add_argument("--ransac-thr", type=float, default=0.5, help="RANSAC threshold in pixels (LoFTR: 0.5)")
    parser.add_argument("--ransac-conf", type=float, default=POSE_RANSAC_CONF, help="RANSAC confidence")
    parser.add_argument(
        "--epi-thr", type=float, default=None,
        help="squared symmetric epipolar distance (normalised coordinates) below which a match is correct, for "
        "the precision column (default: 1e-4 for megadepth, 5e-4 otherwise, LoFTR's recommendation)",
    )
    add_common_arguments(parser)
    return parser


def precision_threshold(args: argparse.Namespace) -> float:
    """The precision threshold of a run: ``--epi-thr``, else the dataset's."""
    return args.epi_thr if args.epi_thr is not None else epipolar_precision_threshold(args.dataset)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the benchmark; prints the table and returns ``{"rows", "markdown", "json_path", "md_path",
    "computed", "cached", "skipped", "records"}``. Raises CacheMismatchError when a cache holds other
    settings."""
    args = build_parser().parse_args(argv)
    if warning := opencv_pose_warning():
        print(f"warning: {warning}", file=sys.stderr)
    dataset, data_fingerprint = build_dataset(args)
    data_fingerprint = {**data_fingerprint, "resize": args.resize}
    num_pairs = len(dataset) if args.max_pairs is None else min(args.max_pairs, len(dataset))
    run, labels = run_script_pairs(
        args,
        f"pose-{args.dataset}",
        num_pairs,
        lambda i: load_sample_pair(dataset, i),
        lambda pred, pair: evaluate_pose_pair(pred, pair.truth, args.ransac_thr, args.ransac_conf, precision_threshold(args)),
        data_fingerprint,
        description=f"pose/{args.dataset}",
    )
    rows = [summarize_pose(label, recs, len(run.skipped)) for label, recs in run.records.items()]
    title = f"Relative pose: {args.dataset}"
    protocol = pose_protocol(args, data_fingerprint, run.image_sizes, len(dataset), dropped_pairs(dataset))
    return report_run(args.out, f"pose_{args.dataset}", title, rows, POSE_COLUMNS, protocol, run, labels)


if __name__ == "__main__":
    run_script(main)
