"""ResNet-FPN 8/2 backbone: a 1/8 coarse map and a 1/2 fine map from a grayscale image.

Speed: activations are kept channels-last (oneDNN's and cuDNN's native layout: no reorder around every
convolution), and in eval mode each batch norm is folded into the convolution before it, so a conv-BN-ReLU
is one convolution plus one in-place activation instead of three passes over the map. With ``winograd``,
CPU inference runs the 3x3 stride-1 convolutions (95% of the arithmetic) as Winograd F(4x4, 3x3)
(:mod:`matcher.winograd`, float32 results within about 1e-5 of the direct convolution) where the layer is
wide enough for it to be faster on this CPU (:func:`matcher.winograd.pays_off`: every layer on AVX-512,
1.3-1.9x faster there, and on AVX2 with 128-bit vector units; from 160 channels on other AVX2 CPUs).
Training runs the modules as they are (batch statistics). Parameter names are LoFTR's, so its checkpoints
load unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .chunking import chunk_slices, is_tracing
from .winograd import activate_, conv3x3_winograd, pays_off


def conv1x1(in_dim: int, out_dim: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_dim, out_dim, kernel_size=1, stride=stride, bias=False)


def _winograd_applies(x: torch.Tensor, conv: nn.Conv2d, min_channels: int | None = None) -> bool:
    """Whether ``conv`` on ``x`` may run as Winograd: a 3x3 stride-1 convolution wide enough for it
    (:func:`~matcher.winograd.pays_off` with ``min_channels``) in CPU float inference (no autograd, no
    autocast, no tracing for export, where the graph must keep the plain convolution)."""
    return (
        x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64)
        and conv.kernel_size == (3, 3) and conv.stride == (1, 1) and conv.padding == (1, 1)
        and conv.dilation == (1, 1) and conv.groups == 1 and pays_off(conv.in_channels, conv.out_channels, min_channels)
        and not torch.is_grad_enabled() and not torch.is_autocast_enabled("cpu")
        and not is_tracing() and not torch.jit.is_scripting()
    )


def conv_bn(
    x: torch.Tensor, conv: nn.Conv2d, bn: nn.BatchNorm2d, negative_slope: float | None = None, winograd: bool = False,
    min_channels: int | None = None,
) -> torch.Tensor:
    """``act(bn(conv(x)))`` with ``act`` none (``negative_slope`` None), ReLU (0) or LeakyReLU.

    In eval mode one convolution with the batch norm folded into its weight and bias, run as Winograd
    when ``winograd`` is set and :func:`_winograd_applies` (``min_channels``: its width threshold).
    """
    if bn.training:
        return activate_(bn(conv(x)), negative_slope)
    scale = bn.weight * torch.rsqrt(bn.running_var + bn.eps)
    weight = conv.weight * scale[:, None, None, None]
    bias = bn.bias - bn.running_mean * scale
    if conv.bias is not None:
        bias = bias + conv.bias * scale
    if winograd and _winograd_applies(x, conv, min_channels):
        return conv3x3_winograd(x, weight, bias, negative_slope)
    weight = weight.contiguous(memory_format=torch.channels_last)
    return activate_(F.conv2d(x, weight, bias, conv.stride, conv.padding, conv.dilation, conv.groups), negative_slope)


def _conv(x: torch.Tensor, conv: nn.Conv2d, winograd: bool, min_channels: int | None = None) -> torch.Tensor:
    """``conv(x)``, as Winograd when ``winograd`` is set and :func:`_winograd_applies`."""
    if winograd and _winograd_applies(x, conv, min_channels):
        return conv3x3_winograd(x, conv.weight, conv.bias)
    return conv(x)


def conv3x3(in_dim: int, out_dim: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_dim, out_dim, kernel_size=3, stride=stride, padding=1, bias=False)


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with batch norm and a (projected when strided) residual."""

    def __init__(self, in_dim: int, out_dim: int, stride: int = 1, winograd: bool = False) -> None:
        super().__init__()
        self.winograd = winograd  # 3x3 stride-1 convolutions as Winograd in CPU inference
        self.winograd_min_channels: int | None = None  # where wide enough (None: this CPU's threshold)
        self.conv1 = conv3x3(in_dim, out_dim, stride)
        self.conv2 = conv3x3(out_dim, out_dim)
        self.bn1 = nn.BatchNorm2d(out_dim)
        self.bn2 = nn.BatchNorm2d(out_dim)
        self.downsample = None
        if stride != 1:
            self.downsample = nn.Sequential(conv1x1(in_dim, out_dim, stride), nn.BatchNorm2d(out_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = conv_bn(x, self.conv1, self.bn1, 0.0, self.winograd, self.winograd_min_channels)
        y = conv_bn(y, self.conv2, self.bn2, None, self.winograd, self.winograd_min_channels)
        if self.downsample is not None:
            x = conv_bn(x, self.downsample[0], self.downsample[1])
        return F.relu(y.add_(x), inplace=True)


#: Upsampled channels per piece in the top-down merge (:func:`_fpn_merge`), in bytes of the piece.
MERGE_CHUNK_BYTES = 128 << 20


def _fpn_merge(fine: torch.Tensor, coarse: torch.Tensor) -> torch.Tensor:
    """``fine`` plus ``coarse`` upsampled 2x (bilinear, align_corners) and cropped to ``fine``'s size.

    Without autograd (and not while tracing for export) the sum is written into ``fine``, a lateral
    convolution's fresh output that nothing else reads, a few channels at a time (bilinear upsampling works
    per channel), so the upsampled map never exists whole: at 1600x1200 it would be one more 0.75 GB map at
    the backbone's peak.

    For sides that are not multiples of 8 the finer map can be one cell smaller than twice the coarser
    one; cropping keeps cell i of the finer map reading the coarser map as the published weights expect.
    """
    h, w = fine.shape[2:]

    def upsample(x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(x, scale_factor=2.0, mode="bilinear", align_corners=True)[..., :h, :w]

    if torch.is_grad_enabled() or is_tracing() or torch.result_type(fine, coarse) != fine.dtype:
        return fine + upsample(coarse)
    step = max(1, MERGE_CHUNK_BYTES // (fine[:, :1].numel() * fine.element_size()))
    for part in chunk_slices(fine.shape[1], step):
        fine[:, part].add_(upsample(coarse[:, part]))
    return fine


def _outconv2(block: nn.Sequential, x: torch.Tensor, winograd: bool, min_channels: int | None) -> torch.Tensor:
    """An FPN ``conv3x3 -> BN -> LeakyReLU -> conv3x3`` block with the batch norm folded in eval mode. The
    input is released once the first convolution has read it, when the caller keeps no reference to it."""
    conv_a, bn, act, conv_b = block
    x = conv_bn(x, conv_a, bn, act.negative_slope, winograd, min_channels)
    return _conv(x, conv_b, winograd, min_channels)


#: torch's registries of global module hooks (``nn.modules.module``; read with a default, being private).
_GLOBAL_HOOKS = ("_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks",
                 "_global_backward_pre_hooks")


def _has_hooks(module: nn.Module) -> bool:
    """Whether calling ``module`` runs hooks: its own or global module hooks."""
    own = (module._forward_hooks, module._forward_pre_hooks, module._backward_hooks, module._backward_pre_hooks)
    return any(own) or any(getattr(nn.modules.module, name, None) for name in _GLOBAL_HOOKS)


def _run_blocks(layer: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
    """``layer(x)``. Without autograd, calling the blocks one by one: ``nn.Module.__call__`` on the whole layer
    would keep its input alive until the last block returns (at 1/2 resolution, one more full-size map at the
    peak). The layer is called as a module where that saves nothing (autograd keeps the input anyway) or
    where hooks must see the call."""
    if torch.is_grad_enabled() or _has_hooks(layer):
        return layer(x)
    for block in layer:
        x = block(x)
    return x


class ResNetFPN(nn.Module):
    """ResNet-FPN 8/2.

    Input ``(B, 1, H, W)``; outputs ``(B, block_dims[2], ceil(H/8), ceil(W/8))`` and
    ``(B, block_dims[0], ceil(H/2), ceil(W/2))``. Coarse cell (x, y) sits on pixel (8x, 8y), fine cell
    (x, y) on pixel (2x, 2y), for any image size. ``winograd``: run the 3x3 stride-1 convolutions that are
    wide enough as Winograd F(4x4, 3x3) in CPU inference (see :func:`_winograd_applies`).
    """

    def __init__(self, initial_dim: int, block_dims: list[int], winograd: bool = False) -> None:
        super().__init__()
        d1, d2, d3 = block_dims
        self.winograd = winograd
        self.winograd_min_channels: int | None = None
        self.conv1 = nn.Conv2d(1, initial_dim, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(initial_dim)
        self.layer1 = nn.Sequential(BasicBlock(initial_dim, d1, 1, winograd), BasicBlock(d1, d1, 1, winograd))  # 1/2
        self.layer2 = nn.Sequential(BasicBlock(d1, d2, 2, winograd), BasicBlock(d2, d2, 1, winograd))  # 1/4
        self.layer3 = nn.Sequential(BasicBlock(d2, d3, 2, winograd), BasicBlock(d3, d3, 1, winograd))  # 1/8
        self.layer3_outconv = conv1x1(d3, d3)
        self.layer2_outconv = conv1x1(d2, d3)
        self.layer2_outconv2 = nn.Sequential(conv3x3(d3, d3), nn.BatchNorm2d(d3), nn.LeakyReLU(), conv3x3(d3, d2))
        self.layer1_outconv = conv1x1(d1, d2)
        self.layer1_outconv2 = nn.Sequential(conv3x3(d2, d2), nn.BatchNorm2d(d2), nn.LeakyReLU(), conv3x3(d2, d1))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def set_winograd(self, enabled: bool, min_channels: int | None = None) -> None:
        """Switch the Winograd path of every block on or off (``resnetfpn.winograd`` sets it at build). On,
        it takes the convolutions of at least ``min_channels`` (geometric mean of input and output
        channels; None: where it is faster on this CPU, :func:`~matcher.winograd.default_min_channels`;
        0: all 14)."""
        valid = min_channels is None or (type(min_channels) is int and min_channels >= 0)
        if not valid:
            raise ValueError(f"min_channels must be None or an integer >= 0, got {min_channels!r}")
        for module in self.modules():
            if isinstance(module, (ResNetFPN, BasicBlock)):
                module.winograd, module.winograd_min_channels = enabled, min_channels

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(B, 1, H, W)`` -> coarse ``(B, C3, H/8, W/8)`` and fine ``(B, C1, H/2, W/2)`` maps, both in
        channels-last memory order (same shapes and values as contiguous ones)."""
        image = image.contiguous(memory_format=torch.channels_last)
        x1 = _run_blocks(self.layer1, conv_bn(image, self.conv1, self.bn1, 0.0))
        x2 = _run_blocks(self.layer2, x1)
        coarse = self.layer3_outconv(_run_blocks(self.layer3, x2))
        # Top-down pathway. The largest maps are the 1/2-resolution ones: each map is passed on as the only
        # reference to it (no local name), so it is freed as soon as it has been read and at most two are
        # alive at a time (measured on CPython 3.11, which hands a call's arguments over to the callee).
        finer_maps = [x1, x2]
        del x1, x2
        top_down = coarse
        wide = self.winograd_min_channels
        levels = ((self.layer2_outconv, self.layer2_outconv2), (self.layer1_outconv, self.layer1_outconv2))
        for lateral, block in levels:
            top_down = _outconv2(block, _fpn_merge(lateral(finer_maps.pop()), top_down), self.winograd, wide)
        return coarse, top_down
