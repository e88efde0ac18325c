"""Datasets named by a data config, split per rank for distributed training."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig
from torch.utils.data import ConcatDataset, Dataset

#: Size of the virtual index space of procedural training data (scenes are generated per index).
VIRTUAL_TRAIN_SCENES = 10_000_000


def _scene_files(folder: str | Path, suffix: str = ".npz") -> list[Path]:
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"index folder not found: {folder}")
    files = sorted(folder.glob(f"*{suffix}"))
    if not files:
        raise FileNotFoundError(f"no {suffix} index files in {folder}")
    return files


def _grouped(datasets: list[Dataset]) -> tuple[ConcatDataset, list[list[int]]]:
    """Concatenate per-scene datasets; the index groups let the sampler draw per scene."""
    groups, start = [], 0
    for ds in datasets:
        groups.append(list(range(start, start + len(ds))))
        start += len(ds)
    return ConcatDataset(datasets), [g for g in groups if g]


def build_datasets(cfg: DictConfig, rank: int = 0, world: int = 1) -> tuple[Dataset, list, int, Dataset]:
    """Returns ``(train_set, index_groups, samples_per_group, val_set)``.

    Every rank draws ``samples_per_group`` pairs per group and epoch: for scene datasets the groups are the
    rank's own scenes (scenes split round-robin over ranks), for procedural data one disjoint index range.
    """
    name = cfg.name
    if name == "synthetic":
        from .data.synthetic import SyntheticDataset

        size = tuple(cfg.image_size)
        train = SyntheticDataset("train", VIRTUAL_TRAIN_SCENES, size, cfg.seed, cfg.photometric)
        val = SyntheticDataset("val", cfg.val_length, size, cfg.seed, cfg.photometric)
        per_rank = VIRTUAL_TRAIN_SCENES // world
        group = range(rank * per_rank, (rank + 1) * per_rank)
        return train, [group], max(1, cfg.train_length // world), val
    if name == "homography":
        from .data.homography import HomographyDataset

        size = tuple(cfg.image_size)
        train = HomographyDataset(cfg.image_dir, VIRTUAL_TRAIN_SCENES, size, cfg.seed, split="train")
        val = HomographyDataset(cfg.val_image_dir or cfg.image_dir, cfg.val_length, size, cfg.seed, split="val")
        per_rank = VIRTUAL_TRAIN_SCENES // world
        return train, [range(rank * per_rank, (rank + 1) * per_rank)], max(1, cfg.train_length // world), val
    if name == "scannet":
        from .data.scannet import ScanNetDataset

        files = _scene_files(cfg.train_index_dir)[rank::world]
        scenes = [
            ScanNetDataset(Path(cfg.root) / "train", f, cfg.train_intrinsics, "train", cfg.min_overlap_score, tuple(cfg.image_size))
            for f in files
        ]
        train, groups = _grouped(scenes)
        val = ScanNetDataset(cfg.val_root, cfg.val_npz, cfg.val_intrinsics, "val", 0.0, tuple(cfg.image_size))
        return train, groups, cfg.samples_per_scene, val
    if name == "megadepth":
        from .data.megadepth import MegaDepthDataset

        files = _scene_files(cfg.train_index_dir)[rank::world]
        scenes = [MegaDepthDataset(cfg.root, f, "train", cfg.min_overlap_score, cfg.img_resize) for f in files]
        train, groups = _grouped(scenes)
        val = ConcatDataset([MegaDepthDataset(cfg.root, f, "val", 0.0, cfg.img_resize) for f in _scene_files(cfg.val_index_dir)])
        return train, groups, cfg.samples_per_scene, val
    raise ValueError(f"unknown dataset {name!r}: synthetic, homography, scannet or megadepth")
