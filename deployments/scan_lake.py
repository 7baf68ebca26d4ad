"""The scheduled deployment of ``scan_pipeline`` (docs/architecture.md, 'Layers').

Re-clustering a growing lake on a schedule, Prefect's two ways:

- **serve** (``scan-lake serve``): :func:`build_deployment` makes the deployment with
  ``scan_pipeline.to_deployment(cron=...)`` and :func:`serve_deployments` serves it from this
  process (``prefect.serve``): it registers the deployment and its schedule with the Prefect
  server, polls for due runs and runs each in a subprocess. No work pool.
- **worker** (``scan-lake deploy --work-pool NAME``): :func:`deploy_to_work_pool` registers the same
  deployment on a ``process`` work pool, with the flow code pulled from this checkout
  (``flow.from_source``); ``prefect worker start --pool NAME`` runs it. ``prefect.yaml`` at the
  repository root describes the same deployment for ``prefect deploy``.

Both need a running Prefect server (``PREFECT_API_URL``), not the ephemeral one. The flow runs
read machine settings (S3 endpoint, credentials, MLflow) from the serve/worker process's
environment (``tasks/settings.py``).

**One run at a time.** The deployment (either way, and ``prefect.yaml``'s) has a concurrency
limit of one with the ``ENQUEUE`` collision strategy (:func:`one_run_at_a_time`): the Prefect
server lets one run of it start; a run due or requested meanwhile waits (state
``AwaitingConcurrencySlot``) and starts when the running one ends, so two runs of one lake never
overlap and none is dropped.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any
from uuid import UUID

from tasks.auto import parse_budget
from tasks.config import build_config, parse_clusters
from tasks.errors import ScanLakeError
from tasks.parallel import requested

logger = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[1]
ENTRYPOINT = "flows/pipeline.py:scan_pipeline"
DEPLOYMENT_NAME = "scan-lake-scheduled"
DEFAULT_CRON = "0 2 * * *"  # every night at 02:00 (server time zone: UTC unless set)
TAGS = ["scan-lake"]


def deployment_parameters(
    lake: str,
    workspace: str,
    clusters: int | str | None = None,
    config_file: Path | str | None = None,
    overrides: dict[str, Any] | None = None,
    budget: str | None = None,
    workers: int | None = None,
    dask_address: str | None = None,
) -> dict[str, Any]:
    """The flow parameters of the deployment.

    Without a config file, every run chooses its settings from the lake as ``scan-lake run``
    does (``preset: auto``), with the ``overrides`` on top and the optional ``budget``: the
    deployment holds lake, workspace, clusters, preset, overrides and budget. With a config
    file, the file and the overrides are resolved now, so the deployment holds every setting
    (shown and editable in the Prefect UI) and does not depend on a file on the worker.
    ``clusters`` is a number, or ``"auto"``: every run then chooses k without labels in
    ``cluster_count.k_min..k_max`` (the flow's own ``clusters="auto"``). ``workers`` (a local
    Dask cluster per run) or ``dask_address`` (an existing one) go in when given; without
    either, runs use ``SCAN_LAKE_DASK_ADDRESS`` of the serving or worker process, if set
    (:mod:`tasks.parallel`).

    Raises:
        ScanLakeError: an invalid config, override, budget or ``clusters``, a budget with a
            config file (a budget sizes the automatic settings only), or an invalid engine.
    """
    wanted = parse_clusters(clusters)
    if workers is not None or dask_address is not None:
        workers, dask_address = requested(workers, dask_address)
    engine = {
        key: value
        for key, value in (("workers", workers), ("dask_address", dask_address))
        if value is not None
    }
    config = build_config(config_file, overrides, wanted)  # checks keys and values now
    parameters: dict[str, Any] = {
        "lake": lake,
        "workspace": workspace,
        "clusters": "auto" if wanted == "auto" else config.scan.num_clusters,
        **engine,
    }
    if config_file is not None:
        if budget is not None:
            raise ScanLakeError(
                "--budget sizes the automatic settings: drop --config, or drop --budget and "
                "set the epochs in the config file."
            )
        return {**parameters, "config": config.model_dump(mode="json")}
    parse_budget(budget)
    return {
        **parameters,
        "preset": "auto",
        "overrides": dict(overrides or {}),
        "budget": budget,
    }


def describe(parameters: dict[str, Any]) -> str:
    """The deployment's one-line description."""
    clusters = parameters["clusters"]
    into = (
        "a number of clusters chosen without labels"
        if clusters == "auto"
        else f"{clusters} clusters"
    )
    return f"Re-cluster {parameters['lake']} into {into}."


