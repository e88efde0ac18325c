"""Where QuadTree attention looks: for one query pixel of image0, the regions of image1 kept at each
level (coarse to fine) of one coarse layer and head -- the picture the paper uses to explain the method.

    python demo/attention.py IMAGE0 IMAGE1 --x 320 --y 240 [--layer 1] [--head 0] [--out attention.png]
"""

from __future__ import annotations

import argparse
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402

from matcher.image_io import load_gray, resize_long_side  # noqa: E402

from matcher.model import matcher_with_description  # noqa: E402


def level_cells(
    selection: list[torch.Tensor], hw_query: tuple[int, int], hw_keys: tuple[int, int], qx: int, qy: int, head: int
):
    """Key cells ``[(level, size_px, [(kx, ky), ...]), ...]`` coarsest first for the query at coarse cell
    (qx, qy) of a grid ``hw_query``, keys on the grid ``hw_keys`` (image1's in a cross layer, image0's in a
    self layer); the finest level lists the candidates (children of the keys picked one level up)."""
    num_sel = len(selection)
    out = []
    for step, sel in enumerate(selection):
        level = num_sel - step  # selection[0] is the coarsest level, L-1 == num_sel
        w_q = hw_query[1] >> level
        w_k = hw_keys[1] >> level
        q = (qy >> level) * w_q + (qx >> level)
        keys = sel[head, q].tolist()
        out.append((level, 8 << level, [(k % w_k, k // w_k) for k in keys]))
    _, _, last = out[-1]
    children = [(2 * kx + dx, 2 * ky + dy) for kx, ky in last for dy in (0, 1) for dx in (0, 1)]
    out.append((0, 8, children))
    return out


def layer_cells(model: torch.nn.Module, result: dict, layer_index: int, qx: int, qy: int, head: int):
    """``(kind, levels)``: the layer's kind (self / cross) and :func:`level_cells` on the grid its keys come
    from, for ``result`` of ``model.attention_selection``."""
    kind = model.loftr_coarse.layer_names[layer_index]
    hw_keys = result["hw1"] if kind == "cross" else result["hw0"]
    return kind, level_cells(result["selection"], result["hw0"], hw_keys, qx, qy, head)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("image0")
    p.add_argument("image1")
    p.add_argument("--x", type=float, required=True, help="query pixel x in image0 (original pixels)")
    p.add_argument("--y", type=float, required=True, help="query pixel y in image0 (original pixels)")
    p.add_argument("--layer", type=int, default=1, help="coarse layer index (odd = cross layers by default)")
    p.add_argument("--head", type=int, default=0, help="attention head")
    p.add_argument("--weights", help="shipped weights name or checkpoint path (default: the shipped default)")
    p.add_argument("--config", help="model config name, for a checkpoint without a .yaml beside it (needs --weights)")
    p.add_argument("--resize", type=int, default=640, help="long side to resize to")
    p.add_argument("--out", default="attention.png")
    args = p.parse_args(argv)
    try:
        model, which = matcher_with_description(args.weights, args.config)
        grays = [load_gray(path, name) for path, name in ((args.image0, "image0"), (args.image1, "image1"))]
        (g0, s0), (g1, _) = (resize_long_side(g, args.resize) for g in grays)
        # the coarse cell holding the query pixel's centre, pixel centres at integers on both sides
        qx, qy = int((args.x + 0.5) / s0[0] // 8), int((args.y + 0.5) / s0[1] // 8)
        if not (0 <= qx < -(-g0.shape[1] // 8) and 0 <= qy < -(-g0.shape[0] // 8)):
            raise ValueError(f"query ({args.x}, {args.y}) lies outside image0")
        if not 0 <= args.head < model.config.coarse.nhead:
            raise ValueError(f"--head must be in [0, {model.config.coarse.nhead})")
        to_t = lambda g: torch.from_numpy(np.ascontiguousarray(g))[None, None]  # noqa: E731
        result = model.attention_selection(to_t(g0), to_t(g1), args.layer)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    kind, levels = layer_cells(model, result, args.layer, qx, qy, args.head)
    target = g1 if kind == "cross" else g0
    fig, axes = plt.subplots(1, len(levels) + 1, figsize=(4 * (len(levels) + 1), 3.4))
    axes[0].imshow(g0, cmap="gray")
    axes[0].add_patch(Rectangle((qx * 8, qy * 8), 8, 8, edgecolor="red", facecolor="red"))
    axes[0].set_title("query (image0)")
    colors = ["tab:orange", "tab:green", "tab:cyan", "tab:pink"]
    for ax, (level, size, cells), color in zip(axes[1:], levels, colors * 2):
        ax.imshow(target, cmap="gray")
        for kx, ky in cells:
            ax.add_patch(Rectangle((kx * size, ky * size), size, size, edgecolor=color, facecolor=color, alpha=0.35))
        label = "candidates" if level == 0 else f"top-{len(cells)}"
        ax.set_title(f"level {level} ({size} px cells): {label}")
    for ax in axes:
        ax.axis("off")
    fig.suptitle(f"QuadTree {kind} layer {args.layer}, head {args.head} -- {which}", fontsize=9)
    fig.tight_layout()
    fig.savefig(args.out, dpi=100)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
