"""Model configuration: one default tree, YAML files merged over it, locked against unknown keys.

The tree is named like LoFTR's lower-case config (``backbone_type``, ``resnetfpn``, ``coarse``,
``match_coarse``, ``fine``) so that users coming from LoFTR / QuadTree find the same knobs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError

#: Folder holding ``configs/model/*.yaml`` in a source checkout (the package is installed editable).
CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs" / "model"

DEFAULT_CONFIG: dict[str, Any] = {
    "backbone_type": "ResNetFPN",  # the only backbone: ResNet-18-like with an FPN, outputs 1/8 and 1/2 maps
    "resolution": [8, 2],  # pixel strides of the coarse and the fine feature maps (fixed by the backbone)
    "fine_window_size": 5,  # side of the fine window cropped around every coarse match
    "fine_concat_coarse_feat": True,  # merge the transformed coarse feature into the fine windows
    "resnetfpn": {
        "initial_dim": 128,  # channels of the 7x7 stride-2 stem
        "block_dims": [128, 196, 256],  # channels of the 1/2, 1/4 and 1/8 stages
        "winograd": True,  # CPU inference: 3x3 convolutions as Winograd F(4x4,3x3), 1.6x faster on AVX-512 Xeons, ~1e-5 off
    },
    "coarse": {
        "d_model": 256,  # token width of the coarse transformer (must equal block_dims[-1])
        "nhead": 8,  # attention heads; channels split into contiguous groups of d_model / nhead
        "layer_names": ["self", "cross"] * 4,  # interleaved self / cross layers
        "attention": "quadtree",  # quadtree | linear (LoFTR) | full (exact softmax, for comparison)
        "attn_type": "B",  # QuadTree variant: B (released model) or A
        "topks": [32, 16, 16],  # keys kept per query at each level, coarsest first; len = number of levels
        "mlp_ratio": 4,  # hidden width of the QuadTree block's MLP, in multiples of d_model
        "temp_bug_fix": True,  # corrected sine position encoding (False: LoFTR's original formula)
        "kernel": "auto",  # QuadTree refine levels, MLP middle, coarse matching: auto (Triton on CUDA if installed) | torch | triton
    },
    "match_coarse": {
        "thr": 0.2,  # dual-softmax confidence a coarse match must exceed
        "border_rm": 2,  # coarse cells removed at each (unpadded) border
        "match_type": "dual_softmax",  # the only matching layer implemented
        "dsmax_temperature": 0.1,  # similarity temperature of the dual softmax
        "train_coarse_percent": 0.3,  # training: share of max(L0, L1) coarse matches sent to the fine stage
        "train_pad_num_gt_min": 200,  # training: at least this many ground-truth matches are padded in
    },
    "fine": {
        "d_model": 128,  # token width of the fine transformer (must equal block_dims[0])
        "nhead": 8,  # attention heads of the fine transformer
        "layer_names": ["self", "cross"],  # one self and one cross LoFTR layer
        "attention": "linear",  # linear (LoFTR) or full
    },
    "inference": {
        "resize": 640,  # Matcher.match: long side the images are resized to (null keeps the size)
        # backbone + coarse transformer in eval mode: auto | float32 | bfloat16 (autocast; coarse matching and
        # the fine stage stay float32). auto: bfloat16 on CPUs with native bf16 dot products (AVX512-BF16, AMX;
        # ~1.5x faster end to end, ~99% of the float32 matches within 1 px), float32 elsewhere (GPUs included)
        "feature_dtype": "auto",
    },
}


def _resolve_path(name_or_path: str | Path) -> Path:
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml"):
        if not path.is_file():
            raise FileNotFoundError(f"config file not found: {path}")
        return path
    candidate = CONFIG_DIR / f"{name_or_path}.yaml"
    if not candidate.is_file():
        available = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
        raise ValueError(f"unknown model config {str(name_or_path)!r}; available: {available}")
    return candidate


def load_config(name_or_path: str | Path | None = None, **overrides: Any) -> DictConfig:
    """Build a locked model config.

    Args:
        name_or_path: a config name from ``configs/model/`` (``quadtree_b_indoor``, ``lite``, ...), a YAML
            path, or None for the defaults.
        overrides: top-level groups to merge last, e.g. ``match_coarse={"thr": 0.1}``.

    Returns:
        An OmegaConf tree in struct mode: reading or setting a key that does not exist raises.
    """
    cfg = OmegaConf.create(DEFAULT_CONFIG)
    OmegaConf.set_struct(cfg, True)
    if name_or_path is not None:
        path = _resolve_path(name_or_path)
        cfg = merge_config(cfg, OmegaConf.load(path), source=str(path))
    if overrides:
        cfg = merge_config(cfg, OmegaConf.create(overrides), source="overrides")
    validate_config(cfg)
    return cfg


def one_line(text: object) -> str:
    """``text`` (a message or an exception) on one line: every run of whitespace, newlines included, becomes
    one space (YAML, omegaconf and torch errors span several lines; command-line errors are one line)."""
    return " ".join(str(text).split())


class ConfigError(ValueError):
    """A config that cannot be used (unknown name or key, wrong value or type); the message is one line,
    meant for the command line."""


def merge_config(base: DictConfig, update: Any, what: str = "model config", source: str | None = None) -> DictConfig:
    """Merge ``update`` over ``base`` (keys unknown to ``base`` are refused). A failure raises one
    :class:`ConfigError` line naming ``what`` (which config), ``source`` (where ``update`` came from) and the
    key, and for an unknown key the known ones, instead of omegaconf's multi-line message."""
    try:
        merged = OmegaConf.merge(base, update)
    except Exception as err:  # omegaconf raises ConfigKeyError / ValidationError subclasses
        raise ConfigError(_merge_error(err, base, what, source)) from None
    OmegaConf.set_struct(merged, True)
    return merged