def one_run_at_a_time() -> Any:
    """The deployment's concurrency limit: one run at a time, later runs wait (not dropped)."""
    from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy

    return ConcurrencyLimitConfig(limit=1, collision_strategy=ConcurrencyLimitStrategy.ENQUEUE)


def build_deployment(
    parameters: dict[str, Any], name: str = DEPLOYMENT_NAME, cron: str = DEFAULT_CRON
) -> Any:
    """``scan_pipeline.to_deployment`` with the cron schedule, parameters and the limit of one
    run at a time (for ``serve``)."""
    from flows.pipeline import scan_pipeline

    return scan_pipeline.to_deployment(
        name=name,
        cron=cron,
        parameters=parameters,
        tags=TAGS,
        description=describe(parameters),
        concurrency_limit=one_run_at_a_time(),
    )


def check_api() -> str:
    """The URL of the Prefect server the deployment goes to.

    Raises:
        ScanLakeError: ``PREFECT_API_URL`` is unset or the server does not answer.
    """
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL

    url = PREFECT_API_URL.value()
    if not url:
        raise ScanLakeError(
            "Deployments need a running Prefect server: start one with `uv run prefect server "
            "start` and export PREFECT_API_URL=http://127.0.0.1:4200/api."
        )
    with get_client(sync_client=True) as client:
        exc = client.api_healthcheck()
    if exc is not None:
        raise ScanLakeError(
            f"The Prefect server at {url} does not answer ({type(exc).__name__}): start it with "
            "`uv run prefect server start` or fix PREFECT_API_URL."
        ) from exc
    return str(url)


def serve_deployments(*deployments: Any, limit: int | None = 1) -> None:
    """Register ``deployments`` and run their scheduled and requested runs until interrupted
    (``prefect.serve``); ``limit`` runs at a time (one: runs of a lake must not overlap)."""
    from prefect import serve

    serve(*deployments, limit=limit)


def ensure_work_pool(name: str) -> None:
    """Create the ``process`` work pool ``name`` unless it exists."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            client.read_work_pool(name)
        except ObjectNotFound:
            client.create_work_pool(WorkPoolCreate(name=name, type="process"))
            logger.info("created process work pool %s", name)


def deploy_to_work_pool(
    parameters: dict[str, Any],
    work_pool: str,
    name: str = DEPLOYMENT_NAME,
    cron: str = DEFAULT_CRON,
    source: Path = ROOT,
) -> UUID:
    """Register the deployment on the ``process`` work pool ``work_pool`` (created if missing),
    with the flow code taken from ``source`` (this checkout) when a worker runs it."""
    from prefect import Flow

    ensure_work_pool(work_pool)
    flow: Any = Flow.from_source(source=str(source), entrypoint=ENTRYPOINT)
    # ``to_deployment(...).apply()`` rather than ``flow.deploy``: prefect 3.8.8's ``deploy`` asks
    # the server for the pool's workers with ``limit: null``, which its own API refuses (422).
    deployment = flow.to_deployment(
        name=name,
        work_pool_name=work_pool,
        cron=cron,
        parameters=parameters,
        tags=TAGS,
        description=describe(parameters),
        concurrency_limit=one_run_at_a_time(),
    )
    return deployment.apply()  # type: ignore[no-any-return]
