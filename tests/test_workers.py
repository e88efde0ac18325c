"""Matching in worker processes (matcher/workers.py) and its use by the evaluation loop and match_pairs.

The workers are spawned processes: what they build and run is given as module-level functions of this
module, which they import by name like any other.
"""

from __future__ import annotations

import argparse
import functools
import os
from pathlib import Path

import cv2
import h5py
import numpy as np
import pytest
import torch

from matcher import match_pairs as mp
from matcher.evaluation import LoadedPair, PredictionCache, open_pool, run_pairs, timing_protocol
from matcher.workers import MatcherPool, WorkerDied, submitted_ahead, threads_per_worker


class ShiftMatcher:
    """Matches a grid of image0 to the same grid shifted by ``shift`` in image1; fails on an all-black image
    (ValueError) and ends its process on an all-white one (a worker that dies)."""

    def __init__(self, shift: tuple[float, float]) -> None:
        self.shift = np.asarray(shift, np.float32)

    def match(self, image0, image1, resize=None):
        if image1.max() == 0:
            raise ValueError("black image")
        if image1.min() == 255:
            os._exit(3)
        ys, xs = np.mgrid[10:40:10, 10:50:10]
        k0 = np.stack([xs.ravel(), ys.ravel()], 1).astype(np.float32) + float(image0.mean() % 7)
        return {"keypoints0": k0, "keypoints1": k0 + self.shift, "confidence": np.linspace(1, 0.5, len(k0), dtype=np.float32)}


def shift_matchers(shift: tuple[float, float]) -> dict[str, ShiftMatcher]:
    return {"shift": ShiftMatcher(shift), "other": ShiftMatcher((-1.0, 1.0))}


def describe_worker(matcher: ShiftMatcher, value: int) -> tuple[int, int, tuple[float, ...], int]:
    return os.getpid(), torch.get_num_threads(), tuple(matcher.shift.tolist()), value


def raise_value_error(matcher: ShiftMatcher) -> None:
    raise ValueError("from the job")


def end_process(matcher: ShiftMatcher) -> None:
    os._exit(3)


# ----------------------------------------------------------------------------------------------- the pool
def test_pool_runs_jobs_on_each_workers_own_matchers() -> None:
    with MatcherPool(functools.partial(shift_matchers, (3.0, -2.0)), workers=2) as pool:
        results = [MatcherPool.result(pool.submit(describe_worker, label, i)) for i, label in enumerate(["shift", "other"] * 3)]
    assert {pid for pid, *_ in results}.isdisjoint({os.getpid()})
    assert {threads for _, threads, *_ in results} == {threads_per_worker(2)} == {pool.threads}
    expected = [((3.0, -2.0) if i % 2 == 0 else (-1.0, 1.0), i) for i in range(6)]
    assert [(shift, value) for _, _, shift, value in results] == expected


def test_pool_returns_job_errors_and_reports_a_dead_worker() -> None:
    with MatcherPool(functools.partial(shift_matchers, (0.0, 0.0)), workers=1) as pool:
        with pytest.raises(ValueError, match="from the job"):
            MatcherPool.result(pool.submit(raise_value_error, "shift"))
        assert MatcherPool.result(pool.submit(describe_worker, "shift", 7))[3] == 7  # the worker lives on
        with pytest.raises(WorkerDied, match="fewer --workers"):
            MatcherPool.result(pool.submit(end_process, "shift"))


def test_threads_per_worker_and_refused_settings() -> None:
    assert threads_per_worker(2, 2) == 1 and threads_per_worker(4, 2) == 1 and threads_per_worker(2, 16) == 8
    for workers in (0, -1, 1.5, "2"):
        with pytest.raises(ValueError, match="workers must be"):
            MatcherPool(dict, workers)
    with pytest.raises(ValueError, match="for CPU matching"):
        MatcherPool(dict, 2, device="cuda")
    with pytest.raises(SystemExit, match="--workers 2 is for --device cpu"):
        open_pool(argparse.Namespace(workers=2, device="cuda"), ["sift"])
    assert open_pool(argparse.Namespace(workers=1, device="cuda"), ["sift"]) is None
    assert "worker processes" not in timing_protocol(argparse.Namespace(workers=1, device="cpu"))
    threads = threads_per_worker(3)
    assert f"one of 3 worker processes of {threads} thread" in timing_protocol(argparse.Namespace(workers=3, device="cpu"))


