"""Lightning training: the LightningModule (losses, schedule, validation) and the DataModule."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader, Sampler, Subset

from .config import load_config, merge_config
from .model import Matcher

TRAIN_CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"


# ----------------------------------------------------------------------------------------------- config
def _config_path(kind: str, name_or_path: str) -> Path:
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml"):
        return path
    path = TRAIN_CONFIG_DIR / kind / f"{name_or_path}.yaml"
    if not path.is_file():
        available = sorted(p.stem for p in (TRAIN_CONFIG_DIR / kind).glob("*.yaml"))
        raise ValueError(f"unknown {kind} config {name_or_path!r}; available: {available}")
    return path


def load_train_config(path: str | Path | None = None, overrides: list[str] | None = None) -> DictConfig:
    """The training config: ``configs/train/default.yaml``, then ``path`` merged over it, then dotlist
    ``overrides`` (``key.sub=value``); unknown keys raise. ``data`` is resolved into its own tree."""
    cfg = OmegaConf.load(_config_path("train", "default"))
    OmegaConf.set_struct(cfg, True)
    # model keys are checked by load_config against the model config, so this one node stays open
    OmegaConf.set_struct(cfg.model_overrides, False)
    if path is not None:
        cfg = merge_config(cfg, OmegaConf.load(_config_path("train", str(path))))
    data_overrides = [o for o in overrides or [] if o.startswith("data.")]
    rest = [o for o in overrides or [] if not o.startswith("data.")]
    if rest:
        cfg = merge_config(cfg, OmegaConf.from_dotlist(rest))
    if isinstance(cfg.data, str):
        OmegaConf.set_struct(cfg, False)
        data_cfg = OmegaConf.load(_config_path("data", cfg.data))
        OmegaConf.set_struct(data_cfg, True)
        cfg.data = data_cfg
        OmegaConf.set_struct(cfg, True)
    if data_overrides:
        cfg = merge_config(cfg, OmegaConf.from_dotlist(data_overrides))
    return cfg


def build_model_config(cfg: DictConfig) -> DictConfig:
    overrides = OmegaConf.to_container(cfg.model_overrides) if cfg.model_overrides else {}
    return load_config(cfg.model, **overrides)


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
        self._val_outputs: list[dict[str, np.ndarray]] = []

    # ------------------------------------------------------------------ loss
    def compute_loss(self, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        from .losses import coarse_focal_loss, fine_l2_loss
        from .supervision import coarse_supervision, fine_supervision

        hw0 = tuple(math.ceil(s / 8) for s in batch["image0"].shape[2:])
        hw1 = tuple(math.ceil(s / 8) for s in batch["image1"].shape[2:])
        spv = coarse_supervision(batch, hw0, hw1)
        out = self.matcher({**batch, **spv}, internals=True)
        expec_gt = fine_supervision(spv, out["b_ids"], out["i_ids"], out["j_ids"], window=self.matcher.config.fine_window_size)
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
        results = evaluate_batch(batch, out, vcfg.ransac_thr, vcfg.ransac_conf)
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
        steps_per_epoch = max(1, int(batches) // self.trainer.accumulate_grad_batches)
        schedule = lambda step: lr_factor(step, int(steps_per_epoch), warmup, optim.warmup_ratio, list(optim.milestones), optim.gamma)  # noqa: E731
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


# ----------------------------------------------------------------------------------------------- data
class EpochSubsetSampler(Sampler[int]):
    """Draws ``num_samples`` indices per epoch from ``indices`` (without replacement where possible),
    reseeded every epoch: fresh synthetic scenes / a new per-scene sample each epoch."""

    def __init__(self, groups: list[list[int]], samples_per_group: int, seed: int = 0) -> None:
        self.groups, self.samples_per_group, self.seed, self.epoch = groups, samples_per_group, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.samples_per_group * len(self.groups)

    def __iter__(self) -> Iterator[int]:
        rng = np.random.default_rng([self.seed, self.epoch])
        picked = []
        for group in self.groups:
            if isinstance(group, range) and len(group) > 100 * self.samples_per_group:
                # a huge virtual range (procedural scenes): collisions are negligible, skip the permutation
                picked.extend((group.start + rng.integers(0, len(group), self.samples_per_group)).tolist())
                continue
            replace = len(group) < self.samples_per_group
            picked.extend(rng.choice(np.asarray(group), self.samples_per_group, replace=replace).tolist())
        rng.shuffle(picked)
        self.epoch += 1  # also advances when Lightning does not call set_epoch
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
        self.train_set, groups, self.samples_per_group, self.val_set = build_datasets(self.data_cfg, rank, world)
        self.train_groups = groups

    def batches_per_epoch(self) -> int:
        """Training batches per epoch on this rank (the sampler's draw, dropping the last partial batch)."""
        return self.samples_per_group * len(self.train_groups) // self.batch_size

    def train_dataloader(self) -> DataLoader:
        sampler = EpochSubsetSampler(self.train_groups, self.samples_per_group, self.seed + 1000 * self._rank())
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
