"""Train the matcher with PyTorch Lightning.

    python train.py                                   # lite QuadTree-B on built-in synthetic data, CPU
    python train.py --data scannet --model quadtree_b_indoor --devices 4 --strategy ddp --batch-size 2
    python train.py --resume runs/default             # continue a run from its last checkpoint
    python train.py --set optim.milestones=[3,6] --set loss.fine_weight=0.5   # any config key

Every run writes its resolved config to RUN_DIR/config.yaml, checkpoints to RUN_DIR/checkpoints
(last.ckpt, written atomically every `trainer.checkpoint_every_n_steps`, after every validation and after the
last step, so it holds the final state of a finished run; and the best by val/auc@10), metrics to RUN_DIR/logs
and validation figures to RUN_DIR/val_figures. Training always ends with a validation, so a run shorter than
one validation interval has one too. --resume of a run that reached its max steps / epochs says so and trains
nothing. Configuration and data errors print one line `error: ...` and exit with status 2.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from pathlib import Path

import pytorch_lightning as pl
from omegaconf import OmegaConf
import torch
from pytorch_lightning.callbacks import Callback, LearningRateMonitor, ModelCheckpoint, TQDMProgressBar
from pytorch_lightning.loggers import CSVLogger
from pytorch_lightning.trainer.states import TrainerFn
from pytorch_lightning.utilities.exceptions import MisconfigurationException

from matcher import config_to_dict
from matcher.config import one_line
from matcher.training import (
    ConfigError, DataError, MatcherDataModule, MatcherModule, build_model_config, load_train_config, merge_run_overrides,
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="training config name (configs/train/) or YAML merged over the defaults")
    p.add_argument("--model", help="model config name (configs/model/) or YAML path")
    p.add_argument("--data", help="data config name (configs/data/) or YAML path")
    p.add_argument("--batch-size", type=int, help="pairs per device and step")
    p.add_argument("--num-workers", type=int, help="data-loading processes per device")
    p.add_argument("--devices", help="number of devices, e.g. 1, 4, or auto")
    p.add_argument("--num-nodes", type=int, help="machines (multi-node DDP)")
    p.add_argument("--accelerator", help="cpu, gpu or auto")
    p.add_argument("--strategy", help="auto, ddp, ...")
    p.add_argument("--precision", help="32-true, 16-mixed or bf16-mixed")
    p.add_argument("--max-steps", type=int, help="stop after this many optimiser steps")
    p.add_argument("--max-epochs", type=int, help="stop after this many epochs")
    p.add_argument("--lr", type=float, help="canonical lr (at optim.canonical_bs; scaled by the total batch)")
    p.add_argument("--run-dir", help="output folder of the run")
    p.add_argument("--init-weights", help="checkpoint to initialise the model from (weights only)")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its last checkpoint")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="any config key (repeatable)")
    return p.parse_args(argv)


def _overrides(args: argparse.Namespace) -> list[str]:
    pairs = {
        "model": args.model, "data": args.data, "batch_size": args.batch_size, "num_workers": args.num_workers,
        "trainer.devices": args.devices, "trainer.num_nodes": args.num_nodes, "trainer.accelerator": args.accelerator,
        "trainer.strategy": args.strategy, "trainer.precision": args.precision, "trainer.max_steps": args.max_steps,
        "trainer.max_epochs": args.max_epochs, "optim.canonical_lr": args.lr, "run_dir": args.run_dir,
        "init_weights": args.init_weights,
    }
    return [f"{k}={v}" for k, v in pairs.items() if v is not None] + list(args.set)


def _resume_config(run_dir: Path, extra: list[str]):
    saved = run_dir / "config.yaml"
    if not saved.is_file():
        raise ConfigError(f"--resume: no config.yaml in {run_dir}")
    return merge_run_overrides(OmegaConf.load(saved), extra)


def _finished(ckpt: Path, cfg) -> str | None:
    """Why the run saved in ``ckpt`` has nothing left to train under ``cfg``'s limits, or None."""
    try:
        state = torch.load(ckpt, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # truncated or not a checkpoint
        raise ConfigError(f"--resume: cannot read {ckpt}: {type(err).__name__}: {one_line(err)[:300]}") from None
    step = int(state.get("global_step", 0))
    fit_loop = state.get("loops", {}).get("fit_loop", {})
    epoch_progress = fit_loop.get("epoch_progress", {}).get("current", {})
    # epochs trained: last.ckpt is written within the last batch of an epoch (is_last_batch), before the epoch's
    # own counters advance; a checkpoint from the end of an epoch has `processed` advanced already
    last_batch = bool(fit_loop.get("epoch_loop.batch_progress", {}).get("is_last_batch", False))
    epochs = max(epoch_progress.get("processed", 0), epoch_progress.get("completed", 0) + last_batch) if epoch_progress else None
    max_steps, max_epochs = cfg.trainer.max_steps, cfg.trainer.max_epochs
    if max_steps is not None and max_steps >= 0 and step >= max_steps:
        return f"it reached trainer.max_steps={max_steps} (global step {step}); pass a larger --max-steps to train on"
    if max_epochs is not None and max_epochs >= 0 and epochs is not None and epochs >= max_epochs:
        return f"it trained trainer.max_epochs={max_epochs} epochs (global step {step}); pass a larger --max-epochs to train on"
    return None


def is_last_step(trainer: pl.Trainer, batch_idx: int) -> bool:
    """Whether training ends after this batch: `max_steps` reached, or the last batch of the last epoch."""
    max_steps, max_epochs = trainer.max_steps, trainer.max_epochs
    if max_steps is not None and max_steps >= 0 and trainer.global_step >= max_steps:
        return True
    return (
        max_epochs is not None and max_epochs >= 0 and trainer.current_epoch + 1 >= max_epochs
        and batch_idx + 1 >= trainer.num_training_batches
    )


class AtomicCheckpoint(ModelCheckpoint):
    """Writes each checkpoint to a temporary file and renames it, so a run killed at any moment
    (kill -9 included) never leaves a half-written last.ckpt behind. Besides every `every_n_train_steps`, it
    saves after the last training step (so last.ckpt holds the final state of a finished run) and after every
    validation (so it also holds the best checkpoint's bookkeeping of that validation)."""

    def _save_checkpoint(self, trainer: pl.Trainer, filepath: str) -> None:
        tmp = f"{filepath}.tmp"
        trainer.save_checkpoint(tmp, self.save_weights_only)
        if trainer.is_global_zero:
            os.replace(tmp, filepath)
        self._last_global_step_saved = trainer.global_step
        self._last_checkpoint_saved = filepath

    def _may_save(self, trainer: pl.Trainer) -> bool:
        return (
            trainer.state.fn == TrainerFn.FITTING and not trainer.fast_dev_run and not trainer.sanity_checking
            and trainer.global_step > 0
        )

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch, batch_idx: int) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if self._may_save(trainer) and trainer.global_step != self._last_global_step_saved and is_last_step(trainer, batch_idx):
            self._save_topk_checkpoint(trainer, self._monitor_candidates(trainer))

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_validation_end(trainer, pl_module)
        if self._may_save(trainer):
            self._save_topk_checkpoint(trainer, self._monitor_candidates(trainer))


