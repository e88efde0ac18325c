"""Matching in worker processes, for throughput on CPUs that one pair does not keep busy.

One pair through the model does not scale with cores: many of its operations are small or bound by
memory, so on 2 cores of an AMD EPYC one pair took 7.4 s with 1 thread and 5.3 s with 2 (1.4x). Two
processes of one thread each matched 1.23-1.28x as many pairs per second as one process of two threads
(threads of one process gained 1.07x: the interpreter lock); ``eval/pose.py`` on 40 synthetic 320x240 pairs
took 60-66 s with ``--workers 2`` against 80-83 s without, and ``eval/benchmark.py --sections workers``
(640x480, where the two processes lean more on the shared caches and memory bandwidth) measures 1.15-1.16x.
:class:`MatcherPool` runs such processes, each with its own copy of the matchers and an equal share of torch's
threads; the evaluation scripts and ``matcher.match_pairs`` use it with ``--workers N``. GPUs gain nothing from
it and are refused.

Workers are started with ``spawn`` (a fork would copy torch's thread pools in an undefined state), so what
is sent to them, the matcher builder and each job's function and arguments, must be picklable:
module-level functions, ``functools.partial`` of them, arrays.
"""

from __future__ import annotations

import multiprocessing
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from collections import deque
from typing import Any, Callable, Iterable, Iterator, TypeVar

Item = TypeVar("Item")


class WorkerDied(RuntimeError):
    """A worker process of a :class:`MatcherPool` ended while jobs were left (out of memory, say)."""


#: This worker process's matchers, ``{label: matcher}`` (set once by :func:`_start_worker`; empty in the
#: main process).
_WORKER_MATCHERS: dict[str, Any] = {}


def _start_worker(build: Callable[[], dict[str, Any]], threads: int, reuse_memory: bool) -> None:
    """Initialiser of a worker process: its share of the cores, the allocator setting, its matchers."""
    import cv2
    import torch

    torch.set_num_threads(threads)
    cv2.setNumThreads(threads)
    if reuse_memory:
        from .allocator import reuse_freed_memory

        reuse_freed_memory()
    _WORKER_MATCHERS.update(build())


def _run_job(function: Callable[..., Any], label: str, args: tuple[Any, ...]) -> Any:
    """``function(matcher, *args)`` with this worker's matcher ``label``."""
    return function(_WORKER_MATCHERS[label], *args)


def threads_per_worker(workers: int, threads: int | None = None) -> int:
    """An equal share of ``threads`` (None: torch's current count) for each of ``workers``, at least 1."""
    if threads is None:
        import torch

        threads = torch.get_num_threads()
    return max(1, threads // workers)


def submitted_ahead(items: Iterable[Item], submit: Callable[[Item], Any], ahead: int) -> Iterator[tuple[Item, Any]]:
    """``(item, submit(item))`` for each of ``items``, in order, each ``submit`` called up to ``ahead`` items
    before its item is handed on: what keeps a pool's workers busy while the caller finishes items in order."""
    pending: deque[tuple[Item, Any]] = deque()
    for item in items:
        pending.append((item, submit(item)))
        if len(pending) > ahead:
            yield pending.popleft()
    while pending:
        yield pending.popleft()


class MatcherPool:
    """``workers`` processes, each holding the matchers ``build()`` returns and running jobs on them.

    Args:
        build: picklable, returns ``{label: matcher}``; called once in each worker (seed it inside, so that
            every worker builds the same weights).
        workers: number of processes, at least 1.
        device: the matchers' device; only ``cpu``.
        reuse_memory: call :func:`matcher.allocator.reuse_freed_memory` in each worker (the command-line
            tools do in their own process; the library never does by itself).

    ``submit(function, label, *args)`` runs ``function(matcher, *args)`` in a worker and returns its
    :class:`~concurrent.futures.Future`; :meth:`result` waits for it and raises the job's own exception, or
    :class:`WorkerDied` once a worker has died (the pool is then broken for every later job). Use as a
    context manager, or call :meth:`close`.
    """

    def __init__(self, build: Callable[[], dict[str, Any]], workers: int, device: str = "cpu",
                 reuse_memory: bool = False) -> None:
        if type(workers) is not int or workers < 1:
            raise ValueError(f"workers must be an integer >= 1, got {workers!r}")
        if device != "cpu":
            raise ValueError(f"worker processes are for CPU matching; got device {device!r} (one process keeps a GPU busy)")
        self.workers = workers
        self.threads = threads_per_worker(workers)
        self._executor = ProcessPoolExecutor(
            workers, mp_context=multiprocessing.get_context("spawn"), initializer=_start_worker,
            initargs=(build, self.threads, reuse_memory),
        )

    def submit(self, function: Callable[..., Any], label: str, *args: Any) -> Future:
        """Run ``function(matcher, *args)`` on a worker's matcher ``label``."""
        return self._executor.submit(_run_job, function, label, args)

    @staticmethod
    def result(job: Future) -> Any:
        """``job``'s result; its exception, or :class:`WorkerDied` if a worker died."""
        try:
            return job.result()
        except BrokenProcessPool as err:
            raise WorkerDied(f"a matching worker process died ({err}); with less memory per worker, use fewer "
                             "--workers") from err

    def close(self) -> None:
        """Stop the workers (jobs not started are cancelled)."""
        self._executor.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> "MatcherPool":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
