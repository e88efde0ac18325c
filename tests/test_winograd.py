"""Winograd F(4x4, 3x3) convolution against torch's direct convolution, and where the backbone uses it."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import matcher.winograd as winograd
from matcher.winograd import conv3x3_winograd, winograd_weight
from tests.test_backbone import _plain_forward, _random_backbone


def _reference(x, weight, bias, negative_slope):
    y = F.conv2d(x, weight, bias, padding=1)
    return y if negative_slope is None else F.leaky_relu(y, negative_slope)


TRANSFORMS = ["arrays", "matmul"]


@pytest.mark.parametrize("transforms", TRANSFORMS)
@pytest.mark.parametrize("negative_slope", [None, 0.0, 0.1])
@pytest.mark.parametrize(
    "n,c_in,c_out,h,w",
    [(2, 5, 7, 9, 13), (1, 3, 4, 17, 6), (2, 8, 3, 4, 4), (1, 2, 2, 1, 1), (1, 4, 6, 11, 23)],
)
def test_winograd_equals_direct_convolution(n, c_in, c_out, h, w, negative_slope, transforms):
    g = torch.Generator().manual_seed(h * w + c_in)
    x = torch.randn(n, c_in, h, w, generator=g, dtype=torch.float64)
    weight = torch.randn(c_out, c_in, 3, 3, generator=g, dtype=torch.float64)
    bias = torch.randn(c_out, generator=g, dtype=torch.float64)
    expected = _reference(x, weight, bias, negative_slope)
    for inp in (x, x.contiguous(memory_format=torch.channels_last)):
        out = conv3x3_winograd(inp, weight, bias, negative_slope, transforms)
        assert out.shape == expected.shape and out.is_contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(out, expected, rtol=1e-11, atol=1e-11)
    plain = conv3x3_winograd(x, weight, transforms=transforms)
    torch.testing.assert_close(plain, F.conv2d(x, weight, padding=1), rtol=1e-11, atol=1e-11)


@pytest.mark.parametrize("transforms", TRANSFORMS)
@pytest.mark.parametrize("chunk_bytes", [1, 2000, 40000])
def test_winograd_chunks_of_rows_and_row_pieces(chunk_bytes, transforms, monkeypatch):
    """Chunks of one tile, of a few tiles of a row, and of several rows cover the map exactly once."""
    monkeypatch.setattr(winograd, "CHUNK_BYTES", chunk_bytes)
    g = torch.Generator().manual_seed(chunk_bytes)
    x = torch.randn(2, 6, 19, 30, generator=g, dtype=torch.float64)
    weight = torch.randn(5, 6, 3, 3, generator=g, dtype=torch.float64)
    bias = torch.randn(5, generator=g, dtype=torch.float64)
    out = conv3x3_winograd(x, weight, bias, 0.0, transforms)
    torch.testing.assert_close(out, _reference(x, weight, bias, 0.0), rtol=1e-11, atol=1e-11)
    chunks = winograd._tile_chunks(5, 8, 36 * 6 * 8)
    covered = [(r, c) for r0, r1, c0, c1 in chunks for r in range(r0, r1) for c in range(c0, c1)]
    assert sorted(covered) == [(r, c) for r in range(5) for c in range(8)]


@pytest.mark.parametrize("transforms", TRANSFORMS)
def test_winograd_float32_rounding_stays_small(transforms):
    """Backbone-sized channels in float32: within 1e-4 of the output range of the exact (float64) result."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 128, 24, 40, generator=g)
    weight = torch.randn(96, 128, 3, 3, generator=g) / 34.0
    exact = F.conv2d(x.double(), weight.double(), padding=1)
    error = (conv3x3_winograd(x, weight, transforms=transforms).double() - exact).abs().max() / exact.abs().max()
    assert error < 1e-4


def test_winograd_refuses_unknown_transforms():
    with pytest.raises(ValueError, match="transforms must be one of"):
        conv3x3_winograd(torch.zeros(1, 2, 4, 4), torch.zeros(3, 2, 3, 3), transforms="kron")


