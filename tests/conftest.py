from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import torch

torch.set_num_threads(2)

# Without a GPU, Triton kernels run in Triton's CPU interpreter (tests/test_quadtree_triton.py). The variable
# must be set before triton is first imported: triton's own library functions are wrapped at import.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def cpu_without_native_bf16(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """``inference.feature_dtype: auto`` runs bf16 on CPUs with native bf16: every test sees a CPU without it,
    so that its numbers do not depend on the machine, unless marked ``native_bf16`` (then it sees one with it)."""
    from matcher import model

    native = request.node.get_closest_marker("native_bf16") is not None
    monkeypatch.setattr(model, "cpu_has_native_bf16", lambda: native)


@pytest.fixture
def kernel_device() -> torch.device:
    """Where the Triton kernels' tests run: the GPU (compiled), else the CPU through Triton's interpreter."""
    from matcher.triton_support import interpreting

    if torch.cuda.is_available():
        return torch.device("cuda")
    if not interpreting():
        pytest.skip("no GPU and TRITON_INTERPRET is not set")
    return torch.device("cpu")


def textured_image(h: int, w: int, seed: int = 0) -> np.ndarray:
    """Smooth random texture, float32 (h, w) in [0, 1]."""
    rng = np.random.default_rng(seed)
    import cv2

    noise = rng.random((h // 4 + 1, w // 4 + 1)).astype(np.float32)
    img = cv2.resize(noise, (w, h), interpolation=cv2.INTER_CUBIC)
    return np.clip(img, 0.0, 1.0)


@pytest.fixture
def image_pair() -> tuple[torch.Tensor, torch.Tensor]:
    """A textured image and the same image shifted by (16, 8) px, as (1, 1, 240, 320) tensors."""
    img = torch.from_numpy(textured_image(240, 320))[None, None]
    return img, torch.roll(img, (8, 16), (2, 3))


@pytest.fixture(scope="session")
def reference_layout() -> dict[str, tuple[int, ...]]:
    """Parameter names and shapes of the published LoFTR-QuadTree-B checkpoints (tests/data copy)."""
    from pathlib import Path

    layout = {}
    for line in (Path(__file__).parent / "data" / "official_loftr_quadtree_state_dict.txt").read_text().splitlines():
        if line.startswith("#") or not line.strip():
            continue
        name, shape, _ = line.split("\t")
        layout[name] = tuple(int(s) for s in shape.strip("()").split(",") if s.strip())
    return layout


def load_script(path: Path, name: str) -> ModuleType:
    """A script that is not part of the package (eval/pose.py, datasets/check_layout.py, demo/attention.py),
    loaded from its file."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module
