"""The full matcher: parity with kornia's LoFTR, sizes, masks, gradients."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from kornia.feature import LoFTR as KorniaLoFTR

from matcher import Matcher, load_config
from matcher.position_encoding import sine_position_encoding


def _random_kornia_loftr(seed: int = 0) -> KorniaLoFTR:
    torch.manual_seed(seed)
    model = KorniaLoFTR(pretrained=None)
    with torch.no_grad():  # non-trivial batch-norm statistics, so that they must be loaded right
        for name, buf in model.named_buffers():
            if name.endswith("running_mean"):
                buf.normal_(0, 0.1)
            elif name.endswith("running_var"):
                buf.uniform_(0.5, 1.5)
    model.coarse_matching.thr = 0.0  # random weights give low confidences: compare every mutual match
    return model.eval()


@pytest.mark.parametrize("size1", [(240, 320), (200, 300)])
def test_loftr_linear_reproduces_kornia(image_pair, size1, tmp_path):
    kornia_model = _random_kornia_loftr()
    path = tmp_path / "kornia_loftr.pt"
    torch.save(kornia_model.state_dict(), path)
    ours = Matcher(load_config("loftr_linear", match_coarse={"thr": 0.0})).load_weights(path).eval()
    image0, image1 = image_pair
    batch = {"image0": image0, "image1": image1[..., : size1[0], : size1[1]].contiguous()}
    with torch.inference_mode():
        expected, got = kornia_model(dict(batch)), ours(batch)
    assert len(expected["keypoints0"]) > 10
    assert len(got["keypoints0"]) == len(expected["keypoints0"])
    torch.testing.assert_close(got["keypoints0"], expected["keypoints0"], atol=1e-4, rtol=0)
    torch.testing.assert_close(got["keypoints1"], expected["keypoints1"], atol=1e-2, rtol=0)
    torch.testing.assert_close(got["confidence"], expected["confidence"], atol=1e-6, rtol=1e-4)
    torch.testing.assert_close(got["batch_indexes"], expected["batch_indexes"])


@pytest.mark.parametrize("fix", [True, False])
def test_position_encoding_matches_kornia(fix):
    from kornia.feature.loftr.utils.position_encoding import PositionEncodingSine

    ref = PositionEncodingSine(64, (30, 50), temp_bug_fix=fix).pe
    torch.testing.assert_close(sine_position_encoding(64, 30, 50, fix), ref)
    big = sine_position_encoding(64, 300, 400, fix)  # no maximum size
    torch.testing.assert_close(big[:, :, :30, :50], ref)


def test_published_quadtree_layout_is_matched_exactly(reference_layout):
    model = Matcher(load_config("quadtree_b_indoor"))
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert ours == reference_layout


@pytest.mark.parametrize("name", ["lite", "quadtree_a", "loftr_linear"])
def test_configs_build_and_match_different_sizes(name):
    model = Matcher(load_config(name, match_coarse={"thr": 0.0})).eval()
    image0, image1 = torch.rand(2, 1, 100, 130), torch.rand(2, 1, 150, 90)  # not multiples of 8 or 32
    with torch.inference_mode():
        out = model({"image0": image0, "image1": image1})
    assert set(out) == {"keypoints0", "keypoints1", "confidence", "batch_indexes"}
    m = len(out["confidence"])
    assert m > 0 and out["keypoints0"].shape == (m, 2) and out["keypoints1"].shape == (m, 2)
    assert (out["keypoints0"] >= 0).all() and (out["keypoints0"][:, 0] < 130).all() and (out["keypoints0"][:, 1] < 100).all()
    assert (out["keypoints1"][:, 0] < 90 + 4).all() and (out["keypoints1"][:, 1] < 150 + 4).all()
    assert set(out["batch_indexes"].tolist()) <= {0, 1}


def test_a_bounded_coarsest_level_pads_to_its_levels_and_matches():
    """``coarse.max_coarsest_tokens`` adds QuadTree levels on large grids: the pair is padded to their
    multiple (here 8 instead of 4), and with a bound above the trained coarsest level nothing changes."""
    config = lambda bound: load_config("lite", match_coarse={"thr": 0.0}, coarse={"topks": [2, 2, 2], "max_coarsest_tokens": bound})  # noqa: E731
    bounded, plain, loose = (Matcher(config(bound)).eval() for bound in (16, None, 20))
    for model in (plain, loose):
        model.load_state_dict(bounded.state_dict())
    # coarse grids 13 x 17 and 19 x 12: trained coarsest 4 x 5 = 20 tokens (> 16: one level more)
    assert bounded.loftr_coarse.padding_multiple((13, 17), (19, 12)) == 8
    assert plain.loftr_coarse.padding_multiple((13, 17), (19, 12)) == loose.loftr_coarse.padding_multiple((13, 17), (19, 12)) == 4
    g = torch.Generator().manual_seed(0)
    batch = {"image0": torch.rand(1, 1, 100, 130, generator=g), "image1": torch.rand(1, 1, 150, 90, generator=g)}
    with torch.inference_mode():
        out, expected, same = bounded(batch), plain(batch), loose(batch)
    for key in expected:
        torch.testing.assert_close(same[key], expected[key])
    # the added 2 x 3 level keeps 2 keys per query: the trained coarsest level sees 8 of its 20 keys
    assert len(out["confidence"]) != len(expected["confidence"]) or not torch.allclose(out["confidence"], expected["confidence"])
    m = len(out["confidence"])
    assert m > 0 and out["keypoints0"].shape == (m, 2) and out["keypoints1"].shape == (m, 2)
    assert (out["keypoints0"][:, 0] < 130).all() and (out["keypoints0"][:, 1] < 100).all()
    # on a built model: the setter gives the bounded model's output, None the trained levels' again
    with torch.inference_mode():
        torch.testing.assert_close(plain.set_max_coarsest_tokens(16)(batch)["keypoints1"], out["keypoints1"])
        torch.testing.assert_close(plain.set_max_coarsest_tokens(None)(batch)["keypoints1"], expected["keypoints1"])
    with pytest.raises(ValueError, match="max_coarsest_tokens must be null or an integer"):
        plain.set_max_coarsest_tokens(0)
    assert plain.config.coarse.max_coarsest_tokens is None and plain.loftr_coarse.max_coarsest_tokens is None


def test_forward_does_not_mutate_batch():
    model = Matcher(load_config("lite")).eval()
    batch = {"image0": torch.rand(1, 1, 64, 64), "image1": torch.rand(1, 1, 64, 64)}
    keys = set(batch)
    with torch.inference_mode():
        out = model(batch)
    assert set(batch) == keys and out is not batch


def test_quadtree_padding_does_not_leak_into_valid_tokens():
    """Valid tokens' outputs do not depend on what sits in masked tokens."""
    model = Matcher(load_config("lite")).eval()
    g = torch.Generator().manual_seed(0)
    c0, c1 = torch.randn(1, 128, 12, 16, generator=g), torch.randn(1, 128, 8, 8, generator=g)
    mask0 = torch.zeros(1, 12, 16, dtype=torch.bool)
    mask0[:, :9, :13] = True
    noisy = c0.clone()
    noisy[:, :, ~mask0[0]] = 50.0
    with torch.inference_mode():
        t_clean, _ = model.coarse_transform(c0, c1, mask0, None)
        t_noisy, _ = model.coarse_transform(noisy, c1, mask0, None)
    valid = mask0.flatten(1)[0]
    torch.testing.assert_close(t_clean[:, valid], t_noisy[:, valid], atol=1e-4, rtol=1e-4)


