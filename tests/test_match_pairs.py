"""Batch matching into hloc's h5 layout: keypoint merging, per-pair matches0, resume and bad input."""

from __future__ import annotations

import cv2
import h5py
import numpy as np
import pytest

from matcher import match_pairs as mp


class ShiftMatcher:
    """Matches a fixed grid of image0 to the same grid shifted by (dx, dy) in image1."""

    def __init__(self, shift=(3.0, -2.0)) -> None:
        self.shift = np.asarray(shift, np.float32)
        self.calls = 0

    def match(self, image0, image1, resize=None):
        self.calls += 1
        ys, xs = np.mgrid[10:40:10, 10:50:10]
        k0 = np.stack([xs.ravel(), ys.ravel()], 1).astype(np.float32)
        return {"keypoints0": k0, "keypoints1": k0 + self.shift, "confidence": np.linspace(1, 0.5, len(k0), dtype=np.float32)}


def test_names_to_pair_follows_hloc():
    assert mp.names_to_pair("a/b.jpg", "c.jpg") == "a-b.jpg/c.jpg"


def test_merge_keypoints_groups_points_in_a_cell():
    pts = np.array([[10.1, 5.0], [20.0, 20.0], [9.9, 5.2], [20.4, 19.8]], np.float32)
    merged, ids = mp.merge_keypoints(pts, 1.0)
    assert ids.tolist() == [0, 1, 0, 1]
    np.testing.assert_allclose(merged, [[10.0, 5.1], [20.2, 19.9]], atol=1e-5)
    empty, none = mp.merge_keypoints(np.zeros((0, 2), np.float32), 1.0)
    assert empty.shape == (0, 2) and none.shape == (0,)


def test_pair_matches_keeps_the_most_confident_per_keypoint():
    ids0 = np.array([0, 0, 1, 2])
    ids1 = np.array([5, 6, 6, 7])
    scores = np.array([0.5, 0.9, 0.8, 0.1], np.float32)
    matches0, scores0 = mp.pair_matches(ids0, ids1, scores, num0=4)
    # 0->6 (0.9) wins over 0->5; then 1->6 loses keypoint 6 of image1; 2->7 stays
    assert matches0.tolist() == [6, -1, 7, -1]
    np.testing.assert_allclose(scores0, [0.9, 0, 0.1, 0])


def test_read_pairs_skips_comments_and_duplicates(tmp_path):
    f = tmp_path / "pairs.txt"
    f.write_text("# header\na.png b.png\n\na.png b.png  # again\nb.png c.png\n")
    assert mp.read_pairs(f) == [("a.png", "b.png"), ("b.png", "c.png")]
    f.write_text("only_one_name\n")
    with pytest.raises(ValueError, match="pairs.txt:1"):
        mp.read_pairs(f)
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        mp.read_pairs(tmp_path / "missing.txt")


def _images(folder, names):
    folder.mkdir(exist_ok=True)
    rng = np.random.default_rng(0)
    for name in names:
        cv2.imwrite(str(folder / name), rng.integers(0, 255, (48, 64), dtype=np.uint8))


def test_hloc_files_link_shifted_points(tmp_path):
    _images(tmp_path / "img", ["a.png", "b.png", "c.png"])
    pairs = [("a.png", "b.png"), ("b.png", "c.png")]
    matcher = ShiftMatcher()
    with h5py.File(tmp_path / "m.h5", "a") as out:
        assert mp.match_all(matcher, pairs, tmp_path / "img", out, None) == []
        counts = mp.write_hloc(pairs, out, tmp_path / "k.h5", merge_px=1.0)
    assert counts == {"pairs": 2, "images": 3, "matches": 24, "unlisted": 0}
    with h5py.File(tmp_path / "m.h5") as m, h5py.File(tmp_path / "k.h5") as k:
        for name0, name1 in pairs:
            matches0 = m[mp.names_to_pair(name0, name1)]["matches0"][()]
            kp0, kp1 = k[name0]["keypoints"][()], k[name1]["keypoints"][()]
            assert len(matches0) == len(kp0)
            valid = matches0 >= 0
            np.testing.assert_allclose(kp1[matches0[valid]] - kp0[valid], np.tile(matcher.shift, (valid.sum(), 1)), atol=1e-5)
        # b.png takes part in two pairs: its points from both are in one keypoint list
        assert len(k["b.png"]["keypoints"]) == 24