def test_submitted_ahead_hands_items_on_in_order_after_submitting_ahead() -> None:
    def run(items, ahead):
        submitted: list[int] = []
        handed = [(item, job, len(submitted))  # (item, its job, items submitted when it was handed on)
                  for item, job in submitted_ahead(items, lambda i: submitted.append(i) or 10 * i, ahead)]
        return handed, submitted

    assert run(range(5), 2) == ([(0, 0, 3), (1, 10, 4), (2, 20, 5), (3, 30, 5), (4, 40, 5)], [0, 1, 2, 3, 4])
    assert run(range(3), 0) == ([(0, 0, 1), (1, 10, 2), (2, 20, 3)], [0, 1, 2])  # no look-ahead: one at a time
    assert run([], 3) == ([], [])


# ----------------------------------------------------------------------------------------------- evaluation loop
def _pairs(count: int, broken: dict[int, int] | None = None) -> list[LoadedPair]:
    """Random image pairs; ``broken`` maps a pair index to the value of its whole second image."""
    rng = np.random.default_rng(0)
    pairs = []
    for i in range(count):
        image0, image1 = (rng.integers(0, 255, (48, 64), dtype=np.uint8) for _ in range(2))
        if broken and i in broken:
            image1[:] = broken[i]
        pairs.append(LoadedPair(f"p{i}", image0, image1, {}))
    return pairs


def _run(pairs: list[LoadedPair], tmp_path: Path, name: str, pool: MatcherPool | None) -> tuple[dict, dict]:
    matchers = shift_matchers((2.0, 1.0))
    caches = {label: PredictionCache(tmp_path / f"{name}-{label}.h5", {"label": label}) for label in matchers}

    def load(index: int) -> LoadedPair:
        if index == 1:
            raise FileNotFoundError("pair 1 is unreadable")
        return pairs[index]

    def evaluate(prediction, pair):
        return {"shift_x": float(np.mean(prediction["keypoints1"][:, 0] - prediction["keypoints0"][:, 0]))
                if len(prediction["confidence"]) else None}

    try:
        run = run_pairs(len(pairs), load, matchers, caches, evaluate, progress=False, pool=pool)
    finally:
        for cache in caches.values():
            cache.close()
    return run, {label: len(_cached_keys(tmp_path / f"{name}-{label}.h5", label)) for label in matchers}


def _cached_keys(path: Path, label: str) -> set[str]:
    with PredictionCache(path, {"label": label}) as cache:
        return {f"p{i}" for i in range(10) if f"p{i}" in cache}


def test_run_pairs_with_workers_gives_the_records_of_a_serial_run(tmp_path: Path) -> None:
    pairs = _pairs(7, broken={4: 0})  # pair 4: the matchers raise (a failure record, nothing cached)
    serial, serial_cached = _run(pairs, tmp_path, "serial", None)
    with MatcherPool(functools.partial(shift_matchers, (2.0, 1.0)), workers=2) as pool:
        parallel, parallel_cached = _run(pairs, tmp_path, "parallel", pool)
        drop_time = lambda records: [{k: v for k, v in r.items() if k != "time_ms"} for r in records]  # noqa: E731
        assert {k: drop_time(v) for k, v in parallel.records.items()} == {k: drop_time(v) for k, v in serial.records.items()}
        assert parallel.skipped == serial.skipped and [s["index"] for s in serial.skipped] == [1]
        assert parallel.computed == serial.computed == {"shift": 6, "other": 6}
        assert parallel_cached == serial_cached == {"shift": 5, "other": 5}
        assert [r["key"] for r in parallel.records["shift"]] == ["p0", "p2", "p3", "p4", "p5", "p6"]
        assert "black image" in parallel.records["shift"][3]["error"]
        assert parallel.records["shift"][0]["shift_x"] == pytest.approx(2.0)
        resumed, _ = _run(pairs, tmp_path, "parallel", pool)  # from the cache: no job for the cached pairs
        assert resumed.cached == {"shift": 5, "other": 5} and resumed.computed == {"shift": 1, "other": 1}


def test_run_pairs_stops_when_a_worker_dies_and_keeps_what_finished(tmp_path: Path) -> None:
    pairs = _pairs(6, broken={5: 255})  # pair 5 ends the worker process
    with MatcherPool(functools.partial(shift_matchers, (2.0, 1.0)), workers=1) as pool:
        with pytest.raises(WorkerDied):
            _run(pairs, tmp_path, "dies", pool)
    cached = _cached_keys(tmp_path / "dies-shift.h5", "shift")
    assert {"p0", "p2"} <= cached and "p5" not in cached  # p0 and p2 finished before p5 was sent (p3, p4: a race)