def test_masked_cells_never_match():
    model = Matcher(load_config("lite", match_coarse={"thr": 0.0, "border_rm": 0})).eval()
    image = torch.rand(1, 1, 128, 128)
    mask = torch.zeros(1, 128, 128, dtype=torch.bool)
    mask[:, :96, :80] = True
    with torch.inference_mode():
        out = model({"image0": image, "image1": image.flip(-1), "mask0": mask, "mask1": mask})
    assert len(out["keypoints0"]) > 0
    for key in ("keypoints0",):
        assert (out[key][:, 0] < 80).all() and (out[key][:, 1] < 96).all()
    assert (out["keypoints1"][:, 0] < 80 + 4).all() and (out["keypoints1"][:, 1] < 96 + 4).all()


def test_gradients_reach_every_parameter():
    model = Matcher(load_config("lite")).train()
    image0, image1 = torch.rand(2, 1, 64, 96), torch.rand(2, 1, 64, 96)
    # ground-truth coarse matches, as the supervision provides them, pad the fine stage in training
    spv = {"spv_b_ids": torch.tensor([0, 1, 1]), "spv_i_ids": torch.tensor([20, 30, 40]), "spv_j_ids": torch.tensor([21, 31, 41])}
    out = model({"image0": image0, "image1": image1, **spv}, internals=True)
    assert out["conf_matrix"].shape == (2, 96, 96) and out["expec_f"].shape[1] == 3
    loss = out["conf_matrix"].log().mean() + out["expec_f"].square().mean()
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing, missing
    assert model.loftr_coarse.layers[0].attn.py_att.weight.grad.abs().sum() > 0


