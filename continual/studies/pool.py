"""Independent runs handed to a pool of workers: in this process, in local processes, or on Ray.

A study (``continual compare``: entries x seeds) is a list of runs that share nothing but their
inputs, each writing its own run directory. :func:`run_all` runs them

- one after another in this process (``workers=1``, the default);
- on ``workers`` local processes (spawned: a fresh interpreter each, no forked torch state), each
  given ``cpu_count // workers`` torch threads so that the workers do not fight over the cores;
- on a Ray cluster (``ray_address``, with ``ray`` installed): one task per run, ``num_cpus`` each.

Every run is seeded by its own settings, never by the worker it lands on, so the numbers do not
depend on the pool. A run that fails does not stop the others: :func:`run_all` waits for all of
them and then raises :class:`PoolError` naming the failed ones (the finished ones stay on disk and
are reused when the study is run again). A worker process that dies (killed, out of memory) breaks
a local pool and every run then in it: those runs are retried once, each alone in a fresh process,
so a lost worker costs only its own run (reported as such), never its neighbours'.
"""

from __future__ import annotations

import concurrent.futures as cf
import importlib.util
from concurrent.futures.process import BrokenProcessPool
import multiprocessing
import os
from typing import Any, Callable, Sequence

import torch


class PoolError(RuntimeError):
    """Some runs of a study failed; ``failures`` maps each one's label to its error text."""

    def __init__(self, failures: dict[str, str], total: int | None = None) -> None:
        self.failures = failures
        if len(failures) == total and len(set(failures.values())) == 1:  # a bad setting: say it once
            super().__init__(f"all {total} run(s) failed: {next(iter(failures.values()))}")
            return
        lines = "\n".join(f"  {k}: {v}" for k, v in failures.items())
        kept = "none finished" if len(failures) == total else "the others finished and are kept"
        super().__init__(f"{len(failures)} run(s) failed ({kept}):\n{lines}")


def _set_threads(threads: int) -> None:
    """A local worker's start: its share of the cores, and no library progress bars (transformers
    draws one per backbone load; several workers' bars interleave in one log, and the study's own
    bar is the parent's)."""
    torch.set_num_threads(threads)
    library_bars(False, False)


def library_bars(transformers: bool, hub: bool) -> tuple[bool, bool]:
    """Whether transformers (a bar per backbone load) and the HuggingFace hub (a bar per download)
    draw progress bars, set; returns how they were. Off in a worker, and under ``--no-progress``."""
    import huggingface_hub.utils as hub_utils
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled(), not hub_utils.are_progress_bars_disabled()
    (hf_logging.enable_progress_bar if transformers else hf_logging.disable_progress_bar)()
    (hub_utils.enable_progress_bars if hub else hub_utils.disable_progress_bars)()
    return was


def threads_per_worker(workers: int) -> int:
    return max(1, (os.cpu_count() or 1) // workers)


def run_all(fn: Callable[[Any], Any], jobs: Sequence[Any], labels: Sequence[str], workers: int = 1,
            ray_address: str | None = None, done: Callable[[str, Any], None] | None = None) -> list[Any]:
    """``[fn(job) for job in jobs]``, on the pool the arguments name; ``done(label, result)`` is
    called as each run finishes. ``fn`` must be a module-level function and ``jobs`` picklable."""
    if not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers must be an integer >= 1, got {workers!r}")
    if ray_address:
        check_ray()
        return _collect(_on_ray(fn, jobs, labels, workers, ray_address), labels, done)
    if workers == 1 or len(jobs) <= 1:
        return _collect(((i, _call(fn, j)) for i, j in enumerate(jobs)), labels, done)
    return _collect(_local(fn, jobs, workers), labels, done)


def _local(fn: Callable[[Any], Any], jobs: Sequence[Any], workers: int) -> Any:
    """(index, outcome) of each job on local processes; the runs a dead worker took down with the
    pool are retried once, one at a time, each in a pool of its own."""
    lost = []
    for i, out in _in_pool(fn, dict(enumerate(jobs)), min(workers, len(jobs))):
        if isinstance(out, BrokenProcessPool):
            lost.append(i)
        else:
            yield i, out
    for i in lost:
        for _, out in _in_pool(fn, {i: jobs[i]}, 1):
            if isinstance(out, BrokenProcessPool):
                out = RuntimeError("its worker process died twice (killed, or out of memory); the other runs are unaffected")
            yield i, out


def _in_pool(fn: Callable[[Any], Any], jobs: dict[int, Any], workers: int) -> Any:
    ctx = multiprocessing.get_context("spawn")
    with cf.ProcessPoolExecutor(workers, mp_context=ctx, initializer=_set_threads,
                                initargs=(threads_per_worker(workers),)) as pool:
        futures = {pool.submit(fn, j): i for i, j in jobs.items()}
        for f in cf.as_completed(futures):
            yield futures[f], _outcome(f)


def _call(fn: Callable[[Any], Any], job: Any) -> Any:
    try:
        return fn(job)
    except Exception as e:  # reported with the others at the end
        return e


def _outcome(future: cf.Future) -> Any:
    try:
        return future.result()
    except Exception as e:
        return e


def _collect(outcomes: Any, labels: Sequence[str], done: Callable[[str, Any], None] | None) -> list[Any]:
    results: list[Any] = [None] * len(labels)
    failures = {}
    for i, out in outcomes:
        results[i] = out
        if isinstance(out, Exception):
            failures[labels[i]] = f"{type(out).__name__}: {out}"
        elif done is not None:
            done(labels[i], out)
    if failures:
        raise PoolError(failures, len(labels))
    return results


def check_ray() -> None:
    """Refuse a Ray pool where ray is not installed, before anything is loaded or run (it was a
    traceback once the study had started)."""
    if importlib.util.find_spec("ray") is None:
        raise ImportError("--ray-address needs ray: pip install 'ray>=2.9' (without it, --workers runs local processes)")


def _on_ray(fn: Callable[[Any], Any], jobs: Sequence[Any], labels: Sequence[str], workers: int, address: str) -> Any:
    import ray

    if not ray.is_initialized():
        try:
            ray.init(address=address)
        except (ConnectionError, RuntimeError) as e:  # no cluster there: a bad setting, not a crash
            raise ValueError(f"cannot reach a Ray cluster at {address!r}: {e}") from None
    # workers > 1 on Ray: how many CPUs each run reserves is the cluster's CPUs / workers
    cpus = max(1, int(ray.cluster_resources().get("CPU", 1)) // workers)
    remote = ray.remote(num_cpus=cpus)(fn)
    refs = {remote.remote(j): i for i, j in enumerate(jobs)}
    pending = list(refs)
    while pending:
        ready, pending = ray.wait(pending, num_returns=1)
        try:
            yield refs[ready[0]], ray.get(ready[0])
        except Exception as e:
            yield refs[ready[0]], e
