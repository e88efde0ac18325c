"""demo/attention.py: the key cells it draws lie on the grid the layer's keys come from."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from matcher import Matcher, load_config

from .conftest import load_script

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def attention_demo():
    return load_script(ROOT / "demo" / "attention.py", "attention_demo")


@pytest.mark.parametrize("layer", [0, 1])  # a self layer (keys on image0's grid), a cross layer (image1's)
def test_key_cells_lie_on_the_key_images_grid(attention_demo, layer):
    torch.manual_seed(0)
    model = Matcher(load_config("lite")).eval()
    image0, image1 = torch.rand(1, 1, 128, 256), torch.rand(1, 1, 256, 128)  # coarse grids 16x32 and 32x16
    result = model.attention_selection(image0, image1, layer)
    kind, levels = attention_demo.layer_cells(model, result, layer, 20, 9, head=0)
    assert kind == ("self", "cross")[layer]
    h_keys, w_keys = (128 // 8, 256 // 8) if kind == "self" else (256 // 8, 128 // 8)
    assert [level for level, _, _ in levels] == [2, 1, 0]
    for level, size, cells in levels:
        h, w = h_keys >> level, w_keys >> level
        assert size == 8 << level and cells
        assert all(0 <= kx < w and 0 <= ky < h for kx, ky in cells), (level, cells)
