"""MLflow tracking: one parent run per flow run, one nested run per stage (DESIGN.md §2).

Everything goes through an explicit ``MlflowClient`` and explicit run ids, because the active run
of ``mlflow``'s fluent API is thread-local and Prefect may run tasks in other threads.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.metadata
import logging
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mlflow
from mlflow import MlflowClient
from mlflow.entities import RunStatus
from mlflow.exceptions import MlflowException
from pydantic import BaseModel, ConfigDict

from scan_core.training import EpochLog

logger = logging.getLogger(__name__)


class TrackingRef(BaseModel):
    """Where a stage logs: tracking URI, experiment and the flow's parent run."""

    model_config = ConfigDict(frozen=True)

    tracking_uri: str
    experiment_id: str
    parent_run_id: str

    def client(self) -> MlflowClient:
        """A client for this tracking server."""
        return MlflowClient(tracking_uri=self.tracking_uri)


def flatten(config: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": "1"}`` (MLflow params are flat strings)."""
    out: dict[str, str] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = str(value)
    return out


@contextlib.contextmanager
def store_lock(tracking_uri: str) -> Iterator[None]:
    """Hold an exclusive lock beside a local sqlite store (``<db>.lock``); other URIs: no-op.

    MLflow creates and migrates a sqlite store's tables on first use; two processes doing that
    at once (two runs started together on a fresh state dir) fail with "duplicate column" or
    "table already exists". The lock makes the first use one process at a time.
    """
    prefix = "sqlite:///"
    if not tracking_uri.startswith(prefix) or ":memory:" in tracking_uri:
        yield
        return
    db = Path(tracking_uri[len(prefix) :].split("?", 1)[0])
    db.parent.mkdir(parents=True, exist_ok=True)
    with open(db.with_name(db.name + ".lock"), "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def ensure_experiment(tracking_uri: str, name: str, artifact_location: str | None = None) -> str:
    """The id of experiment ``name``, created (with ``artifact_location``) when missing.

    Safe to call from several processes at once: the first use of a local sqlite store is
    serialised (:func:`store_lock`), and a run that loses the race to create the experiment
    (on any tracking server) takes the one the winner created.
    """
    with store_lock(tracking_uri):
        client = MlflowClient(tracking_uri=tracking_uri)
        experiment = client.get_experiment_by_name(name)
        if experiment is not None:
            return str(experiment.experiment_id)
        try:
            return str(client.create_experiment(name, artifact_location=artifact_location))
        except MlflowException:
            experiment = client.get_experiment_by_name(name)
            if experiment is None:
                raise
            return str(experiment.experiment_id)


def start_parent_run(
    tracking_uri: str, experiment_id: str, run_name: str, tags: dict[str, str]
) -> str:
    """Create the flow's parent run; return its id."""
    client = MlflowClient(tracking_uri=tracking_uri)
    run = client.create_run(experiment_id, run_name=run_name, tags=tags)
    return str(run.info.run_id)


def start_stage_run(
    ref: TrackingRef, stage: str, params: dict[str, Any], tags: dict[str, str] | None = None
) -> str:
    """Create a nested run for ``stage`` under the parent run, with its config as params."""
    client = ref.client()
    all_tags = {"mlflow.parentRunId": ref.parent_run_id, "stage": stage, **(tags or {})}
    run = client.create_run(ref.experiment_id, run_name=stage, tags=all_tags)
    run_id = str(run.info.run_id)
    flat = flatten(params)
    if flat:
        client.log_batch(
            run_id, params=[mlflow.entities.Param(k, v[:6000]) for k, v in flat.items()]
        )
    return run_id


def record_cached_stage(ref: TrackingRef, stage: str, key: str, source_run_id: str | None) -> str:
    """A nested run that says ``stage`` was served from cache and links the run that made it."""
    client = ref.client()
    tags = {
        "mlflow.parentRunId": ref.parent_run_id,
        "stage": stage,
        "stage_key": key,
        "cached": "true",
        "source_run_id": source_run_id or "",
    }
    run = client.create_run(ref.experiment_id, run_name=f"{stage} (cached)", tags=tags)
    client.set_terminated(run.info.run_id, RunStatus.to_string(RunStatus.FINISHED))
    return str(run.info.run_id)


def log_metrics(
    ref: TrackingRef, run_id: str, metrics: dict[str, float], step: int | None = None
) -> None:
    """Log finite numeric metrics at ``step``."""
    entries = [
        mlflow.entities.Metric(
            k, float(v), int(mlflow.utils.time.get_current_time_millis()), step or 0
        )
        for k, v in metrics.items()
        if isinstance(v, int | float) and v == v and abs(float(v)) != float("inf")
    ]
    if entries:
        ref.client().log_batch(run_id, metrics=entries)


def log_epoch(ref: TrackingRef, run_id: str, log: EpochLog) -> None:
    """Log one epoch's metrics (prefixed by the stage) at ``step = epoch``."""
    metrics = {f"{log.stage}/{k}": v for k, v in log.metrics.items()}
    metrics[f"{log.stage}/epoch_seconds"] = log.seconds
    log_metrics(ref, run_id, metrics, step=log.epoch)


def log_file(
    ref: TrackingRef, run_id: str, name: str, data: bytes, folder: str | None = None
) -> None:
    """Log ``data`` as artifact ``[folder/]name``."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / name
        path.write_bytes(data)
        ref.client().log_artifact(run_id, str(path), artifact_path=folder)


def log_table(ref: TrackingRef, run_id: str, rows: list[dict[str, Any]], name: str) -> None:
    """Log ``rows`` as an MLflow table artifact ``name`` (``.json``; shown in the UI's table
    view)."""
    if rows:
        ref.client().log_table(run_id, {k: [r[k] for r in rows] for k in rows[0]}, name)


def end_run(ref: TrackingRef, run_id: str, ok: bool = True) -> None:
    """Mark a run finished (or failed)."""
    status = RunStatus.FINISHED if ok else RunStatus.FAILED
    ref.client().set_terminated(run_id, RunStatus.to_string(status))


def set_tags(ref: TrackingRef, run_id: str, tags: dict[str, str]) -> None:
    """Set several tags on a run."""
    client = ref.client()
    for key, value in tags.items():
        client.set_tag(run_id, key, value)


def log_and_register_model(
    ref: TrackingRef,
    run_id: str,
    model: Any,
    input_example: Any,
    registered_name: str,
    alias: str | None = "champion",
) -> str:
    """Log the final clustering model with ``mlflow.pytorch`` and register it, under an alias
    unless ``alias`` is None (see :func:`set_model_alias`).

    The default serialization (``pt2``, torch.export) needs an input example (a batch of two or
    more, so the exported batch dimension stays dynamic); the model version
    gets ``alias`` (registry stages are deprecated). Returns the model version.
    """
    mlflow.set_tracking_uri(ref.tracking_uri)
    with mlflow.start_run(run_id=run_id, nested=True):
        info = mlflow.pytorch.log_model(
            model,
            name="model",
            input_example=input_example,
            serialization_format="pt2",
            registered_model_name=registered_name,
            pip_requirements=model_requirements(),
        )
    version = str(info.registered_model_version)
    if alias is not None:
        set_model_alias(ref, registered_name, version, alias)
    return version


def model_requirements() -> list[str]:
    """The logged model's pip requirements: torch and mlflow pinned to the installed
    distributions' versions.

    Read from the package metadata, which MLflow checks the pins against: ``torch.__version__``
    of a CUDA build is ``2.14.1+cu130``, a local version label that pip cannot install from
    PyPI and that made MLflow warn of a mismatch on every run.
    """
    return [f"{name}=={importlib.metadata.version(name)}" for name in ("torch", "mlflow")]


def set_model_alias(
    ref: TrackingRef, registered_name: str, version: str, alias: str = "champion"
) -> None:
    """Point ``alias`` of the registered model at ``version``."""
    ref.client().set_registered_model_alias(registered_name, alias, version)


def run_link(tracking_uri: str, experiment_id: str, run_id: str) -> str:
    """Where the run shows in ``mlflow ui`` (a relative link for local stores)."""
    if tracking_uri.startswith(("http://", "https://")):
        return f"{tracking_uri.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}"
    return f"http://127.0.0.1:5000/#/experiments/{experiment_id}/runs/{run_id}"