def test_cli_resumes_counts_failures_and_refuses_other_settings(tmp_path, monkeypatch, capsys):
    _images(tmp_path / "img", ["a.png", "b.png"])
    (tmp_path / "pairs.txt").write_text("a.png b.png\na.png missing.png\n")
    matcher = ShiftMatcher()
    monkeypatch.setattr("matcher.model.matcher_with_description", lambda w, c: (_Wrapped(matcher), "a stub"))
    args = [str(tmp_path / "pairs.txt"), "--image-dir", str(tmp_path / "img"), "--out", str(tmp_path / "m.h5")]
    assert mp.main(args) == 1  # one pair failed
    out, err = capsys.readouterr()
    assert "missing.png" in err and "not found" in err
    assert "matching 2 pairs with a stub" in out
    assert matcher.calls == 1
    assert mp.main(args) == 1 and matcher.calls == 1  # resumed: the finished pair is not matched again
    # ... and says so, instead of "matching 2 pairs"
    resumed = f"2 pairs: 1 already matched in {tmp_path / 'm.h5'} (resuming), matching the other 1 with a stub"
    assert resumed in capsys.readouterr().out
    assert (tmp_path / "m-keypoints.h5").is_file()
    (tmp_path / "pairs.txt").write_text("a.png b.png\n")
    assert mp.main(args) == 0 and matcher.calls == 1
    assert "1 of 1 pairs already matched" in capsys.readouterr().out
    assert mp.main(args + ["--resize", "32"]) == 2
    assert "different matcher or settings" in capsys.readouterr().err


def test_a_failed_pair_is_written_without_matches_so_hloc_can_read_the_rest(tmp_path, monkeypatch, capsys):
    """hloc reads every listed pair and image: a failed pair gets matches0 of -1 (as long as image0's keypoints)
    and an image seen only in failed pairs gets no keypoints; the exit status stays 1."""
    _images(tmp_path / "img", ["a.png", "b.png"])
    (tmp_path / "pairs.txt").write_text("a.png b.png\na.png missing.png\nmissing.png b.png\n")
    monkeypatch.setattr("matcher.model.matcher_with_description", lambda w, c: (_Wrapped(ShiftMatcher()), "a stub"))
    args = [str(tmp_path / "pairs.txt"), "--image-dir", str(tmp_path / "img"), "--out", str(tmp_path / "m.h5")]
    assert mp.main(args) == 1
    assert "2 pairs failed (listed above; written without matches" in capsys.readouterr().out
    with h5py.File(tmp_path / "m.h5") as m, h5py.File(tmp_path / "m-keypoints.h5") as k:
        assert k["missing.png/keypoints"].shape == (0, 2) and len(k["a.png/keypoints"]) == 12
        assert (m["a.png/missing.png/matches0"][()] == -1).all() and len(m["a.png/missing.png/matches0"]) == 12
        assert m["missing.png/b.png/matches0"].shape == (0,) and "raw_scores" not in m["a.png/missing.png"]
        assert (m["a.png/b.png/matches0"][()] >= 0).sum() == 12


def test_cli_never_replaces_a_foreign_keypoints_file(tmp_path, monkeypatch, capsys):
    """--keypoints-out naming hloc's own features file is refused before matching (unless --overwrite);
    the file this tool wrote is replaced on the next run."""
    _images(tmp_path / "img", ["a.png", "b.png"])
    (tmp_path / "pairs.txt").write_text("a.png b.png\n")
    matcher = ShiftMatcher()
    monkeypatch.setattr("matcher.model.matcher_with_description", lambda w, c: (_Wrapped(matcher), "a stub"))
    features = tmp_path / "feats-superpoint.h5"
    with h5py.File(features, "w") as f:
        f.create_dataset("x.jpg/keypoints", data=np.zeros((3, 2), np.float32))
    args = [str(tmp_path / "pairs.txt"), "--image-dir", str(tmp_path / "img"), "--out", str(tmp_path / "m.h5"),
            "--keypoints-out", str(features)]
    assert mp.main(args) == 2 and matcher.calls == 0
    assert "feats-superpoint.h5 holds data this tool did not write" in capsys.readouterr().err
    with h5py.File(features) as f:
        assert list(f) == ["x.jpg"]
    assert mp.main(args + ["--overwrite"]) == 0 and mp.main(args) == 0  # then it is ours: replaced freely
    with h5py.File(features) as f:
        assert sorted(f) == ["a.png", "b.png"]


def test_a_later_pair_list_leaves_no_stale_matches(tmp_path):
    """matches0 index the keypoints file the run writes: pairs of an earlier list that are not in this one lose
    theirs (hloc then fails on them instead of reading wrong keypoints) and get them back when listed again."""
    _images(tmp_path / "img", ["a.png", "b.png", "c.png"])
    both, first = [("a.png", "b.png"), ("b.png", "c.png")], [("a.png", "b.png")]
    with h5py.File(tmp_path / "m.h5", "a") as out:
        mp.match_all(ShiftMatcher(), both, tmp_path / "img", out, None)
        mp.write_hloc(both, out, tmp_path / "k.h5", merge_px=1.0)
        assert mp.write_hloc(first, out, tmp_path / "k.h5", merge_px=1.0)["unlisted"] == 1
        assert "matches0" not in out["b.png/c.png"] and "raw_scores" in out["b.png/c.png"]
        with h5py.File(tmp_path / "k.h5") as k:
            assert set(k) == {"a.png", "b.png"} and len(out["a.png/b.png/matches0"]) == len(k["a.png/keypoints"])
        assert mp.write_hloc(both, out, tmp_path / "k.h5", merge_px=1.0) == {"pairs": 2, "images": 3, "matches": 24, "unlisted": 0}
        with pytest.raises(ValueError, match="must be positive"):
            mp.write_hloc(both, out, tmp_path / "k.h5", merge_px=0.0)


