"""Helpers shared by the benchmark scripts (eval/pose.py, eval/homography.py).

- building the matchers named on the command line (SIFT and ORB rows are always offered),
- a per-(matcher, pair) prediction cache in HDF5 that refuses to mix configurations,
- the pair loop (load -> match, cached -> evaluate), robust to unreadable pairs,
- results tables written as JSON and Markdown, with the protocol stated beside the numbers,
- what both scripts do around their own data and metrics: matchers, caches and worker pool around the
  pair loop, the report, the command-line entry with its exit statuses,
- the ``--device`` check the demos and ``matcher.match_pairs`` share with them.

It lives in the package so that the scripts and the tests import it like any other module.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import math
import platform
import re
import sys
import time
from collections import Counter
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import cv2
import h5py
import numpy as np

from matcher.allocator import reuse_freed_memory
from matcher.baselines import BASELINE_NAMES, build_matcher, empty_matches
from matcher.workers import MatcherPool, WorkerDied, submitted_ahead, threads_per_worker

#: Version of the cache layout and of what it holds; a cache written with another is refused. 2: keypoints
#: of resized images map back with pixel centres at integers (``image_io.to_input_pixels``), not by scaling.
CACHE_FORMAT = 2

PREDICTION_KEYS = ("keypoints0", "keypoints1", "confidence")


class CacheMismatchError(RuntimeError):
    """A prediction cache exists for the same output path but was made with different settings."""


# ----------------------------------------------------------------------------------------------- matchers
def matcher_names(requested: Sequence[str] | None, include_baselines: bool = True) -> list[str]:
    """Matchers of a run: SIFT and ORB first (unless ``include_baselines`` is False), then the requested
    ones, duplicates removed in order. Raises ValueError when the list ends up empty."""
    names = list(BASELINE_NAMES) if include_baselines else []
    for name in requested or []:
        canonical = name.lower() if name.lower() in BASELINE_NAMES else name
        if canonical not in names:
            names.append(canonical)
    if not names:
        raise ValueError("no matcher to evaluate: name one with --matcher (or drop --no-baselines)")
    return names


def matcher_label(name: str) -> str:
    """File- and table-safe label of a matcher name or checkpoint path: ``runs/x/last.ckpt`` -> ``last``."""
    path = Path(name)
    stem = path.stem if path.suffix else name
    return re.sub(r"[^A-Za-z0-9_.+-]+", "_", stem).strip("_") or "matcher"


def unique_labels(names: Sequence[str]) -> list[str]:
    """:func:`matcher_label` of each name, suffixed ``-2``, ``-3`` ... where two names share a label."""
    seen: Counter[str] = Counter()
    labels = []
    for name in names:
        label = matcher_label(name)
        seen[label] += 1
        labels.append(label if seen[label] == 1 else f"{label}-{seen[label]}")
    return labels


def parameters_digest(module: Any) -> str:
    """sha256 over the names, shapes, dtypes and bytes of a torch module's state dict."""
    import torch

    digest = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        t = tensor.detach().cpu().contiguous().view(-1)
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        if t.numel():
            digest.update(t.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def matcher_fingerprint(matcher: Any, name: str) -> dict[str, Any]:
    """JSON-serialisable description of everything that decides a matcher's output: the baselines'
    ``describe()``; for a learned matcher its full config and a digest of its weights (not its file name,
    so a moved checkpoint keeps its cache). ``name`` only serves the error message."""
    if hasattr(matcher, "describe"):
        return dict(matcher.describe())
    config = getattr(matcher, "config", None)
    if config is None:
        raise TypeError(f"cannot fingerprint matcher {name!r} ({type(matcher).__name__}): no describe() or config")
    from omegaconf import OmegaConf

    fingerprint = {
        "matcher": type(matcher).__name__,
        "config": OmegaConf.to_container(config, resolve=True),
        "weights_sha256": parameters_digest(matcher),
    }
    if config.get("inference", {}).get("feature_dtype") == "auto":  # the machine decides: record what it chose
        fingerprint["feature_dtype_resolved"] = matcher.feature_dtype()
    return fingerprint


def build_matchers(names: Sequence[str], device: str, config: str | None = None, feature_dtype: str | None = None,
                   max_coarsest_tokens: int | None = None) -> dict[str, Any]:
    """``{label: matcher}`` for the given names (see ``matcher.baselines.build_matcher``; ``config`` is the
    architecture of checkpoints with no ``.yaml`` beside them; ``feature_dtype``, when given, overrides the
    learned matchers' ``inference.feature_dtype``: the evaluation scripts pin ``float32`` unless ``--bf16``,
    so that a protocol's numbers do not depend on the CPU; ``max_coarsest_tokens``, when given, sets the
    learned matchers' ``coarse.max_coarsest_tokens``). The torch seed is fixed first so that a config name
    (random weights) builds the same model on every run."""
    import torch

    torch.manual_seed(0)
    matchers = {label: build_matcher(name, device=device, config=config) for label, name in zip(unique_labels(names), names)}
    for matcher in matchers.values():
        set_feature_dtype(matcher, feature_dtype)  # part of a learned matcher's fingerprint, as the bound below
        if max_coarsest_tokens is not None and hasattr(matcher, "set_max_coarsest_tokens"):
            matcher.set_max_coarsest_tokens(max_coarsest_tokens)
    return matchers


def set_feature_dtype(matcher: Any, feature_dtype: str | None) -> None:
    """Set a learned matcher's ``inference.feature_dtype``; nothing for None or a baseline (no config)."""
    if feature_dtype is not None and hasattr(matcher, "config"):
        matcher.config.inference.feature_dtype = feature_dtype


# ----------------------------------------------------------------------------------------------- cache
def canonical_json(obj: Any) -> str:
    """Deterministic JSON text of a fingerprint (sorted keys, no whitespace)."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def pair_group_name(key: str) -> str:
    """HDF5 group name of a pair key (keys may hold '/' and other characters h5 names dislike)."""
    return hashlib.sha1(key.encode()).hexdigest()


@dataclass
class CachedPrediction:
    """A stored prediction: the match dict (float32 numpy) and the seconds it took when computed."""

    prediction: dict[str, np.ndarray]
    seconds: float


class PredictionCache:
    """Predictions of ONE matcher on the pairs of ONE benchmark setting, in an HDF5 file.

    Layout: file attribute ``fingerprint`` (canonical JSON of matcher + data settings) and ``format``;
    one group per pair (named by :func:`pair_group_name`) with datasets ``keypoints0`` ``(M, 2)``,
    ``keypoints1`` ``(M, 2)``, ``confidence`` ``(M,)`` and attributes ``key`` and ``seconds``. Every
    :meth:`put` is flushed, so an interrupted run resumes where it stopped.

    Raises CacheMismatchError on opening when the file holds another fingerprint (or is unreadable),
    unless ``overwrite`` is set, which starts the file afresh.
    """

    def __init__(self, path: str | Path, fingerprint: dict[str, Any], overwrite: bool = False) -> None:
        self.path = Path(path)
        self.fingerprint = canonical_json({"format": CACHE_FORMAT, **fingerprint})
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if overwrite and self.path.exists():
            self.path.unlink()
        try:
            self._file = h5py.File(self.path, "a")
        except OSError as err:
            raise CacheMismatchError(
                f"cannot open prediction cache {self.path} ({err}); delete it or pass --overwrite-cache"
            ) from None
        stored = self._file.attrs.get("fingerprint")
        if stored is None:
            self._file.attrs["fingerprint"] = self.fingerprint
            self._file.flush()
        elif stored != self.fingerprint:
            self._file.close()
            raise CacheMismatchError(
                f"prediction cache {self.path} was made with different settings "
                f"({describe_difference(json.loads(stored), json.loads(self.fingerprint))}); "
                "use another --out folder or pass --overwrite-cache"
            )

    def __len__(self) -> int:
        return len(self._file)

    def __contains__(self, key: str) -> bool:
        return pair_group_name(key) in self._file

    def get(self, key: str) -> CachedPrediction | None:
        """The stored prediction of a pair, or None."""
        group = self._file.get(pair_group_name(key))
        if group is None or any(k not in group for k in PREDICTION_KEYS):
            return None
        prediction = {k: np.asarray(group[k][()], np.float32) for k in PREDICTION_KEYS}
        return CachedPrediction(prediction, float(group.attrs["seconds"]))

    def put(self, key: str, prediction: dict[str, np.ndarray], seconds: float) -> None:
        """Store (or replace) the prediction of a pair and flush to disk."""
        name = pair_group_name(key)
        if name in self._file:
            del self._file[name]
        group = self._file.create_group(name)
        for k in PREDICTION_KEYS:
            group.create_dataset(k, data=np.asarray(prediction[k], np.float32))
        group.attrs["key"] = key
        group.attrs["seconds"] = float(seconds)
        self._file.flush()

    def close(self) -> None:
        if self._file.id.valid:
            self._file.close()

    def __enter__(self) -> "PredictionCache":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def describe_difference(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> str:
    """Short text naming the (nested) keys whose values differ between two fingerprints."""
    diffs = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            inner = describe_difference(a, b, f"{prefix}{key}.")
            if inner:
                diffs.append(inner)
        elif a != b:
            diffs.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return "; ".join(diffs)


# ----------------------------------------------------------------------------------------------- pair loop
@dataclass
class LoadedPair:
    """One benchmark pair ready for matching: images as the matcher gets them, and the ground truth the
    evaluation function needs (poses, homography, scales ...)."""

    key: str
    image0: np.ndarray
    image1: np.ndarray
    truth: dict[str, Any]


@dataclass
class RunResult:
    """Outcome of :func:`run_pairs`: per-matcher per-pair records, pairs that could not be loaded, counts of
    computed and cached predictions per matcher, and the image sizes (``"WxH"`` per image) seen."""

    records: dict[str, list[dict[str, Any]]]
    skipped: list[dict[str, Any]] = field(default_factory=list)
    computed: dict[str, int] = field(default_factory=dict)
    cached: dict[str, int] = field(default_factory=dict)
    image_sizes: Counter = field(default_factory=Counter)


def timed_match(matcher: Any, image0: np.ndarray, image1: np.ndarray, resize: int | None) -> tuple[dict[str, np.ndarray], float]:
    """Run ``matcher.match`` and time it (wall clock; the numpy output forces GPU work to finish)."""
    start = time.perf_counter()
    out = matcher.match(image0, image1, resize=resize)
    seconds = time.perf_counter() - start
    prediction = {k: np.asarray(out[k], np.float32) for k in PREDICTION_KEYS}
    prediction["keypoints0"] = prediction["keypoints0"].reshape(-1, 2)
    prediction["keypoints1"] = prediction["keypoints1"].reshape(-1, 2)
    prediction["confidence"] = prediction["confidence"].reshape(-1)
    return prediction, seconds


def run_pairs(
    num_pairs: int,
    load_pair: Callable[[int], LoadedPair],
    matchers: dict[str, Any],
    caches: dict[str, PredictionCache],
    evaluate: Callable[[dict[str, np.ndarray], LoadedPair], dict[str, Any]],
    resize: int | None = None,
    progress: bool = True,
    description: str = "pairs",
    pool: MatcherPool | None = None,
) -> RunResult:
    """Match and evaluate pairs ``0 .. num_pairs - 1`` with every matcher.

    A pair whose ``load_pair`` raises is recorded in ``skipped`` (index and reason) for all matchers. A
    cached prediction is reused; otherwise the matcher runs and its output is cached. A matcher that
    raises on a pair gets an empty prediction for it (a failure in the metrics), the error is recorded
    in that pair's record and nothing is cached.

    With a ``pool`` (:class:`~matcher.workers.MatcherPool` holding the same matchers under the same labels)
    the matching runs in its worker processes, a few pairs ahead; loading, caching and evaluation stay
    here and pairs finish in order, so the records are those of a run without a pool (times aside: each is
    measured in its worker). A worker that dies stops the run with :class:`~matcher.workers.WorkerDied`; the
    pairs finished before it are cached.

    Returns a :class:`RunResult`; each record holds ``key``, ``num_matches``, ``time_ms`` (as measured when
    computed), ``cached`` and whatever ``evaluate`` returns.
    """
    from tqdm import tqdm

    result = RunResult(records={label: [] for label in matchers})
    result.computed = {label: 0 for label in matchers}
    result.cached = {label: 0 for label in matchers}

    def loaded_pairs() -> Iterator[LoadedPair]:
        for index in tqdm(range(num_pairs), desc=description, unit="pair", disable=not progress, dynamic_ncols=True):
            try:
                pair = load_pair(index)
            except Exception as err:  # any unreadable file / missing pose: report, skip, go on
                result.skipped.append({"index": index, "reason": f"{type(err).__name__}: {err}"})
                continue
            for image in (pair.image0, pair.image1):
                result.image_sizes[f"{image.shape[1]}x{image.shape[0]}"] += 1
            yield pair

    def submit(pair: LoadedPair) -> dict[str, Future | None]:  # the uncached matchers' jobs (no pool: none)
        return {label: None if pool is None or pair.key in caches[label]
                else pool.submit(timed_match, label, pair.image0, pair.image1, resize) for label in matchers}

    for pair, jobs in submitted_ahead(loaded_pairs(), submit, 0 if pool is None else 2 * pool.workers):
        _finish_pair(pair, jobs, matchers, caches, evaluate, resize, result)
    return result


def _finish_pair(pair: LoadedPair, jobs: dict[str, Future | None], matchers: dict[str, Any],
                 caches: dict[str, PredictionCache], evaluate: Callable[[dict[str, np.ndarray], LoadedPair], dict[str, Any]],
                 resize: int | None, result: RunResult) -> None:
    """One pair's records, in :func:`run_pairs`: from the cache, a worker's job or the matcher here."""
    for label, matcher in matchers.items():
        record: dict[str, Any] = {"key": pair.key}
        stored = caches[label].get(pair.key)
        if stored is not None:
            prediction, seconds = stored.prediction, stored.seconds
            result.cached[label] += 1
            record["cached"] = True
        else:
            try:
                job = jobs[label]
                if job is None:
                    prediction, seconds = timed_match(matcher, pair.image0, pair.image1, resize)
                else:
                    prediction, seconds = MatcherPool.result(job)
                caches[label].put(pair.key, prediction, seconds)
            except WorkerDied:
                raise  # the run cannot go on; the pairs finished before are cached, so a rerun resumes there
            except Exception as err:
                prediction, seconds = empty_matches(), float("nan")
                record["error"] = f"{type(err).__name__}: {err}"
            result.computed[label] += 1
            record["cached"] = False
        record["num_matches"] = int(len(prediction["confidence"]))
        record["time_ms"] = 1000.0 * seconds
        record.update(evaluate(prediction, pair))
        result.records[label].append(record)


# ----------------------------------------------------------------------------------------------- tables
@dataclass(frozen=True)
class Column:
    """A table column: the row key, its header and a format spec for numbers."""

    key: str
    header: str
    fmt: str = ".2f"


def format_value(value: Any, fmt: str) -> str:
    """Table text of a cell: numbers with ``fmt`` ('-' for None / NaN), anything else with str()."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool):
        return format(value, fmt)
    return str(value)


def markdown_table(rows: Sequence[dict[str, Any]], columns: Sequence[Column]) -> str:
    """Rows as a Markdown table (first column left-aligned, numbers right-aligned)."""
    header = "| " + " | ".join(c.header for c in columns) + " |"
    rule = "|" + "|".join(":---" if i == 0 else "---:" for i in range(len(columns))) + "|"
    lines = [header, rule]
    for row in rows:
        lines.append("| " + " | ".join(format_value(row.get(c.key), c.fmt) for c in columns) + " |")
    return "\n".join(lines)


def json_safe(obj: Any) -> Any:
    """Copy of a JSON-like structure with inf / NaN as None and numpy scalars / arrays as Python values."""
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return json_safe(obj.tolist())
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        value = float(obj)
        return value if math.isfinite(value) else None
    return obj


def software_versions() -> dict[str, str]:
    """Versions of the libraries that decide the numbers."""
    import torch

    return {"python": platform.python_version(), "numpy": np.__version__, "opencv": cv2.__version__, "torch": torch.__version__}


def pairs_summary(listed: int, max_pairs: int | None) -> str:
    """Protocol text of the pairs a run covers: ``"104 listed"``, or with ``--max-pairs 5``
    ``"104 listed (first 5 requested)"`` (the table's Pairs and Skipped columns count those evaluated)."""
    return f"{listed} listed" if max_pairs is None else f"{listed} listed (first {max_pairs} requested)"


def size_summary(image_sizes: Counter) -> str:
    """``Counter({"640x480": 3000})`` -> ``"640x480 (3000 images)"``, most common first."""
    if not image_sizes:
        return "none"
    return ", ".join(f"{size} ({count} images)" for size, count in image_sizes.most_common())


def write_results(
    out_dir: str | Path,
    stem: str,
    title: str,
    rows: Sequence[dict[str, Any]],
    columns: Sequence[Column],
    protocol: dict[str, Any],
    details: dict[str, Any],
) -> tuple[Path, Path, str]:
    """Write ``{stem}.json`` (rows, protocol, details such as per-pair records) and ``{stem}.md`` (title,
    table, protocol bullet list) under ``out_dir``. Returns both paths and the Markdown text."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    protocol_lines = "\n".join(f"- **{k}**: {v}" for k, v in protocol.items())
    markdown = f"# {title}\n\n{markdown_table(rows, columns)}\n\n## Protocol\n\n{protocol_lines}\n"
    json_path, md_path = out_dir / f"{stem}.json", out_dir / f"{stem}.md"
    payload = {"title": title, "rows": list(rows), "columns": [c.__dict__ for c in columns], "protocol": protocol, **details}
    json_path.write_text(json.dumps(json_safe(payload), indent=1))
    md_path.write_text(markdown)
    return json_path, md_path, markdown


# ----------------------------------------------------------------------------------------------- CLI
def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    """Options every benchmark script has: matchers, pair limit, output folder, device, resize, cache."""
    parser.add_argument(
        "--matcher",
        action="append",
        default=[],
        metavar="NAME_OR_PATH",
        help="matcher to evaluate (repeatable): sift, orb, a checkpoint (.ckpt/.pt/.pth/.safetensors), shipped "
        "weights ('default') or a model config name (random weights). SIFT and ORB rows are always added "
        "unless --no-baselines.",
    )
    parser.add_argument(
        "--config", default=None, help="model config (name or yaml) of checkpoints with no .yaml beside them, "
        "e.g. quadtree_b_outdoor for the published outdoor .ckpt (default: the model defaults)",
    )
    parser.add_argument("--no-baselines", action="store_true", help="do not add the SIFT and ORB rows")
    parser.add_argument("--max-pairs", type=int, default=None, help="evaluate only the first N pairs")
    parser.add_argument("--out", default="eval_results", help="folder for the tables and the prediction caches")
    parser.add_argument("--device", default="cpu", type=device_argument, help="device of learned matchers: cpu, cuda or cuda:N")
    add_precision_arguments(parser, default="float32")
    parser.add_argument("--max-coarsest-tokens", type=positive_int_argument, default=None,
                        help="learned QuadTree matchers: bound the coarsest level to this many tokens by adding levels "
                        "(coarse.max_coarsest_tokens; default: the config's, null in the shipped ones)")
    parser.add_argument("--overwrite-cache", action="store_true", help="discard existing prediction caches")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_workers_argument(parser)


def add_workers_argument(parser: argparse.ArgumentParser) -> None:
    """``--workers N`` (here and in ``matcher.match_pairs``); :func:`workers_device_error` checks it."""
    parser.add_argument("--workers", type=positive_int_argument, default=1,
                        help="CPU: match in N worker processes, each with 1/N of the threads (more pairs per second "
                        "where one pair does not keep the cores busy: 1.15-1.33x with 2 on 2 cores; each worker first "
                        "loads the model, so from a few dozen pairs); each pair's time is then measured inside its "
                        "worker (default 1: no workers)")


def workers_device_error(args: argparse.Namespace) -> str | None:
    """Why ``--workers`` cannot go with ``--device``, or None."""
    if args.workers > 1 and args.device != "cpu":
        return f"--workers {args.workers} is for --device cpu (got {args.device}: one process keeps a GPU busy)"
    return None


#: What the model configs' default precision means, for help texts and protocols.
_AUTO_PRECISION = "the model config's (auto: bfloat16 on CPUs with AVX512-BF16 / AMX, else float32)"


def add_precision_arguments(parser: argparse.ArgumentParser, default: str | None) -> None:
    """``--bf16`` and ``--fp32``: the learned matchers' backbone + coarse transformer precision
    (``inference.feature_dtype``), read back by :func:`feature_dtype_argument`. ``default``: the value without
    either flag (None: the model config's own, ``auto`` unless it says otherwise)."""
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--bf16", action="store_true", help="learned matchers: backbone + coarse transformer in bf16 "
                       f"(inference.feature_dtype; default {default or _AUTO_PRECISION}; on CPUs without them "
                       "torch emulates bf16: slower than float32, 11x on an AVX2 CPU)")
    group.add_argument("--fp32", action="store_true", help="learned matchers: backbone + coarse transformer in float32")
    parser.set_defaults(feature_dtype_default=default)


def feature_dtype_argument(args: argparse.Namespace) -> str | None:
    """The ``inference.feature_dtype`` chosen with :func:`add_precision_arguments` (None: leave the config's)."""
    return "bfloat16" if args.bf16 else "float32" if args.fp32 else args.feature_dtype_default


def numerics_protocol(args: argparse.Namespace) -> str:
    """The protocol line of the learned matchers' precision (:func:`add_precision_arguments`' flags) and of
    ``--max-coarsest-tokens``."""
    features = feature_dtype_argument(args) or _AUTO_PRECISION
    line = f"learned matchers' backbone + coarse transformer in {features}, coarse matching and fine stage in float32"
    if getattr(args, "max_coarsest_tokens", None) is not None:
        line += f"; coarsest QuadTree level bounded to {args.max_coarsest_tokens} tokens (levels added above the trained ones)"
    return line


def long_side_argument(value: str) -> int:
    """argparse ``type`` of ``--resize`` (demos, ``matcher.match_pairs``, evaluation): an integer of at least
    one coarse cell, checked before any file is written (a bad value would fail every pair)."""
    from .image_io import MIN_SIDE

    try:
        long_side = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer number of pixels, got {value!r}") from None
    if long_side < MIN_SIDE:
        raise argparse.ArgumentTypeError(f"must be at least {MIN_SIDE} px (one coarse cell), got {long_side}")
    return long_side


def _integer_at_least(value: str, minimum: int) -> int:
    """``int(value)``, or an argparse error naming ``minimum`` for anything else or anything smaller."""
    try:
        number = int(value)
    except ValueError:
        number = minimum - 1
    if number < minimum:
        raise argparse.ArgumentTypeError(f"expected an integer of at least {minimum}, got {value!r}")
    return number


def positive_int_argument(value: str) -> int:
    """argparse ``type`` of an integer of at least 1 (``--max-coarsest-tokens``)."""
    return _integer_at_least(value, 1)


def count_argument(value: str) -> int:
    """argparse ``type`` of a count, an integer of at least 0 (``--max-matches``)."""
    return _integer_at_least(value, 0)


def device_argument(value: str) -> str:
    """argparse ``type`` of ``--device`` (here, in the demos and in ``matcher.match_pairs``): ``cpu``, ``cuda``
    or ``cuda:N``, checked against this PyTorch build and machine, so that a device that cannot work is one
    usage error (exit status 2) instead of a traceback from deep inside ``model.to()``."""
    import torch

    usage = f"expected cpu, cuda or cuda:N, got {value!r}"
    try:
        device = torch.device(value)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(usage) from None
    if device.type == "cpu":
        return value
    if device.type != "cuda":
        raise argparse.ArgumentTypeError(usage)
    if not torch.backends.cuda.is_built():
        raise argparse.ArgumentTypeError(
            f"{value}: this PyTorch build ({torch.__version__}) has no CUDA support; use --device cpu, or install "
            "a CUDA build of PyTorch"
        )
    if not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"{value}: PyTorch {torch.__version__} sees no CUDA GPU; use --device cpu")
    count = torch.cuda.device_count()
    if device.index is not None and device.index >= count:
        raise argparse.ArgumentTypeError(f"{value}: only {count} CUDA GPU(s) visible (cuda:0 .. cuda:{count - 1})")
    return value


