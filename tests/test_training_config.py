"""Training config, learning-rate schedule and per-epoch sampling (no data needed)."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from matcher.training import (
    ConfigError, EpochSubsetSampler, capped_warmup, load_train_config, lr_factor, planned_total_steps, scaled_lr_and_warmup,
)


def test_lr_schedule_warmup_and_step_decay():
    kw = dict(steps_per_epoch=100, warmup_steps=50, warmup_ratio=0.1, milestones=[2, 4], gamma=0.5)
    assert lr_factor(0, **kw) == pytest.approx(0.1)
    assert lr_factor(25, **kw) == pytest.approx(0.1 + 0.9 * 0.5)
    assert lr_factor(50, **kw) == 1.0
    assert lr_factor(199, **kw) == 1.0
    assert lr_factor(200, **kw) == 0.5  # epoch 2
    assert lr_factor(450, **kw) == 0.25  # epoch 4


def test_published_lr_scaling():
    optim = OmegaConf.create({"canonical_lr": 6e-3, "canonical_bs": 64, "warmup_steps": 4800})
    assert scaled_lr_and_warmup(optim, 64) == (pytest.approx(6e-3), 4800)
    lr, warmup = scaled_lr_and_warmup(optim, 8)
    assert lr == pytest.approx(7.5e-4) and warmup == 38400


def test_train_config_defaults_and_overrides():
    cfg = load_train_config(None, ["batch_size=4", "trainer.max_steps=10", "data.image_size=[120,160]"])
    assert cfg.model == "lite" and cfg.data.name == "synthetic" and cfg.batch_size == 4
    assert cfg.trainer.max_steps == 10 and list(cfg.data.image_size) == [120, 160]
    assert cfg.trainer.gradient_clip_val == 0.5 and cfg.optim.weight_decay == 0.1
    with pytest.raises(ValueError, match="batchsize"):
        load_train_config(None, ["batchsize=4"])
    with pytest.raises(ValueError, match="unknown data config"):
        load_train_config(None, ["data=imagenet"])


def test_epoch_sampler_draws_per_group_and_changes_with_epoch():
    groups = [list(range(0, 10)), list(range(10, 13))]
    sampler = EpochSubsetSampler(groups, samples_per_group=4, seed=1, replacement=False)
    sampler.set_epoch(0)
    first = list(sampler)
    assert len(first) == len(sampler) == 8
    assert sum(i < 10 for i in first) == 4 and sum(i >= 10 for i in first) == 4
    assert len({i for i in first if i < 10}) == 4  # without replacement where the scene is large enough
    sampler.set_epoch(0)
    assert list(sampler) == first  # deterministic per epoch
    sampler.set_epoch(1)
    assert list(sampler) != first
    huge = EpochSubsetSampler([range(100, 10_000_100)], samples_per_group=5, seed=0)
    assert all(100 <= i < 10_000_100 for i in huge)


def test_epoch_sampler_draws_with_replacement_as_loftr_by_default():
    # LoFTR's RandomConcatSampler (SB_SUBSET_SAMPLE_REPLACEMENT = True): independent draws within a scene
    sampler = EpochSubsetSampler([list(range(20))], samples_per_group=20, seed=0)
    draws = [list(sampler) for _ in range(5)]
    assert all(len(d) == 20 and set(d) <= set(range(20)) for d in draws)
    assert any(len(set(d)) < 20 for d in draws)  # P(no repeat in 20 of 20) = 20!/20^20 per epoch
    alone = EpochSubsetSampler([list(range(20))], samples_per_group=20, seed=0, replacement=False)
    assert sorted(alone) == list(range(20))


def test_epoch_sampler_fills_empty_groups_from_the_others():
    """A scene without pairs keeps its share of the epoch (equal epoch lengths on every DDP rank)."""
    sampler = EpochSubsetSampler([list(range(0, 6)), [], [6]], samples_per_group=3, seed=2)
    drawn = list(sampler)
    assert len(drawn) == len(sampler) == 9 and set(drawn) <= set(range(7))
    assert sum(i < 6 for i in drawn) in (3, 6) and drawn.count(6) in (3, 6)  # the empty group's 3 from one group
    with pytest.raises(ValueError, match="none of the 2 groups"):
        EpochSubsetSampler([[], []], samples_per_group=3)


def _planned_warmup(cfg, world: int = 1, steps_per_epoch: int | None = None) -> int:
    total_batch = cfg.batch_size * world
    _, warmup = scaled_lr_and_warmup(cfg.optim, total_batch)
    if steps_per_epoch is None:
        steps_per_epoch = cfg.data.train_length // cfg.batch_size
    total = planned_total_steps(cfg.trainer.max_steps, cfg.trainer.max_epochs, steps_per_epoch)
    return capped_warmup(warmup, total, cfg.optim.warmup_cap_fraction)


def test_warmup_is_capped_only_when_it_outlasts_the_run():
    assert planned_total_steps(-1, 30, 1000) == 30_000
    assert planned_total_steps(500, 30, 1000) == 500
    assert planned_total_steps(-1, -1, 1000) is None
    assert capped_warmup(307_200, None, 0.1) == (307_200, False)  # no limit: nothing to compare with
    assert capped_warmup(1499, 1500, 0.1) == (1499, False)
    assert capped_warmup(1500, 1500, 0.1) == (150, True)  # would end with the last step: never at full lr
    # bare `python train.py`: batch 1 on the CPU, 30 epochs of 1000 steps
    assert _planned_warmup(load_train_config()) == (3000, True)
    assert _planned_warmup(load_train_config(None, ["trainer.max_steps=500"])) == (50, True)
    # the recipe of the shipped weights keeps its 192-step warm-up (6 x 64 / 2) in 1500 steps
    assert _planned_warmup(load_train_config("lite_synthetic")) == (192, False)
    # the published recipes on 8 GPUs at batch 1 keep theirs: 38,400 steps; ScanNet ~1513 scenes x 200 pairs,
    # MegaDepth ~368 scenes x 100 pairs per epoch, split over the 8 ranks
    for data, steps_per_epoch in (("scannet", 1513 * 200 // 8), ("megadepth", 368 * 100 // 8)):
        assert _planned_warmup(load_train_config(None, [f"data={data}"]), 8, steps_per_epoch) == (38_400, False)


def test_config_errors_name_the_config_and_the_key():
    with pytest.raises(ConfigError, match=r"^invalid training config \(overrides\): unknown key 'optim\.foo'; known keys of 'optim': canonical_lr"):
        load_train_config(None, ["optim.foo=1"])
    with pytest.raises(ConfigError, match=r"^invalid data config 'synthetic' \(overrides\): unknown key 'data\.foo'"):
        load_train_config(None, ["data.foo=1"])
    with pytest.raises(ConfigError, match=r"data\.train_length must be an integer, got 1\.5"):
        load_train_config(None, ["data.train_length=1.5"])
    with pytest.raises(ConfigError, match=r"loss\.sparse must be true or false"):
        load_train_config(None, ["loss.sparse=1"])
    with pytest.raises(ConfigError, match=r"warmup_cap_fraction must be in \[0, 1\]"):
        load_train_config(None, ["optim.warmup_cap_fraction=2"])
    with pytest.raises(ConfigError, match="not KEY=VALUE"):
        load_train_config(None, ["optim.gamma"])
    assert load_train_config(None, ["optim.canonical_lr=1", "trainer.max_epochs=null"]).optim.canonical_lr == 1


@pytest.mark.native_bf16
def test_validation_runs_float32_features_where_auto_would_pick_bf16():
    """On a CPU with native bf16 the default (auto) runs bf16 features; training validation pins float32
    like eval/pose.py, while the saved model config keeps auto and an explicit bfloat16 is kept."""
    from matcher import load_config
    from matcher.training import MatcherModule

    model_config = OmegaConf.to_container(load_config("lite"))
    module = MatcherModule({"model_config": model_config})
    assert module.matcher.eval().feature_dtype() == "float32"
    assert module.hparams["config"]["model_config"]["inference"]["feature_dtype"] == "auto"
    model_config["inference"]["feature_dtype"] = "bfloat16"
    assert MatcherModule({"model_config": model_config}).matcher.eval().feature_dtype() == "bfloat16"


@pytest.mark.parametrize("recipe, model, data, published", [
    # Tangshitao/QuadTreeAttention configs/loftr/{indoor,outdoor}/loftr_ds_quadtree.py over src/config/default.py
    ("scannet_quadtree", "quadtree_b_indoor", "scannet",
     dict(canonical_lr=6e-3, canonical_bs=64, weight_decay=0.1, warmup_steps=4800, warmup_ratio=0.0,
          milestones=[3, 6, 9, 12, 17, 20, 23, 26, 29], gamma=0.5, train_coarse_percent=0.2, topks=[32, 16, 16])),
    ("megadepth_quadtree", "quadtree_b_outdoor", "megadepth",
     dict(canonical_lr=8e-3, canonical_bs=64, weight_decay=0.1, warmup_steps=1875, warmup_ratio=0.1,
          milestones=[8, 12, 16, 20, 24], gamma=0.5, train_coarse_percent=0.3, topks=[16, 8, 8])),
])
def test_published_quadtree_recipes(recipe, model, data, published):
    from matcher.training import build_model_config

    cfg = load_train_config(recipe)
    model_cfg = build_model_config(cfg)
    got = {k: cfg.optim[k] for k in ("canonical_lr", "canonical_bs", "weight_decay", "warmup_steps", "warmup_ratio", "gamma")}
    got.update(milestones=list(cfg.optim.milestones), train_coarse_percent=model_cfg.match_coarse.train_coarse_percent,
               topks=list(model_cfg.coarse.topks))
    assert got == pytest.approx(published)
    assert cfg.model == model and cfg.data.name == data and cfg.trainer.max_epochs == 30
    assert cfg.trainer.gradient_clip_val == 0.5 and not cfg.loss.sparse  # dense supervision, clip 0.5 (both)
    # validation precision at eval/pose.py's threshold for the dataset
    from matcher.metrics import epipolar_precision_threshold

    assert cfg.validation.epi_thr == epipolar_precision_threshold(data)
    # the defaults hold the indoor optimisation recipe; the shipped lite weights keep their own warm-up start
    assert load_train_config(None).optim == load_train_config("scannet_quadtree").optim
    assert load_train_config("lite_synthetic").optim.warmup_ratio == 0.1


@pytest.mark.parametrize("batches, accumulate", [(4, 3), (6, 3), (5, 1), (2, 4)])
def test_optimizer_steps_per_epoch_as_lightning_counts_them(tmp_path, batches, accumulate):
    """The lr milestones count epochs in optimiser steps: Lightning also steps on an epoch's last, partial
    accumulation group (4 batches at accumulate 3: 2 steps, not 1)."""
    import pytorch_lightning as pl
    import torch

    from matcher.training import optimizer_steps_per_epoch

    class Tiny(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))
            self.steps = 0

        def training_step(self, batch, batch_idx):
            return (self.w - batch.sum()) ** 2

        def optimizer_step(self, *args, **kwargs):
            self.steps += 1
            super().optimizer_step(*args, **kwargs)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    module = Tiny()
    trainer = pl.Trainer(
        max_epochs=2, accumulate_grad_batches=accumulate, accelerator="cpu", logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
    )
    trainer.fit(module, torch.utils.data.DataLoader(torch.ones(batches, 1), batch_size=1))
    assert module.steps == 2 * optimizer_steps_per_epoch(batches, accumulate)


def test_resume_refuses_what_the_checkpoint_fixed():
    """A resumed run keeps its batch, devices, accumulation, optimiser settings and epoch length (Lightning
    restores the optimiser and the lr schedule as saved); limits and other keys may change."""
    from matcher.training import merge_run_overrides

    def saved():
        return OmegaConf.create(OmegaConf.to_container(load_train_config(None, ["batch_size=2"])))

    assert merge_run_overrides(saved(), ["batch_size=2", "trainer.max_steps=10"]).trainer.max_steps == 10
    assert merge_run_overrides(saved(), ["num_workers=0"]).num_workers == 0
    for override, key in [
        ("batch_size=4", r"batch_size \(2 -> 4\)"), ("optim.canonical_lr=0.01", r"optim.canonical_lr \(0.006 -> 0.01\)"),
        ("optim.milestones=[1]", "optim.milestones"), ("trainer.devices=2", r"trainer.devices \(auto -> 2\)"),
        ("trainer.accumulate_grad_batches=2", "trainer.accumulate_grad_batches"), ("data.train_length=5", "data.train_length"),
    ]:
        with pytest.raises(ConfigError, match=f"^{key}.* cannot change when a run is resumed"):
            merge_run_overrides(saved(), [override])


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("stop", [5, 6, 8])  # inside epoch 1 (after 1 or 2 of its 4 batches) and at its end
def test_a_resumed_run_draws_what_an_uninterrupted_one_draws(tmp_path, workers, stop):
    """Lightning restarts the data iterator of an epoch it resumes inside and (with worker processes) draws
    before setting the sampler's epoch; the sampler placed by resume_position continues where the run stopped."""
    import pytorch_lightning as pl
    import torch
    from pytorch_lightning.callbacks import ModelCheckpoint

    from matcher.training import resume_position

    class Recorder(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))
            self.seen = []

        def training_step(self, batch, batch_idx):
            self.seen.append(batch.flatten().long().tolist())
            return (self.w - batch.mean()) ** 2

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01)

        def train_dataloader(self):
            sampler = EpochSubsetSampler([list(range(100))], 8, seed=0)
            sampler.resume_at(*resume_position(self.trainer, 2, 4))
            return torch.utils.data.DataLoader(
                torch.arange(100.0)[:, None], batch_size=2, sampler=sampler, drop_last=True, num_workers=workers,
                persistent_workers=workers > 0,
            )

    def fit(run, max_steps, resume=False):
        module = Recorder()
        checkpoint = ModelCheckpoint(dirpath=run, filename="last", every_n_train_steps=1, enable_version_counter=False)
        trainer = pl.Trainer(
            max_steps=max_steps, max_epochs=10, accelerator="cpu", logger=False, enable_progress_bar=False,
            enable_model_summary=False, callbacks=[checkpoint], default_root_dir=run,
        )
        trainer.fit(module, ckpt_path=str(run / "last.ckpt") if resume else None)
        return module.seen

    whole = fit(tmp_path / "whole", 12)
    assert fit(tmp_path / "split", stop) + fit(tmp_path / "split", 12, resume=True) == whole