def test_cli_never_wipes_a_foreign_file_and_checks_the_merge_grid(tmp_path, monkeypatch, capsys):
    _images(tmp_path / "img", ["a.png", "b.png"])
    (tmp_path / "pairs.txt").write_text("a.png b.png\n")
    monkeypatch.setattr("matcher.model.matcher_with_description", lambda w, c: (_Wrapped(ShiftMatcher()), "a stub"))
    foreign = tmp_path / "hloc_matches.h5"
    with h5py.File(foreign, "w") as f:
        f.create_dataset("x.png/y.png/matches0", data=np.zeros(3, np.int32))
    args = [str(tmp_path / "pairs.txt"), "--image-dir", str(tmp_path / "img"), "--out", str(foreign)]
    assert mp.main(args) == 2
    assert "did not write" in capsys.readouterr().err
    with h5py.File(foreign) as f:
        assert "x.png/y.png/matches0" in f
    assert mp.main(args + ["--overwrite"]) == 0
    with h5py.File(foreign) as f:
        assert "x.png" not in f and "a.png/b.png/matches0" in f
    with pytest.raises(SystemExit):
        mp.main(args + ["--merge-px", "0"])
    assert "--merge-px must be positive" in capsys.readouterr().err


class _Wrapped:
    """Gives the stub what main() needs: describe() for the fingerprint, .to() and feature_dtype()."""

    def __init__(self, inner) -> None:
        self.inner = inner

    def to(self, device):
        return self

    def describe(self):
        return {"matcher": "stub"}

    def feature_dtype(self):
        return "float32"

    def match(self, *args, **kwargs):
        return self.inner.match(*args, **kwargs)


def test_cli_bf16_flag_reaches_the_matcher_config(tmp_path, capsys):
    """``--bf16`` runs the shipped model with ``inference.feature_dtype: bfloat16``: it matches, and the output
    file then refuses a float32 run (the setting is part of the matcher's fingerprint)."""
    _images(tmp_path / "img", ["a.png", "b.png"])
    (tmp_path / "pairs.txt").write_text("a.png b.png\n")
    # at the images' own size: the config's 640 px would run bf16 at 480x640, slow on CPUs without native bf16
    args = [str(tmp_path / "pairs.txt"), "--image-dir", str(tmp_path / "img"), "--out", str(tmp_path / "m.h5"),
            "--resize", "64"]
    assert mp.main(args + ["--bf16"]) == 0
    assert mp.main(args) == 2
    assert "different matcher or settings" in capsys.readouterr().err


def test_cli_refuses_config_without_weights_and_a_missing_device(tmp_path, monkeypatch, capsys):
    """--config alone would be ignored (the shipped weights bring their own config): an error, exit status 2.
    --device cuda on a PyTorch without CUDA: a usage error, exit status 2, no traceback."""
    import torch

    from matcher.model import WEIGHTS_DIR

    _images(tmp_path / "img", ["a.png", "b.png"])
    (tmp_path / "pairs.txt").write_text("a.png b.png\n")
    args = [str(tmp_path / "pairs.txt"), "--image-dir", str(tmp_path / "img"), "--out", str(tmp_path / "m.h5")]
    if (WEIGHTS_DIR / "default.safetensors").is_file():
        assert mp.main(args + ["--config", "lite_linear"]) == 2
        assert "--config lite_linear needs --weights" in capsys.readouterr().err
    monkeypatch.setattr(torch.backends.cuda, "is_built", lambda: False)
    with pytest.raises(SystemExit) as exit_info:
        mp.main(args + ["--device", "cuda"])
    assert exit_info.value.code == 2 and "argument --device: cuda: this PyTorch build" in capsys.readouterr().err
    assert not (tmp_path / "m.h5").exists()


@pytest.mark.parametrize("resize, message", [("4", "must be at least 8 px"), ("abc", "expected an integer")])
def test_cli_refuses_a_resize_below_one_cell_before_writing(tmp_path, capsys, resize, message):
    # it failed every pair and stored the setting, so a corrected rerun into the same --out was refused
    (tmp_path / "pairs.txt").write_text("a.png b.png\n")
    args = [str(tmp_path / "pairs.txt"), "--image-dir", str(tmp_path), "--out", str(tmp_path / "m.h5")]
    with pytest.raises(SystemExit) as exit_info:
        mp.main(args + ["--resize", resize])
    assert exit_info.value.code == 2 and f"argument --resize: {message}" in capsys.readouterr().err
    assert not (tmp_path / "m.h5").exists()