class ValidateAtEnd(Callback):
    """Validates after the last training step when that step is not a scheduled validation step (a run stopped by
    `max_steps` inside an epoch), so every run ends with validation metrics, figures and a best checkpoint.
    Setting `should_stop` on the last step is how Lightning is asked to validate before it stops."""

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch, batch_idx: int) -> None:
        if is_last_step(trainer, batch_idx):
            trainer.should_stop = True


class SaveRunConfig(Callback):
    """Writes RUN_DIR/config.yaml and model.yaml (what Matcher.from_pretrained needs beside the weights) when
    training starts, after the data is set up."""

    def __init__(self, run_dir: Path, cfg, model_cfg) -> None:
        self.run_dir, self.cfg, self.model_cfg = run_dir, cfg, model_cfg

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(self.cfg, self.run_dir / "config.yaml")
        OmegaConf.save(self.model_cfg, self.run_dir / "model.yaml")


def archive_metrics(run_dir: Path) -> None:
    """Lightning's CSV logger deletes an existing metrics.csv; on resume keep it as metrics-K.csv so the
    whole loss curve of a run survives its restarts."""
    current = run_dir / "logs" / "metrics.csv"
    if current.is_file():
        k = len(list(current.parent.glob("metrics-*.csv")))
        current.rename(current.parent / f"metrics-{k}.csv")