def test_optional_values_stay_accepted(tmp_path):
    # a data YAML with only the keys its loader needs, null model overrides, checkpoints off (Lightning's 0)
    minimal = "name: megadepth\nroot: r\ntrain_index_dir: t\nval_index_dir: v\nmin_overlap_score: 0.0\n" \
              "samples_per_scene: 10\nimg_resize: 640\n"
    (tmp_path / "md.yaml").write_text(minimal)
    (tmp_path / "md_nodepthpad.yaml").write_text(minimal + "depth_padding: null\n")
    for data, batch in (("md", 1), ("md", 2), ("md_nodepthpad", 1)):
        overrides = [f"data={tmp_path / data}.yaml", f"batch_size={batch}", "model_overrides=null",
                     "trainer.checkpoint_every_n_steps=0"]
        cfg = load_train_config(None, overrides)
        assert cfg.data.name == "megadepth" and cfg.model_overrides is None
    with pytest.raises(ConfigError, match="data.depth_padding must be set for batches of more than one pair"):
        load_train_config(None, [f"data={tmp_path / 'md_nodepthpad.yaml'}", "batch_size=2"])
    # a run folder's config.yaml written before a key existed still resumes (ranges skip missing keys)
    from matcher.training import merge_run_overrides

    saved = OmegaConf.to_container(load_train_config(None))
    del saved["validation"]["epi_thr"], saved["optim"]["warmup_cap_fraction"]
    assert merge_run_overrides(OmegaConf.create(saved), ["trainer.max_steps=5"]).trainer.max_steps == 5
