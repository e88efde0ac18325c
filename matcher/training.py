"""Lightning training: the LightningModule (losses, schedule, validation) and the DataModule."""

from __future__ import annotations

import copy
import logging
import math
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader, Sampler, Subset

from .config import ConfigError, check_ranges, check_types, load_config, merge_config, one_line, validate_config
from .model import Matcher

TRAIN_CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"

log = logging.getLogger(__name__)

#: Share of a run's total steps the lr warm-up is cut to when the scaled warm-up would not end within the run
#: (default of ``optim.warmup_cap_fraction``; run folders written before that key existed fall back to it).
WARMUP_CAP_FRACTION = 0.1


# ----------------------------------------------------------------------------------------------- config
class DataError(RuntimeError):
    """The configured data cannot be opened (missing folder or index file, bad data option)."""


def _config_path(kind: str, name_or_path: str) -> Path:
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml"):
        if not path.is_file():
            raise ConfigError(f"{kind} config file not found: {path}")
        return path
    path = TRAIN_CONFIG_DIR / kind / f"{name_or_path}.yaml"
    if not path.is_file():
        available = sorted(p.stem for p in (TRAIN_CONFIG_DIR / kind).glob("*.yaml"))
        raise ConfigError(f"unknown {kind} config {name_or_path!r}; available: {available}")
    return path


def _load_yaml(path: Path, what: str) -> DictConfig:
    try:
        cfg = OmegaConf.load(path)
    except Exception as err:  # yaml syntax errors
        raise ConfigError(f"cannot read {what} {path}: {one_line(err)}") from None
    if not isinstance(cfg, DictConfig):
        raise ConfigError(f"{what} {path} is not a mapping of keys")
    return cfg


def _dotlist(overrides: list[str]) -> DictConfig:
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not KEY=VALUE")
        try:
            OmegaConf.from_dotlist([item])
        except Exception as err:  # YAML syntax errors in the value
            raise ConfigError(f"cannot parse override {item!r}: {one_line(err)}") from None
    return OmegaConf.from_dotlist(overrides)


def _split_data_overrides(overrides: list[str]) -> tuple[list[str], list[str]]:
    """``(data.* overrides, the others)``: the data tree is merged after the rest (it may be named by them)."""
    return [o for o in overrides if o.startswith("data.")], [o for o in overrides if not o.startswith("data.")]


def _data_config_name(cfg: DictConfig) -> str:
    return f"data config {cfg.data.get('name')!r}" if cfg.data.get("name") else "data config"


#: Training-config keys that take null besides their default's type: Lightning's "no limit" / "off" for
#: ``trainer.*``, no overrides for ``model_overrides``.
TRAIN_NULLABLE = ("trainer.", "model_overrides")


def _out_of_range(checks: list[tuple[str, Any, bool, str]], which: str) -> None:
    """One ConfigError for the first ``(key, value, ok, wanted)`` that is not ok."""
    for key, value, ok, wanted in checks:
        if not ok:
            raise ConfigError(f"invalid {which}: {key} must be {wanted}, got {value!r}")