def test_blank_images_give_no_matches():
    model = Matcher(load_config("lite")).eval()
    blank = torch.full((1, 1, 120, 160), 0.5)
    with torch.inference_mode():
        out = model({"image0": blank, "image1": blank})
    assert out["keypoints0"].shape == (0, 2) and out["confidence"].shape == (0,)


@pytest.mark.parametrize(
    "batch,match",
    [
        ({"image0": torch.rand(1, 3, 64, 64), "image1": torch.rand(1, 1, 64, 64)}, "image0"),
        ({"image0": torch.rand(1, 1, 64, 64)}, "image1"),
        ({"image0": torch.rand(1, 1, 4, 64), "image1": torch.rand(1, 1, 64, 64)}, "smaller than one coarse cell"),
        ({"image0": torch.rand(2, 1, 64, 64), "image1": torch.rand(1, 1, 64, 64)}, "batch size"),
        ({"image0": torch.rand(1, 1, 64, 64) * 255, "image1": torch.rand(1, 1, 64, 64)}, r"\[0, 1\].*divide by 255"),
        ({"image0": torch.rand(1, 1, 64, 64), "image1": torch.full((1, 1, 64, 64), float("nan"))}, r"image1 must lie in \[0, 1\]"),
        ({"image0": torch.zeros(1, 1, 64, 64, dtype=torch.uint8), "image1": torch.rand(1, 1, 64, 64)}, "float tensor"),
        ({"image0": torch.rand(1, 1, 64, 64), "image1": torch.rand(1, 1, 64, 64), "mask0": torch.ones(1, 8, 8, dtype=torch.bool)},
         r"mask0 must be a \(B, H, W\) = \(1, 64, 64\) tensor like image0, got \(1, 8, 8\)"),
        ({"image0": torch.rand(1, 1, 64, 64), "image1": torch.rand(1, 1, 64, 64), "mask1": np.ones((1, 64, 64), bool)},
         r"mask1 must be a \(B, H, W\) .* got ndarray"),
        ({"image0": torch.rand(0, 1, 64, 64), "image1": torch.rand(0, 1, 64, 64)}, r"image0 holds no image \(batch size 0\)"),
        (torch.rand(1, 1, 64, 64), "the batch must be a dict with 'image0' and 'image1' tensors, got Tensor"),
    ],
)
def test_bad_batches_raise(batch, match):
    model = Matcher(load_config("lite")).eval()
    with pytest.raises(ValueError, match=match):
        model(batch)


