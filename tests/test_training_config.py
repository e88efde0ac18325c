"""Training config, learning-rate schedule and per-epoch sampling (no data needed)."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from matcher.training import EpochSubsetSampler, load_train_config, lr_factor, scaled_lr_and_warmup


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
    sampler = EpochSubsetSampler(groups, samples_per_group=4, seed=1)
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
