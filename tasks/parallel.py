"""Parallel work of a flow run on Dask, through Prefect's ``DaskTaskRunner`` (prefect-dask).

A run asks for an engine with ``--workers N`` (a local Dask cluster of N worker processes, one
thread each, started for the run and stopped after it), ``--dask ADDRESS`` or
``SCAN_LAKE_DASK_ADDRESS`` (an existing cluster's scheduler); with neither, everything runs in the
flow's own process, as it always did. :func:`engine` opens the engine for the flow run, and
:func:`fan_out` is how a stage hands out shards: with a Dask engine it maps a Prefect task over
them (each shard a task run in the Prefect UI, on whichever worker Dask picks); without one it
calls the same function on every shard in order, in-process. Either way a shard's output is
named by its content (a retried shard writes the same file again), and the stage that fanned
out stays the only reducer: it reads the shard results back, writes its own files and manifest,
and is the only one that talks to MLflow.

Workers need only the environment (the ``SCAN_LAKE_*`` and ``AWS_*`` variables, the Prefect
API) and the workspace, which must therefore be a folder every worker sees or an ``s3://``
prefix. A local cluster's workers inherit the flow's environment, including the address of the
temporary Prefect server a run without ``PREFECT_API_URL`` starts, so their task runs report to
the flow's server instead of starting servers of their own. Where CUDA is present, local workers
offer one ``GPU`` resource each and the embedding shards ask for one (``dask.annotate``); on a
remote cluster they ask for one only when some worker offers a ``GPU`` resource (start GPU
workers with ``dask worker ADDRESS --resources GPU=1``).

Results travel between the flow and its workers through Dask's own serialisation, between
processes this run started or that the user pointed it at; nothing of it is read from the lake
or the workspace.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
from collections.abc import Callable, Iterator, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

from tasks import progress
from tasks.errors import ScanLakeError

logger = logging.getLogger(__name__)

ADDRESS_ENV = "SCAN_LAKE_DASK_ADDRESS"
MAX_LOCAL_WORKERS = 256
_ADDRESS = re.compile(r"(?:(?:tcp|tls|ucx|inproc)://)?[A-Za-z0-9_.\-\[\]:]+:\d{1,5}")


@dataclass
class Engine:
    """The engine of one flow run: ``runner`` is None for the flow's own process."""

    kind: str  # "process", "local" or "remote"
    workers: int | None = None
    address: str | None = None
    runner: Any = None
    gpu_shards: bool = False
    worker_pids: set[int] = field(default_factory=set)
    shards: int = 0

    def describe(self) -> dict[str, Any]:
        """What the run's result and MLflow record of the engine."""
        return {
            "engine": self.kind,
            "workers": self.workers,
            "address": self.address,
            "flow_pid": os.getpid(),
            "worker_pids": sorted(self.worker_pids),
            "shards": self.shards,
            "gpu_shards": self.gpu_shards,
        }


_current: ContextVar[Engine | None] = ContextVar("scan_lake_engine", default=None)


def requested(workers: int | None, address: str | None) -> tuple[int | None, str | None]:
    """The checked engine request: ``(workers, address)``, the address falling back to
    ``SCAN_LAKE_DASK_ADDRESS``.

    Raises:
        ScanLakeError: both given, a worker count out of range, an address that is not
            ``[scheme://]host:port``.
    """
    address = (address or os.environ.get(ADDRESS_ENV) or "").strip() or None
    if workers is not None and address is not None:
        raise ScanLakeError(
            f"Both --workers {workers} and a Dask address ({address}) were given: use --workers "
            f"for a local cluster or --dask / {ADDRESS_ENV} for an existing one, not both."
        )
    if workers is not None and not 1 <= workers <= MAX_LOCAL_WORKERS:
        raise ScanLakeError(f"--workers must be between 1 and {MAX_LOCAL_WORKERS}, got {workers}.")
    if address is not None and not _ADDRESS.fullmatch(address):
        raise ScanLakeError(
            f"The Dask address '{address[:200]}' is not a scheduler address: give "
            "host:port or tcp://host:port (what `dask scheduler` prints)."
        )
    return workers, address


def _cuda() -> bool:
    import torch

    return bool(torch.cuda.is_available())


@contextlib.contextmanager
def _api_for_workers() -> Iterator[None]:
    """Export the Prefect API address the flow uses while a local cluster's workers spawn, so
    they report to the same server (a temporary one included) instead of starting their own."""
    if os.environ.get("PREFECT_API_URL"):
        yield
        return
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        url = str(client.api_url)
    os.environ["PREFECT_API_URL"] = url
    try:
        yield
    finally:
        os.environ.pop("PREFECT_API_URL", None)


def _quiet_dask() -> None:
    for name in ("distributed", "distributed.scheduler", "distributed.nanny", "distributed.core"):
        logging.getLogger(name).setLevel(logging.WARNING)


def _workers(runner: Any) -> dict[str, Any]:
    """The scheduler's workers (address -> info) of a started runner."""
    client = getattr(runner, "_client", None)
    return {} if client is None else dict(client.scheduler_info().get("workers", {}))


def _gpu_workers(runner: Any) -> bool:
    return any("GPU" in (w.get("resources") or {}) for w in _workers(runner).values())