def _merge_error(err: Exception, base: DictConfig, what: str, source: str | None) -> str:
    key = str(getattr(err, "full_key", "") or getattr(err, "key", "") or "")
    where = f"invalid {what}" + (f" ({source})" if source else "")
    if isinstance(err, ConfigKeyError) and "not in struct" in str(err.msg):
        parent = key.rpartition(".")[0]
        node = OmegaConf.select(base, parent) if parent else base
        known = ""
        if isinstance(node, DictConfig):
            known = f"; known keys{f' of {parent!r}' if parent else ''}: {', '.join(map(str, node.keys()))}"
        return f"{where}: unknown key {key!r}{known}"
    first = str(getattr(err, "msg", err)).splitlines()[0].strip()
    return f"{where}: {first}" + (f" (key {key!r})" if key else "")


def validate_config(cfg: DictConfig) -> None:
    """Raise a ValueError for values that would build a broken model."""
    coarse, fine = cfg.coarse, cfg.fine
    if list(cfg.resolution) != [8, 2]:
        raise ValueError(f"resolution must be [8, 2] (the backbone's strides), got {list(cfg.resolution)}")
    if coarse.d_model != cfg.resnetfpn.block_dims[-1] or fine.d_model != cfg.resnetfpn.block_dims[0]:
        raise ValueError("coarse.d_model must equal block_dims[-1] and fine.d_model block_dims[0]")
    for name, group in (("coarse", coarse), ("fine", fine)):
        if group.d_model % group.nhead:
            raise ValueError(f"{name}.d_model ({group.d_model}) must be divisible by nhead ({group.nhead})")
        if any(n not in ("self", "cross") for n in group.layer_names):
            raise ValueError(f"{name}.layer_names may only hold 'self' and 'cross': {list(group.layer_names)}")
    if coarse.attention not in ("quadtree", "linear", "full"):
        raise ValueError(f"coarse.attention must be quadtree, linear or full, got {coarse.attention!r}")
    if fine.attention not in ("linear", "full"):
        raise ValueError(f"fine.attention must be linear or full, got {fine.attention!r}")
    if coarse.attn_type not in ("A", "B"):
        raise ValueError(f"coarse.attn_type must be 'A' or 'B', got {coarse.attn_type!r}")
    if len(coarse.topks) < 1 or any(k < 1 for k in coarse.topks):
        raise ValueError(f"coarse.topks must be a non-empty list of positive ints, got {list(coarse.topks)}")
    if cfg.match_coarse.match_type != "dual_softmax":
        raise ValueError("match_coarse.match_type: only 'dual_softmax' is implemented")
    if cfg.fine_window_size % 2 != 1:
        raise ValueError("fine_window_size must be odd")