#: Ranges of the training config's numbers: ``(key, test, what it must be)`` (types are checked before, by
#: :func:`check_types`; a key that is null or missing, as in a run folder written before it existed, is skipped).
TRAIN_RANGES: tuple[tuple[str, Callable[[Any], bool], str], ...] = (
    ("batch_size", lambda x: x >= 1, "at least 1"),
    ("num_workers", lambda x: x >= 0, "at least 0"),
    ("optim.canonical_lr", lambda x: x > 0, "positive"),
    ("optim.canonical_bs", lambda x: x >= 1, "at least 1"),
    ("optim.weight_decay", lambda x: x >= 0, "at least 0"),
    ("optim.warmup_steps", lambda x: x >= 0, "at least 0"),
    ("optim.warmup_ratio", lambda x: 0 <= x <= 1, "in [0, 1]"),
    ("optim.warmup_cap_fraction", lambda x: 0 <= x <= 1, "in [0, 1]"),
    ("optim.milestones", lambda x: all(m >= 0 for m in x), "epochs, at least 0"),
    ("optim.gamma", lambda x: x > 0, "positive"),
    *((f"loss.{k}", lambda x: x >= 0, "at least 0")
      for k in ("coarse_weight", "fine_weight", "focal_gamma", "pos_weight", "neg_weight")),
    ("loss.focal_alpha", lambda x: 0 <= x <= 1, "in [0, 1]"),
    ("loss.fine_correct_thr", lambda x: x > 0, "positive"),
    ("trainer.num_nodes", lambda x: x >= 1, "at least 1"),
    ("trainer.accumulate_grad_batches", lambda x: x >= 1, "at least 1"),
    ("trainer.checkpoint_every_n_steps", lambda x: x >= 0, "at least 0 (0: off)"),
    ("validation.ransac_thr", lambda x: x > 0, "positive"),
    ("validation.ransac_conf", lambda x: 0 < x < 1, "in (0, 1)"),
    ("validation.epi_thr", lambda x: x > 0, "positive"),
    ("validation.figures", lambda x: x >= 0, "at least 0"),
)


def _check_values(cfg: DictConfig) -> None:
    check_ranges(cfg, TRAIN_RANGES, "training config")


def _check_data_values(cfg: DictConfig, reference: DictConfig) -> None:
    """The data tree's values that would fail only once data loads (or at the first batch)."""
    data, which = cfg.data, _data_config_name(cfg)
    if data.get("name") != reference.get("name"):
        raise ConfigError(f"invalid {which}: data.name cannot change the kind of data of data config "
                          f"{reference.get('name')!r} (its keys are that kind's); choose another with data=NAME")
    checks = []
    if data.get("image_size") is not None:
        size = list(data.image_size)
        checks.append(("data.image_size", size, len(size) == 2 and min(size) >= 8, "[H, W], each at least 8"))
    for key, least in (("train_length", 1), ("val_length", 1), ("samples_per_scene", 1), ("img_resize", 8)):
        if data.get(key) is not None:
            checks.append((f"data.{key}", data[key], data[key] >= least, f"at least {least}"))
    if data.get("min_overlap_score") is not None:
        lo, hi = data.min_overlap_score, data.get("max_overlap_score") or 1.0
        checks.append(("data.min_overlap_score / max_overlap_score", [lo, hi], 0 <= lo <= hi <= 1, "0 <= min <= max <= 1"))
    if data.get("name") == "megadepth" and cfg.batch_size > 1:
        # LoFTR asserts padding for training: the batches stack squares of img_resize and of depth_padding
        for key, default in (("img_padding", True), ("depth_padding", 2000)):
            value = data.get(key, default)
            checks.append((f"data.{key}", value, bool(value), "set for batches of more than one pair (LoFTR pads "
                                                               "every image and depth map to a square)"))
    _out_of_range(checks, which)


def load_train_config(path: str | Path | None = None, overrides: list[str] | None = None) -> DictConfig:
    """The training config: ``configs/train/default.yaml``, then ``path`` merged over it, then dotlist
    ``overrides`` (``key.sub=value``); unknown keys and values of the wrong type raise a :class:`ConfigError`
    that names the training or the data config. ``data`` is resolved into its own tree."""
    defaults = _load_yaml(_config_path("train", "default"), "training config")
    cfg = copy.deepcopy(defaults)
    OmegaConf.set_struct(cfg, True)
    # model keys are checked by load_config against the model config, so this one node stays open
    OmegaConf.set_struct(cfg.model_overrides, False)
    if path is not None:
        file = _config_path("train", str(path))
        cfg = merge_config(cfg, _load_yaml(file, "training config"), "training config", str(file))
    data_overrides, rest = _split_data_overrides(overrides or [])
    if rest:
        cfg = merge_config(cfg, _dotlist(rest), "training config", "overrides")
    check_types(cfg, defaults, "training config", nullable=TRAIN_NULLABLE)
    _check_values(cfg)
    data_reference = None
    if isinstance(cfg.data, str):
        file = _config_path("data", cfg.data)
        data_reference = _load_yaml(file, "data config")
        data_cfg = copy.deepcopy(data_reference)
        OmegaConf.set_struct(data_cfg, True)
        OmegaConf.set_struct(cfg, False)
        cfg.data = data_cfg
        OmegaConf.set_struct(cfg, True)
    elif not isinstance(cfg.data, DictConfig):
        raise ConfigError(f"invalid training config: data must be a data config name or YAML path, got {cfg.data!r}")
    if data_overrides:
        cfg = merge_config(cfg, _dotlist(data_overrides), _data_config_name(cfg), "overrides")
    if data_reference is not None:
        check_types(cfg.data, data_reference, _data_config_name(cfg), "data.")
        _check_data_values(cfg, data_reference)
    return cfg