@contextlib.contextmanager
def engine(workers: int | None = None, address: str | None = None) -> Iterator[Engine]:
    """Open the run's engine (see the module docstring) and make it the one :func:`fan_out`
    uses until the block ends; a local cluster is stopped at the end.

    Raises:
        ScanLakeError: a bad request (:func:`requested`), or a scheduler that cannot be reached.
    """
    workers, address = requested(workers, address)
    if workers is None and address is None:
        current = Engine(kind="process")
        token = _current.set(current)
        try:
            yield current
        finally:
            _current.reset(token)
        return
    from prefect_dask import DaskTaskRunner

    _quiet_dask()
    if address is not None:
        runner = DaskTaskRunner(address=address)
        current = Engine(kind="remote", address=address, runner=runner)
    else:
        cuda = _cuda()
        runner = DaskTaskRunner(
            cluster_class="distributed.LocalCluster",
            cluster_kwargs={
                "n_workers": workers,
                "threads_per_worker": 1,
                "processes": True,
                "host": "127.0.0.1",
                "dashboard_address": None,
                **({"resources": {"GPU": 1}} if cuda else {}),
            },
        )
        current = Engine(kind="local", workers=workers, runner=runner)
    try:
        with _api_for_workers():
            runner.__enter__()
    except (OSError, TimeoutError) as exc:
        raise ScanLakeError(
            f"Could not reach the Dask scheduler at {address} ({type(exc).__name__}: "
            f"{' '.join(str(exc).split())[:200]}): start it (`dask scheduler`) or fix the address."
        ) from exc
    try:
        current.gpu_shards = _gpu_workers(runner)
        if address is not None:
            current.workers = len(_workers(runner))
        logger.info(
            "Dask %s cluster with %s workers%s",
            current.kind,
            current.workers,
            " (GPU shards)" if current.gpu_shards else "",
        )
        token = _current.set(current)
        try:
            yield current
        finally:
            _current.reset(token)
    finally:
        runner.__exit__(None, None, None)


def current_engine() -> Engine:
    """The engine of the running flow (the flow's own process outside :func:`engine`)."""
    return _current.get() or Engine(kind="process")


def fan_out(
    task_obj: Any,
    shards: Sequence[Any],
    *,
    stage: str,
    note: str,
    gpu: bool = False,
    size_of: Callable[[Any], int] | None = None,
    **shared: Any,
) -> list[Any]:
    """``task_obj``'s function on every shard (``fn(shard, **shared)``), results in shard order.

    With a Dask engine the Prefect task is mapped over the shards on the cluster (``gpu``:
    each shard asks for a ``GPU`` resource where workers offer one); otherwise the function
    runs on each shard here, in order. A result that is a dict with a ``pid`` records where it
    ran (:meth:`Engine.describe`). Progress is reported per finished shard, in shards or, with
    ``size_of``, in the units it counts (e.g. objects).

    Raises:
        The first failed shard's exception (the stage then fails; finished shards' files stay,
        named by content, for the rerun).
    """
    current = current_engine()
    units = [size_of(s) if size_of else 1 for s in shards]
    total, done = sum(units), 0
    current.shards += len(shards)
    results: list[Any] = []
    if current.runner is None or not shards:
        fn: Callable[..., Any] = task_obj.fn
        for shard, unit in zip(shards, units, strict=True):
            results.append(fn(shard, **shared))
            done += unit
            progress.report(stage, done, total, note)
    else:
        import dask
        from prefect.utilities.annotations import unmapped

        annotations = {"resources": {"GPU": 1}} if gpu and current.gpu_shards else {}
        with dask.annotate(**annotations):
            futures = current.runner.map(
                task_obj,
                {"shard": list(shards), **{k: unmapped(v) for k, v in shared.items()}},
            )
        for future, unit in zip(futures, units, strict=True):
            results.append(future.result())
            done += unit
            progress.report(stage, done, total, note)
    for result in results:
        if isinstance(result, dict) and isinstance(result.get("pid"), int):
            current.worker_pids.add(result["pid"])
    return results


def engine_sentence(described: dict[str, Any] | None) -> str:
    """One sentence on where a run's parallel work ran (:meth:`Engine.describe`), for the CLI
    and the run's summary."""
    if not described:
        return "Parallel work: not recorded."
    shards = described.get("shards", 0)
    if described.get("engine") == "process":
        return f"Parallel work: {shards} shards in the run's own process (no --workers or --dask)."
    where = (
        f"a local Dask cluster of {described.get('workers')} worker processes"
        if described.get("engine") == "local"
        else f"the Dask cluster at {described.get('address')} ({described.get('workers')} workers)"
    )
    pids = ", ".join(str(p) for p in described.get("worker_pids", [])) or "none (all cached)"
    return f"Parallel work: {shards} shards on {where}; processes {pids}."


def chunks(items: Sequence[Any], size: int) -> list[list[Any]]:
    """``items`` in consecutive lists of at most ``size`` (the last one shorter)."""
    if size < 1:
        raise ValueError(f"size must be >= 1, got {size}")
    return [list(items[i : i + size]) for i in range(0, len(items), size)]
