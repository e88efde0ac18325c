"""Winograd F(4x4, 3x3) convolution (Lavin & Gray, 2016) for CPU inference.

A 3x3, stride-1 convolution computes each 4x4 output tile from a 6x6 input tile. Winograd's minimal
filtering algorithm does it with 36 multiplications per (input, output) channel pair instead of 144: the
input tile and the filter are transformed (``B^T d B``, ``G g G^T``), multiplied elementwise, which over
channels becomes 36 independent matrix products, and transformed back (``A^T m A``). The matrix products
hold 1/4 of the direct convolution's arithmetic; the transforms are small matrix products too, so the whole
convolution runs on the BLAS. On a 2-core AVX-512 CPU this is 1.4-1.9x faster than oneDNN's direct
convolution for the backbone's layers.

Rounding: the transforms multiply by up to 8 and divide by 24, so float32 results differ from the direct
convolution by about 1e-5 of the output's range (direct: 1e-6); the matcher's agreement with the direct
path is measured by ``eval/benchmark.py``. Work proceeds in chunks of tile rows and columns whose
transformed tiles stay in cache, and the bias and activation are applied to each chunk while it is there.
"""

from __future__ import annotations

import functools
import platform
import re

import torch
import torch.nn.functional as F

# Lavin & Gray's F(4x4, 3x3) matrices, interpolation points 0, 1, -1, 2, -2 and infinity.
_BT = torch.tensor(
    [[4, 0, -5, 0, 1, 0], [0, -4, -4, 1, 1, 0], [0, 4, -4, -1, 1, 0],
     [0, -2, -1, 2, 1, 0], [0, 2, -1, -2, 1, 0], [0, 4, 0, -5, 0, 1]],
    dtype=torch.float64,
)
_G = torch.tensor(
    [[1 / 4, 0, 0], [-1 / 6, -1 / 6, -1 / 6], [-1 / 6, 1 / 6, -1 / 6],
     [1 / 24, 1 / 12, 1 / 6], [1 / 24, -1 / 12, 1 / 6], [0, 0, 1]],
    dtype=torch.float64,
)
_AT = torch.tensor(
    [[1, 1, 1, 1, 1, 0], [0, 1, -1, 2, -2, 0], [0, 1, 1, 4, 4, 0], [0, 1, -1, 8, -8, 1]],
    dtype=torch.float64,
)
#: Both sides of each 2-D transform as one matrix on the flattened tile / filter entries (row-major).
_INPUT_TRANSFORM = torch.kron(_BT, _BT)  # (36, 36)
_OUTPUT_TRANSFORM = torch.kron(_AT, _AT)  # (16, 36)
_FILTER_TRANSFORM = torch.kron(_G, _G)  # (36, 9)

#: Width from which Winograd beats oneDNN's direct float32 convolution, by :func:`cpu_class`, as the geometric
#: mean of a convolution's input and output channels: its transforms cost about C per pixel, its products
#: 2.25 C^2 (direct: 9 C^2), so it pays off from some width on, the earlier the slower the CPU's arithmetic is
#: against its memory. Measured on 2 cores, batch 2 at 120x160 and 240x320: AVX2 (AMD EPYC Zen 3) 64-128
#: channels 1.1-1.6x slower than direct, 160 even, 196-256 1.1-1.3x faster; AVX2 on 128-bit units (AMD EPYC
#: Zen 1, half Zen 3's FMA rate) 64 channels 1.1-1.2x slower, 96-256 1.1-2.1x faster; AVX-512 (Intel Xeon)
#: 128-256 channels 1.3-1.9x faster (narrower layers not measured there: kept on).
MIN_CHANNELS = {"AVX512": 0, "AVX2_128BIT": 80}

#: The same for other CPUs (AVX2, ARM, ...): the AVX2 break-even.
DEFAULT_MIN_CHANNELS = 160

#: ``(vendor, family)`` -> the first model of that family with full-width (256-bit) vector units; the models
#: below it run 256-bit AVX instructions as two 128-bit halves: AMD Zen / Zen+ (family 0x17 below Zen 2's
#: 0x30) and Hygon Dhyana (family 0x18, a Zen 1: every model, hence the bound above any model number).
_HALF_WIDTH_AVX_BELOW_MODEL = {("AuthenticAMD", 0x17): 0x30, ("HygonGenuine", 0x18): 0x100}


