"""Datasets named by a data config, split per rank for distributed training."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from omegaconf import DictConfig
from torch.utils.data import ConcatDataset, Dataset

#: Size of the virtual index space of procedural training data (scenes are generated per index).
VIRTUAL_TRAIN_SCENES = 10_000_000

#: Seed of the shuffle that deals scene files to DDP ranks (the same on every rank).
SCENE_SPLIT_SEED = 0


def _scene_files(folder: str | Path, suffix: str = ".npz", list_file: str | Path | None = None) -> list[Path]:
    """Index files of a folder, sorted; with ``list_file`` (LoFTR's ``train_list.txt`` style: one file stem per
    line, first token, '#' comments) only the listed ones, each of which must exist."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"index folder not found: {folder}")
    if list_file:
        list_file = Path(list_file)
        if not list_file.is_file():
            raise FileNotFoundError(f"scene list not found: {list_file}")
        stems = [line.split()[0] for line in list_file.read_text().splitlines() if line.strip() and not line.lstrip().startswith("#")]
        files = [folder / (stem if stem.endswith(suffix) else stem + suffix) for stem in stems]
        for f in files:
            if not f.is_file():
                raise FileNotFoundError(f"index file listed in {list_file} not found: {f}")
        if not files:
            raise FileNotFoundError(f"scene list {list_file} is empty")
        return sorted(files)
    files = sorted(folder.glob(f"*{suffix}"))
    if not files:
        raise FileNotFoundError(f"no {suffix} index files in {folder}")
    return files


def rank_scenes(files: list[Path], rank: int, world: int, seed: int = SCENE_SPLIT_SEED) -> list[Path]:
    """This rank's share of the scene index files.

    With several ranks the files are shuffled with ``seed`` and padded to a multiple of ``world`` with randomly
    repeated files (as LoFTR does), then dealt round-robin: every rank gets the same number of scenes, so every
    rank takes the same number of steps per epoch (under DDP each step waits for all ranks' gradients, and a
    rank with more steps would hang at the end of the epoch).
    """
    if world <= 1:
        return list(files)
    rng = np.random.default_rng(seed)
    order = [files[i] for i in rng.permutation(len(files))]
    order += [files[i] for i in rng.choice(len(files), -len(files) % world)]
    return order[rank::world]


def _grouped(datasets: list[Dataset]) -> tuple[ConcatDataset, list[list[int]]]:
    """Concatenate per-scene datasets; the index groups (one per scene, empty for a scene without pairs) let
    the sampler draw per scene."""
    groups, start = [], 0
    for ds in datasets:
        groups.append(list(range(start, start + len(ds))))
        start += len(ds)
    return ConcatDataset(datasets), groups


def build_datasets(cfg: DictConfig, rank: int = 0, world: int = 1) -> tuple[Dataset, list, int, Dataset]:
    """Returns ``(train_set, index_groups, samples_per_group, val_set)``.

    Every rank draws ``samples_per_group`` pairs per group and epoch: for scene datasets the groups are the
    rank's own scenes (:func:`rank_scenes`: the same number on every rank; a scene without pairs is an empty
    group, whose draw the sampler takes from the rank's other scenes), for procedural data one disjoint index
    range.
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
        # Without a separate validation folder the last val_fraction of image_dir's sorted files is held out.
        val_dir = cfg.get("val_image_dir") or None
        options = dict(
            val_fraction=0.0 if val_dir else float(cfg.get("val_fraction", 0.1)),
            photometric=bool(cfg.get("photometric", True)),
            max_angle=float(cfg.get("max_angle", 25.0)),
            scale_range=tuple(cfg.get("scale_range", (0.8, 1.25))),
            max_shift=float(cfg.get("max_shift", 0.12)),
        )
        train = HomographyDataset(cfg.image_dir, VIRTUAL_TRAIN_SCENES, size, cfg.seed, split="train", **options)
        val = HomographyDataset(val_dir or cfg.image_dir, cfg.val_length, size, cfg.seed, split="val", **options)
        per_rank = VIRTUAL_TRAIN_SCENES // world
        return train, [range(rank * per_rank, (rank + 1) * per_rank)], max(1, cfg.train_length // world), val
    if name == "scannet":
        from .data.scannet import ScanNetDataset

        size = tuple(cfg.image_size)
        k_size = tuple(cfg.get("intrinsics_size", (480, 640)))
        files = rank_scenes(_scene_files(cfg.train_index_dir, list_file=cfg.get("train_list")), rank, world)
        scenes = [
            ScanNetDataset(Path(cfg.root) / "train", f, cfg.train_intrinsics, "train", cfg.min_overlap_score, size, intrinsics_size=k_size)
            for f in files
        ]
        train, groups = _grouped(scenes)
        # Validation needs images, K and poses only: depth is not read (ScanNet-1500 copies may lack it).
        val = ScanNetDataset(cfg.val_root, cfg.val_npz, cfg.val_intrinsics, "val", 0.0, size, intrinsics_size=k_size, load_depth=False)
        return train, groups, cfg.samples_per_scene, val
    if name == "megadepth":
        from .data.megadepth import MegaDepthDataset

        options = dict(
            df=cfg.get("df", 8), img_padding=bool(cfg.get("img_padding", True)), depth_padding=cfg.get("depth_padding", 2000),
        )
        files = rank_scenes(_scene_files(cfg.train_index_dir, list_file=cfg.get("train_list")), rank, world)
        scenes = [
            MegaDepthDataset(
                cfg.root, f, "train", cfg.min_overlap_score, cfg.img_resize, max_overlap_score=float(cfg.get("max_overlap_score", 1.0)), **options
            )
            for f in files
        ]
        train, groups = _grouped(scenes)
        # Validation needs images, K and poses only: depth is not read (MegaDepth-1500 ships no depth maps).
        val_root = cfg.get("val_root") or cfg.root
        val = ConcatDataset(
            [
                MegaDepthDataset(val_root, f, "val", 0.0, cfg.img_resize, **{**options, "load_depth": False, "depth_padding": False})
                for f in _scene_files(cfg.val_index_dir, list_file=cfg.get("val_list"))
            ]
        )
        return train, groups, cfg.samples_per_scene, val
    raise ValueError(f"unknown dataset {name!r}: synthetic, homography, scannet or megadepth")
