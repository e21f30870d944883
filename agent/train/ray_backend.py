"""Run a stage's per-item function on a Ray cluster (`--ray local|auto|ADDRESS`) instead of local processes.

Ray is an optional extra (`pip install ".[scale]"`) and is imported only when `--ray` is given. Items go
out as Ray tasks, or, for stages whose items need a model (tokens' Mimi, script's LLM, Parler), as calls on
a pool of actors: long-lived worker processes, so the stage's per-process model cache loads the model once
per actor, not once per item. Results come back in job order, so the stage writes its manifest exactly as
the one-process run does; every item's result depends only on the item (seeded by its id), so the output
is byte-identical. An item whose call raises (or whose worker dies) is sent again, `retries` times, and
then handed to `failed`, which turns the exception into the stage's own "skip" result: the item is
reported, never lost, and the others go on. Workers write their files into the stage's --out folder, so on
several machines that folder must be on storage every node mounts at the same path.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from agent.train.common import UsageError

RETRIES = 2
IN_FLIGHT = 64  # calls submitted ahead of the one being collected: bounded memory on big stages
# Every worker gets these, whatever its node's defaults: the same thread counts on every node.
WORKER_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}


def connect(address: str) -> Any:
    try:
        import ray
    except ImportError as exc:
        raise UsageError('--ray needs Ray: pip install ".[scale]"') from exc
    if not ray.is_initialized():
        ray.init(address=None if address == "local" else address, include_dashboard=False,
                 log_to_driver=False, ignore_reinit_error=True, runtime_env={"env_vars": WORKER_ENV})
    return ray


class _Holder:
    """An actor: one worker process that runs the stage's function on item after item."""

    def run(self, fn: Callable, job: Any) -> Any:
        return fn(job)


class _Sender:
    """Sends one job to the cluster and returns its reference: a task each, or (actors > 0) a call on the
    least busy actor of a pool."""

    def __init__(self, ray: Any, fn: Callable, num_gpus: float, actors: int):
        self.fn = fn
        self.task = None if actors else ray.remote(num_cpus=1, num_gpus=num_gpus, max_retries=0)(fn)
        holder = ray.remote(num_cpus=1, num_gpus=num_gpus, max_restarts=-1)(_Holder)
        self.pool = [holder.remote() for _ in range(actors)]
        self.busy: dict[Any, int] = {}  # reference -> actor index, while in flight

    def send(self, job: Any) -> Any:
        if self.task is not None:
            return self.task.remote(job)
        load = [0] * len(self.pool)
        for index in self.busy.values():
            load[index] += 1
        index = load.index(min(load))
        ref = self.pool[index].run.remote(self.fn, job)
        self.busy[ref] = index
        return ref

    def done(self, ref: Any) -> None:
        self.busy.pop(ref, None)


def pool_size(ray: Any, jobs: int, num_gpus: float) -> int:
    """How many actors the cluster holds at once (one CPU each, `num_gpus` each), at most one per job."""
    resources = ray.cluster_resources()
    fits = resources.get("GPU", 0) / num_gpus if num_gpus else resources.get("CPU", 1)
    return max(1, min(jobs, int(fits)))


def ray_map(fn: Callable, jobs: list, address: str, failed: Callable[[BaseException], Any],
            retries: int = RETRIES, num_gpus: float = 0, actors: bool = False) -> Iterator:
    """fn over jobs on Ray, results in job order; an item failing `retries` + 1 times yields failed(exc)."""
    if not jobs:
        return  # everything was done already: no cluster to join
    ray = connect(address)
    sender = _Sender(ray, fn, num_gpus, pool_size(ray, len(jobs), num_gpus) if actors and jobs else 0)
    pending: dict[Any, int] = {}  # reference -> job index
    results: dict[int, Any] = {}
    tries = [0] * len(jobs)
    nxt = 0
    for i in range(len(jobs)):
        while i not in results:
            while nxt < len(jobs) and len(pending) < IN_FLIGHT:
                pending[sender.send(jobs[nxt])] = nxt
                nxt += 1
            (ref,), _ = ray.wait(list(pending), num_returns=1)
            k = pending.pop(ref)
            sender.done(ref)
            try:
                results[k] = ray.get(ref)
            except Exception as exc:  # noqa: BLE001 - any task error is retried, then becomes the item's report line
                if tries[k] < retries:
                    tries[k] += 1
                    pending[sender.send(jobs[k])] = k
                else:
                    results[k] = failed(exc)
        yield results.pop(i)
