"""ONNX export of the matcher for a fixed input size (the number of matches stays dynamic)."""

from __future__ import annotations

import copy
import warnings
from pathlib import Path

import torch
from torch import nn

from .image_io import MIN_SIDE
from .model import OUTPUT_KEYS, Matcher


class _ImagesToMatches(nn.Module):
    """Positional-tensor interface for export: (image0, image1) -> the four output tensors."""

    def __init__(self, matcher: Matcher) -> None:
        super().__init__()
        self.matcher = matcher

    def forward(self, image0: torch.Tensor, image1: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = self.matcher({"image0": image0, "image1": image1})
        return tuple(out[k] for k in OUTPUT_KEYS)


def export_onnx(
    matcher: Matcher,
    path: str | Path,
    size0: tuple[int, int] = (480, 640),
    size1: tuple[int, int] | None = None,
    opset: int = 17,
) -> Path:
    """Export ``matcher`` (in eval mode) to ONNX for images of ``size0`` and ``size1`` (H, W), batch 1.

    Inputs ``image0`` ``(1, 1, H0, W0)``, ``image1`` ``(1, 1, H1, W1)`` float32 in [0, 1]; outputs
    ``keypoints0``, ``keypoints1``, ``confidence``, ``batch_indexes`` with a dynamic number of matches
    (zero included). The graph has no mask inputs: give each image at its own size (``size1`` may differ)
    rather than zero-padded to a common one, since padding would be matched like image content. The graph is
    traced on CPU; a model on another device is copied, not moved.
    """
    if matcher.training:
        raise ValueError("export a matcher in eval mode (call .eval())")
    if matcher.config.inference.feature_dtype == "bfloat16":  # autocast would trace bf16 ops ONNX runtimes lack
        raise ValueError("export traces the float32 model: set inference.feature_dtype to 'float32' or 'auto' "
                         "(got 'bfloat16')")
    size1 = size1 or size0
    for name, size in (("size0", size0), ("size1", size1)):
        if len(size) != 2 or not all(isinstance(v, int) and v >= MIN_SIDE for v in size):
            raise ValueError(f"{name} must be (H, W), integers of at least {MIN_SIDE} px (one coarse cell), got {size}")
    dummy = (torch.rand(1, 1, *size0), torch.rand(1, 1, *size1))
    path = Path(path)
    on_cpu = all(p.device.type == "cpu" for p in matcher.parameters())
    cpu_matcher = matcher if on_cpu else copy.deepcopy(matcher).cpu()  # the caller's model stays where it is
    wrapper = _ImagesToMatches(cpu_matcher).eval()  # eval: the exporter restores the wrapper's mode after
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings about Python ints taken from shapes (fixed sizes)
        torch.onnx.export(
            wrapper, dummy, str(path), dynamo=False, opset_version=opset,
            input_names=["image0", "image1"], output_names=list(OUTPUT_KEYS),
            dynamic_axes={k: {0: "num_matches"} for k in OUTPUT_KEYS},
        )
    return path