def open_pool(args: argparse.Namespace, names: Sequence[str]) -> MatcherPool | None:
    """The :class:`~matcher.workers.MatcherPool` of ``--workers`` (None for 1), whose workers build the
    matchers ``names`` as :func:`build_matchers` does here. SystemExit (usage error) for a GPU device."""
    if error := workers_device_error(args):
        raise SystemExit(f"error: {error}")
    if args.workers == 1:
        return None
    build = functools.partial(build_matchers, list(names), args.device, args.config, feature_dtype_argument(args),
                              args.max_coarsest_tokens)
    return MatcherPool(build, args.workers, args.device, reuse_memory=True)


def timing_protocol(args: argparse.Namespace) -> str:
    """The protocol line of the time column."""
    where = f"wall clock of matcher.match per pair on {args.device}"
    if args.workers > 1:
        threads = threads_per_worker(args.workers)
        where += (f", in one of {args.workers} worker processes of {threads} thread{'s' if threads > 1 else ''} each "
                  "(a pair's latency with those threads, not the run's time divided by the pairs)")
    return where + " (cached pairs keep the time measured when computed)"


def open_caches(
    out_dir: str | Path, prefix: str, names: Sequence[str], matchers: dict[str, Any], data_fingerprint: dict[str, Any], overwrite: bool
) -> dict[str, PredictionCache]:
    """One :class:`PredictionCache` per matcher at ``out_dir/cache/{prefix}-{label}.h5``, fingerprinted with
    the matcher's settings and ``data_fingerprint``. Closes what it opened if one of them is refused."""
    caches: dict[str, PredictionCache] = {}
    try:
        for (label, matcher), name in zip(matchers.items(), names):
            fingerprint = {"matcher": matcher_fingerprint(matcher, name), "data": data_fingerprint}
            caches[label] = PredictionCache(Path(out_dir) / "cache" / f"{prefix}-{label}.h5", fingerprint, overwrite)
    except Exception:
        close_all(caches.values())
        raise
    return caches


