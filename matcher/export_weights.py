"""Export a training checkpoint as shipped weights: ``.safetensors`` (float16 by default) + its model config.

    python -m matcher.export_weights runs/lite_synthetic/checkpoints/last.ckpt matcher/pretrained/default.safetensors \
        --config runs/lite_synthetic/model.yaml
"""

from __future__ import annotations

import sys
from pathlib import Path

from .weights import export_safetensors


def main(argv: list[str] | None = None) -> int:
    """``python -m matcher.weights CHECKPOINT OUT.safetensors --config MODEL.yaml [--fp32]``."""
    import argparse

    parser = argparse.ArgumentParser(description="Export a training checkpoint as .safetensors + its config .yaml")
    parser.add_argument("checkpoint", help="Lightning .ckpt, .pt/.pth state dict or .safetensors")
    parser.add_argument("out", help="output .safetensors (the config is written beside it as .yaml)")
    parser.add_argument("--config", required=True, help="model config name or YAML (a run's model.yaml)")
    parser.add_argument("--fp32", action="store_true", help="keep float32 (default: float16)")
    args = parser.parse_args(argv)
    try:
        info = export_safetensors(args.checkpoint, args.out, args.config, half=not args.fp32)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {args.out} ({info['tensors']} tensors, {info['bytes'] / 1e6:.1f} MB) and {Path(args.out).with_suffix('.yaml')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