def test_pose_script_with_workers_reproduces_the_learned_matcher(tmp_path: Path, monkeypatch) -> None:
    """The shipped model in worker processes gives the same matches as here with the workers' thread count."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("eval_pose_workers", Path(__file__).parents[1] / "eval" / "pose.py")
    pose = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(pose)
    args = ["--dataset", "synthetic", "--synthetic-pairs", "3", "--image-size", "120", "160", "--no-progress",
            "--matcher", "default", "--no-baselines"]
    threads = torch.get_num_threads()
    parallel = pose.main([*args, "--out", str(tmp_path / "parallel"), "--workers", "2"])
    torch.set_num_threads(threads_per_worker(2, threads))  # what each worker ran with
    try:
        serial = pose.main([*args, "--out", str(tmp_path / "serial")])
    finally:
        torch.set_num_threads(threads)
    keys = ("key", "num_matches", "pose_error", "precision")
    assert [{k: r[k] for k in keys} for r in parallel["records"]["default"]] == [
        {k: r[k] for k in keys} for r in serial["records"]["default"]]
    assert min(r["num_matches"] for r in serial["records"]["default"]) > 0
    assert "worker processes" in parallel["markdown"] and "worker processes" not in serial["markdown"]


# ----------------------------------------------------------------------------------------------- match_pairs
def _image_dir(root: Path) -> Path:
    rng = np.random.default_rng(1)
    root.mkdir()
    for name in ("a.png", "b.png", "c.png"):
        cv2.imwrite(str(root / name), rng.integers(0, 255, (48, 64), dtype=np.uint8))
    cv2.imwrite(str(root / "black.png"), np.zeros((48, 64), np.uint8))
    return root


def test_match_all_with_workers_stores_what_a_serial_run_stores(tmp_path: Path) -> None:
    images = _image_dir(tmp_path / "img")
    pairs = [("a.png", "b.png"), ("a.png", "missing.png"), ("b.png", "c.png"), ("c.png", "black.png"), ("c.png", "a.png")]
    matcher = ShiftMatcher((3.0, -2.0))
    with h5py.File(tmp_path / "serial.h5", "w") as out:
        serial_failures = mp.match_all(matcher, pairs, images, out, None)
        serial = {k: out[k][()] for k in _datasets(out)}
    build = functools.partial(_one_shift_matcher, (3.0, -2.0))
    with MatcherPool(build, workers=2) as pool, h5py.File(tmp_path / "parallel.h5", "w") as out:
        parallel_failures = mp.match_all(matcher, pairs, images, out, None, pool)
        parallel = {k: out[k][()] for k in _datasets(out)}
    assert parallel_failures == serial_failures and len(serial_failures) == 2  # the missing file, the black image
    assert "missing.png" in serial_failures[0] and "black image" in serial_failures[1]
    assert parallel.keys() == serial.keys() and len(serial) == 3 * 3
    assert all(np.array_equal(parallel[k], serial[k]) for k in serial)


def _one_shift_matcher(shift: tuple[float, float]) -> dict[str, ShiftMatcher]:
    return {"matcher": ShiftMatcher(shift)}


def _datasets(file: h5py.File) -> list[str]:
    names: list[str] = []
    file.visititems(lambda name, item: names.append(name) if isinstance(item, h5py.Dataset) else None)
    return names


def test_match_pairs_cli_refuses_workers_on_a_gpu_and_zero_workers(tmp_path: Path, capsys, monkeypatch) -> None:
    images = _image_dir(tmp_path / "img")
    (tmp_path / "pairs.txt").write_text("a.png b.png\n")
    base = [str(tmp_path / "pairs.txt"), "--image-dir", str(images), "--out", str(tmp_path / "m.h5")]
    with pytest.raises(SystemExit) as exit_info:
        mp.main([*base, "--workers", "0"])
    assert exit_info.value.code == 2 and "at least 1" in capsys.readouterr().err
    monkeypatch.setattr("matcher.evaluation.device_argument", lambda value: value)  # as on a machine with a GPU
    with pytest.raises(SystemExit) as exit_info:
        mp.main([*base, "--workers", "2", "--device", "cuda"])
    assert exit_info.value.code == 2 and "--workers 2 is for --device cpu" in capsys.readouterr().err
