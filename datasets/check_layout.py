"""Check that the files a data config needs are where the datasets will look for them.

Usage (from the repository root, where the configs' relative paths resolve)::

    python datasets/check_layout.py configs/data/scannet.yaml
    python datasets/check_layout.py configs/data/megadepth.yaml root=/mnt/megadepth --show 20

First checks that every path the config names (``root``, ``*_index_dir``, ``*_intrinsics``, ``val_npz``,
``*_list``, ``image_dir`` ...) exists, listing all that do not. Then builds the training and validation sets
with :func:`matcher.data_factory.build_datasets` (so index files are found and read exactly as in training)
and walks every pair's file paths WITHOUT decoding them:
ScanNet colour / pose (and depth where the dataset reads it), MegaDepth images (and depth h5 where read),
the image files of a homography folder. Prints, per split, the number of datasets (scenes), pairs and
distinct files, the training scenes left without a pair (by the overlap filter, say), and the first missing
files. Exit status: 0 when everything is present, 1 when a file (or an index file, which makes building
fail) is missing or no training pair is left (training would refuse to start), 2 for a bad config or an
index file that cannot be used.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

from omegaconf import DictConfig, OmegaConf
from torch.utils.data import ConcatDataset, Dataset, Subset


@dataclass
class SplitReport:
    """What one split needs: ``datasets`` (scenes / folders), ``pairs``, distinct ``files`` and those missing."""

    name: str
    datasets: int = 0
    pairs: int = 0
    files: int = 0
    missing: list[Path] = field(default_factory=list)
    note: str = ""


def leaf_datasets(dataset: Dataset) -> Iterator[Dataset]:
    """The datasets inside (nested) ConcatDataset / Subset wrappers."""
    if isinstance(dataset, ConcatDataset):
        for part in dataset.datasets:
            yield from leaf_datasets(part)
    elif isinstance(dataset, Subset):
        yield from leaf_datasets(dataset.dataset)
    else:
        yield dataset


def scannet_files(ds, index: int) -> list[Path]:
    """Files ScanNetDataset reads for pair ``index`` (depth only when it loads depth)."""
    paths = ds.paths(index)
    keys = ["color0", "color1", "pose0", "pose1"] + (["depth0", "depth1"] if ds.load_depth else [])
    return [paths[k] for k in keys]


def megadepth_files(ds, index: int) -> list[Path]:
    """Files MegaDepthDataset reads for pair ``index`` (depth only when it loads depth)."""
    i0, i1, _ = ds.pairs[index]
    files = [ds.root_dir / ds.image_paths[i] for i in (i0, i1)]
    if ds.load_depth:
        files += [ds.root_dir / ds.depth_paths[i] for i in (i0, i1)]
    return files


def dataset_files(ds: Dataset) -> tuple[int, Iterator[list[Path]], str]:
    """``(pairs, per-pair file lists, note)`` of one leaf dataset."""
    from matcher.data.homography import HomographyDataset
    from matcher.data.megadepth import MegaDepthDataset
    from matcher.data.scannet import ScanNetDataset

    if isinstance(ds, ScanNetDataset):
        return len(ds), (scannet_files(ds, i) for i in range(len(ds))), ""
    if isinstance(ds, MegaDepthDataset):
        note = f"{ds.dropped_incomplete} pair(s) without image / depth / K / pose dropped" if ds.dropped_incomplete else ""
        return len(ds), (megadepth_files(ds, i) for i in range(len(ds))), note
    if isinstance(ds, HomographyDataset):
        return len(ds), iter([list(ds.files)]), f"pairs generated from {len(ds.files)} image(s)"
    return len(ds), iter([]), f"{type(ds).__name__}: procedural, no files"


def check_split(name: str, dataset: Dataset) -> SplitReport:
    """Walk every pair of ``dataset``; each distinct path is checked once."""
    report, seen = SplitReport(name), set()
    notes = []
    for ds in leaf_datasets(dataset):
        report.datasets += 1
        pairs, file_lists, note = dataset_files(ds)
        report.pairs += pairs
        notes += [note] if note else []
        for files in file_lists:
            for path in files:
                if path in seen:
                    continue
                seen.add(path)
                if not path.is_file():
                    report.missing.append(path)
    report.files = len(seen)
    report.note = "; ".join(sorted(set(notes)))
    return report


def print_report(report: SplitReport, show: int) -> None:
    print(f"{report.name}: {report.datasets} dataset(s), {report.pairs} pair(s), {report.files} distinct file(s), "
          f"{len(report.missing)} missing")
    if report.note:
        print(f"  note: {report.note}")
    for path in report.missing[:show]:
        print(f"  missing: {path}")
    if len(report.missing) > show:
        print(f"  ... and {len(report.missing) - show} more")


#: Config keys that name files or folders (those absent from a config, or null, are not checked).
PATH_KEYS = (
    "root", "train_index_dir", "train_list", "train_intrinsics", "val_root", "val_npz", "val_intrinsics",
    "val_index_dir", "val_list", "image_dir", "val_image_dir",
)


def missing_config_paths(cfg: DictConfig) -> list[str]:
    """``key: path`` for each path named by the config that does not exist (all reported at once, where
    building the datasets would stop at the first)."""
    return [f"{key}: {cfg[key]}" for key in PATH_KEYS if cfg.get(key) and not Path(str(cfg[key])).exists()]


def load_config(path: str | Path, overrides: Sequence[str]) -> DictConfig:
    """A data config (``configs/data/*.yaml``) with ``key=value`` overrides (OmegaConf dotlist)."""
    cfg = OmegaConf.load(path)
    if overrides:
        cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(list(overrides)))
    return cfg


def main(argv: Sequence[str] | None = None) -> int:
    """Run the check; returns the exit status (0 complete, 1 missing files, 2 bad config)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", help="data config, e.g. configs/data/scannet.yaml")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. root=/mnt/scannet")
    parser.add_argument("--show", type=int, default=5, help="missing files to list per split")
    args = parser.parse_args(argv)
    from matcher.data_factory import build_datasets

    try:
        cfg = load_config(args.config, args.overrides)
    except Exception as err:  # unreadable yaml, bad override
        print(f"error: cannot read config {args.config}: {err}", file=sys.stderr)
        return 2
    print(f"data config {args.config} (dataset {cfg.get('name')!r}), paths relative to {Path.cwd()}")
    absent = missing_config_paths(cfg)
    for item in absent:
        print(f"missing: {item}")
    if absent:
        print(f"FAILED: {len(absent)} path(s) of the config missing")
        return 1
    try:
        train, groups, _, val = build_datasets(cfg)
    except FileNotFoundError as err:
        print(f"missing: {err}")
        return 1
    except (ValueError, KeyError, AttributeError, TypeError, IndexError) as err:
        # bad values or keys missing from the config, or an index file that cannot be used
        print(f"error: cannot build the datasets (a bad config value or an unusable index file): {err}", file=sys.stderr)
        return 2
    reports = [check_split("train", train), check_split("val", val)]
    for report in reports:
        print_report(report, args.show)
    empty = sum(1 for group in groups if not len(group))
    if empty:
        print(f"  note: {empty} of {len(groups)} training scene(s) have no pair (overlap filter, or an empty index); "
              "under DDP a rank draws their share from its other scenes")
    missing = sum(len(r.missing) for r in reports)
    failures = [f"{missing} missing file(s)"] if missing else []
    if not reports[0].pairs:
        failures.append("no training pair is left (min_overlap_score, max_overlap_score or train_list?): training "
                        "would refuse to start")
    print(f"FAILED: {'; '.join(failures)}" if failures else "OK: every file is present")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