def close_all(caches: Iterable[PredictionCache]) -> None:
    for cache in caches:
        cache.close()


# ----------------------------------------------------------------------------------------------- scripts
def run_script_pairs(
    args: argparse.Namespace,
    prefix: str,
    num_pairs: int,
    load_pair: Callable[[int], LoadedPair],
    evaluate: Callable[[dict[str, np.ndarray], LoadedPair], dict[str, Any]],
    data_fingerprint: dict[str, Any],
    description: str,
) -> tuple[RunResult, dict[str, str]]:
    """The pair loop of an evaluation script: builds the matchers of ``--matcher`` (and the baselines) as
    the common arguments say, opens their caches (``{out}/cache/{prefix}-{label}.h5``) and, with
    ``--workers``, the worker pool, runs :func:`run_pairs` and closes both. Returns the run and
    ``{label: name}`` of the matchers."""
    names = matcher_names(args.matcher, not args.no_baselines)
    matchers = build_matchers(names, args.device, args.config, feature_dtype_argument(args), args.max_coarsest_tokens)
    caches = open_caches(args.out, prefix, names, matchers, data_fingerprint, args.overwrite_cache)
    pool = None
    try:
        pool = open_pool(args, names)
        run = run_pairs(num_pairs, load_pair, matchers, caches, evaluate, resize=args.resize,
                        progress=not args.no_progress, description=description, pool=pool)
    finally:
        close_all(caches.values())
        if pool is not None:
            pool.close()
    return run, dict(zip(matchers, names))


