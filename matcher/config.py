"""Model configuration: one default tree, YAML files merged over it, locked against unknown keys.

The tree is named like LoFTR's lower-case config (``backbone_type``, ``resnetfpn``, ``coarse``,
``match_coarse``, ``fine``) so that users coming from LoFTR / QuadTree find the same knobs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Sequence

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import ConfigKeyError

from .triton_support import KERNELS

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
        "winograd": True,  # CPU inference: 3x3 convolutions as Winograd F(4x4,3x3) where faster (~1e-5 off; winograd.pays_off)
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
        # null: the trained levels on every grid (published). N: on larger grids, levels added above them until the
        # coarsest holds <= N tokens (linear cost; variant B: selection only, weight 0). The trained coarsest at 640x480: 300
        "max_coarsest_tokens": None,
    },
    "match_coarse": {
        "thr": 0.2,  # dual-softmax confidence a coarse match must exceed
        "border_rm": 2,  # coarse cells removed at each (unpadded) border
        "match_type": "dual_softmax",  # the only matching layer implemented
        "dsmax_temperature": 0.1,  # similarity temperature of the dual softmax
        "train_coarse_percent": 0.2,  # training: share of max(L0, L1) coarse matches sent to the fine stage (published default; outdoor 0.3)
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


def _type_error(value: Any, ref: Any) -> str | None:
    """What ``value`` should be when it does not have the kind of its default ``ref`` (a bool for a bool, an
    integer for an int, a number for a float), or None when it fits or ``ref`` is no number (strings are
    checked by the code reading them)."""
    if isinstance(ref, bool):
        return None if isinstance(value, bool) else "true or false"
    if isinstance(ref, int):
        return None if isinstance(value, int) and not isinstance(value, bool) else "an integer"
    if isinstance(ref, float):
        return None if isinstance(value, (int, float)) and not isinstance(value, bool) else "a number"
    return None


def check_types(cfg: DictConfig, reference: Any, which: str, prefix: str = "", nullable: tuple[str, ...] = (),
                required: bool = False) -> None:
    """Every key of ``cfg`` that ``reference`` (the defaults) has must keep its default's kind: a mapping stays
    a mapping, a list a list (of the kind of its default's first element), a bool a bool, an int an integer, a
    float a number; null only where the default is null or the key starts with one of ``nullable``. A key of
    ``reference`` missing from ``cfg`` is an error if ``required``. Raises one :class:`ConfigError` naming
    ``which`` config and the key."""
    for key, ref in reference.items():
        if key not in cfg:
            if required:
                raise ConfigError(f"invalid {which}: key {prefix}{key} is missing (build configs with load_config, "
                                  f"which merges a YAML over the defaults)")
            continue
        value, full = cfg[key], f"{prefix}{key}"
        if ref is None or (value is None and full.startswith(nullable)):
            continue
        if isinstance(ref, (dict, DictConfig)):
            if not isinstance(value, DictConfig):
                raise ConfigError(f"invalid {which}: {full} must be a mapping of keys, got {value!r}")
            check_types(value, ref, which, f"{full}.", nullable, required)
            continue
        if isinstance(ref, (list, ListConfig)):
            if not isinstance(value, ListConfig):
                raise ConfigError(f"invalid {which}: {full} must be a list, got {value!r}")
            wrong = [_type_error(v, ref[0]) for v in value if len(ref) and _type_error(v, ref[0])]
            if wrong:
                raise ConfigError(f"invalid {which}: {full} must be a list whose entries are {wrong[0]}, got {list(value)!r}")
            continue
        wanted = _type_error(value, ref)
        if wanted:
            raise ConfigError(f"invalid {which}: {full} must be {wanted}, got {value!r}")


#: Model-config keys that take null besides their default's type.
NULLABLE_MODEL_KEYS = ("inference.resize",)

#: Values of ``inference.feature_dtype``: the precision of the backbone and the coarse transformer in eval mode
#: ("auto": :func:`matcher.model.resolve_feature_dtype`).
FEATURE_DTYPES = ("auto", "float32", "bfloat16")

#: Allowed values of the model config's string keys.
MODEL_CHOICES = {
    "backbone_type": ("ResNetFPN",),
    "coarse.attention": ("quadtree", "linear", "full"),
    "coarse.attn_type": ("A", "B"),
    "coarse.kernel": KERNELS,
    "fine.attention": ("linear", "full"),
    "match_coarse.match_type": ("dual_softmax",),
    "inference.feature_dtype": FEATURE_DTYPES,
}


def validate_config(cfg: DictConfig) -> None:
    """Raise a :class:`ConfigError` (a ValueError) for values that would build a broken model: a wrong type, a
    value out of its range, an unknown choice, inconsistent widths."""
    check_types(cfg, DEFAULT_CONFIG, "model config", nullable=NULLABLE_MODEL_KEYS, required=True)
    for key, choices in MODEL_CHOICES.items():
        value = OmegaConf.select(cfg, key)
        if value not in choices:
            raise ConfigError(f"invalid model config: {key} must be one of {', '.join(choices)}, got {value!r}")
    _check_widths(cfg)
    check_ranges(cfg, MODEL_RANGES, "model config")


def _check_widths(cfg: DictConfig) -> None:
    coarse, fine = cfg.coarse, cfg.fine
    if list(cfg.resolution) != [8, 2]:
        raise ConfigError(f"resolution must be [8, 2] (the backbone's strides), got {list(cfg.resolution)}")
    dims = [cfg.resnetfpn.initial_dim, *cfg.resnetfpn.block_dims]
    if len(cfg.resnetfpn.block_dims) != 3 or min(dims) < 1:
        raise ConfigError(f"resnetfpn: initial_dim and three block_dims must be positive, got {dims}")
    if coarse.d_model != cfg.resnetfpn.block_dims[-1] or fine.d_model != cfg.resnetfpn.block_dims[0]:
        raise ConfigError("coarse.d_model must equal block_dims[-1] and fine.d_model block_dims[0]")
    for name, group in (("coarse", coarse), ("fine", fine)):
        if group.nhead < 1 or group.d_model % group.nhead:
            raise ConfigError(f"{name}.nhead must be positive and divide d_model ({group.d_model}), got {group.nhead}")
        if not group.layer_names or any(n not in ("self", "cross") for n in group.layer_names):
            raise ConfigError(f"{name}.layer_names must be a non-empty list of 'self' and 'cross': {list(group.layer_names)}")
    if len(coarse.topks) < 1 or any(k < 1 for k in coarse.topks):
        raise ConfigError(f"coarse.topks must be a non-empty list of positive ints, got {list(coarse.topks)}")
    if coarse.mlp_ratio < 1:
        raise ConfigError(f"coarse.mlp_ratio must be at least 1, got {coarse.mlp_ratio}")


#: Ranges of the model config's numbers: ``(key, test, what it must be)``; null values are skipped (only
#: :data:`NULLABLE_MODEL_KEYS` pass the type check as null).
MODEL_RANGES: tuple[tuple[str, Callable[[Any], bool], str], ...] = (
    ("fine_window_size", lambda x: x >= 1 and x % 2 == 1, "odd and positive"),
    ("match_coarse.thr", lambda x: 0.0 <= x <= 1.0, "in [0, 1]"),
    ("match_coarse.border_rm", lambda x: x >= 0, "at least 0"),
    ("match_coarse.dsmax_temperature", lambda x: x > 0, "positive"),
    ("match_coarse.train_coarse_percent", lambda x: 0 < x <= 1, "in (0, 1]"),
    ("match_coarse.train_pad_num_gt_min", lambda x: x >= 0, "at least 0"),
    ("inference.resize", lambda x: x >= 8, "null or at least 8 (one coarse cell)"),
    ("coarse.max_coarsest_tokens", lambda x: isinstance(x, int) and not isinstance(x, bool) and x >= 1,
     "null or an integer of at least 1"),
)


def check_ranges(cfg: DictConfig, ranges: Sequence[tuple[str, Callable[[Any], bool], str]], which: str) -> None:
    """One :class:`ConfigError` for the first ``(key, test, wanted)`` of ``ranges`` whose value fails its test;
    a key that is null or missing (a run folder written before it existed) is skipped."""
    for key, test, wanted in ranges:
        value = OmegaConf.select(cfg, key, default=None)
        if value is not None and not test(value):
            raise ConfigError(f"invalid {which}: {key} must be {wanted}, got {one_line(value)}")