def parse_cpu_identity(cpuinfo: str) -> tuple[str, int, int] | None:
    """``(vendor, family, model)`` of the first CPU in a Linux ``/proc/cpuinfo`` text or a Windows
    ``platform.processor()`` string ("AMD64 Family 23 Model 1 Stepping 2, AuthenticAMD"); None if absent."""
    linux = {key: re.search(rf"^{key}\s*:\s*(\S+)", cpuinfo, re.MULTILINE) for key in ("vendor_id", "cpu family", "model")}
    if all(linux.values()) and linux["cpu family"][1].isdigit() and linux["model"][1].isdigit():
        return linux["vendor_id"][1], int(linux["cpu family"][1]), int(linux["model"][1])
    windows = re.search(r"Family (\d+) Model (\d+).*,\s*(\w+)\s*$", cpuinfo)
    return (windows[3], int(windows[1]), int(windows[2])) if windows else None


def _cpu_identity() -> tuple[str, int, int] | None:
    """:func:`parse_cpu_identity` of this machine (Linux or Windows; None elsewhere or unreadable)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            return parse_cpu_identity(f.read(1 << 16))
    except OSError:
        return parse_cpu_identity(platform.processor() or "")


def cpu_class(capability: str, identity: tuple[str, int, int] | None) -> str:
    """The key of :data:`MIN_CHANNELS` for torch's CPU ``capability`` and the CPU's ``(vendor, family, model)``:
    the capability, or ``AVX2_128BIT`` for an AVX2 CPU with half-width vector units."""
    if capability == "AVX2" and identity is not None:
        vendor, family, model = identity
        if model < _HALF_WIDTH_AVX_BELOW_MODEL.get((vendor, family), 0):
            return "AVX2_128BIT"
    return capability


def this_cpu_class() -> str:
    """:func:`cpu_class` of this machine."""
    return cpu_class(torch.backends.cpu.get_cpu_capability(), _cpu_identity())


@functools.lru_cache(maxsize=1)
def default_min_channels() -> int:
    """:data:`MIN_CHANNELS` of this CPU (:func:`this_cpu_class`)."""
    return MIN_CHANNELS.get(this_cpu_class(), DEFAULT_MIN_CHANNELS)


def pays_off(c_in: int, c_out: int, min_channels: int | None = None) -> bool:
    """Whether a ``c_in -> c_out`` 3x3 convolution is wide enough for Winograd: ``sqrt(c_in * c_out) >=
    min_channels`` (None: :func:`default_min_channels`; 0: always)."""
    threshold = default_min_channels() if min_channels is None else min_channels
    return c_in * c_out >= threshold * threshold


#: Bytes of transformed tiles per chunk (the larger of input and output side): the chunk's temporaries
#: then stay in the cores' caches between the transforms and the matrix products.
CHUNK_BYTES = 4 << 20


def winograd_weight(weight: torch.Tensor) -> torch.Tensor:
    """Transformed filters ``G g G^T``: ``(C_out, C_in, 3, 3)`` -> ``(36, C_in, C_out)``, as one matrix
    product (recomputed per call from the folded weights: 1 ms for 256 x 256 channels; as C_out * C_in
    small products it took 14)."""
    c_out, c_in = weight.shape[:2]
    taps = weight.permute(2, 3, 1, 0).reshape(9, c_in * c_out)
    return (_FILTER_TRANSFORM.to(weight) @ taps).view(36, c_in, c_out)


def activate_(x: torch.Tensor, negative_slope: float | None) -> torch.Tensor:
    """In place: nothing (``negative_slope`` None), ReLU (0) or LeakyReLU; returns ``x``."""
    if negative_slope is None:
        return x
    return F.relu(x, inplace=True) if negative_slope == 0 else F.leaky_relu(x, negative_slope, inplace=True)


def _tile_chunks(tile_rows: int, tile_cols: int, bytes_per_tile: int) -> list[tuple[int, int, int, int]]:
    """``(r0, r1, c0, c1)`` tile ranges of about :data:`CHUNK_BYTES`: whole tile rows when one fits,
    else equal pieces of a row."""
    per_chunk = max(1, CHUNK_BYTES // bytes_per_tile)
    if per_chunk >= tile_cols:
        rows = per_chunk // tile_cols
        return [(r, min(r + rows, tile_rows), 0, tile_cols) for r in range(0, tile_rows, rows)]
    width = -(-tile_cols // -(-tile_cols // per_chunk))  # as many pieces as needed, of equal width
    return [(r, r + 1, c, min(c + width, tile_cols)) for r in range(tile_rows) for c in range(0, tile_cols, width)]


def conv3x3_winograd(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, negative_slope: float | None = None
) -> torch.Tensor:
    """``F.conv2d(x, weight, bias, padding=1)`` (stride 1), optionally followed by a (leaky) ReLU.

    Args:
        x: ``(N, C_in, H, W)`` float, any memory format (channels-last is read without a copy).
        weight: ``(C_out, C_in, 3, 3)``; bias: ``(C_out,)`` or None.
        negative_slope: None for no activation, 0 for ReLU, else the LeakyReLU slope.
    Returns:
        ``(N, C_out, H, W)`` in channels-last memory format.
    """
    n, c_in, h, w = x.shape
    c_out = weight.shape[0]
    if weight.shape[1:] != (c_in, 3, 3):
        raise ValueError(f"expected a (C_out, {c_in}, 3, 3) weight, got {tuple(weight.shape)}")
    u = winograd_weight(weight)
    input_transform, output_transform = _INPUT_TRANSFORM.to(x), _OUTPUT_TRANSFORM.to(x)
    tile_rows, tile_cols = -(-h // 4), -(-w // 4)
    out = x.new_empty(n, 4 * tile_rows, 4 * tile_cols, c_out)
    pixels = x.permute(0, 2, 3, 1)  # (N, H, W, C): a view for channels-last input
    for r0, r1, c0, c1 in _tile_chunks(tile_rows, tile_cols, 36 * max(c_in, c_out) * x.element_size()):
        for image in range(n):
            tiles = _input_tiles(pixels[image], r0, r1, c0, c1)  # (6, 6, r, c, C_in)
            v = (input_transform @ tiles.reshape(36, -1)).view(36, -1, c_in)
            m = torch.bmm(v, u)  # (36, tiles, C_out)
            y = (output_transform @ m.view(36, -1)).view(4, 4, r1 - r0, c1 - c0, c_out)
            target = out[image, 4 * r0 : 4 * r1, 4 * c0 : 4 * c1].view(r1 - r0, 4, c1 - c0, 4, c_out)
            y = y.permute(2, 0, 3, 1, 4)  # tile row, row in tile, tile column, column in tile
            if bias is None:
                target.copy_(y)
            else:
                torch.add(y, bias, out=target)
            activate_(target, negative_slope)
    out = out.permute(0, 3, 1, 2)
    if out.shape[2:] != (h, w):
        out = out[:, :, :h, :w].contiguous(memory_format=torch.channels_last)
    return out


def _input_tiles(pixels: torch.Tensor, r0: int, r1: int, c0: int, c1: int) -> torch.Tensor:
    """The overlapping 6x6 input tiles of tile rows ``r0:r1`` and columns ``c0:c1`` of one ``(H, W, C)``
    image, zero outside it: ``(6, 6, r1 - r0, c1 - c0, C)``, a strided view of one padded copy."""
    h, w, c = pixels.shape
    top, bottom, left, right = 4 * r0 - 1, 4 * r1 + 1, 4 * c0 - 1, 4 * c1 + 1  # input rows / cols read
    seg = pixels[max(top, 0) : min(bottom, h), max(left, 0) : min(right, w)]
    seg = F.pad(seg, (0, 0, max(0, -left), right - min(right, w), max(0, -top), bottom - min(bottom, h)))
    s_row, s_col, s_chan = seg.stride()
    shape = (6, 6, r1 - r0, c1 - c0, c)
    return seg.as_strided(shape, (s_row, s_col, 4 * s_row, 4 * s_col, s_chan))