def report_run(out_dir: str | Path, stem: str, title: str, rows: Sequence[dict[str, Any]], columns: Sequence[Column],
               protocol: dict[str, Any], run: RunResult, labels: dict[str, str]) -> dict[str, Any]:
    """Write an evaluation script's tables (:func:`write_results`, with the per-pair records), print them,
    the skipped pairs and the counts. Returns what the scripts' ``main`` returns: ``{"rows", "markdown",
    "json_path", "md_path", "computed", "cached", "skipped", "records"}``."""
    details = {"matchers": labels, "computed": run.computed, "cached": run.cached, "skipped_pairs": run.skipped,
               "per_pair": run.records}
    json_path, md_path, markdown = write_results(out_dir, stem, title, rows, columns, protocol, details)
    print(markdown)
    for item in run.skipped:
        print(f"skipped pair {item['index']}: {item['reason']}", file=sys.stderr)
    print(f"computed {run.computed}, from cache {run.cached}; tables: {json_path}, {md_path}")
    return {"rows": rows, "markdown": markdown, "json_path": json_path, "md_path": md_path, "computed": run.computed,
            "cached": run.cached, "skipped": run.skipped, "records": run.records}


def run_script(main: Callable[[], Any]) -> None:
    """Command-line entry of an evaluation script: malloc tuned for the process (``matcher.allocator``),
    then ``main()``; a refused cache, a missing file, a bad value or a missing package is one line and exit
    status 2, a dead worker exit status 1 (the pairs finished before it are cached)."""
    reuse_freed_memory()
    try:
        main()
    except (CacheMismatchError, FileNotFoundError, ValueError, ImportError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except WorkerDied as err:
        print(f"error: {err}; the pairs finished before are cached, so a rerun resumes there", file=sys.stderr)
        sys.exit(1)


def finite_mean(values: Iterable[float]) -> float:
    """Mean of the finite values (NaN when there are none)."""
    arr = np.asarray([v for v in values if v is not None], np.float64)
    arr = arr[np.isfinite(arr)]
    return float(arr.mean()) if len(arr) else float("nan")