#: Keys fixed for the life of a run: the checkpoint's optimiser state and lr schedule (the scaled lr, the
#: warm-up and the epoch length that places the milestones) were made for them, and Lightning restores those
#: as saved, so a new value would be written into config.yaml without taking effect.
RESUME_FIXED_KEYS = (
    "batch_size", "trainer.devices", "trainer.num_nodes", "trainer.accumulate_grad_batches", "optim",
    "data.train_length", "data.samples_per_scene",
)


def _leaf_keys(cfg: DictConfig, keys: tuple[str, ...]) -> list[str]:
    """``keys`` with each section (``optim``) replaced by its own keys (``optim.gamma`` ...)."""
    leaves = []
    for key in keys:
        node = OmegaConf.select(cfg, key)
        if isinstance(node, DictConfig):
            leaves.extend(f"{key}.{k}" for k in node)
        else:
            leaves.append(key)
    return leaves


def merge_run_overrides(cfg: DictConfig, overrides: list[str]) -> DictConfig:
    """Overrides given when a run is resumed, merged over its saved ``config.yaml`` with the same checks.
    ``model``, ``data`` and :data:`RESUME_FIXED_KEYS` cannot change (ConfigError)."""
    OmegaConf.set_struct(cfg, True)
    if not overrides:
        return cfg
    for item in overrides:
        if item.startswith(("model=", "data=")):
            raise ConfigError(f"{item.split('=')[0]} cannot change when a run is resumed ({item!r})")
    data_overrides, rest = _split_data_overrides(overrides)
    merged = merge_config(cfg, _dotlist(rest), "training config", "overrides") if rest else cfg
    if data_overrides:
        merged = merge_config(merged, _dotlist(data_overrides), _data_config_name(cfg), "overrides")
    defaults = _load_yaml(_config_path("train", "default"), "training config")
    check_types(merged, defaults, "training config", nullable=TRAIN_NULLABLE)
    _check_values(merged)
    _check_data_values(merged, cfg.data)
    changed = [key for key in _leaf_keys(cfg, RESUME_FIXED_KEYS) if OmegaConf.select(cfg, key) != OmegaConf.select(merged, key)]
    if changed:
        what = ", ".join(
            f"{key} ({one_line(OmegaConf.select(cfg, key))} -> {one_line(OmegaConf.select(merged, key))})" for key in changed
        )
        raise ConfigError(
            f"{what} cannot change when a run is resumed: its optimiser state and lr schedule were made for the "
            f"saved values; start a new run from its weights instead (--init-weights RUN_DIR/checkpoints/last.ckpt)"
        )
    return merged


def build_model_config(cfg: DictConfig, saved: Path | None = None) -> DictConfig:
    """The model config named by ``cfg.model`` with ``cfg.model_overrides`` merged over it; errors are
    :class:`ConfigError` s of one line. ``saved``: a resumed run's ``model.yaml``, used instead of the named
    config, so that the run keeps the model settings it started with when the named config's defaults
    change between versions."""
    try:
        model_cfg = load_config(saved if saved is not None else cfg.model)
        if cfg.model_overrides:
            overrides = OmegaConf.to_container(cfg.model_overrides)
            model_cfg = merge_config(model_cfg, overrides, source=f"{cfg.model!r} + model_overrides")
            validate_config(model_cfg)
        return model_cfg
    except (ValueError, FileNotFoundError) as err:  # ConfigError included: one line already
        raise ConfigError(one_line(err)) from None


