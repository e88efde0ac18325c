"""train.py end to end on tiny synthetic pairs: it runs, checkpoints, resumes, and stops on a NaN loss."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from matcher.training import NonFiniteLossError

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def train_main():
    spec = importlib.util.spec_from_file_location("train_script", ROOT / "train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def _args(run_dir: Path, *extra: str) -> list[str]:
    return [
        "--run-dir", str(run_dir), "--num-workers", "0", "--batch-size", "1",
        "--set", "data.image_size=[64,96]", "--set", "data.val_length=1", "--set", "data.train_length=50",
        "--set", "trainer.checkpoint_every_n_steps=1", "--set", "trainer.val_check_interval=2",
        "--set", "trainer.limit_val_batches=1", "--set", "trainer.log_every_n_steps=1",
        "--set", "model_overrides={match_coarse: {train_pad_num_gt_min: 8}}", *extra,
    ]


def _step(ckpt: Path) -> int:
    return torch.load(ckpt, map_location="cpu", weights_only=True)["global_step"]


def test_train_checkpoint_and_resume(train_main, tmp_path):
    run = tmp_path / "run"
    assert train_main(_args(run, "--max-steps", "2")) == 0
    last = run / "checkpoints" / "last.ckpt"
    assert _step(last) == 2
    assert (run / "config.yaml").is_file() and (run / "model.yaml").is_file()
    assert list((run / "val_figures").glob("*.png"))
    metrics = (run / "logs" / "metrics.csv").read_text()
    assert "train/loss" in metrics and "val/auc@5" in metrics
    # continue the same run to a larger budget: the step count carries on from the checkpoint
    assert train_main(["--resume", str(run), "--max-steps", "3"]) == 0
    assert _step(last) == 3
    # the first segment's log is kept beside the new one, not deleted by the logger
    assert "train/loss" in (run / "logs" / "metrics-0.csv").read_text()
    # the checkpoint holds plain data and loads with weights_only=True into the matcher
    from matcher import Matcher, load_config

    Matcher(load_config(run / "model.yaml")).load_weights(last)


def test_nan_loss_stops_the_run(train_main, tmp_path):
    with pytest.raises(NonFiniteLossError, match="non-finite loss"):
        train_main(_args(tmp_path / "nan", "--max-steps", "2", "--set", "loss.coarse_weight=.nan"))
    assert not (tmp_path / "nan" / "checkpoints" / "last.ckpt").exists()