def test_a_none_mask_is_no_mask():
    model = Matcher(load_config("lite", match_coarse={"thr": 0.0})).eval()
    torch.manual_seed(0)
    batch = {"image0": torch.rand(1, 1, 64, 96), "image1": torch.rand(1, 1, 64, 96)}
    with torch.inference_mode():
        plain, with_none = model(batch), model({**batch, "mask0": None, "mask1": None})
    assert len(plain["keypoints0"]) > 0
    torch.testing.assert_close(with_none["keypoints1"], plain["keypoints1"])


def test_unknown_config_key_is_an_error():
    with pytest.raises(ValueError, match="thresh"):
        load_config("lite", match_coarse={"thresh": 0.1})
    cfg = load_config("lite")
    with pytest.raises(Exception):
        cfg.coarse.topk = [1, 2]
    with pytest.raises(ValueError, match="unknown model config"):
        load_config("quadtree_z")


@pytest.mark.parametrize("key, value, match", [
    ("fine_window_size", 4, "fine_window_size must be odd"),  # ran with the wrong window geometry, 2-3 px off
    ("coarse.attention", "Linear", "coarse.attention must be one of quadtree, linear, full"),  # ran full attention
    ("fine.attention", "lineer", "fine.attention must be one of linear, full"),
    ("coarse.temp_bug_fix", "false", "coarse.temp_bug_fix must be true or false"),  # a truthy string
    ("coarse.nhead", 0, "coarse.nhead must be positive"),
    ("coarse.topks", [32.5, 16, 16], "coarse.topks must be a list whose entries are an integer"),
    ("coarse.layer_names", [], "layer_names must be a non-empty list"),
    ("match_coarse.dsmax_temperature", 0, "dsmax_temperature must be positive"),
    ("match_coarse.thr", "high", "match_coarse.thr must be a number"),
    ("match_coarse.border_rm", -3, "border_rm must be at least 0"),
    ("inference.resize", 4, "inference.resize must be null or at least 8"),
    ("coarse.max_coarsest_tokens", 0, "coarse.max_coarsest_tokens must be null or an integer of at least 1"),
    ("coarse.max_coarsest_tokens", "300", "coarse.max_coarsest_tokens must be null or an integer"),
    ("coarse", 5, "coarse must be a mapping of keys"),
    ("backbone_type", "VGG", "backbone_type must be one of ResNetFPN"),
])
def test_values_changed_after_load_config_are_checked_when_building(key, value, match):
    from omegaconf import OmegaConf

    cfg = load_config("lite")
    OmegaConf.update(cfg, key, value, force_add=False, merge=False)
    with pytest.raises(ValueError, match=match):
        Matcher(cfg)
    top, _, rest = key.partition(".")  # the same mistake through load_config
    with pytest.raises(ValueError, match=match):
        load_config("lite", **{top: {rest: value} if rest else value})


def test_a_config_missing_keys_names_the_first():
    from omegaconf import OmegaConf

    partial = OmegaConf.load(Path(__file__).resolve().parents[1] / "configs" / "model" / "lite.yaml")
    with pytest.raises(ValueError, match="key backbone_type is missing .*load_config"):
        Matcher(partial)


def test_train_coarse_percent_counts_candidates_as_loftr():
    # LoFTR's coarse matching: B * max(L0, L1) without masks, the sum of min(valid0, valid1) with them
    conf = torch.zeros(2, 300, 120)
    assert Matcher._max_candidates(conf, None, None) == 600
    mask0, mask1 = torch.ones(2, 300, dtype=torch.bool), torch.ones(2, 120, dtype=torch.bool)
    mask0[1, 100:], mask1[0, 60:] = False, False
    assert Matcher._max_candidates(conf, mask0, mask1) == 60 + 100


@pytest.mark.slow
def test_full_width_indoor_model_on_640x480():
    model = Matcher(load_config("quadtree_b_indoor")).eval()
    with torch.inference_mode():
        out = model({"image0": torch.rand(1, 1, 480, 640), "image1": torch.rand(1, 1, 480, 640)})
    assert out["keypoints0"].shape[1] == 2


