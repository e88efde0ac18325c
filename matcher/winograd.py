"""Winograd F(4x4, 3x3) convolution (Lavin & Gray, 2016) for CPU inference.

A 3x3, stride-1 convolution computes each 4x4 output tile from a 6x6 input tile. Winograd's minimal
filtering algorithm does it with 36 multiplications per (input, output) channel pair instead of 144: the
input tile and the filter are transformed (``B^T d B``, ``G g G^T``), multiplied elementwise, which over
channels becomes 36 independent matrix products, and transformed back (``A^T m A``). The matrix products
hold 1/4 of the direct convolution's arithmetic and run on the BLAS; the tile transforms run either as
products with Kronecker matrices too or as a few whole-array additions over strided views, whichever is faster
on the CPU (:data:`TRANSFORMS`). On a 2-core AVX-512 CPU this is 1.4-1.9x faster than oneDNN's direct
convolution for the backbone's layers, on an AMD EPYC Zen 1 1.05-1.9x.

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
#: channels 1.1-1.6x slower than direct, 160 even, 196-256 1.1-1.3x faster; AVX-512 (Intel Xeon) 128-256
#: channels 1.3-1.9x faster (narrower layers not measured there: kept on); both with ``"matmul"`` transforms
#: (:data:`TRANSFORMS`). AVX2 on 128-bit units (AMD EPYC Zen 1, half Zen 3's FMA rate), with ``"arrays"``
#: transforms: 64 channels 1.05-1.15x faster, 96-256 1.4-2x (with ``"matmul"`` 64 channels were 1.2-1.3x slower).
MIN_CHANNELS = {"AVX512": 0, "AVX2_128BIT": 0}

#: The same for other CPUs (AVX2, ARM, ...): the AVX2 break-even.
DEFAULT_MIN_CHANNELS = 160

#: How the tile transforms run, by :func:`cpu_class`: ``"arrays"``, a few whole-array additions per 1-D pass
#: over strided views of the chunk (bound by the caches' bandwidth), or ``"matmul"``, one product with the
#: Kronecker matrix per chunk after a copy of the overlapping tiles (bound by the FMA rate: 36 multiply-adds
#: per value). On 2 cores of an AMD EPYC Zen 1, 128 channels at 240x320: as arrays the input transform 1.9x
#: and the output transform 1.3x faster, the layer 1.2-1.4x. The other classes' thresholds were measured with ``"matmul"``, which they keep
#: until ``eval/benchmark.py --sections winograd`` (which times both) has been run on them.
TRANSFORMS = {"AVX2_128BIT": "arrays"}

#: The same for other CPUs.
DEFAULT_TRANSFORMS = "matmul"

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


@functools.lru_cache(maxsize=1)
def default_transforms() -> str:
    """:data:`TRANSFORMS` of this CPU (:func:`this_cpu_class`)."""
    return TRANSFORMS.get(this_cpu_class(), DEFAULT_TRANSFORMS)


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
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, negative_slope: float | None = None,
    transforms: str | None = None,
) -> torch.Tensor:
    """``F.conv2d(x, weight, bias, padding=1)`` (stride 1), optionally followed by a (leaky) ReLU.

    Args:
        x: ``(N, C_in, H, W)`` float, any memory format (channels-last is read without a copy).
        weight: ``(C_out, C_in, 3, 3)``; bias: ``(C_out,)`` or None.
        negative_slope: None for no activation, 0 for ReLU, else the LeakyReLU slope.
        transforms: ``"arrays"`` or ``"matmul"`` (see :data:`TRANSFORMS`; same results up to rounding);
            None: this CPU's, :func:`default_transforms`.
    Returns:
        ``(N, C_out, H, W)`` in channels-last memory format.
    """
    n, c_in, h, w = x.shape
    c_out = weight.shape[0]
    if weight.shape[1:] != (c_in, 3, 3):
        raise ValueError(f"expected a (C_out, {c_in}, 3, 3) weight, got {tuple(weight.shape)}")
    transforms = default_transforms() if transforms is None else transforms
    if transforms not in _TRANSFORM_FUNCTIONS:
        raise ValueError(f"transforms must be one of {sorted(_TRANSFORM_FUNCTIONS)} or None, got {transforms!r}")
    input_transform, output_transform = _TRANSFORM_FUNCTIONS[transforms]
    u = winograd_weight(weight)
    tile_rows, tile_cols = -(-h // 4), -(-w // 4)
    out = x.new_empty(n, 4 * tile_rows, 4 * tile_cols, c_out)
    pixels = x.permute(0, 2, 3, 1)  # (N, H, W, C): a view for channels-last input
    for r0, r1, c0, c1 in _tile_chunks(tile_rows, tile_cols, 36 * max(c_in, c_out) * x.element_size()):
        for image in range(n):
            v = input_transform(pixels[image], r0, r1, c0, c1)  # (6, 6, r, c, C_in)
            m = torch.bmm(v.view(36, -1, c_in), u).view(6, 6, r1 - r0, c1 - c0, c_out)
            if bias is not None:
                m[1, 1].add_(bias)  # A^T's second column is all ones: this adds the bias to every output pixel
            target = out[image, 4 * r0 : 4 * r1, 4 * c0 : 4 * c1].view(r1 - r0, 4, c1 - c0, 4, c_out)
            output_transform(m, target.permute(1, 3, 0, 2, 4))  # (row in tile, column in tile, tile row, ...)
            activate_(target, negative_slope)
    out = out.permute(0, 3, 1, 2)
    if out.shape[2:] != (h, w):
        out = out[:, :, :h, :w].contiguous(memory_format=torch.channels_last)
    return out


# "arrays": the transforms as a few whole-array operations on strided views of the chunk, one 1-D pass over
# the tile rows and one over the tile columns, using the matrices' structure (22 and 18 of their 36 and 24
# entries are non-zero, with shared sums): 12 and 11 array operations per pass, each over C contiguous channels.


def _bt_pass(d: list[torch.Tensor], o: list[torch.Tensor]) -> None:
    """``o[i] = sum_j B^T[i, j] d[j]`` for the six inputs ``d`` and six outputs ``o`` (equal shapes; ``o`` may
    be strided views of a larger tensor), with no temporaries."""
    torch.add(d[4], d[2], alpha=-5, out=o[0]).add_(d[0], alpha=4)  # 4 d0 - 5 d2 + d4
    torch.add(d[4], d[2], alpha=-4, out=o[1])  # a = d4 - 4 d2
    torch.add(d[3], d[1], alpha=-4, out=o[2])  # b = d3 - 4 d1
    o[1].add_(o[2])  # a + b
    torch.add(o[1], o[2], alpha=-2, out=o[2])  # a - b
    torch.sub(d[4], d[2], out=o[3])  # c = d4 - d2
    torch.sub(d[3], d[1], out=o[4])  # e = d3 - d1
    o[3].add_(o[4], alpha=2)  # c + 2 e
    torch.add(o[3], o[4], alpha=-4, out=o[4])  # c - 2 e
    torch.add(d[5], d[3], alpha=-5, out=o[5]).add_(d[1], alpha=4)  # 4 d1 - 5 d3 + d5


def _at_pass(m: list[torch.Tensor], y: list[torch.Tensor]) -> None:
    """``y[i] = sum_j A^T[i, j] m[j]`` for the six inputs ``m`` and four outputs ``y``, with no temporaries."""
    torch.add(m[1], m[2], out=y[0])  # s = m1 + m2
    torch.add(m[3], m[4], out=y[2])  # t = m3 + m4
    torch.sub(m[1], m[2], out=y[1])  # p = m1 - m2
    torch.sub(m[3], m[4], out=y[3])  # q = m3 - m4
    y[1].add_(y[3], alpha=2)  # p + 2 q
    torch.add(y[1], y[3], alpha=6, out=y[3]).add_(m[5])  # p + 8 q + m5
    y[0].add_(y[2])  # s + t
    torch.add(y[0], y[2], alpha=3, out=y[2])  # s + 4 t
    y[0].add_(m[0])  # m0 + s + t


def _transformed_tiles(pixels: torch.Tensor, r0: int, r1: int, c0: int, c1: int) -> torch.Tensor:
    """``B^T d B`` of the overlapping 6x6 input tiles ``d`` of tile rows ``r0:r1`` and columns ``c0:c1`` of one
    ``(H, W, C)`` image, zero outside it: ``(6, 6, r1 - r0, c1 - c0, C)``, contiguous."""
    rows, cols, c = r1 - r0, c1 - c0, pixels.shape[2]
    seg = _padded_segment(pixels, r0, r1, c0, c1)
    by_rows = seg.new_empty(6, rows, 4 * cols + 2, c)  # B^T over each tile's rows
    _bt_pass([seg[j : j + 4 * rows - 3 : 4] for j in range(6)], list(by_rows))
    tiles = seg.new_empty(6, 6, rows, cols, c)  # ... then over its columns
    _bt_pass([by_rows[:, :, j : j + 4 * cols - 3 : 4] for j in range(6)], [tiles[:, k] for k in range(6)])
    return tiles


def _output_transform(m: torch.Tensor, target: torch.Tensor) -> None:
    """``A^T m A`` of the ``(6, 6, ...)`` products ``m`` written into ``target``, ``(4, 4, ...)`` (row and
    column in the output tile first; a strided view of the output map)."""
    by_rows = m.new_empty(4, *m.shape[1:])
    _at_pass(list(m), list(by_rows))
    _at_pass([by_rows[:, k] for k in range(6)], [target[:, j] for j in range(4)])


# "matmul": each transform as one product with its Kronecker matrix.


@functools.lru_cache(maxsize=8)
def _kronecker(which: str, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """:data:`_INPUT_TRANSFORM` (``which`` "input") or :data:`_OUTPUT_TRANSFORM` ("output") in ``dtype`` on
    ``device``, converted once rather than per chunk."""
    with torch.inference_mode(False):  # usable outside inference mode too
        return (_INPUT_TRANSFORM if which == "input" else _OUTPUT_TRANSFORM).to(device, dtype)


def _transformed_tiles_matmul(pixels: torch.Tensor, r0: int, r1: int, c0: int, c1: int) -> torch.Tensor:
    """:func:`_transformed_tiles` as one ``(36, 36)`` matrix product over a copy of the overlapping tiles."""
    tiles = _input_tiles(pixels, r0, r1, c0, c1)
    return (_kronecker("input", tiles.dtype, tiles.device) @ tiles.reshape(36, -1)).view(tiles.shape)


def _output_transform_matmul(m: torch.Tensor, target: torch.Tensor) -> None:
    """:func:`_output_transform` as one ``(16, 36)`` matrix product and a copy into ``target``."""
    target.copy_((_kronecker("output", m.dtype, m.device) @ m.reshape(36, -1)).view(target.shape))


def _input_tiles(pixels: torch.Tensor, r0: int, r1: int, c0: int, c1: int) -> torch.Tensor:
    """The overlapping 6x6 input tiles of tile rows ``r0:r1`` and columns ``c0:c1`` of one ``(H, W, C)``
    image, zero outside it: ``(6, 6, r1 - r0, c1 - c0, C)``, a strided view of one padded copy."""
    seg = _padded_segment(pixels, r0, r1, c0, c1)
    s_row, s_col, s_chan = seg.stride()
    return seg.as_strided((6, 6, r1 - r0, c1 - c0, seg.shape[2]), (s_row, s_col, 4 * s_row, 4 * s_col, s_chan))


def _padded_segment(pixels: torch.Tensor, r0: int, r1: int, c0: int, c1: int) -> torch.Tensor:
    """The input pixels that tile rows ``r0:r1`` and columns ``c0:c1`` of one ``(H, W, C)`` image read, with
    zeros outside the image: ``(4 (r1 - r0) + 2, 4 (c1 - c0) + 2, C)``, contiguous."""
    h, w, _ = pixels.shape
    top, bottom, left, right = 4 * r0 - 1, 4 * r1 + 1, 4 * c0 - 1, 4 * c1 + 1
    seg = pixels[max(top, 0) : min(bottom, h), max(left, 0) : min(right, w)]
    return F.pad(seg, (0, 0, max(0, -left), right - min(right, w), max(0, -top), bottom - min(bottom, h)))


#: ``transforms`` -> (input transform, output transform).
_TRANSFORM_FUNCTIONS = {
    "arrays": (_transformed_tiles, _output_transform),
    "matmul": (_transformed_tiles_matmul, _output_transform_matmul),
}

#: The values ``conv3x3_winograd``'s ``transforms`` takes (besides None).
TRANSFORM_CHOICES = tuple(_TRANSFORM_FUNCTIONS)
