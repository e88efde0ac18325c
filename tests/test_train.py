"""train.py end to end on tiny synthetic pairs: it runs, checkpoints, resumes, and stops on a NaN loss."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from matcher.training import NonFiniteLossError

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def train_script():
    spec = importlib.util.spec_from_file_location("train_script", ROOT / "train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def train_main(train_script):
    return train_script.main


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
    # continue the same run to a larger budget: the step count carries on from the checkpoint, with the
    # model settings the run started with (its model.yaml), even where the named config's defaults changed
    saved = (run / "model.yaml").read_text()
    assert "train_coarse_percent: 0.3\n" in saved  # lite's
    (run / "model.yaml").write_text(saved.replace("train_coarse_percent: 0.3\n", "train_coarse_percent: 0.25\n"))
    assert train_main(["--resume", str(run), "--max-steps", "3"]) == 0
    assert _step(last) == 3
    assert "train_coarse_percent: 0.25\n" in (run / "model.yaml").read_text()
    # the first segment's log is kept beside the new one, not deleted by the logger
    assert "train/loss" in (run / "logs" / "metrics-0.csv").read_text()
    # the checkpoint holds plain data and loads with weights_only=True into the matcher
    from matcher import Matcher, load_config

    Matcher(load_config(run / "model.yaml")).load_weights(last)


def test_nan_loss_stops_the_run(train_main, tmp_path):
    # a NaN weight is refused as a config value; 1e39 overflows float32, so the loss is infinite
    assert train_main(_args(tmp_path / "nan", "--max-steps", "2", "--set", "loss.coarse_weight=.nan")) == 2
    with pytest.raises(NonFiniteLossError, match="non-finite loss"):
        train_main(_args(tmp_path / "inf", "--max-steps", "2", "--set", "loss.coarse_weight=1e39"))
    assert not (tmp_path / "nan" / "checkpoints" / "last.ckpt").exists()


def test_run_stopped_by_max_steps_saves_final_state_and_validates(train_main, tmp_path, capsys):
    # 3 steps, last.ckpt every 2 steps, validation every 50: before the fix last.ckpt stayed at step 2 and the run
    # had no validation, no best checkpoint and no figures
    run = tmp_path / "short"
    extra = ("--max-steps", "3", "--set", "trainer.checkpoint_every_n_steps=2", "--set", "trainer.val_check_interval=50")
    assert train_main(_args(run, *extra)) == 0
    last = run / "checkpoints" / "last.ckpt"
    assert _step(last) == 3
    assert not list(run.glob("checkpoints/*.tmp"))
    assert [p.name for p in (run / "checkpoints").glob("best-*.ckpt")] == ["best-epoch=0-step=3.ckpt"]
    assert [p.name for p in (run / "val_figures").glob("*.png")] == ["step0000003_pair0.png"]
    assert "val/auc@10" in (run / "logs" / "metrics.csv").read_text()
    # resuming a finished run says so and trains nothing; a larger budget trains on from the final state
    capsys.readouterr()
    stamp = last.stat().st_mtime_ns
    assert train_main(["--resume", str(run)]) == 0
    assert "is complete" in capsys.readouterr().out and last.stat().st_mtime_ns == stamp
    assert train_main(["--resume", str(run), "--max-steps", "4"]) == 0
    assert _step(last) == 4
    assert (run / "val_figures" / "step0000004_pair0.png").is_file()


def test_validation_interval_in_steps_runs_across_epochs(train_main, tmp_path):
    """An int val_check_interval counts steps over the whole run, even when it is longer than an epoch (3 steps
    here; Lightning's per-epoch count refused it with a traceback)."""
    run = tmp_path / "across"
    extra = ("--max-steps", "7", "--set", "data.train_length=3", "--set", "trainer.val_check_interval=4",
             "--set", "trainer.checkpoint_every_n_steps=100")
    assert train_main(_args(run, *extra)) == 0
    assert sorted(p.name for p in (run / "val_figures").glob("*.png")) == ["step0000004_pair0.png", "step0000007_pair0.png"]
    assert _step(run / "checkpoints" / "last.ckpt") == 7


def test_run_stopped_by_max_epochs_saves_final_state(train_main, tmp_path, capsys):
    run = tmp_path / "epochs"  # 3 steps per epoch, last.ckpt every 2 steps
    args = _args(run, "--max-epochs", "1", "--set", "data.train_length=3", "--set", "trainer.checkpoint_every_n_steps=2")
    assert train_main(args) == 0
    assert _step(run / "checkpoints" / "last.ckpt") == 3
    capsys.readouterr()
    assert train_main(["--resume", str(run)]) == 0
    assert "max_epochs=1" in capsys.readouterr().out


def test_warmup_longer_than_the_run_is_capped_and_kept_on_resume(train_main, tmp_path, caplog):
    # batch 1: the published rule gives 4800 x 64 = 307,200 warm-up steps, far beyond a 4-step run
    run = tmp_path / "warmup"
    with caplog.at_level("WARNING", logger="matcher.training"):
        assert train_main(_args(run, "--max-steps", "4", "--set", "optim.warmup_cap_fraction=0.5")) == 0
    assert [r.getMessage() for r in caplog.records if "warm-up" in r.getMessage()] == [
        "lr warm-up: the scaled warm-up of 307200 steps (optim.warmup_steps 4800 x 64 / total batch 1) does not end "
        "within the run's 4 steps; capped to 2 steps (0.5 of the run, optim.warmup_cap_fraction)"
    ]
    state = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert state["lr_warmup_steps"] == 2
    assert state["optimizer_states"][0]["param_groups"][0]["lr"] == pytest.approx(6e-3 / 64)  # warm-up over
    # a larger budget on resume would cap the warm-up to 3 steps: the run keeps its 2
    assert train_main(["--resume", str(run), "--max-steps", "6"]) == 0
    state = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert state["global_step"] == 6 and state["lr_warmup_steps"] == 2
    assert state["optimizer_states"][0]["param_groups"][0]["lr"] == pytest.approx(6e-3 / 64)


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        (["--set", "optim.foo=1"], "invalid training config (overrides): unknown key 'optim.foo'"),
        (["--set", "data.foo=1"], "invalid data config 'synthetic' (overrides): unknown key 'data.foo'"),
        (["--set", "batch_size=abc"], "invalid training config: batch_size must be an integer, got 'abc'"),
        (["--set", "model_overrides={coarse: {foo: 1}}"], "invalid model config ('lite' + model_overrides): unknown key 'coarse.foo'"),
        (["--config", "nope"], "unknown train config 'nope'"),
        (["--model", "nope"], "unknown model config 'nope'"),
        (["--data", "nope"], "unknown data config 'nope'"),
        (["--data", "homography", "--set", "data.image_dir=/nonexistent/photos"], "data 'homography': image folder not found: /nonexistent/photos"),
        (["--resume", "/nonexistent/run"], "--resume: no config.yaml in /nonexistent/run"),
        (["--resume", "/nonexistent/run", "--config", "lite_synthetic"], "--config cannot be given with --resume"),
        (["--resume", "/nonexistent/run", "--init-weights", "w.pt"], "--init-weights cannot be given with --resume"),
        # values Lightning, the optimiser or the data loader would refuse only later, with a traceback
        (["--devices", "abc"], "invalid training config (trainer.*): `devices` selected with `CPUAccelerator`"),
        (["--precision", "64-bad"], "invalid training config (trainer.*): Precision '64-bad' is invalid"),
        (["--lr", "-1"], "invalid training config: optim.canonical_lr must be positive, got -1.0"),
        (["--num-workers", "-1"], "invalid training config: num_workers must be at least 0, got -1"),
        (["--set", "optim.milestones=5"], "invalid training config: optim.milestones must be a list, got 5"),
        (["--set", "optim.milestones=[a,b]"], "invalid training config: optim.milestones must be a list whose entries are an integer"),
        (["--set", "optim=5"], "invalid training config: optim must be a mapping of keys, got 5"),
        (["--set", "data.image_size=[10]"], "invalid data config 'synthetic': data.image_size must be [H, W], each at least 8"),
        (["--set", "data.name=megadepth"], "invalid data config 'megadepth': data.name cannot change the kind of data"),
        (["--data", "megadepth", "--batch-size", "2", "--set", "data.img_padding=false"],
         "invalid data config 'megadepth': data.img_padding must be set for batches of more than one pair"),
        (["--set", "model_overrides.coarse.temp_bug_fix=fasle"], "invalid model config: coarse.temp_bug_fix must be true or false"),
        (["--set", "model_overrides.coarse.nhead=eight"], "invalid model config: coarse.nhead must be an integer"),
        (["--set", "model_overrides=5"], "invalid training config: model_overrides must be a mapping of keys, got 5"),
    ],
)
def test_config_and_data_errors_are_one_line(train_main, tmp_path, capsys, extra, expected):
    run = tmp_path / "bad"
    assert train_main(["--run-dir", str(run), "--num-workers", "0", *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"error: {expected}"), err[-1]
    assert not any("Traceback" in line for line in err)
    assert not (run / "config.yaml").exists()  # a run that cannot start leaves no config behind


@pytest.mark.parametrize("setting, world, device, synced", [
    ("auto", 2, "cuda", True),   # several processes on GPUs (strategy auto on several GPUs is DDP)
    ("auto", 1, "cuda", False),  # one process: nothing to synchronise
    ("auto", 2, "cpu", False),   # torch's SyncBatchNorm has no CPU version
    (True, 2, "cuda", True),
    (True, 1, "cpu", True),      # a no-op for Lightning with one process
    (False, 8, "cuda", False),
])
def test_sync_batchnorm_setting(train_script, setting, world, device, synced):
    assert train_script.sync_batchnorm(setting, world, device) == synced


def test_sync_batchnorm_follows_the_resolved_strategy(train_script, tmp_path):
    """Strategy auto on two CPU devices resolves to DDP with two processes: auto leaves batch norm alone there
    (as it must: torch's SyncBatchNorm refuses CPU modules), true is one config error."""
    from matcher.training import ConfigError, load_train_config

    overrides = ["trainer.accelerator=cpu", "trainer.devices=2", "trainer.strategy=auto"]
    trainer = train_script.build_trainer(load_train_config(None, overrides), tmp_path)
    assert trainer.world_size == 2 and trainer.strategy.root_device.type == "cpu"
    assert getattr(trainer.strategy, "_layer_sync", None) is None
    with pytest.raises(ConfigError, match="needs CUDA devices"):
        train_script.build_trainer(load_train_config(None, [*overrides, "trainer.sync_batchnorm=true"]), tmp_path)
