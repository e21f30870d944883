"""Run a stage's per-item function on a Ray cluster (`--ray auto|ADDRESS`) instead of local processes.

Ray is an optional extra (`pip install ".[scale]"`) and is imported only when `--ray` is given. Items go
out as Ray tasks and come back in job order, so the stage writes its manifest exactly as the one-process
run does; every item's result depends only on the item (seeded by its id), so the output is
byte-identical. A task that raises is retried (`retries` times) and then handed to `failed`, which turns
the exception into the stage's own "skip" result: the item is reported, never lost, and the others go on.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from agent.train.common import UsageError

RETRIES = 2
IN_FLIGHT = 64  # tasks submitted ahead of the one being collected: bounded memory on big stages


def connect(address: str) -> Any:
    try:
        import ray
    except ImportError as exc:
        raise UsageError('--ray needs Ray: pip install ".[scale]"') from exc
    if not ray.is_initialized():
        ray.init(address=None if address == "local" else address, include_dashboard=False,
                 log_to_driver=False, ignore_reinit_error=True)
    return ray


def ray_map(fn: Callable, jobs: list, address: str, failed: Callable[[BaseException], Any],
            retries: int = RETRIES, num_gpus: float = 0) -> Iterator:
    """fn over jobs on Ray, results in job order; an item failing `retries` + 1 times yields failed(exc)."""
    ray = connect(address)
    task = ray.remote(num_cpus=1, num_gpus=num_gpus, max_retries=retries, retry_exceptions=True)(fn)
    refs: list = []
    nxt = 0
    for i in range(len(jobs)):
        while nxt < len(jobs) and nxt < i + IN_FLIGHT:
            refs.append(task.remote(jobs[nxt]))
            nxt += 1
        try:
            yield ray.get(refs[i])
        except Exception as exc:  # noqa: BLE001 - any task error becomes the item's report line
            yield failed(exc)
        refs[i] = None