@pytest.mark.parametrize("masked,magnitude", [(False, 1.0), (True, 1.0), (False, 4.0), (True, 4.0)])
def test_chunked_coarse_matching_equals_dense(masked, magnitude):
    """The memory-bounded matcher of large inference pairs gives the dense dual-softmax + mutual-NN result,
    also with features 4x larger (similarities and log-sum-exps of several hundred)."""
    from matcher.matching import chunked_mutual_nearest_matches, dual_softmax, mutual_nearest_matches

    g = torch.Generator().manual_seed(0)
    hw0, hw1 = (12, 16), (10, 14)
    f0 = torch.randn(2, hw0[0] * hw0[1], 32, generator=g)
    f1 = torch.randn(2, hw1[0] * hw1[1], 32, generator=g)
    f1[:, : 100] = f0[:, 50:150] + 0.05 * torch.randn(2, 100, 32, generator=g)  # some clear matches
    f0, f1 = f0 * magnitude, f1 * magnitude
    m0 = m1 = None
    if masked:
        m0 = torch.ones(2, *hw0, dtype=torch.bool)
        m0[1, 9:] = False
        m1 = torch.ones(2, *hw1, dtype=torch.bool)
        m1[0, :, 11:] = False
        m0, m1 = m0.flatten(1), m1.flatten(1)
    dense = mutual_nearest_matches(dual_softmax(f0, f1, 0.1, m0, m1), 0.05, 2, hw0, hw1, m0, m1)
    chunked = chunked_mutual_nearest_matches(f0, f1, 0.1, 0.05, 2, hw0, hw1, m0, m1, max_entries=2 * hw1[0] * hw1[1] * 7)
    assert len(dense[0]) > 20
    for a, b in zip(dense[:3], chunked[:3]):
        assert torch.equal(a, b)
    torch.testing.assert_close(dense[3], chunked[3], rtol=1e-4, atol=1e-6)


def test_large_inference_pairs_use_chunked_matching(image_pair, monkeypatch):
    """Forcing the chunked path in forward() gives the same matches as the dense one."""
    import matcher.matching as matching

    model = Matcher.from_pretrained("default")  # trained weights: real matches
    x0, x1 = image_pair
    with torch.inference_mode():
        dense = model({"image0": x0, "image1": x1})
        monkeypatch.setattr(matching, "CPU_DENSE_MATCHING_MAX_ENTRIES", 0)
        chunked = model({"image0": x0, "image1": x1})
    assert len(dense["keypoints0"]) > 0
    assert torch.equal(dense["keypoints0"], chunked["keypoints0"])
    torch.testing.assert_close(dense["keypoints1"], chunked["keypoints1"])


def test_bfloat16_features_keep_the_float32_matches(image_pair):
    """``inference.feature_dtype: bfloat16`` runs the backbone and the coarse transformer in bf16 and the rest
    in float32, and keeps at least 95% of the float32 matches within 1 px (the shipped weights)."""
    from matcher.metrics import matches_kept

    model = Matcher.from_pretrained("default")
    x0, x1 = image_pair
    with torch.inference_mode():
        ref = model({"image0": x0, "image1": x1})
        model.config.inference.feature_dtype = "bfloat16"
        seen = {}
        for name in ("loftr_coarse", "loftr_fine"):  # the dtype each transformer receives
            getattr(model, name).register_forward_pre_hook(lambda mod, args, name=name: seen.update({name: args[0].dtype}))
        new = model({"image0": x0, "image1": x1})
    assert seen == {"loftr_coarse": torch.bfloat16, "loftr_fine": torch.float32}
    assert new["keypoints1"].dtype == torch.float32
    assert len(ref["keypoints0"]) > 100
    kept = matches_kept(*(o[k].numpy() for o in (ref, new) for k in ("keypoints0", "keypoints1")))
    assert kept >= 0.95


