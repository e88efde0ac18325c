"""The backbone's eval-mode fast path (batch norm folded into convolutions, channels-last activations)
against the modules run one by one as the published code runs them."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from matcher import backbone
from matcher.backbone import BasicBlock, ResNetFPN, _fpn_merge, conv_bn


def _plain_block(block: BasicBlock, x: torch.Tensor) -> torch.Tensor:
    y = torch.relu(block.bn1(block.conv1(x)))
    y = block.bn2(block.conv2(y))
    return torch.relu((x if block.downsample is None else block.downsample(x)) + y)


def _plain_merge(fine: torch.Tensor, coarse: torch.Tensor) -> torch.Tensor:
    up = F.interpolate(coarse, scale_factor=2.0, mode="bilinear", align_corners=True)
    return fine + up[..., : fine.shape[2], : fine.shape[3]]


def _plain_forward(net: ResNetFPN, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.relu(net.bn1(net.conv1(image)))
    x1 = x
    for block in net.layer1:
        x1 = _plain_block(block, x1)
    x2 = x1
    for block in net.layer2:
        x2 = _plain_block(block, x2)
    x3 = x2
    for block in net.layer3:
        x3 = _plain_block(block, x3)
    coarse = net.layer3_outconv(x3)
    x2_out = net.layer2_outconv2(_plain_merge(net.layer2_outconv(x2), coarse))
    return coarse, net.layer1_outconv2(_plain_merge(net.layer1_outconv(x1), x2_out))


def _random_backbone(seed: int = 0) -> ResNetFPN:
    torch.manual_seed(seed)
    net = ResNetFPN(8, [8, 12, 16])
    for m in net.modules():  # non-trivial statistics, so folding has something to fold
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.5)
            m.running_var.uniform_(0.01, 3.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.normal_(0, 0.5)
    return net


def test_eval_fast_path_equals_plain_modules():
    net = _random_backbone().eval().double()
    image = torch.rand(2, 1, 37, 52, dtype=torch.float64)  # sides not multiples of 8
    with torch.no_grad():
        fast = net(image)
        plain = _plain_forward(net, image)
    for a, b in zip(fast, plain):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    assert fast[0].is_contiguous(memory_format=torch.channels_last)


def test_hooks_on_the_layers_see_their_calls():
    """The eval path calls the layers' blocks one by one to free memory early, except where the layer has hooks:
    those fire with the layer's input and output, and the result is the same."""
    net = _random_backbone().eval().double()
    image = torch.rand(2, 1, 37, 52, dtype=torch.float64)
    with torch.no_grad():
        expected = net(image)
        seen = {}
        handles = [
            getattr(net, name).register_forward_hook(lambda m, a, out, name=name: seen.update({name: (a[0].shape, out.shape)}))
            for name in ("layer1", "layer2", "layer3")
        ]
        hooked = net(image)
    for h in handles:
        h.remove()
    assert seen == {
        "layer1": ((2, 8, 19, 26), (2, 8, 19, 26)),
        "layer2": ((2, 8, 19, 26), (2, 12, 10, 13)),
        "layer3": ((2, 12, 10, 13), (2, 16, 5, 7)),
    }
    for a, b in zip(hooked, expected):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_training_mode_uses_batch_statistics_and_gradients_flow():
    net = _random_backbone(1).train()
    image = torch.rand(2, 1, 32, 32)
    before = net.bn1.running_mean.clone()
    coarse, fine = net(image)
    plain_net = _random_backbone(1).train()
    ref_coarse, ref_fine = _plain_forward(plain_net, image)
    torch.testing.assert_close(coarse, ref_coarse, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(fine, ref_fine, rtol=1e-4, atol=1e-5)
    assert not torch.equal(net.bn1.running_mean, before)  # running statistics were updated
    (coarse.square().mean() + fine.square().mean()).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in net.parameters())
    assert net.bn1.weight.grad.abs().sum() > 0 and net.layer1_outconv2[1].weight.grad.abs().sum() > 0