# ----------------------------------------------------------------------------------------------- schedule
def lr_factor(step: int, steps_per_epoch: int, warmup_steps: int, warmup_ratio: float, milestones: list[int], gamma: float) -> float:
    """Learning-rate multiplier at optimiser step ``step``: linear warm-up from ``warmup_ratio`` to 1 over
    ``warmup_steps``, times ``gamma`` for every epoch milestone passed."""
    epoch = step // max(steps_per_epoch, 1)
    decay = gamma ** sum(epoch >= m for m in milestones)
    if step < warmup_steps:
        return decay * (warmup_ratio + (1.0 - warmup_ratio) * step / warmup_steps)
    return decay


def scaled_lr_and_warmup(optim: DictConfig, total_batch: int) -> tuple[float, int]:
    """The published scaling: lr proportional to the total batch, warm-up steps inversely."""
    lr = optim.canonical_lr * total_batch / optim.canonical_bs
    warmup = math.floor(optim.warmup_steps * optim.canonical_bs / total_batch)
    return lr, warmup


def optimizer_steps_per_epoch(batches: int, accumulate: int) -> int:
    """Optimiser steps in an epoch of ``batches`` batches: Lightning also steps on the last, partial
    accumulation group of an epoch."""
    return max(1, math.ceil(batches / accumulate))


def planned_total_steps(max_steps: int | None, max_epochs: int | None, steps_per_epoch: int) -> int | None:
    """Optimiser steps the run will take: the smaller of ``max_steps`` and ``max_epochs`` x ``steps_per_epoch``
    (-1 or None: no limit); None when neither limits the run."""
    limits = []
    if max_steps is not None and max_steps >= 0:
        limits.append(int(max_steps))
    if max_epochs is not None and max_epochs >= 0:
        limits.append(int(max_epochs) * int(steps_per_epoch))
    return min(limits) if limits else None


def capped_warmup(warmup: int, total_steps: int | None, fraction: float) -> tuple[int, bool]:
    """``(warm-up steps, capped)``: a warm-up that would not end within the run (``warmup >= total_steps``: the lr
    would never reach its target) is cut to ``fraction`` of the run's total steps; any other one is kept."""
    if total_steps is None or warmup < total_steps:
        return warmup, False
    return math.floor(fraction * total_steps), True


# ----------------------------------------------------------------------------------------------- module
class NonFiniteLossError(RuntimeError):
    """Raised instead of stepping the optimiser on a NaN / inf loss."""


