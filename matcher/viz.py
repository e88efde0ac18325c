"""Plotting matches (matplotlib, no display needed)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: never needs a display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def side_by_side(image0: np.ndarray, image1: np.ndarray, gap: int = 10) -> tuple[np.ndarray, int]:
    """Two gray images ``(H, W)`` in [0, 1] on one canvas; returns it and the x offset of image1."""
    h = max(image0.shape[0], image1.shape[0])
    w = image0.shape[1] + gap + image1.shape[1]
    canvas = np.ones((h, w), np.float32)
    canvas[: image0.shape[0], : image0.shape[1]] = image0
    offset = image0.shape[1] + gap
    canvas[: image1.shape[0], offset:] = image1
    return canvas, offset


def match_colors(values: np.ndarray, correct: np.ndarray | None = None, cmap: str = "jet") -> np.ndarray:
    """RGBA colours ``(M, 4)``: green / red by ``correct`` when given, else ``values`` in [0, 1] on a map."""
    if correct is not None:
        colors = np.zeros((len(correct), 4))
        colors[:, 3] = 1.0
        colors[correct, 1] = 0.8
        colors[~correct, 0] = 1.0
        return colors
    return matplotlib.colormaps[cmap](np.clip(values, 0.0, 1.0))


def plot_matches(
    image0: np.ndarray,
    image1: np.ndarray,
    keypoints0: np.ndarray,
    keypoints1: np.ndarray,
    confidence: np.ndarray | None = None,
    correct: np.ndarray | None = None,
    title: str | None = None,
    max_matches: int | None = None,
    path: str | Path | None = None,
    dpi: int = 100,
) -> plt.Figure:
    """Side-by-side images with a line per match, coloured by confidence (or correctness).

    Args:
        image0, image1: gray ``(H, W)`` in [0, 1], the frames the keypoints are in.
        keypoints0, keypoints1: ``(M, 2)`` pixel (x, y).
        confidence: ``(M,)`` in [0, 1] for colours; correct: ``(M,)`` bool overrides them.
        max_matches: draw at most this many (the most confident).
        path: save the figure there (PNG, PDF, ...) and close it.
    """
    if max_matches is not None and max_matches < 0:
        raise ValueError(f"max_matches must be at least 0 or None, got {max_matches}")  # [:-3] would drop 3
    order = np.argsort(-confidence) if confidence is not None else np.arange(len(keypoints0))
    if max_matches is not None:
        order = order[:max_matches]
    canvas, offset = side_by_side(image0, image1)
    colors = match_colors(
        confidence[order] if confidence is not None else np.ones(len(order)),
        None if correct is None else np.asarray(correct, bool)[order],
    )
    fig = plt.figure(figsize=(canvas.shape[1] / dpi, canvas.shape[0] / dpi + (0.3 if title else 0)), dpi=dpi)
    ax = fig.add_axes([0, 0, 1, 1 if not title else canvas.shape[0] / (canvas.shape[0] + 30)])
    ax.imshow(canvas, cmap="gray", vmin=0, vmax=1)
    ax.axis("off")
    if len(order):
        k0, k1 = keypoints0[order], keypoints1[order] + np.array([offset, 0])
        for a, b, c in zip(k0, k1, colors):
            ax.plot([a[0], b[0]], [a[1], b[1]], color=c, linewidth=0.8, alpha=0.8)
        ax.scatter(k0[:, 0], k0[:, 1], c=colors, s=3)
        ax.scatter(k1[:, 0], k1[:, 1], c=colors, s=3)
    if title:
        fig.suptitle(title, fontsize=9, y=0.995, va="top")
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=dpi)
        plt.close(fig)
    return fig


def plot_keypoints(image: np.ndarray, keypoints: np.ndarray, path: str | Path | None = None, color: str = "lime") -> plt.Figure:
    """One image with keypoints ``(N, 2)`` overlaid."""
    fig, ax = plt.subplots(figsize=(image.shape[1] / 100, image.shape[0] / 100), dpi=100)
    ax.imshow(image, cmap="gray", vmin=0, vmax=1)
    ax.scatter(keypoints[:, 0], keypoints[:, 1], s=3, c=color)
    ax.axis("off")
    if path is not None:
        fig.savefig(path, bbox_inches="tight")
        plt.close(fig)
    return fig