def test_outer_bf16_autocast_keeps_float32_coordinates_and_the_float32_matches():
    """Under a caller's bf16 autocast the features are bf16, but keypoints come out in float32 (bf16's spacing
    is 4 px at 512-1023) and the fine expectation and coarse matching run in float32: on the demo pair at
    640x480 at least 95% of the float32 matches stay within 1 px (98.6%; with bf16 coordinates and a bf16
    expectation, as before, 89%; either fix alone gives 97-99%)."""
    from pathlib import Path

    import cv2

    from matcher.metrics import matches_kept

    assets = Path(__file__).resolve().parents[1] / "demo" / "assets"
    x0, x1 = (torch.from_numpy(cv2.imread(str(assets / n), cv2.IMREAD_GRAYSCALE)).float().div(255)[None, None]
              for n in ("pair_a.png", "pair_b.png"))
    model = Matcher.from_pretrained("default")
    with torch.inference_mode():
        ref = model({"image0": x0, "image1": x1})
        with torch.autocast("cpu", dtype=torch.bfloat16):
            new = model({"image0": x0, "image1": x1})
    assert {new[k].dtype for k in ("keypoints0", "keypoints1", "confidence")} == {torch.float32}
    assert len(ref["keypoints0"]) > 1000
    kept = matches_kept(*(o[k].numpy() for o in (ref, new) for k in ("keypoints0", "keypoints1")))
    assert kept >= 0.95


def test_window_expectation_runs_in_float32_under_autocast():
    """The fine expectation's variance is a difference of nearly equal moments: float32 even for bf16 inputs."""
    from matcher.matching import window_expectation

    g = torch.Generator().manual_seed(0)
    f0, f1 = torch.randn(50, 25, 64, generator=g), torch.randn(50, 25, 64, generator=g)
    ref = window_expectation(f0, f1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = window_expectation(f0, f1)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, ref)
    assert window_expectation(f0[:0], f1[:0]).dtype == torch.float32


def test_feature_dtype_is_checked_and_training_ignores_it():
    with pytest.raises(ValueError, match="feature_dtype must be one of"):
        Matcher(load_config("lite", inference={"feature_dtype": "fp16"}))
    model = Matcher(load_config("lite", inference={"feature_dtype": "bfloat16"}))
    assert model.training and model._feature_precision()[1] is None
    assert model.eval()._feature_precision()[1] == torch.bfloat16


def test_bf16_features_on_a_cpu_without_native_bf16_warn_that_they_are_emulated():
    """Asked for explicitly on a CPU that emulates bf16 (every unmarked test sees one), bf16 features warn
    (11x slower than float32 on the Zen 1 here); float32 and 'auto' do not, nor does training."""
    import warnings

    from matcher.model import EMULATED_BF16_WARNING

    model = Matcher(load_config("lite", inference={"feature_dtype": "bfloat16"}))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model._feature_precision()  # training mode: float32
        for name in ("auto", "float32"):
            model.config.inference.feature_dtype = name
            model.eval()._feature_precision()
    model.config.inference.feature_dtype = "bfloat16"
    with pytest.warns(RuntimeWarning, match="CPU without native bf16") as caught:
        model._feature_precision()
    assert [str(w.message) for w in caught] == [EMULATED_BF16_WARNING]


@pytest.mark.native_bf16
def test_bf16_features_on_a_cpu_with_native_bf16_do_not_warn():
    import warnings

    model = Matcher(load_config("lite", inference={"feature_dtype": "bfloat16"})).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert model._feature_precision()[1] == torch.bfloat16


def test_auto_feature_dtype_is_float32_on_a_cpu_without_native_bf16(image_pair):
    """The default ``auto``: on a CPU without native bf16 (what every unmarked test sees) and on a GPU the
    backbone and coarse transformer run in float32, so the default gives the float32 matches exactly."""
    from matcher.model import resolve_feature_dtype

    model = Matcher(load_config("lite", match_coarse={"thr": 0.0})).eval()
    assert model.config.inference.feature_dtype == "auto" and model.feature_dtype() == "float32"
    assert model._feature_precision()[1] is None
    assert resolve_feature_dtype("auto", "cuda") is None and resolve_feature_dtype("bfloat16", "cuda") == torch.bfloat16
    with torch.inference_mode():
        auto = model({"image0": image_pair[0], "image1": image_pair[1]})
        model.config.inference.feature_dtype = "float32"
        fp32 = model({"image0": image_pair[0], "image1": image_pair[1]})
    assert len(fp32["keypoints0"]) > 0
    for key in fp32:
        assert torch.equal(auto[key], fp32[key])


