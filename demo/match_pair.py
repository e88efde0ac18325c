"""Match two images and save a picture of the matches.

    python demo/match_pair.py                          # the sample pair shipped in demo/assets/
    python demo/match_pair.py a.jpg b.png --out matches.png --resize 640 --max-matches 500

Give both images or none (none = the sample pair). With ground truth (``--truth`` npz holding K0, K1,
T_0to1; the sample pair ships one) matches are coloured green / red by LoFTR's epipolar criterion (squared
symmetric epipolar distance in normalised coordinates below 5e-4) instead of by confidence, and the
precision is printed.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


import numpy as np

from matcher.allocator import reuse_freed_memory
from matcher.evaluation import (
    add_precision_arguments, count_argument, device_argument, feature_dtype_argument, long_side_argument,
    positive_int_argument, set_feature_dtype,
)
from matcher.image_io import load_gray
from matcher.metrics import epipolar_precision
from matcher.model import matcher_with_description
from matcher.viz import plot_matches

ASSETS = Path(__file__).resolve().parent / "assets"


def correct_matches(result: dict[str, np.ndarray], truth_path: str) -> np.ndarray:
    """Per-match correctness by LoFTR's criterion (squared symmetric epipolar distance in normalised
    coordinates below 5e-4, :func:`matcher.metrics.epipolar_precision`), from an npz with K0, K1, T_0to1."""
    if not Path(truth_path).is_file():
        raise FileNotFoundError(f"ground-truth file not found: {truth_path}")
    with np.load(truth_path) as truth:
        K0, K1, T = (np.asarray(truth[k], dtype=np.float64) for k in ("K0", "K1", "T_0to1"))
    _, correct = epipolar_precision(result["keypoints0"], result["keypoints1"], T, K0, K1)
    return np.asarray(correct, dtype=bool)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("image0", nargs="?", help="first image (give both images, or none for the sample pair)")
    p.add_argument("image1", nargs="?", help="second image")
    p.add_argument("--weights", help="shipped weights name or checkpoint path (default: the shipped default)")
    p.add_argument("--config", help="model config name, for a checkpoint without a .yaml beside it (needs --weights)")
    p.add_argument("--resize", type=long_side_argument, help="long side to resize to (default: the config's inference.resize)")
    p.add_argument("--out", default="matches.png", help="output picture")
    p.add_argument("--max-matches", type=count_argument, default=1000, help="draw at most this many matches")
    p.add_argument("--device", default="cpu", type=device_argument, help="cpu, cuda or cuda:N")
    p.add_argument("--max-coarsest-tokens", type=positive_int_argument, help="large images: bound the coarsest QuadTree level to this "
                   "many tokens by adding levels (coarse.max_coarsest_tokens; 300 is the trained size at 640x480)")
    add_precision_arguments(p, default=None)
    p.add_argument("--truth", help="npz with K0, K1, T_0to1 (default: the sample pair's, for the sample pair)")
    args = p.parse_args(argv)
    if args.image1 is None:
        if args.image0 is not None:
            p.error(f"give two images (IMAGE0 IMAGE1), or none for the sample pair; got only {args.image0}")
        args.image0, args.image1 = str(ASSETS / "pair_a.png"), str(ASSETS / "pair_b.png")
    sample = (ASSETS / "pair_a.png").resolve(), (ASSETS / "pair_b.png").resolve()
    if args.truth is None and (Path(args.image0).resolve(), Path(args.image1).resolve()) == sample:
        args.truth = str(ASSETS / "pair_truth.npz")
    try:
        model, which = matcher_with_description(args.weights, args.config)
        model = model.to(args.device)
        set_feature_dtype(model, feature_dtype_argument(args))
        if args.max_coarsest_tokens is not None:
            model.set_max_coarsest_tokens(args.max_coarsest_tokens)
        resize = args.resize if args.resize is not None else "config"
        images = [load_gray(path, name) for path, name in ((args.image0, "image0"), (args.image1, "image1"))]
        start = time.perf_counter()
        result = model.match(images[0], images[1], resize=resize)
        elapsed = time.perf_counter() - start
        correct = correct_matches(result, args.truth) if args.truth else None
    except (ValueError, FileNotFoundError, KeyError, RuntimeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    n = len(result["confidence"])
    print(f"{n} matches in {elapsed:.2f} s on {args.device} (backbone + coarse transformer in {model.feature_dtype()}) "
          f"with {which}")
    title = f"{n} matches, {elapsed:.2f} s ({which.split(':')[0]})"
    if correct is not None and n:
        share = float(correct.mean())
        print(f"epipolar precision (LoFTR's criterion: squared symmetric epipolar distance < 5e-4): "
              f"{100 * share:.1f}% of {n} matches correct")
        title += f", {100 * share:.0f}% correct"
    plot_matches(images[0], images[1], result["keypoints0"], result["keypoints1"], result["confidence"],
                 correct=correct, title=title, max_matches=args.max_matches, path=args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    reuse_freed_memory()  # process-wide malloc tuning, for command-line runs only (see matcher/allocator.py)
    sys.exit(main())