def test_transformed_filter_is_g_g_gt():
    """A known answer: the filter transform is ``G g G^T`` for each (output, input) channel pair."""
    weight = torch.randn(3, 2, 3, 3, dtype=torch.float64)
    u = winograd_weight(weight)
    assert u.shape == (36, 2, 3)
    for o in range(3):
        for i in range(2):
            torch.testing.assert_close(u[:, i, o].view(6, 6), winograd._G @ weight[o, i] @ winograd._G.T)


def _count_winograd_calls(monkeypatch) -> list[int]:
    import matcher.backbone as backbone

    calls = [0]
    original = backbone.conv3x3_winograd

    def counting(*args, **kwargs):
        calls[0] += 1
        return original(*args, **kwargs)

    monkeypatch.setattr(backbone, "conv3x3_winograd", counting)
    return calls


def test_backbone_winograd_path_equals_direct_path(monkeypatch):
    """Eval-mode backbone with and without Winograd (float64): the same maps as each other and as the
    modules run one by one; with no width threshold all 14 stride-1 3x3 convolutions take the Winograd path
    in inference, none when autograd, autocast or export tracing is on."""
    net = _random_backbone().eval().double()
    net.set_winograd(True, min_channels=0)
    image = torch.rand(2, 1, 37, 52, dtype=torch.float64)
    calls = _count_winograd_calls(monkeypatch)
    with torch.no_grad():
        fast = net(image)
    assert calls[0] == 14
    net.set_winograd(False)
    with torch.no_grad():
        direct = net(image)
        plain = _plain_forward(net, image)
    assert calls[0] == 14
    for a, b, c in zip(fast, direct, plain):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(a, c, rtol=1e-10, atol=1e-10)

    net.set_winograd(True, min_channels=0)
    net.float()
    net(image.float())  # autograd on
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        net(image.float())
    monkeypatch.setattr(torch.jit, "is_tracing", lambda: True)
    with torch.no_grad():
        net(image.float())
    assert calls[0] == 14


