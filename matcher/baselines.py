"""Classical sparse matchers (OpenCV SIFT and ORB) with the same ``match`` contract as ``Matcher.match``.

They are the reference rows of every benchmark table and need no weights:

    >>> m = build_matcher("sift")
    >>> res = m.match("a.jpg", "b.png")        # paths, numpy arrays or tensors
    >>> res["keypoints0"].shape, res["keypoints1"].shape, res["confidence"].shape
    ((M, 2), (M, 2), (M,))

Keypoints come back in each image's ORIGINAL pixel coordinates (x, y), whatever ``resize`` was used.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import cv2
import numpy as np

from .image_io import ImageLike, load_gray, resize_long_side, to_input_pixels

#: Largest Hamming distance between two 256-bit ORB descriptors.
ORB_DESCRIPTOR_BITS = 256

#: Names :func:`build_matcher` maps to the classical matchers.
BASELINE_NAMES = ("sift", "orb")

#: File suffixes :func:`build_matcher` treats as checkpoints of the learned matcher.
CHECKPOINT_SUFFIXES = (".ckpt", ".pt", ".pth", ".safetensors")


def to_uint8_gray(image: ImageLike, resize: int | None = None, name: str = "image") -> tuple[np.ndarray, np.ndarray]:
    """Any supported image -> uint8 grayscale ``(H', W')`` resized to long side ``resize`` (None keeps the size),
    and the scale ``[sx, sy]`` taking its pixel coordinates back to the input's."""
    gray, scale = resize_long_side(load_gray(image, name), resize)
    return np.clip(np.rint(gray * 255.0), 0, 255).astype(np.uint8), scale.astype(np.float64)


def empty_matches() -> dict[str, np.ndarray]:
    """The match dict with no matches: ``keypoints0/1`` ``(0, 2)``, ``confidence`` ``(0,)``, float32."""
    return {
        "keypoints0": np.zeros((0, 2), np.float32),
        "keypoints1": np.zeros((0, 2), np.float32),
        "confidence": np.zeros((0,), np.float32),
    }


