"""Checkpoint loading: every supported format, strictness and its errors, and safety."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from matcher import Matcher, load_config


@pytest.fixture(scope="module")
def lite_model() -> Matcher:
    torch.manual_seed(0)
    return Matcher(load_config("lite")).eval()


def _same_weights(a: Matcher, b: Matcher) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k].to(sb[k].dtype), sb[k]) for k in sa)


def test_published_lightning_checkpoint_layout_loads(reference_layout, tmp_path):
    """A checkpoint laid out like the released LoFTR-QuadTree .ckpt (state_dict, 'matcher.' prefix,
    names and shapes from the reference list) loads strictly into quadtree_b_indoor."""
    g = torch.Generator().manual_seed(0)
    state = {}
    for name, shape in reference_layout.items():
        dtype = torch.int64 if name.endswith("num_batches_tracked") else torch.float32
        state[f"matcher.{name}"] = torch.randn(shape, generator=g).to(dtype) if dtype.is_floating_point else torch.tensor(7)
    path = tmp_path / "indoor.ckpt"
    torch.save({"epoch": 29, "global_step": 1000, "state_dict": state}, path)
    model = Matcher(load_config("quadtree_b_indoor")).load_weights(path)
    loaded = model.state_dict()
    for name in reference_layout:
        assert torch.equal(loaded[name], state[f"matcher.{name}"]), name
    # the outdoor config shares the layout (only top-k differs)
    Matcher(load_config("quadtree_b_outdoor")).load_weights(path)


@pytest.mark.parametrize("fmt", ["pt", "pth", "ckpt", "safetensors", "safetensors-fp16"])
def test_round_trip_formats(lite_model, fmt, tmp_path):
    state = lite_model.state_dict()
    if fmt.startswith("safetensors"):
        if fmt.endswith("fp16"):
            state = {k: v.half() if v.is_floating_point() else v for k, v in state.items()}
        path = tmp_path / "w.safetensors"
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    elif fmt == "ckpt":
        path = tmp_path / "w.ckpt"
        torch.save({"state_dict": {f"matcher.{k}": v for k, v in state.items()}}, path)
    else:
        path = tmp_path / f"w.{fmt}"
        torch.save(state, path)
    other = Matcher(load_config("lite")).load_weights(path)
    if fmt.endswith("fp16"):
        ref = lite_model.state_dict()
        for k, v in other.state_dict().items():
            torch.testing.assert_close(v, ref[k], atol=1e-2, rtol=1e-3)
    else:
        assert _same_weights(other, lite_model)


def test_wrong_config_names_first_mismatches(lite_model, tmp_path):
    path = tmp_path / "lite.pt"
    torch.save(lite_model.state_dict(), path)
    with pytest.raises(ValueError, match=r"shape mismatch: backbone\.conv1\.weight: checkpoint \(64, 1, 7, 7\)"):
        Matcher(load_config("quadtree_b_indoor")).load_weights(path)
    with pytest.raises(ValueError, match=r"missing: .*merge|unexpected: .*py_att"):
        Matcher(load_config("lite_linear")).load_weights(path)


@pytest.mark.parametrize("payload", ["touch", "os.system"])
def test_pickle_that_runs_code_is_refused(tmp_path, payload):
    # torch reports the modules it never allows (os, sys, ...) in other words than other classes
    path = tmp_path / "evil.pt"
    marker = tmp_path / "pwned"
    torch.save({"state_dict": {"x": torch.zeros(1)}, "payload": _Payload(payload, marker)}, path)
    with pytest.raises(ValueError, match="(?i)refusing to load .*unsupported global") as err:
        Matcher(load_config("lite")).load_weights(path)
    assert "weights_only set to False" not in str(err.value)  # torch's advice would run the payload
    assert not marker.exists()


def test_bytes_that_are_no_checkpoint_are_not_called_unsafe(tmp_path):
    for data in (b"\x01\x02\x03\x04", b"plain text, not a checkpoint"):
        path = tmp_path / "junk.pt"
        path.write_bytes(data)
        with pytest.raises(ValueError, match="not a PyTorch checkpoint, truncated or corrupt") as err:
            Matcher(load_config("lite")).load_weights(path)
        assert "refusing" not in str(err.value) and "weights_only set to False" not in str(err.value)


class _Payload:
    """An object whose unpickling would run code (creates the file ``marker``)."""

    def __init__(self, how: str, marker):
        self.how, self.marker = how, marker

    def __reduce__(self):
        import os

        if self.how == "os.system":
            return (os.system, (f"touch '{self.marker}'",))
        return (type(self.marker).touch, (self.marker,))


def test_truncated_files_raise_clear_errors(lite_model, tmp_path):
    for suffix in (".pt", ".safetensors"):
        path = tmp_path / f"w{suffix}"
        if suffix == ".pt":
            torch.save(lite_model.state_dict(), path)
        else:
            save_file({k: v.contiguous() for k, v in lite_model.state_dict().items()}, str(path))
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
        with pytest.raises(ValueError, match="truncated or corrupt"):
            Matcher(load_config("lite")).load_weights(path)
    with pytest.raises(FileNotFoundError):
        Matcher(load_config("lite")).load_weights(tmp_path / "missing.pt")


def test_from_pretrained_with_path_and_sidecar_config(lite_model, tmp_path):
    from omegaconf import OmegaConf

    path = tmp_path / "mine.safetensors"
    save_file({k: v.contiguous() for k, v in lite_model.state_dict().items()}, str(path))
    OmegaConf.save(lite_model.config, tmp_path / "mine.yaml")
    model = Matcher.from_pretrained(path)
    assert not model.training and _same_weights(model, lite_model)
    with pytest.raises(ValueError, match="no shipped weights named 'nope'"):
        Matcher.from_pretrained("nope")


def test_export_weights_cli_writes_fp16_safetensors_and_config(lite_model, tmp_path, image_pair):
    """A Lightning checkpoint exported as shipped weights reloads through from_pretrained (config from the
    sidecar yaml) and matches like the fp32 model; a checkpoint that does not fit the config is refused."""
    from matcher.export_weights import main

    ckpt = tmp_path / "run.ckpt"
    torch.save({"global_step": 5, "state_dict": {f"matcher.{k}": v for k, v in lite_model.state_dict().items()}}, ckpt)
    out = tmp_path / "shipped" / "mine.safetensors"
    assert main([str(ckpt), str(out), "--config", "lite"]) == 0
    assert out.with_suffix(".yaml").is_file()
    # the weights file gets the mode the umask gives any new file, like its yaml (safetensors alone: 0600)
    assert out.stat().st_mode & 0o777 == out.with_suffix(".yaml").stat().st_mode & 0o777
    from safetensors.torch import load_file

    assert all(v.dtype in (torch.float16, torch.int64) for v in load_file(str(out)).values())
    shipped = Matcher.from_pretrained(out)
    for k, v in shipped.state_dict().items():
        torch.testing.assert_close(v, lite_model.state_dict()[k], atol=1e-2, rtol=1e-3)
    x0, x1 = image_pair
    with torch.inference_mode():
        a, b = lite_model({"image0": x0, "image1": x1}), shipped({"image0": x0, "image1": x1})
    assert abs(len(a["keypoints0"]) - len(b["keypoints0"])) <= max(2, 0.05 * len(a["keypoints0"]))
    assert main([str(ckpt), str(tmp_path / "bad.safetensors"), "--config", "quadtree_b_indoor"]) == 2
    assert not (tmp_path / "bad.safetensors").exists()


def test_training_checkpoints_find_their_model_config(lite_model, tmp_path):
    """A train.py checkpoint loads by path alone: through the run's model.yaml while it sits in the run's
    checkpoints/ folder, through the model config in its hyper-parameters once copied elsewhere."""
    from omegaconf import OmegaConf

    from matcher.model import checkpoint_config, config_to_dict

    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    state = {f"matcher.{k}": v for k, v in lite_model.state_dict().items()}
    hyper = {"config": {"model_config": config_to_dict(lite_model.config), "batch_size": 2}}
    torch.save({"global_step": 3, "state_dict": state, "hyper_parameters": hyper}, run / "checkpoints" / "last.ckpt")
    OmegaConf.save(lite_model.config, run / "model.yaml")
    assert config_to_dict(checkpoint_config(run / "checkpoints" / "last.ckpt")) == config_to_dict(lite_model.config)
    assert _same_weights(Matcher.from_pretrained(run / "checkpoints" / "last.ckpt"), lite_model)

    (run / "model.yaml").unlink()
    copied = tmp_path / "elsewhere" / "lite.ckpt"
    copied.parent.mkdir()
    copied.write_bytes((run / "checkpoints" / "last.ckpt").read_bytes())
    assert _same_weights(Matcher.from_pretrained(copied), lite_model)
    plain = tmp_path / "plain.pt"  # no config anywhere: the defaults (full width), which do not fit
    torch.save(lite_model.state_dict(), plain)
    assert checkpoint_config(plain) is None
    with pytest.raises(ValueError, match=r"does not fit this model config.*no model config found for plain\.pt.*--config"):
        Matcher.from_pretrained(plain)


@pytest.mark.parametrize("damage", ["nan", "inf", "integer"])
def test_weights_with_unusable_values_are_refused(lite_model, tmp_path, damage):
    # a diverged run's NaN would give plausible matches on the CPU path, whose fused ReLU maps NaN to 0
    state = {k: v.clone() for k, v in lite_model.state_dict().items()}
    name = "backbone.conv1.weight"
    if damage == "integer":
        state[name] = state[name].round().to(torch.int64)
    else:
        state[name].view(-1)[3] = float(damage)
    path = tmp_path / "damaged.pt"
    torch.save(state, path)
    expected = "wrong kind of number: backbone.conv1.weight" if damage == "integer" else "NaN or infinite values"
    with pytest.raises(ValueError, match=f"holds unusable weights: 1 .*{expected}"):
        Matcher(load_config("lite")).load_weights(path)
