"""The matcher: backbone -> position encoding -> coarse transformer -> coarse matching -> fine refinement."""

from __future__ import annotations

import contextlib
import copy
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torch import nn

from .backbone import ResNetFPN
from .chunking import is_tracing
from .config import FEATURE_DTYPES, load_config, validate_config
from .image_io import ImageLike, check_long_side, load_gray, resize_long_side, to_input_pixels
from .matching import FinePreprocess, cell_coordinates, chunked_mutual_nearest_matches, dense_matching_limit, dual_softmax
from .matching import mutual_nearest_matches, pad_with_ground_truth
from .matching import window_expectation
from .matching_triton import use_matching_kernels
from .position_encoding import sine_position_encoding
from .transformer import LocalFeatureTransformer
from .weights import load_strict, read_state_dict

#: Folder of the weights shipped with the project: ``NAME.safetensors`` beside ``NAME.yaml``.
WEIGHTS_DIR = Path(__file__).resolve().parent / "pretrained"

OUTPUT_KEYS = ("keypoints0", "keypoints1", "confidence", "batch_indexes")

#: Warned (once per process, by Python's default filter) when bf16 features are asked for on a CPU without
#: native bf16: there torch runs bf16 convolutions and batched products through slow fallbacks.
EMULATED_BF16_WARNING = (
    "inference.feature_dtype 'bfloat16' on a CPU without native bf16 (AVX512-BF16 or AMX): torch emulates bf16 "
    "here, which is slower than float32 (the sample pair: 46-48 s instead of 4.2 s on 2 cores of an AVX2 AMD EPYC); "
    "'auto' picks float32 on this CPU"
)


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 dot products natively (AVX512-BF16 or AMX). There bf16 matrix products
    and convolutions run about twice as fast as float32 (AMX: more); elsewhere bf16 is emulated and slower."""
    return any(getattr(torch.cpu, name, lambda: False)() for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))


def check_feature_dtype(name: str) -> None:
    """A ValueError unless ``name`` is one of :data:`FEATURE_DTYPES`."""
    if name not in FEATURE_DTYPES:
        raise ValueError(f"inference.feature_dtype must be one of {list(FEATURE_DTYPES)}, got {name!r}")


def resolve_feature_dtype(name: str, device: torch.device | str) -> torch.dtype | None:
    """The dtype of ``inference.feature_dtype`` ``name`` on ``device`` (None: float32, or an outer autocast).

    ``auto`` is bfloat16 on a CPU with native bf16 (:func:`cpu_has_native_bf16`), float32 elsewhere: on GPUs
    (the published precision) and while tracing for export (the graph stays float32). bf16 features keep
    about 99% of the float32 matches within 1 px (README, "Speed and memory").
    """
    check_feature_dtype(name)
    if name == "auto":
        native = torch.device(device).type == "cpu" and not is_tracing() and cpu_has_native_bf16()
        name = "bfloat16" if native else "float32"
    return torch.bfloat16 if name == "bfloat16" else None


def _check_images(batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    if not isinstance(batch, Mapping):
        raise ValueError(f"the batch must be a dict with 'image0' and 'image1' tensors, got {type(batch).__name__}")
    for key in ("image0", "image1"):
        if key not in batch:
            raise ValueError(f"batch needs '{key}'")
        img = batch[key]
        if not isinstance(img, torch.Tensor) or img.ndim != 4 or img.shape[1] != 1:
            shape = tuple(img.shape) if isinstance(img, torch.Tensor) else type(img).__name__
            raise ValueError(f"{key} must be a (B, 1, H, W) tensor, got {shape}")
        if img.shape[0] == 0:
            raise ValueError(f"{key} holds no image (batch size 0)")
        if min(img.shape[2:]) < 8:
            raise ValueError(f"{key} is smaller than one coarse cell (8 px): {tuple(img.shape[2:])}")
        if not img.is_floating_point():
            raise ValueError(f"{key} must be a float tensor in [0, 1], got {img.dtype} (divide by 255?)")
        mask = batch.get("mask" + key[-1])  # None counts as no mask
        if mask is not None and (not isinstance(mask, torch.Tensor) or tuple(mask.shape) != (img.shape[0], *img.shape[2:])):
            got = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
            raise ValueError(f"mask{key[-1]} must be a (B, H, W) = {(img.shape[0], *img.shape[2:])} tensor like {key}, "
                             f"got {got}")
    if batch["image0"].shape[0] != batch["image1"].shape[0]:
        raise ValueError("image0 and image1 need the same batch size")
    return batch["image0"], batch["image1"]


def _check_values(image0: torch.Tensor, image1: torch.Tensor) -> None:
    """Inference inputs lie in [0, 1] (one device sync; skipped while tracing, where it cannot run): 0-255
    floats or NaN would run silently and give a few meaningless matches."""
    if torch.jit.is_tracing() or torch.compiler.is_compiling():
        return
    for key, img in (("image0", image0), ("image1", image1)):
        low, high = (float(v) for v in torch.aminmax(img.detach()))
        if not (0.0 <= low and high <= 1.0):  # NaN fails both comparisons
            raise ValueError(f"{key} must lie in [0, 1], got values in [{low:g}, {high:g}]"
                             + (" (divide by 255?)" if high > 1.0 else ""))


def _pad_grid(feat: torch.Tensor, mask: torch.Tensor | None, multiple: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Zero-pad a map ``(B, C, h, w)`` bottom-right to sides divisible by ``multiple``; the returned mask
    ``(B, h', w')`` marks the original valid cells (None when nothing is padded or masked)."""
    b, _, h, w = feat.shape
    ph, pw = -h % multiple, -w % multiple
    if ph == 0 and pw == 0:
        return feat, mask
    if mask is None:
        mask = torch.ones(b, h, w, dtype=torch.bool, device=feat.device)
    return F.pad(feat, (0, pw, 0, ph)), F.pad(mask, (0, pw, 0, ph), value=False)