def ratio_test_matches(
    desc0: np.ndarray | None, desc1: np.ndarray | None, norm: int, ratio: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Lowe's ratio test on 2-nearest-neighbour brute-force matching.

    Args:
        desc0, desc1: ``(N0, D)`` / ``(N1, D)`` descriptors (None = no keypoints).
        norm: ``cv2.NORM_L2`` (float descriptors) or ``cv2.NORM_HAMMING`` (binary).
        ratio: keep a match when ``d1 < ratio * d2``.
    Returns:
        ``idx0 (M,)``, ``idx1 (M,)`` int indices and ``confidence (M,)`` = ``1 - d1 / d2`` in [0, 1]. With a
        single keypoint in image1 there is no second neighbour and nothing passes.
    """
    if desc0 is None or desc1 is None or len(desc0) == 0 or len(desc1) < 2:
        return np.zeros(0, int), np.zeros(0, int), np.zeros(0, np.float32)
    idx0, idx1, conf = [], [], []
    for pair in cv2.BFMatcher(norm).knnMatch(desc0, desc1, k=2):
        if len(pair) < 2:
            continue
        best, second = pair
        if best.distance < ratio * second.distance:
            idx0.append(best.queryIdx)
            idx1.append(best.trainIdx)
            conf.append(1.0 - best.distance / second.distance)
    return np.asarray(idx0, int), np.asarray(idx1, int), np.asarray(conf, np.float32)


def cross_check_matches(
    desc0: np.ndarray | None, desc1: np.ndarray | None, norm: int, max_distance: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mutual nearest neighbours; ``confidence = 1 - distance / max_distance`` clipped to [0, 1]. Same return
    contract as :func:`ratio_test_matches`."""
    if desc0 is None or desc1 is None or len(desc0) == 0 or len(desc1) == 0:
        return np.zeros(0, int), np.zeros(0, int), np.zeros(0, np.float32)
    found = cv2.BFMatcher(norm, crossCheck=True).match(desc0, desc1)
    idx0 = np.asarray([m.queryIdx for m in found], int)
    idx1 = np.asarray([m.trainIdx for m in found], int)
    dist = np.asarray([m.distance for m in found], np.float32)
    return idx0, idx1, np.clip(1.0 - dist / max_distance, 0.0, 1.0).astype(np.float32)


class _OpenCVFeatureMatcher:
    """Detect-describe-match skeleton shared by the SIFT and ORB matchers."""

    name = "opencv"
    norm = cv2.NORM_L2
    max_distance = 1.0

    def __init__(self, ratio: float | None, cross_check: bool, resize: int | None) -> None:
        if not cross_check and (ratio is None or not 0.0 < ratio <= 1.0):
            raise ValueError(f"ratio must be in (0, 1] (or use cross_check=True), got {ratio}")
        self.ratio = ratio
        self.cross_check = cross_check
        self.resize = resize

    def _detector(self) -> Any:
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        """JSON-serialisable settings that determine this matcher's output (used as a cache fingerprint)."""
        return {
            "matcher": self.name,
            "ratio": self.ratio,
            "cross_check": self.cross_check,
            "resize": self.resize,
            "opencv": cv2.__version__,
        }

    def detect(self, gray_u8: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """uint8 image ``(H, W)`` -> keypoint coordinates ``(N, 2)`` float64 and descriptors ``(N, D)`` or None."""
        keypoints, descriptors = self._detector().detectAndCompute(gray_u8, None)
        coords = np.asarray([kp.pt for kp in keypoints], np.float64).reshape(-1, 2)
        return coords, descriptors

    def match(self, image0: ImageLike, image1: ImageLike, resize: int | None | str = "config") -> dict[str, np.ndarray]:
        """Match two images.

        Args:
            image0, image1: paths, numpy arrays ``(H, W[, C])`` (uint8, uint16 or float in [0, 1]) or
                channels-first tensors; colour is converted to gray.
            resize: long side the images are resized to before detection; "config" uses the ``resize``
                given to the constructor; None keeps the sizes.
        Returns:
            float32 numpy ``keypoints0`` ``(M, 2)``, ``keypoints1`` ``(M, 2)`` in the ORIGINAL pixel
            coordinates of each image and ``confidence`` ``(M,)`` in [0, 1].
        Raises:
            ValueError: unreadable / missing file, empty array, NaN values or a tiny image (as ``Matcher.match``).
        """
        long_side = self.resize if resize == "config" else resize
        gray0, scale0 = to_uint8_gray(image0, long_side, "image0")
        gray1, scale1 = to_uint8_gray(image1, long_side, "image1")
        pts0, desc0 = self.detect(gray0)
        pts1, desc1 = self.detect(gray1)
        if self.cross_check:
            idx0, idx1, conf = cross_check_matches(desc0, desc1, self.norm, self.max_distance)
        else:
            idx0, idx1, conf = ratio_test_matches(desc0, desc1, self.norm, float(self.ratio))
        if len(idx0) == 0:
            return empty_matches()
        return {
            "keypoints0": to_input_pixels(pts0[idx0], scale0).astype(np.float32),
            "keypoints1": to_input_pixels(pts1[idx1], scale1).astype(np.float32),
            "confidence": conf.astype(np.float32),
        }

    def __repr__(self) -> str:
        settings = ", ".join(f"{k}={v}" for k, v in self.describe().items() if k not in ("matcher", "opencv"))
        return f"{type(self).__name__}({settings})"


class SIFTMatcher(_OpenCVFeatureMatcher):
    """OpenCV SIFT keypoints (at most ``max_keypoints``, strongest first) matched with Lowe's ratio test
    (default 0.8) or mutual nearest neighbours (``cross_check=True``; confidence ``1 - d / (512 sqrt 2)``:
    OpenCV's SIFT descriptors are non-negative with norm about 512, so two of them lie at most 512 sqrt 2
    apart, orthogonal)."""

    name = "sift"
    norm = cv2.NORM_L2
    max_distance = 512.0 * 2**0.5

    def __init__(self, max_keypoints: int = 4096, ratio: float = 0.8, cross_check: bool = False, resize: int | None = None) -> None:
        super().__init__(ratio, cross_check, resize)
        self.max_keypoints = int(max_keypoints)

    def _detector(self) -> Any:
        return cv2.SIFT_create(nfeatures=self.max_keypoints)

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "max_keypoints": self.max_keypoints}


class ORBMatcher(_OpenCVFeatureMatcher):
    """OpenCV ORB keypoints (``nfeatures``) matched by Hamming distance with Lowe's ratio test (default 0.8)
    or mutual nearest neighbours (``cross_check=True``; confidence ``1 - d / 256``)."""

    name = "orb"
    norm = cv2.NORM_HAMMING
    max_distance = float(ORB_DESCRIPTOR_BITS)

    def __init__(self, nfeatures: int = 4096, ratio: float = 0.8, cross_check: bool = False, resize: int | None = None) -> None:
        super().__init__(ratio, cross_check, resize)
        self.nfeatures = int(nfeatures)

    def _detector(self) -> Any:
        return cv2.ORB_create(nfeatures=self.nfeatures)

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "nfeatures": self.nfeatures}


def build_matcher(name_or_path: str | Path, device: str = "cpu", config: str | None = None, **kwargs: Any) -> Any:
    """A matcher object with a ``match(image0, image1, resize=...)`` method, from a name or a path.

    Args:
        name_or_path: "sift" / "orb" (classical baselines; ``kwargs`` go to their constructors); a checkpoint
            file (``.ckpt``, ``.pt``, ``.pth``, ``.safetensors``) or the name of weights shipped with the
            project ("default") -> ``Matcher.from_pretrained``; otherwise a model config name or ``.yaml``
            path -> ``Matcher(load_config(...))`` with RANDOM weights (for smoke tests and timing).
        device: torch device of a learned matcher (baselines run on the CPU).
        config: architecture config (name or yaml) of a checkpoint, when no ``.yaml`` sits beside it.
    Returns:
        ``SIFTMatcher``, ``ORBMatcher`` or a ``matcher.Matcher`` in eval mode on ``device``.
    Raises:
        FileNotFoundError / ValueError: for a checkpoint path that does not exist or an unknown config name.
    """
    name = str(name_or_path)
    if name.lower() == "sift":
        return SIFTMatcher(**kwargs)
    if name.lower() == "orb":
        return ORBMatcher(**kwargs)
    if kwargs:
        raise ValueError(f"unexpected options for a learned matcher: {sorted(kwargs)}")
    # Imported here: the baselines must work without building the learned model's modules.
    from .model import WEIGHTS_DIR, Matcher
    from .config import load_config

    path = Path(name)
    if path.suffix in CHECKPOINT_SUFFIXES:
        if not path.is_file():
            raise FileNotFoundError(f"checkpoint not found: {path}")
        model = Matcher.from_pretrained(path, config=config)
    elif not path.suffix and (WEIGHTS_DIR / f"{name}.safetensors").is_file():
        model = Matcher.from_pretrained(name, config=config)
    else:
        model = Matcher(load_config(name))
    return model.to(device).eval()
