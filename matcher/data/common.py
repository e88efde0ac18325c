"""Shared pieces of the file-backed datasets: image reading, bad-file handling, resizing helpers.

Bad data policy (all datasets of this package):
- a file that does not exist raises :class:`FileNotFoundError` naming its path (index files when the dataset is
  built, image / depth / pose files when a sample is read): a missing file is a setup error, never skipped;
- a file that exists but cannot be decoded (corrupt jpg / png, broken h5, malformed pose text) raises
  :class:`CorruptFileError` inside the loader; :class:`SkipCorrupt` turns it into a warning
  (:class:`CorruptDataWarning`, naming the file), increments the dataset's ``skipped`` counter and returns the
  next pair (index + 1, + 2, ... modulo the length, at most ``max_skip`` times). With ``skip_corrupt=False``
  (the default in ``test`` mode, so a benchmark never silently swaps a pair for another) the error propagates.

``skipped`` counts per process: with DataLoader workers each worker has its own copy of the dataset.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import cv2
import numpy as np

#: Modes of the scene datasets.
MODES = ("train", "val", "test")


class CorruptFileError(ValueError):
    """A data file exists but cannot be decoded (the message names the file)."""


class CorruptDataWarning(UserWarning):
    """A sample was skipped because one of its files is corrupt."""


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    return mode


def require_file(path: str | Path, what: str) -> Path:
    """``path`` as a Path; FileNotFoundError naming it (and what it is) when it is not a file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    return path


def load_npz_arrays(path: str | Path, what: str, keys: tuple[str, ...] | None = None) -> dict[str, np.ndarray]:
    """The arrays of an npz archive (all, or those of ``keys`` that it has; no pickles). FileNotFoundError when
    missing, ValueError naming the file when it cannot be read."""
    path = require_file(path, what)
    try:
        with np.load(path, allow_pickle=False) as data:
            return {k: np.asarray(data[k]) for k in data.files if keys is None or k in keys}
    except Exception as err:  # zipfile.BadZipFile, OSError, ValueError (pickled content) ...
        raise ValueError(f"cannot read {what} {path}: {err}") from None


def read_gray_uint8(path: str | Path) -> np.ndarray:
    """Grayscale ``(H, W)`` uint8 image. FileNotFoundError when missing, CorruptFileError when undecodable."""
    path = require_file(path, "image")
    image = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
    if image is None or image.size == 0:
        raise CorruptFileError(f"cannot decode image (corrupt or not an image): {path}")
    return image


def to_unit_float(image: np.ndarray) -> np.ndarray:
    """uint8 image -> float32 in [0, 1]."""
    return image.astype(np.float32) / 255.0


def pad_bottom_right(array: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Zero-pad a 2-D array at the bottom and right to ``size`` (H, W); ValueError when it is larger."""
    h, w = array.shape[:2]
    if h > size[0] or w > size[1]:
        raise ValueError(f"array of size {h}x{w} does not fit the padded size {size[0]}x{size[1]}")
    out = np.zeros(size, array.dtype)
    out[:h, :w] = array
    return out


class SkipCorrupt:
    """Mixin: ``__getitem__`` calls ``self._load(index)`` and, on :class:`CorruptFileError`, moves on to the next
    pair (see the module docstring). Subclasses set ``skip_corrupt``, ``max_skip`` and ``skipped = 0``."""

    skip_corrupt: bool = True
    max_skip: int = 10
    skipped: int = 0

    def _set_mode(self, mode: str, load_depth: bool | None, skip_corrupt: bool | None, max_skip: int) -> None:
        """Scene datasets' mode and its defaults: depth is read and corrupt pairs skipped except in test mode
        (each overridable); the ``skipped`` counter starts at 0."""
        self.mode = check_mode(mode)
        self.load_depth = mode != "test" if load_depth is None else bool(load_depth)
        self.skip_corrupt = mode != "test" if skip_corrupt is None else bool(skip_corrupt)
        self.max_skip, self.skipped = int(max_skip), 0

    def _load(self, index: int) -> dict[str, Any]:  # pragma: no cover - abstract
        raise NotImplementedError

    def __len__(self) -> int:  # pragma: no cover - abstract
        raise NotImplementedError

    def __getitem__(self, index: int) -> dict[str, Any]:
        n = len(self)
        index = int(index)
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range for {type(self).__name__} of length {n}")
        index %= n
        tries = min(self.max_skip + 1, n) if self.skip_corrupt else 1
        last: CorruptFileError | None = None
        for attempt in range(tries):
            i = (index + attempt) % n
            try:
                return self._load(i)
            except CorruptFileError as err:
                if not self.skip_corrupt:
                    raise
                last = err
                self.skipped += 1
                warnings.warn(f"{type(self).__name__}: skipping pair {i}: {err}", CorruptDataWarning, stacklevel=2)
        raise RuntimeError(f"{type(self).__name__}: {tries} consecutive pairs from index {index} are corrupt (last: {last})")