def build_trainer(cfg, run_dir: Path) -> pl.Trainer:
    t = cfg.trainer
    # the best checkpoint first: after a validation it updates its bookkeeping before last.ckpt is written
    checkpoints = [
        ModelCheckpoint(dirpath=run_dir / "checkpoints", filename="best-{epoch}-{step}", monitor="val/auc@10",
                        mode="max", save_top_k=1, save_on_train_epoch_end=False),
        AtomicCheckpoint(dirpath=run_dir / "checkpoints", filename="last", every_n_train_steps=t.checkpoint_every_n_steps,
                        save_top_k=1, save_last=False, enable_version_counter=False),
    ]
    options = dict(
        default_root_dir=run_dir, accelerator=t.accelerator, devices=t.devices, num_nodes=t.num_nodes,
        strategy=t.strategy, precision=t.precision, max_epochs=t.max_epochs, max_steps=t.max_steps,
        gradient_clip_val=t.gradient_clip_val, accumulate_grad_batches=t.accumulate_grad_batches,
        log_every_n_steps=t.log_every_n_steps, val_check_interval=t.val_check_interval,
        # an int interval counts training batches across epochs (Lightning otherwise restarts the count every
        # epoch and refuses an interval longer than one); a float is a share of each epoch
        check_val_every_n_epoch=None if isinstance(t.val_check_interval, int) else 1,
        limit_val_batches=t.limit_val_batches, num_sanity_val_steps=t.num_sanity_val_steps,
        use_distributed_sampler=False,  # the data module splits per rank
        logger=CSVLogger(run_dir, name="logs", version=""), enable_progress_bar=True,
        callbacks=[ValidateAtEnd(), *checkpoints, LearningRateMonitor(), TQDMProgressBar(refresh_rate=1)],
    )
    # Lightning's resolved strategy (strategy "auto" on several devices is DDP) is known once the trainer is built
    trainer = _lightning_trainer(options, sync_batchnorm=False)
    if sync_batchnorm(t.sync_batchnorm, trainer.world_size, trainer.strategy.root_device.type):
        return _lightning_trainer(options, sync_batchnorm=True)
    return trainer


def _lightning_trainer(options: dict, sync_batchnorm: bool) -> pl.Trainer:
    """``pl.Trainer(**options)``; the values Lightning refuses (devices, precision, accelerator, ...) raise one
    ConfigError line instead of a traceback."""
    try:
        return pl.Trainer(**options, sync_batchnorm=sync_batchnorm)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"invalid training config (trainer.*): {one_line(err)}") from None


def sync_batchnorm(setting: bool | str, world_size: int, device_type: str) -> bool:
    """Whether batch norm is synchronised across processes: ``auto`` when several processes run on CUDA
    devices (torch's SyncBatchNorm has no CPU version); ``true`` on CPU processes is a ConfigError."""
    on_gpus = world_size > 1 and device_type == "cuda"
    if setting == "auto":
        return on_gpus
    if setting and world_size > 1 and not on_gpus:
        raise ConfigError("trainer.sync_batchnorm: true needs CUDA devices (torch's SyncBatchNorm); use auto or false")
    return bool(setting)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # the training sampler continues inside a resumed epoch (matcher.training.resume_position)
    warnings.filterwarnings("ignore", message="You're resuming from a checkpoint that ended before the epoch ended")
    try:
        return _train(args)
    except (ConfigError, DataError, MisconfigurationException) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


def _train(args: argparse.Namespace) -> int:
    if args.resume:
        given = [flag for flag, value in (("--config", args.config), ("--init-weights", args.init_weights)) if value]
        if given:
            raise ConfigError(f"{' and '.join(given)} cannot be given with --resume: the run continues from its own "
                              f"config.yaml and last checkpoint")
        run_dir = Path(args.resume)
        cfg = _resume_config(run_dir, _overrides(argparse.Namespace(**{**vars(args), "run_dir": None})))
        ckpt = run_dir / "checkpoints" / "last.ckpt"
        if not ckpt.is_file():
            raise ConfigError(f"--resume: no checkpoint {ckpt} yet")
        done = _finished(ckpt, cfg)
        if done:
            print(f"run {run_dir} is complete: {done}")
            return 0
    else:
        cfg = load_train_config(args.config, _overrides(args))
        run_dir, ckpt = Path(cfg.run_dir), None
    pl.seed_everything(cfg.seed, workers=True)
    saved_model = run_dir / "model.yaml" if ckpt is not None else None
    model_cfg = build_model_config(cfg, saved_model if saved_model is not None and saved_model.is_file() else None)
    module = MatcherModule({**OmegaConf.to_container(cfg, resolve=True), "model_config": config_to_dict(model_cfg)})
    if cfg.init_weights and ckpt is None:
        try:
            module.matcher.load_weights(cfg.init_weights)
        except (FileNotFoundError, ValueError, KeyError) as err:
            raise ConfigError(f"--init-weights {cfg.init_weights}: {one_line(err)}") from None
    data = MatcherDataModule(cfg.data, cfg.batch_size, cfg.num_workers, cfg.seed)
    trainer = build_trainer(cfg, run_dir)
    # config.yaml and model.yaml are written once the data is set up: a run that cannot start leaves no run folder
    # that looks like a run (and --resume of it keeps its config)
    trainer.callbacks.append(SaveRunConfig(run_dir, cfg, model_cfg))
    if ckpt is not None:
        archive_metrics(run_dir)  # before fit: the CSV logger deletes metrics.csv as soon as it is set up
    trainer.fit(module, datamodule=data, ckpt_path=str(ckpt) if ckpt else None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