class Matcher(nn.Module):
    """LoFTR-style dense matcher with a QuadTree (or linear / full) attention coarse transformer.

    Example:
        >>> m = Matcher(load_config("lite")).eval()
        >>> out = m({"image0": torch.rand(1, 1, 240, 320), "image1": torch.rand(1, 1, 200, 300)})
        >>> sorted(out)
        ['batch_indexes', 'confidence', 'keypoints0', 'keypoints1']
    """

    def __init__(self, config: DictConfig | str | None = None) -> None:
        super().__init__()
        if config is None or isinstance(config, (str, Path)):
            config = load_config(config)
        self.config = copy.deepcopy(config)
        cfg = self.config
        validate_config(cfg)  # values changed after load_config fail here, not at the first pair (or never)
        self.backbone = ResNetFPN(cfg.resnetfpn.initial_dim, list(cfg.resnetfpn.block_dims), cfg.resnetfpn.winograd)
        c = cfg.coarse
        self.loftr_coarse = LocalFeatureTransformer(
            c.d_model, c.nhead, list(c.layer_names), c.attention, c.attn_type, list(c.topks), c.mlp_ratio, c.kernel,
            c.max_coarsest_tokens,
        )
        self.fine_preprocess = FinePreprocess(c.d_model, cfg.fine.d_model, cfg.fine_window_size, cfg.fine_concat_coarse_feat)
        f = cfg.fine
        self.loftr_fine = LocalFeatureTransformer(f.d_model, f.nhead, list(f.layer_names), f.attention)

    # ----------------------------------------------------------------------------------------- stages
    def feature_dtype(self) -> str:
        """What the backbone and the coarse transformer run in, in eval mode on the model's current device:
        ``"float32"`` or ``"bfloat16"`` (``inference.feature_dtype`` with "auto" resolved, see
        :func:`resolve_feature_dtype`)."""
        dtype = resolve_feature_dtype(self.config.inference.feature_dtype, self._device())
        return "bfloat16" if dtype == torch.bfloat16 else "float32"

    def set_max_coarsest_tokens(self, tokens: int | None) -> "Matcher":
        """Set ``coarse.max_coarsest_tokens`` of a built model (e.g. shipped weights) and return it: on grids
        whose coarsest QuadTree level would hold more tokens, levels are added above the trained ones
        (:class:`~matcher.transformer.QuadtreeAttention`); None restores the trained levels everywhere."""
        previous, self.config.coarse.max_coarsest_tokens = self.config.coarse.max_coarsest_tokens, tokens
        try:
            validate_config(self.config)
        except ValueError:
            self.config.coarse.max_coarsest_tokens = previous
            raise
        self.loftr_coarse.set_max_coarsest_tokens(tokens)
        return self

    def _device(self) -> torch.device:
        return next(self.parameters()).device

    def _feature_precision(self) -> tuple[contextlib.AbstractContextManager, torch.dtype | None]:
        """Autocast context for the backbone and the coarse transformer (``inference.feature_dtype``, eval
        mode only) and the dtype it runs them in (None: unchanged, an outer autocast included)."""
        dtype = None if self.training else resolve_feature_dtype(self.config.inference.feature_dtype, self._device())
        if dtype is None:
            return contextlib.nullcontext(), None
        if self._device().type == "cpu" and not cpu_has_native_bf16():
            # one place, so Python's default filter shows it once per process
            warnings.warn(EMULATED_BF16_WARNING, RuntimeWarning)
        return torch.autocast(self._device().type, dtype=dtype), dtype

    def extract_features(self, image0: torch.Tensor, image1: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Backbone maps ``coarse0, fine0, coarse1, fine1``; one pass when both images share a size
        (also what batch norm sees in training). Coarse maps carry the position encoding."""
        if image0.shape == image1.shape:
            coarse, fine = self.backbone(torch.cat([image0, image1]))
            (c0, c1), (f0, f1) = coarse.chunk(2), fine.chunk(2)
        else:
            (c0, f0), (c1, f1) = self.backbone(image0), self.backbone(image1)
        c0, c1 = (c + self._position_encoding(c) for c in (c0, c1))
        return c0, f0, c1, f1

    def _position_encoding(self, feat: torch.Tensor) -> torch.Tensor:
        h, w = feat.shape[2:]
        return sine_position_encoding(feat.shape[1], h, w, self.config.coarse.temp_bug_fix, feat.device, feat.dtype)

    def coarse_transform(
        self, c0: torch.Tensor, c1: torch.Tensor, mask0: torch.Tensor | None, mask1: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Coarse maps ``(B, C, h, w)`` and masks ``(B, h, w)`` -> transformed tokens ``(B, h*w, C)``.

        Grids are padded to the divisibility QuadTree needs and cropped back; padding is masked.
        """
        hw0, hw1 = tuple(c0.shape[2:]), tuple(c1.shape[2:])
        multiple = self.loftr_coarse.padding_multiple(hw0, hw1)
        p0, pm0 = _pad_grid(c0, mask0, multiple)
        p1, pm1 = _pad_grid(c1, mask1, multiple)
        t0, t1 = (p.flatten(2).transpose(1, 2) for p in (p0, p1))
        m0, m1 = (None if m is None else m.flatten(1) for m in (pm0, pm1))
        t0, t1 = self.loftr_coarse(t0, t1, tuple(p0.shape[2:]), tuple(p1.shape[2:]), m0, m1)
        crop = lambda t, hw, phw: t.unflatten(1, phw)[:, : hw[0], : hw[1]].flatten(1, 2)  # noqa: E731
        return crop(t0, hw0, tuple(p0.shape[2:])), crop(t1, hw1, tuple(p1.shape[2:]))

    @torch.inference_mode()
    def attention_selection(self, image0: torch.Tensor, image1: torch.Tensor, layer_index: int) -> dict[str, Any]:
        """Where QuadTree attention looks: for every coarse query of image0, the key cells kept at each
        level of coarse layer ``layer_index`` (a cross layer looks into image1, a self layer into image0).

        Returns ``selection``: list, coarsest level first, of ``(nhead, N_l, K_l)`` indices into that
        level's key grid (batch 0; each query's K_l keys in no particular order), and the padded coarse
        grid sizes ``hw0`` and ``hw1`` (level 0, finest).
        """
        _check_images({"image0": image0, "image1": image1})
        with self._feature_precision()[0]:
            c0, _, c1, _ = self.extract_features(image0, image1)
            multiple = self.loftr_coarse.padding_multiple(tuple(c0.shape[2:]), tuple(c1.shape[2:]))
            (p0, m0), (p1, m1) = _pad_grid(c0, None, multiple), _pad_grid(c1, None, multiple)
            t0, t1 = (p.flatten(2).transpose(1, 2) for p in (p0, p1))
            m0, m1 = (None if m is None else m.flatten(1) for m in (m0, m1))
            hw0, hw1 = tuple(p0.shape[2:]), tuple(p1.shape[2:])
            chosen = self.loftr_coarse.selection(t0, t1, hw0, hw1, layer_index, m0, m1)
        return {"selection": [c[0] for c in chosen], "hw0": hw0, "hw1": hw1}

    # ----------------------------------------------------------------------------------------- forward
    def forward(self, batch: dict[str, Any], internals: bool = False) -> dict[str, Any]:
        """Match a batch of image pairs.

        Args:
            batch: ``image0`` ``(B, 1, H0, W0)`` and ``image1`` ``(B, 1, H1, W1)`` in [0, 1] (any sizes);
                optional ``mask0`` / ``mask1`` ``(B, H, W)`` bool (False = padding). In training mode with
                ground truth (``spv_b_ids``, ``spv_i_ids``, ``spv_j_ids``) the fine stage is padded with
                ground-truth matches. The batch is never modified.
            internals: also return what training and visualisation need (``conf_matrix``, ``expec_f``,
                ``b_ids``, ``i_ids``, ``j_ids``, ``mconf``, ``gt_mask``, ``hw0_c``, ``hw1_c``, ...).
        Returns:
            A new dict: ``keypoints0`` ``(M, 2)``, ``keypoints1`` ``(M, 2)`` (x, y) in pixels of the input
            images (coarse cell (x, y) sits on pixel (8x, 8y)), ``confidence`` ``(M,)``,
            ``batch_indexes`` ``(M,)``.
        """
        image0, image1 = _check_images(batch)
        if not self.training:
            _check_values(image0, image1)
        weights_dtype = self.backbone.conv1.weight.dtype  # float64 / float16 images run in the weights' dtype
        image0, image1 = image0.to(weights_dtype), image1.to(weights_dtype)
        cfg = self.config
        mask0, mask1 = (None if batch.get(k) is None else batch[k][:, ::8, ::8].bool() for k in ("mask0", "mask1"))
        precision, feature_dtype = self._feature_precision()
        with precision:
            c0, f0, c1, f1 = self.extract_features(image0, image1)
            t0, t1 = self.coarse_transform(c0, c1, mask0, mask1)
        if feature_dtype is not None:  # matching and the fine stage in float32
            t0, t1, f0, f1 = (t.float() for t in (t0, t1, f0, f1))
        hw0, hw1 = tuple(c0.shape[2:]), tuple(c1.shape[2:])

        mc = cfg.match_coarse
        fm0, fm1 = (None if m is None else m.flatten(1) for m in (mask0, mask1))
        conf = None
        small = t0.shape[0] * t0.shape[1] * t1.shape[1] <= dense_matching_limit(t0.device)
        if internals or self.training or (small and not use_matching_kernels(t0, cfg.coarse.kernel)):
            conf = dual_softmax(t0, t1, mc.dsmax_temperature, fm0, fm1)
        with torch.no_grad():
            if conf is None:  # large inference pairs: never build the (B, L0, L1) matrix
                b_ids, i_ids, j_ids, mconf = chunked_mutual_nearest_matches(
                    t0, t1, mc.dsmax_temperature, max(mc.thr, 0.0), mc.border_rm, hw0, hw1, fm0, fm1,
                    kernel=cfg.coarse.kernel,
                )
            else:
                b_ids, i_ids, j_ids, mconf = mutual_nearest_matches(conf, max(mc.thr, 0.0), mc.border_rm, hw0, hw1, fm0, fm1)
            if torch.jit.is_tracing():  # ONNX export: see _with_placeholder_match
                b_ids, i_ids, j_ids, mconf = _with_placeholder_match(b_ids, i_ids, j_ids, mconf)
            if self.training and "spv_b_ids" in batch:
                num_train = int(self._max_candidates(conf, fm0, fm1) * mc.train_coarse_percent)
                b_ids, i_ids, j_ids, mconf = pad_with_ground_truth(
                    b_ids, i_ids, j_ids, mconf, batch, num_train, mc.train_pad_num_gt_min
                )

        win0, win1 = self.fine_preprocess(f0, f1, t0, t1, b_ids, i_ids, j_ids, hw0[1], hw1[1])
        if len(b_ids):
            win0, win1 = self.loftr_fine(win0, win1)
        expec_f = window_expectation(win0, win1)

        # pixel coordinates in float32 at least: under an outer bf16 autocast the features are bf16, whose
        # spacing is 2 px at 256-511 and 4 px at 512-1023
        coord_dtype = torch.promote_types(t0.dtype, torch.float32)
        kpts0 = cell_coordinates(i_ids, hw0[1], 8).to(coord_dtype)
        kpts1_c = cell_coordinates(j_ids, hw1[1], 8).to(coord_dtype)
        kpts1 = kpts1_c + expec_f[:, :2].detach().to(coord_dtype) * (cfg.fine_window_size // 2) * 2
        pred = mconf > 0  # ground-truth pads carry confidence 0
        out = {
            "keypoints0": kpts0[pred],
            "keypoints1": kpts1[pred],
            "confidence": mconf[pred],
            "batch_indexes": b_ids[pred],
        }
        if internals:
            out.update(
                conf_matrix=conf, expec_f=expec_f, b_ids=b_ids, i_ids=i_ids, j_ids=j_ids, mconf=mconf,
                gt_mask=~pred, mkpts0_c=kpts0[pred], mkpts1_c=kpts1_c[pred], hw0_c=hw0, hw1_c=hw1,
                hw0_f=tuple(f0.shape[2:]), hw1_f=tuple(f1.shape[2:]),
            )
        return out

    @staticmethod
    def _max_candidates(conf: torch.Tensor, mask0: torch.Tensor | None, mask1: torch.Tensor | None) -> int:
        """Coarse matches ``train_coarse_percent`` is a share of, as LoFTR counts them: ``B * max(L0, L1)``
        without masks, else the sum over pairs of the smaller number of valid cells."""
        b, l0, l1 = conf.shape
        if mask0 is None and mask1 is None:
            return b * max(l0, l1)
        n0 = mask0.sum(1) if mask0 is not None else torch.full((b,), l0, device=conf.device)
        n1 = mask1.sum(1) if mask1 is not None else torch.full((b,), l1, device=conf.device)
        return int(torch.minimum(n0, n1).sum())

    # ----------------------------------------------------------------------------------------- weights
    def load_weights(self, path: str | Path) -> "Matcher":
        """Load a checkpoint strictly: a Lightning ``.ckpt`` (``state_dict``, ``matcher.`` prefix), a plain
        ``.pt`` / ``.pth`` state dict, or ``.safetensors``. Names and shapes must fit this config."""
        load_strict(self, read_state_dict(path), source=str(path))
        return self

    @classmethod
    def from_pretrained(cls, name_or_path: str | Path = "default", config: DictConfig | str | None = None) -> "Matcher":
        """Build a matcher with weights, in eval mode.

        ``name_or_path``: the name of weights shipped in ``matcher/pretrained/`` (``NAME.safetensors`` with its
        ``NAME.yaml`` config), or a checkpoint path. For a path, ``config`` (a config or its name) gives the
        architecture; by default the one :func:`checkpoint_config` finds, else the defaults.
        """
        path = Path(name_or_path)
        if not path.suffix and not path.is_file():  # a shipped name
            path = WEIGHTS_DIR / f"{name_or_path}.safetensors"
            if not path.is_file():
                shipped = sorted(p.stem for p in WEIGHTS_DIR.glob("*.safetensors")) if WEIGHTS_DIR.is_dir() else []
                raise ValueError(f"no shipped weights named {str(name_or_path)!r}; shipped: {shipped or 'none yet'}")
        found = config if config is not None else checkpoint_config(path)
        try:
            return cls(found).load_weights(path).eval()
        except ValueError as err:
            if found is not None:
                raise
            # the defaults did not fit: say where a config would come from
            raise ValueError(f"{err} (no model config found for {path.name}, so the defaults were used: "
                             f"pass the config (--config NAME), or put {path.stem}.yaml beside it)") from None

    # ----------------------------------------------------------------------------------------- convenience
    @torch.inference_mode()
    def match(self, image0: ImageLike, image1: ImageLike, resize: int | None | str = "config") -> dict[str, np.ndarray]:
        """Match two images of any size and channel count.

        Args:
            image0, image1: paths, numpy arrays ``(H, W[, C])`` (uint8, uint16 or float in [0, 1]; RGB[A]
                channels are converted to gray) or channels-first tensors.
            resize: long side the images are resized to; "config" takes ``inference.resize``; None keeps
                the sizes.
        Returns:
            numpy ``keypoints0`` ``(M, 2)`` and ``keypoints1`` ``(M, 2)`` in the ORIGINAL pixel coordinates
            of each image, ``confidence`` ``(M,)``.
        Raises:
            ValueError: for a missing or unreadable file, an empty array, NaN values or an image smaller
            than one coarse cell.
        """
        if isinstance(resize, str) and resize != "config":
            raise ValueError(f"resize must be 'config', None or an integer number of pixels, got {resize!r}")
        long_side = self.config.inference.resize if isinstance(resize, str) else resize
        check_long_side(long_side)  # before reading the images
        device = self._device()
        tensors, scales = [], []
        for name, image in (("image0", image0), ("image1", image1)):
            gray, scale = resize_long_side(load_gray(image, name), long_side)
            tensors.append(torch.from_numpy(np.ascontiguousarray(gray))[None, None].to(device))
            scales.append(scale)
        modes = [(module, module.training) for module in self.modules()]  # a frozen backbone stays frozen
        try:  # inference in eval mode whatever mode the model is in: batch norm must not learn from this pair
            out = self.eval()({"image0": tensors[0], "image1": tensors[1]})
        finally:
            for module, training in modes:
                module.training = training
        return {
            "keypoints0": to_input_pixels(out["keypoints0"].float().cpu().numpy(), scales[0]),
            "keypoints1": to_input_pixels(out["keypoints1"].float().cpu().numpy(), scales[1]),
            "confidence": out["confidence"].float().cpu().numpy(),
        }

    def extra_repr(self) -> str:
        c = self.config.coarse
        return f"attention={c.attention}{'-' + c.attn_type if c.attention == 'quadtree' else ''}, d_model={c.d_model}"


def checkpoint_config(path: str | Path) -> DictConfig | None:
    """The model config a checkpoint was written with, if it can be found: ``NAME.yaml`` beside ``NAME.*``,
    the run's ``model.yaml`` for a checkpoint in a ``train.py`` run's ``checkpoints/`` folder, or the model
    config a ``train.py`` checkpoint carries in its hyper-parameters (read with ``weights_only=True``)."""
    path = Path(path)
    candidates = [path.with_suffix(".yaml")]
    if path.parent.name == "checkpoints":  # train.py: RUN_DIR/checkpoints/*.ckpt beside RUN_DIR/model.yaml
        candidates.append(path.parent.parent / "model.yaml")
    for candidate in candidates:
        if candidate.is_file():
            return load_config(str(candidate))
    if path.suffix == ".ckpt" and path.is_file():
        try:  # memory-mapped: the tensors are not read here, load_weights reads them
            hyper = torch.load(path, map_location="cpu", weights_only=True, mmap=True).get("hyper_parameters", {})
            model_config = hyper["config"]["model_config"]
        except Exception:  # not a train.py checkpoint (or unreadable: load_weights says why)
            return None
        return load_config(None, **model_config)
    return None


def _with_placeholder_match(b_ids, i_ids, j_ids, mconf) -> tuple[torch.Tensor, ...]:
    """The matches plus one placeholder (cell 0 with cell 0, confidence 0, dropped with the ground-truth pads
    at the end). A traced graph has no branches: without it, a trace whose example pair had no match would
    leave the fine stage out for good, and ONNX runtimes fail on the fine stage's reshapes of zero windows."""
    zero = b_ids.new_zeros(1)
    return (torch.cat([b_ids, zero]), torch.cat([i_ids, zero]), torch.cat([j_ids, zero]),
            torch.cat([mconf, mconf.new_zeros(1)]))


def matcher_with_description(weights: str | None = None, config: str | None = None) -> tuple[Matcher, str]:
    """A matcher in eval mode for the command-line tools, and a sentence saying which weights it runs with.

    ``weights`` None takes the shipped default weights, or, while none are shipped, random weights of
    ``config`` (default ``lite``) -- and says so, since their matches are meaningless. A ``config`` without
    ``weights`` that is not the shipped weights' own config raises a ValueError instead of being ignored.
    """
    if weights is not None:
        return Matcher.from_pretrained(weights, config=config), f"weights {weights}"
    if (WEIGHTS_DIR / "default.safetensors").is_file():
        own = WEIGHTS_DIR / "default.yaml"
        if config is not None and config_to_dict(load_config(config)) != config_to_dict(load_config(str(own))):
            raise ValueError(f"--config {config} needs --weights: the shipped default weights have their own config "
                             "(matcher/pretrained/default.yaml); give --weights CHECKPOINT to run another config, "
                             "or drop --config")
        return Matcher.from_pretrained("default"), "the shipped default weights (matcher/pretrained/default.safetensors)"
    torch.manual_seed(0)
    model = Matcher(load_config(config or "lite")).eval()
    return model, "RANDOM weights: no trained weights are shipped yet, so these matches are meaningless"


def config_to_dict(config: DictConfig) -> dict[str, Any]:
    """Plain-dict copy of a config, for saving beside weights or in checkpoints."""
    return OmegaConf.to_container(config, resolve=True)