@pytest.mark.native_bf16
def test_auto_feature_dtype_is_bfloat16_on_a_cpu_with_native_bf16(image_pair):
    """On a CPU with AVX512-BF16 / AMX ``auto`` runs the backbone and coarse transformer in bf16 (as
    ``bfloat16`` does: same matches), the rest in float32; training and GPUs keep float32."""
    from matcher.model import resolve_feature_dtype

    model = Matcher(load_config("lite", match_coarse={"thr": 0.0})).eval()
    assert model.feature_dtype() == "bfloat16" and resolve_feature_dtype("auto", torch.device("cuda", 0)) is None
    assert model.train()._feature_precision()[1] is None
    model.eval()
    seen = {}
    model.loftr_coarse.register_forward_pre_hook(lambda mod, args: seen.update(coarse=args[0].dtype))
    with torch.inference_mode():
        auto = model({"image0": image_pair[0], "image1": image_pair[1]})
        model.config.inference.feature_dtype = "bfloat16"
        bf16 = model({"image0": image_pair[0], "image1": image_pair[1]})
    assert seen == {"coarse": torch.bfloat16} and auto["keypoints1"].dtype == torch.float32
    assert len(bf16["keypoints0"]) > 0
    for key in bf16:
        assert torch.equal(auto[key], bf16[key])


def test_native_bf16_detection_agrees_with_the_cpu_flags(monkeypatch):
    """``cpu_has_native_bf16`` (which conftest hides from the other tests) says what /proc/cpuinfo says:
    AVX512-BF16 or AMX-BF16."""
    from pathlib import Path

    from matcher import model as model_module

    cpuinfo = Path("/proc/cpuinfo")
    flags = next((line.split(":", 1)[1].split() for line in cpuinfo.read_text().splitlines() if line.startswith("flags")),
                 None) if cpuinfo.is_file() else None
    if not flags:
        pytest.skip("no CPU flags in /proc/cpuinfo")
    monkeypatch.undo()  # the real detection
    assert model_module.cpu_has_native_bf16() == ("avx512_bf16" in flags or "amx_bf16" in flags)


def test_quadtree_mlp_zeroes_padded_tokens_in_place_in_inference(monkeypatch):
    """CPU inference zeroes the padded tokens of the MLP's own hidden map in place; the result equals the
    out-of-place multiply taken under autograd and an explicit computation, for an irregular mask."""
    from matcher import transformer

    torch.manual_seed(0)
    hw, dim = (6, 8), 16
    mlp = transformer.QuadtreeMLP(dim, 4 * dim, kernel="torch").eval()
    x = torch.randn(2, hw[0] * hw[1], dim)
    mask = torch.rand(2, hw[0] * hw[1]) > 0.3
    mask[1] = True  # one image without padding

    hidden = torch.relu(mlp.fc1(x)) * mask[..., None]
    grid = hidden.unflatten(1, hw).permute(0, 3, 1, 2)
    conv = mlp.dwconv.dwconv
    expected = mlp.fc2(F.gelu(F.conv2d(grid, conv.weight, conv.bias, padding=1, groups=conv.groups)).flatten(2).transpose(1, 2))

    calls = []
    zero_in_place = transformer._zero_padded_tokens_
    monkeypatch.setattr(transformer, "_zero_padded_tokens_", lambda *a: calls.append(1) or zero_in_place(*a))
    with torch.inference_mode():
        fast = mlp(x, hw, mask)
    slow = mlp(x.requires_grad_(), hw, mask)
    assert calls == [1]  # only the inference call took the in-place path
    torch.testing.assert_close(fast, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(slow.detach(), expected, atol=1e-5, rtol=1e-5)