class MatcherModule(pl.LightningModule):
    """Trains :class:`Matcher` with the coarse focal loss and the fine L2 loss; validates pose AUC."""

    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__()
        self.save_hyperparameters({"config": config})  # a plain dict: checkpoints load with weights_only=True
        self.cfg = OmegaConf.create(config)
        self.matcher = Matcher(load_config(None, **config["model_config"]))
        if self.matcher.config.inference.feature_dtype == "auto":
            # validation measures what eval/pose.py measures: float32 features on any CPU (auto would pick bf16
            # on CPUs with native bf16); the saved model config keeps "auto"
            self.matcher.config.inference.feature_dtype = "float32"
        self._val_outputs: list[dict[str, np.ndarray]] = []
        self.warmup_steps: int | None = None  # the run's lr warm-up, fixed when the run starts (kept on resume)
        self._resumed_warmup: int | None = None

    # ------------------------------------------------------------------ loss
    def compute_loss(self, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        from .losses import coarse_focal_loss, fine_l2_loss
        from .supervision import coarse_supervision, fine_supervision

        hw0 = tuple(math.ceil(s / 8) for s in batch["image0"].shape[2:])
        hw1 = tuple(math.ceil(s / 8) for s in batch["image1"].shape[2:])
        spv = coarse_supervision(batch, hw0, hw1)
        out = self.matcher({**batch, **spv}, internals=True)
        expec_gt = fine_supervision(spv, out["b_ids"], out["i_ids"], out["j_ids"], window=self.matcher.config.fine_window_size)
        if len(spv["spv_b_ids"]) == 0:  # the fine stage's only zero-confidence entry is pad_with_ground_truth's placeholder
            expec_gt = expec_gt.masked_fill((out["mconf"] == 0)[:, None], float("inf"))  # outside the window: no target
        lc = self.cfg.loss
        m0 = batch["mask0"][:, ::8, ::8].flatten(1).bool() if "mask0" in batch else None
        m1 = batch["mask1"][:, ::8, ::8].flatten(1).bool() if "mask1" in batch else None
        coarse = coarse_focal_loss(
            out["conf_matrix"], spv["conf_matrix_gt"], lc.focal_alpha, lc.focal_gamma, lc.pos_weight, lc.neg_weight,
            lc.sparse, m0, m1,
        )
        fine = fine_l2_loss(out["expec_f"], expec_gt, lc.fine_correct_thr)
        loss = lc.coarse_weight * coarse + lc.fine_weight * fine
        stats = {"loss_coarse": coarse.detach(), "loss_fine": fine.detach(), "num_gt": torch.tensor(float(len(spv["spv_b_ids"])))}
        return loss, stats

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        loss, stats = self.compute_loss(batch)
        if not torch.isfinite(loss):
            names = batch.get("pair_names")
            raise NonFiniteLossError(
                f"non-finite loss {loss.item()} at step {self.global_step} (pairs {names}); stopping before the "
                f"optimiser writes NaN weights. Last good weights are in the last checkpoint."
            )
        self.log("train/loss", loss, prog_bar=True, batch_size=batch["image0"].shape[0])
        self.log_dict({f"train/{k}": v for k, v in stats.items()}, batch_size=batch["image0"].shape[0])
        self.log("lr", self.trainer.optimizers[0].param_groups[0]["lr"], prog_bar=True)
        return loss

    # ------------------------------------------------------------------ validation
    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        from .validation import evaluate_batch

        with torch.no_grad():
            out = self.matcher({k: v for k, v in batch.items() if k in ("image0", "image1", "mask0", "mask1")})
        vcfg = self.cfg.validation
        results = evaluate_batch(batch, out, vcfg.ransac_thr, vcfg.ransac_conf, epi_thr=vcfg.epi_thr)
        self._val_outputs.extend(results)
        if batch_idx < vcfg.figures and self.global_rank == 0:
            self._save_figure(batch, out, results[0], batch_idx)

    def on_validation_epoch_end(self) -> None:
        from .validation import summarize

        gathered = self._val_outputs
        if self.trainer.world_size > 1:
            all_lists: list[Any] = [None] * self.trainer.world_size
            torch.distributed.all_gather_object(all_lists, self._val_outputs)
            gathered = [r for lst in all_lists for r in lst]
        summary = summarize(gathered)
        self._val_outputs = []
        for key, value in summary.items():
            self.log(f"val/{key}", float(value), prog_bar=key in ("auc@5", "auc@10"), sync_dist=False, rank_zero_only=True)

    def _save_figure(self, batch: dict[str, Any], out: dict[str, torch.Tensor], result: dict[str, Any], index: int) -> None:
        from .viz import plot_matches

        sel = out["batch_indexes"] == 0
        k0, k1 = out["keypoints0"][sel].cpu().numpy(), out["keypoints1"][sel].cpu().numpy()
        correct = result.get("correct")
        title = f"step {self.global_step}: {len(k0)} matches, pose error {result.get('pose_error', float('nan')):.1f} deg"
        path = Path(self.cfg.run_dir) / "val_figures" / f"step{self.global_step:07d}_pair{index}.png"
        plot_matches(
            batch["image0"][0, 0].cpu().numpy(), batch["image1"][0, 0].cpu().numpy(), k0, k1,
            out["confidence"][sel].cpu().numpy(), correct, title=title, path=path,
        )

    # ------------------------------------------------------------------ optimiser
    def configure_optimizers(self):
        optim = self.cfg.optim
        total_batch = self.cfg.batch_size * self.trainer.world_size * self.trainer.accumulate_grad_batches
        lr, warmup = scaled_lr_and_warmup(optim, total_batch)
        optimizer = torch.optim.AdamW(self.parameters(), lr=lr, weight_decay=optim.weight_decay)
        datamodule = self.trainer.datamodule  # set up before this hook: it knows the epoch length
        batches = datamodule.batches_per_epoch() if datamodule is not None else self.trainer.num_training_batches
        steps_per_epoch = optimizer_steps_per_epoch(int(batches), self.trainer.accumulate_grad_batches)
        if self._resumed_warmup is not None:
            # a resumed run keeps the warm-up it started with, even if a new --max-steps changes its length
            self.warmup_steps = self._resumed_warmup
        else:
            total = planned_total_steps(self.trainer.max_steps, self.trainer.max_epochs, steps_per_epoch)
            fraction = float(optim.get("warmup_cap_fraction", WARMUP_CAP_FRACTION))
            self.warmup_steps, capped = capped_warmup(warmup, total, fraction)
            if capped and self.global_rank == 0:
                log.warning(
                    f"lr warm-up: the scaled warm-up of {warmup} steps (optim.warmup_steps {optim.warmup_steps} x "
                    f"{optim.canonical_bs} / total batch {total_batch}) does not end within the run's {total} steps; "
                    f"capped to {self.warmup_steps} steps ({fraction:g} of the run, optim.warmup_cap_fraction)"
                )
        milestones = list(optim.milestones)
        # reads self.warmup_steps at every step: a warm-up restored from a checkpoint after this hook still applies
        schedule = lambda step: lr_factor(step, steps_per_epoch, self.warmup_steps, optim.warmup_ratio, milestones, optim.gamma)  # noqa: E731
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["lr_warmup_steps"] = self.warmup_steps

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        warmup = checkpoint.get("lr_warmup_steps")
        if warmup is not None:
            self._resumed_warmup = self.warmup_steps = int(warmup)


# ----------------------------------------------------------------------------------------------- data
def resume_position(trainer: pl.Trainer, batch_size: int, batches_per_epoch: int) -> tuple[int, int]:
    """``(epoch, samples already trained in it)`` where a fit continues; ``(0, 0)`` for a new run.

    When a run resumes inside an epoch, Lightning restarts the epoch's data iterator but runs only the
    batches left, so a sampler that starts over replays the epoch's first batches and never draws its last
    ones; with worker processes the iterator also draws its first indices before Lightning sets the sampler's
    epoch. Read when the data loader is built, from the restored loop state, this places the sampler itself."""
    loop = trainer.fit_loop
    epoch = loop.epoch_progress.current.processed
    done = loop.epoch_loop.batch_progress.current.processed if loop.epoch_loop.restarting else 0
    if done >= batches_per_epoch:  # saved at the end of an epoch: the next one starts afresh
        return epoch + 1, 0
    return epoch, done * batch_size


class EpochSubsetSampler(Sampler[int]):
    """Draws ``samples_per_group`` indices per group and epoch, reseeded every epoch: fresh synthetic scenes /
    a new per-scene sample each epoch. ``replacement``: each draw independent, as LoFTR's RandomConcatSampler
    (``SB_SUBSET_SAMPLE_REPLACEMENT = True``); False: without replacement where the group is large enough. An
    empty group (a scene without pairs) takes its draw from a random non-empty group, so the epoch length is
    the same on every DDP rank however many of its scenes are empty."""

    def __init__(self, groups: list[list[int]], samples_per_group: int, seed: int = 0, replacement: bool = True) -> None:
        if groups and not any(len(g) for g in groups):
            raise ValueError(f"none of the {len(groups)} groups (scenes) has a sample to draw")
        self.groups, self.samples_per_group, self.seed, self.epoch = groups, samples_per_group, seed, 0
        self.replacement, self._skip = replacement, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def resume_at(self, epoch: int, skip: int) -> None:
        """Continue inside ``epoch``: its next draw leaves out its first ``skip`` indices (a resumed run)."""
        self.epoch, self._skip = epoch, skip

    def __len__(self) -> int:
        return self.samples_per_group * len(self.groups)

    def __iter__(self) -> Iterator[int]:
        rng = np.random.default_rng([self.seed, self.epoch])
        picked = []
        drawable = [g for g in self.groups if len(g)]
        for group in self.groups:
            if not len(group):
                group = drawable[rng.integers(len(drawable))]
            if isinstance(group, range) and len(group) > 100 * self.samples_per_group:
                # a huge virtual range (procedural scenes): collisions are negligible, skip the permutation
                picked.extend((group.start + rng.integers(0, len(group), self.samples_per_group)).tolist())
                continue
            replace = self.replacement or len(group) < self.samples_per_group
            picked.extend(rng.choice(np.asarray(group), self.samples_per_group, replace=replace).tolist())
        rng.shuffle(picked)
        self.epoch += 1  # also advances when Lightning does not call set_epoch
        picked, self._skip = picked[self._skip :], 0
        return iter(picked)


class MatcherDataModule(pl.LightningDataModule):
    """Builds the configured datasets; under DDP each rank gets its own scenes (or scene seeds)."""

    def __init__(self, data_cfg: DictConfig, batch_size: int, num_workers: int, seed: int) -> None:
        super().__init__()
        self.data_cfg, self.batch_size, self.num_workers, self.seed = data_cfg, batch_size, num_workers, seed
        self.train_groups: list[list[int]] = []

    def setup(self, stage: str | None = None) -> None:
        from .data_factory import build_datasets

        rank = self.trainer.global_rank if self.trainer is not None else 0
        world = self.trainer.world_size if self.trainer is not None else 1
        try:
            self.train_set, groups, self.samples_per_group, self.val_set = build_datasets(self.data_cfg, rank, world)
        except (FileNotFoundError, ValueError) as err:
            hint = " (where each file goes: datasets/README.md)" if self.data_cfg.get("name") in ("scannet", "megadepth") else ""
            raise DataError(f"data {self.data_cfg.get('name')!r}: {one_line(err)}{hint}") from err
        if groups and not any(len(g) for g in groups):
            where = f"rank {rank}'s {len(groups)}" if world > 1 else f"the {len(groups)}"
            raise DataError(f"data {self.data_cfg.get('name')!r}: none of {where} training scenes has a pair "
                            f"(min_overlap_score {self.data_cfg.get('min_overlap_score')}; train_list to leave empty scenes out)")
        self.train_groups = groups

    def batches_per_epoch(self) -> int:
        """Training batches per epoch on this rank (the sampler's draw, dropping the last partial batch)."""
        return self.samples_per_group * len(self.train_groups) // self.batch_size

    def train_dataloader(self) -> DataLoader:
        sampler = EpochSubsetSampler(
            self.train_groups, self.samples_per_group, self.seed + 1000 * self._rank(),
            # a run saved before the key existed drew without replacement and keeps doing so when resumed
            replacement=bool(self.data_cfg.get("sample_with_replacement", False)),
        )
        if self.trainer is not None:
            sampler.resume_at(*resume_position(self.trainer, self.batch_size, self.batches_per_epoch()))
        return DataLoader(
            self.train_set, batch_size=self.batch_size, sampler=sampler, num_workers=self.num_workers,
            pin_memory=torch.cuda.is_available(), persistent_workers=self.num_workers > 0, drop_last=True,
        )

    def val_dataloader(self) -> DataLoader:
        rank, world = self._rank(), (self.trainer.world_size if self.trainer is not None else 1)
        shard = Subset(self.val_set, list(range(rank, len(self.val_set), world)))
        return DataLoader(shard, batch_size=1, num_workers=self.num_workers, shuffle=False)

    def _rank(self) -> int:
        return self.trainer.global_rank if self.trainer is not None else 0