def test_folded_conv_bn_is_the_affine_map():
    """A known answer: conv with weight 1 on a constant image, BN with mean 1, var 4, gamma 2, beta 3."""
    conv = torch.nn.Conv2d(1, 1, 1, bias=False)
    bn = torch.nn.BatchNorm2d(1, eps=0.0).eval()
    conv.weight.data.fill_(1.0)
    bn.running_mean.fill_(1.0), bn.running_var.fill_(4.0), bn.weight.data.fill_(2.0), bn.bias.data.fill_(3.0)
    out = conv_bn(torch.full((1, 1, 2, 2), 5.0), conv, bn)
    torch.testing.assert_close(out, torch.full((1, 1, 2, 2), (5.0 - 1.0) / 2.0 * 2.0 + 3.0))


def test_merge_without_autograd_adds_in_place_a_few_channels_at_a_time(monkeypatch):
    fine = torch.randn(2, 8, 13, 19, dtype=torch.float64)  # odd sides: the upsampled map is cropped
    coarse = torch.randn(2, 8, 7, 10, dtype=torch.float64)
    expected = _plain_merge(fine, coarse)
    monkeypatch.setattr(backbone, "MERGE_CHUNK_BYTES", 3 * 2 * 13 * 19 * 8)  # pieces of 3, 3 and 2 channels
    with torch.no_grad():
        merged = _fpn_merge(fine.clone(), coarse)
        target = fine.clone()
        assert _fpn_merge(target, coarse).data_ptr() == target.data_ptr()  # no new full-size map
    torch.testing.assert_close(merged, expected, rtol=0, atol=1e-12)
    with torch.enable_grad():  # autograd: out of place, the lateral map is left as it was
        source = fine.clone()
        torch.testing.assert_close(_fpn_merge(source, coarse), expected, rtol=0, atol=1e-12)
        assert torch.equal(source, fine)


PEAK_CHILD = """
import json, torch
from matcher.backbone import ResNetFPN
def status_mb(key):
    line = next(l for l in open("/proc/self/status") if l.startswith(key + ":"))
    return int(line.split()[1]) / 1024
torch.manual_seed(0)
torch.set_num_threads(1)
net = ResNetFPN(128, [128, 196, 256], winograd=True).eval()
with torch.inference_mode():
    net(torch.rand(2, 1, 64, 64))  # kernels and their code paged in before the measurement
    image = torch.rand(2, 1, 480, 640)
    try:
        open("/proc/self/clear_refs", "w").write("5")  # reset the peak to the current resident size
    except OSError as error:
        print(json.dumps({"skip": f"cannot reset the peak resident size: {error}"}))
        raise SystemExit(0)
    start = status_mb("VmRSS")
    coarse, fine = net(image)
print(json.dumps({"peak_mb": status_mb("VmHWM") - start, "fine_mb": fine.numel() * 4 / 2**20}))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads the peak resident size from /proc")
def test_eval_forward_keeps_few_half_resolution_maps_alive():
    """Peak memory of the eval forward in a fresh process (glibc maps blocks this large separately, so the
    resident size follows the live tensors), in units of the output fine map (128 channels at 1/2
    resolution). Alive at once: a block's input, middle and output maps in layer 1 (3 units), or two
    196-channel maps in the top-down pathway (3.1 units), plus smaller maps and buffers: 4.3-4.6 units on
    an AMD EPYC Zen 1. Holding each layer's input until its last block returned, the whole upsampled
    map and the layer-1 output to the end, as before, peaked at 7.1-7.3 units."""
    out = subprocess.run([sys.executable, "-c", PEAK_CHILD], capture_output=True, text=True, check=True, timeout=300)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    if "skip" in result:
        pytest.skip(result["skip"])
    assert result["peak_mb"] < 5.5 * result["fine_mb"], result


def test_a_global_module_hook_sees_the_layers():
    """Global module hooks (as FlopCounterMode's module tracker registers) see the layers' calls too."""
    net = _random_backbone().eval().double()
    seen = []
    handle = torch.nn.modules.module.register_module_forward_hook(
        lambda m, a, out: seen.append(m) if m in (net.layer1, net.layer2, net.layer3) else None
    )
    try:
        with torch.no_grad():
            net(torch.rand(1, 1, 16, 24, dtype=torch.float64))
    finally:
        handle.remove()
    assert seen == [net.layer1, net.layer2, net.layer3]