def test_winograd_takes_the_layers_wide_enough_for_this_cpu(monkeypatch):
    """Winograd runs where the layer's width (geometric mean of input and output channels) reaches the CPU's
    threshold: every layer on AVX-512 and on AVX2 CPUs with 128-bit vector units, from 160 elsewhere (on a
    Zen 3's AVX2 it is slower below); the 128-bit AVX2 CPUs transform the tiles as arrays, the others by matrix
    products."""
    assert winograd.pays_off(196, 196, 160) and winograd.pays_off(256, 196, 160) and winograd.pays_off(64, 64, 0)
    assert not winograd.pays_off(196, 128, 160) and not winograd.pays_off(128, 128, 160)
    assert winograd.pays_off(96, 64, 78) and not winograd.pays_off(96, 64, 79)
    zen1, zen2, zen3, hygon, xeon = ("AuthenticAMD", 23, 1), ("AuthenticAMD", 23, 49), ("AuthenticAMD", 25, 1), \
        ("HygonGenuine", 24, 0), ("GenuineIntel", 6, 85)
    half_width = [("AVX2", zen1), ("AVX2", ("AuthenticAMD", 23, 24)), ("AVX2", hygon)]
    others = [("AVX2", zen2, 160), ("AVX2", zen3, 160), ("AVX2", xeon, 160), ("AVX2", None, 160), ("SVE256", None, 160),
              ("DEFAULT", None, 160)]
    cases = [("AVX512", zen1, 0, "matmul"), ("AVX512", xeon, 0, "matmul"), *[(*c, 0, "arrays") for c in half_width],
             *[(*c, "matmul") for c in others]]
    for capability, identity, expected, transforms in cases:
        monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda c=capability: c)
        monkeypatch.setattr(winograd, "_cpu_identity", lambda i=identity: i)
        winograd.default_min_channels.cache_clear()
        winograd.default_transforms.cache_clear()
        assert winograd.default_min_channels() == expected, (capability, identity)
        assert winograd.default_transforms() == transforms, (capability, identity)
    winograd.default_min_channels.cache_clear()
    winograd.default_transforms.cache_clear()
    monkeypatch.undo()

    # the random backbone's widths 8 / 12 / 16 against a threshold of 12, as 128 / 196 / 256 against 160: the
    # 8-channel layers and the 12 -> 8 one stay direct, 9 of the 14 run as Winograd, and the maps are unchanged
    net = _random_backbone().eval().double()
    image = torch.rand(1, 1, 32, 40, dtype=torch.float64)
    with torch.no_grad():
        net.set_winograd(False)
        direct = net(image)
        calls = _count_winograd_calls(monkeypatch)
        monkeypatch.setattr(winograd, "default_min_channels", lambda: 12)
        net.set_winograd(True)
        fast = net(image)
        assert calls[0] == 9
        net.set_winograd(True, min_channels=17)
        net(image)
        assert calls[0] == 9
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="min_channels must be None or an integer >= 0"):
            net.set_winograd(True, min_channels=bad)
    for a, b in zip(fast, direct):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_cpu_identity_is_read_from_linux_and_windows_descriptions():
    linux = "processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 23\nmodel\t\t: 1\nmodel name\t: AMD EPYC 7551\n"
    assert winograd.parse_cpu_identity(linux) == ("AuthenticAMD", 23, 1)
    second = linux + "\nprocessor\t: 1\nvendor_id\t: GenuineIntel\ncpu family\t: 6\nmodel\t\t: 85\n"
    assert winograd.parse_cpu_identity(second) == ("AuthenticAMD", 23, 1)  # the first CPU
    assert winograd.parse_cpu_identity("AMD64 Family 23 Model 17 Stepping 0, AuthenticAMD") == ("AuthenticAMD", 23, 17)
    assert winograd.parse_cpu_identity("Intel64 Family 6 Model 85 Stepping 7, GenuineIntel") == ("GenuineIntel", 6, 85)
    arm = "processor\t: 0\nBogoMIPS\t: 243.75\nCPU implementer\t: 0x41\nCPU part\t: 0xd0c\nmodel name\t: Neoverse\n"
    for text in (arm, "", "arm", "vendor_id : AuthenticAMD\ncpu family : 23\nmodel : x1\n"):
        assert winograd.parse_cpu_identity(text) is None, text
    assert winograd.cpu_class("AVX2", ("AuthenticAMD", 23, 1)) == "AVX2_128BIT"
    assert winograd.cpu_class("AVX2", ("AuthenticAMD", 23, 0x31)) == "AVX2"
    assert winograd.this_cpu_class() in {"AVX2_128BIT", torch.backends.cpu.get_cpu_capability()}


def test_shipped_model_keeps_its_matches_with_winograd():
    """The issue's rule for a faster default path: it keeps at least 95% of the direct path's matches
    within 1 px (shipped weights, demo pair at 480 px; in practice all of them, within 0.01 px)."""
    from pathlib import Path

    from matcher import Matcher
    from matcher.metrics import matches_kept

    assets = Path(__file__).resolve().parents[1] / "demo" / "assets"
    model = Matcher.from_pretrained("default")
    assert model.backbone.winograd
    model.backbone.set_winograd(True, min_channels=0)  # every layer, whatever this CPU's threshold
    fast = model.match(assets / "pair_a.png", assets / "pair_b.png", resize=480)
    model.backbone.set_winograd(False)
    direct = model.match(assets / "pair_a.png", assets / "pair_b.png", resize=480)
    assert len(direct["keypoints0"]) > 300
    assert matches_kept(direct["keypoints0"], direct["keypoints1"], fast["keypoints0"], fast["keypoints1"]) >= 0.95


def test_tile_transform_passes_are_the_matrices():
    """A known answer: the array passes compute ``B^T d`` and ``A^T m`` of Lavin & Gray's matrices."""
    g = torch.Generator().manual_seed(3)
    d = torch.randn(6, 5, 7, generator=g, dtype=torch.float64)
    o = torch.empty(6, 5, 7, dtype=torch.float64)
    winograd._bt_pass(list(d), list(o))
    torch.testing.assert_close(o, torch.einsum("ij,jab->iab", winograd._BT, d), rtol=1e-13, atol=1e-13)
    y = torch.empty(4, 5, 7, dtype=torch.float64)
    winograd._at_pass(list(d), list(y))
    torch.testing.assert_close(y, torch.einsum("ij,jab->iab", winograd._AT, d), rtol=1e-13, atol=1e-13)
