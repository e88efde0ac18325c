"""Reading checkpoints safely and loading them strictly, with errors that name the mismatches."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import torch
from torch import nn

from .config import one_line

#: Buffers some checkpoints carry that the model derives itself (LoFTR stored its position encoding).
DERIVED_KEYS = ("pos_encoding.pe",)


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a checkpoint file, with any ``matcher.`` prefix removed.

    Reads Lightning ``.ckpt`` files (under ``state_dict``), plain ``.pt`` / ``.pth`` state dicts with
    ``torch.load(weights_only=True)`` (a file that would run code is refused), and ``.safetensors``.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            state = load_file(str(path), device="cpu")
        except Exception as err:
            raise ValueError(f"cannot read safetensors checkpoint {path} (truncated or corrupt?): {err}") from None
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as err:
            reason = _unpickler_reason(err)
            if "unsupported global" not in reason.lower():  # not a pickle at all, or a broken one
                raise ValueError(f"cannot read checkpoint {path} (not a PyTorch checkpoint, truncated or corrupt?): "
                                 f"{reason}") from None
            raise ValueError(
                f"refusing to load {path}: it holds objects other than tensors and plain containers, which "
                f"could run code when unpickled (loaded with weights_only=True): {reason}"
            ) from None
        except Exception as err:
            raise ValueError(f"cannot read checkpoint {path} (not a PyTorch checkpoint, truncated or corrupt?): "
                             f"{type(err).__name__}: {err}") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path} does not hold a state dict of tensors (nor one under 'state_dict')")
    return {(k[len("matcher.") :] if k.startswith("matcher.") else k): v for k, v in state.items()}


def _unpickler_reason(err: Exception) -> str:
    """The cause torch's weights-only unpickler gives (``Unsupported global: GLOBAL pathlib.Path ...`` for a
    class it refuses, ``Trying to load unsupported GLOBAL posix.system whose module posix is blocked`` for the
    modules it never allows, ``Unsupported operand ...`` for bytes that are no pickle), without torch's advice
    to load with ``weights_only=False``, which would run whatever the file holds."""
    text = one_line(err)
    for marker in ("WeightsUnpickler error:", "Trying to load unsupported GLOBAL"):
        if marker in text:
            reason = text[text.index(marker) :].removeprefix("WeightsUnpickler error:").strip()
            return reason.split(" Please use", 1)[0].split(" Check the documentation", 1)[0].strip()
    return text or type(err).__name__


def describe_mismatch(model: nn.Module, state: dict[str, torch.Tensor], limit: int = 5) -> str | None:
    """A message naming the first missing, unexpected and mis-shaped entries, or None if all fit."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    ]
    return _summary({"missing": missing, "unexpected": unexpected, "shape mismatch": shapes}, limit)


def load_strict(model: nn.Module, state: dict[str, torch.Tensor], source: str = "checkpoint") -> None:
    """Load ``state`` into ``model`` requiring the same names and shapes (derived buffers are ignored)."""
    state = {k: v for k, v in state.items() if k not in DERIVED_KEYS}
    problem = describe_mismatch(model, state)
    if problem:
        raise ValueError(f"{source} does not fit this model config: {problem}")
    problem = describe_bad_values(model, state)
    if problem:
        raise ValueError(f"{source} holds unusable weights: {problem}")
    model.load_state_dict(state, strict=True)


def describe_bad_values(model: nn.Module, state: dict[str, torch.Tensor], limit: int = 5) -> str | None:
    """A message naming the first entries whose kind of number differs from the model's (integer weights
    for floating ones, or the reverse) or that hold NaN or infinity (a diverged run), or None if all fit:
    ``load_state_dict`` would cast the first silently, and the second gives plausible-looking matches on
    paths whose fused ReLU maps NaN to 0."""
    expected = model.state_dict()
    kinds = [
        f"{k}: checkpoint {v.dtype} vs model {expected[k].dtype}"
        for k, v in state.items()
        if v.is_floating_point() != expected[k].is_floating_point()
    ]
    non_finite = [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    return _summary({"with the wrong kind of number": kinds, "with NaN or infinite values": non_finite}, limit)


def _summary(problems: dict[str, list[str]], limit: int) -> str | None:
    """``'<count> <title>: <first items> (+<n> more)'`` for each non-empty list, joined by '; ' (None if none)."""
    parts = []
    for title, items in problems.items():
        if items:
            more = f" (+{len(items) - limit} more)" if len(items) > limit else ""
            parts.append(f"{len(items)} {title}: {', '.join(items[:limit])}{more}")
    return "; ".join(parts) if parts else None


def _umask() -> int:
    """The process's file-creation mask (read by setting it, then restored)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def export_safetensors(
    checkpoint: str | Path, out: str | Path, config: str | Path, half: bool = True
) -> dict[str, int]:
    """Write a checkpoint's matcher weights as ``out`` (``.safetensors``) with its model config beside it
    (``out`` with suffix ``.yaml``), after loading them strictly into ``config`` so that what is written is
    known to fit. ``half`` stores floating tensors as float16 (loading casts them back to the model's dtype).
    Returns ``{'tensors': ..., 'bytes': ...}``."""
    from omegaconf import OmegaConf
    from safetensors.torch import save_file

    from .config import load_config
    from .model import Matcher

    out = Path(out)
    if out.suffix != ".safetensors":
        raise ValueError(f"output must end in .safetensors, got {out}")
    cfg = load_config(str(config))
    model = Matcher(cfg)
    load_strict(model, read_state_dict(checkpoint), source=str(checkpoint))
    state = {
        k: (v.half() if half and v.is_floating_point() else v).contiguous()
        for k, v in model.state_dict().items()
        if k not in DERIVED_KEYS
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(out), metadata={"source": Path(checkpoint).name, "dtype": "float16" if half else "float32"})
    out.chmod(0o666 & ~_umask())  # safetensors creates its files 0600; shipped weights are for others to read too
    out.with_suffix(".yaml").write_text(OmegaConf.to_yaml(cfg))
    return {"tensors": len(state), "bytes": out.stat().st_size}

