"""Train the matcher with PyTorch Lightning.

    python train.py                                   # lite QuadTree-B on built-in synthetic data, CPU
    python train.py --data scannet --model quadtree_b_indoor --devices 4 --strategy ddp --batch-size 2
    python train.py --resume runs/default             # continue a run from its last checkpoint
    python train.py --set optim.milestones=[3,6] --set loss.fine_weight=0.5   # any config key

Every run writes its resolved config to RUN_DIR/config.yaml, checkpoints to RUN_DIR/checkpoints
(last.ckpt, refreshed every `trainer.checkpoint_every_n_steps`, and the best by val/auc@10),
metrics to RUN_DIR/logs and validation figures to RUN_DIR/val_figures.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import pytorch_lightning as pl
from omegaconf import OmegaConf
from pytorch_lightning.callbacks import LearningRateMonitor, ModelCheckpoint, TQDMProgressBar
from pytorch_lightning.loggers import CSVLogger

from matcher import config_to_dict
from matcher.training import MatcherDataModule, MatcherModule, build_model_config, load_train_config


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
        raise SystemExit(f"--resume: no config.yaml in {run_dir}")
    cfg = OmegaConf.load(saved)
    OmegaConf.set_struct(cfg, True)
    return OmegaConf.merge(cfg, OmegaConf.from_dotlist(extra)) if extra else cfg


class AtomicCheckpoint(ModelCheckpoint):
    """Writes each checkpoint to a temporary file and renames it, so a run killed at any moment
    (kill -9 included) never leaves a half-written last.ckpt behind."""

    def _save_checkpoint(self, trainer: pl.Trainer, filepath: str) -> None:
        tmp = f"{filepath}.tmp"
        trainer.save_checkpoint(tmp, self.save_weights_only)
        if trainer.is_global_zero:
            os.replace(tmp, filepath)
        self._last_global_step_saved = trainer.global_step
        self._last_checkpoint_saved = filepath


def archive_metrics(run_dir: Path) -> None:
    """Lightning's CSV logger deletes an existing metrics.csv; on resume keep it as metrics-K.csv so the
    whole loss curve of a run survives its restarts."""
    current = run_dir / "logs" / "metrics.csv"
    if current.is_file():
        k = len(list(current.parent.glob("metrics-*.csv")))
        current.rename(current.parent / f"metrics-{k}.csv")


def build_trainer(cfg, run_dir: Path) -> pl.Trainer:
    t = cfg.trainer
    checkpoints = [
        AtomicCheckpoint(dirpath=run_dir / "checkpoints", filename="last", every_n_train_steps=t.checkpoint_every_n_steps,
                        save_top_k=1, save_last=False, enable_version_counter=False),
        ModelCheckpoint(dirpath=run_dir / "checkpoints", filename="best-{epoch}-{step}", monitor="val/auc@10",
                        mode="max", save_top_k=1, save_on_train_epoch_end=False),
    ]
    sync_bn = t.sync_batchnorm if t.sync_batchnorm != "auto" else (str(t.strategy).startswith("ddp"))
    return pl.Trainer(
        default_root_dir=run_dir, accelerator=t.accelerator, devices=t.devices, num_nodes=t.num_nodes,
        strategy=t.strategy, precision=t.precision, max_epochs=t.max_epochs, max_steps=t.max_steps,
        gradient_clip_val=t.gradient_clip_val, accumulate_grad_batches=t.accumulate_grad_batches,
        log_every_n_steps=t.log_every_n_steps, val_check_interval=t.val_check_interval,
        limit_val_batches=t.limit_val_batches, num_sanity_val_steps=t.num_sanity_val_steps,
        sync_batchnorm=bool(sync_bn), use_distributed_sampler=False,  # the data module splits per rank
        logger=CSVLogger(run_dir, name="logs", version=""), enable_progress_bar=True,
        callbacks=[*checkpoints, LearningRateMonitor(), TQDMProgressBar(refresh_rate=1)],
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.resume:
        run_dir = Path(args.resume)
        cfg = _resume_config(run_dir, _overrides(argparse.Namespace(**{**vars(args), "run_dir": None})))
        ckpt = run_dir / "checkpoints" / "last.ckpt"
        if not ckpt.is_file():
            raise SystemExit(f"--resume: no checkpoint {ckpt} yet")
        archive_metrics(run_dir)
    else:
        cfg = load_train_config(args.config, _overrides(args))
        run_dir, ckpt = Path(cfg.run_dir), None
    pl.seed_everything(cfg.seed, workers=True)
    model_cfg = build_model_config(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(cfg, run_dir / "config.yaml")
    OmegaConf.save(model_cfg, run_dir / "model.yaml")  # what Matcher.from_pretrained needs beside the weights
    module = MatcherModule({**OmegaConf.to_container(cfg, resolve=True), "model_config": config_to_dict(model_cfg)})
    if cfg.init_weights and ckpt is None:
        module.matcher.load_weights(cfg.init_weights)
    data = MatcherDataModule(cfg.data, cfg.batch_size, cfg.num_workers, cfg.seed)
    trainer = build_trainer(cfg, run_dir)
    trainer.fit(module, datamodule=data, ckpt_path=str(ckpt) if ckpt else None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
