"""MLflow tracking: one parent run per flow run, one nested run per stage that ran
(docs/architecture.md, 'What a run leaves').

Everything goes through an explicit ``MlflowClient`` and explicit run ids, because the active run
of ``mlflow``'s fluent API is thread-local and Prefect may run tasks in other threads. Runs made
with ``MlflowClient.create_run`` get none of the fluent API's automatic tags, so every run gets
:func:`source_tags` (git commit, source, user) here. The parent run holds the whole resolved
config (params and ``config.yaml``, :func:`log_config`), the lake as a dataset input
(:func:`log_lake_input`) and one set of ``stage.<name>.*`` tags per stage
(:func:`record_stage`): a stage served from cache is recorded there, with the run that made it,
instead of in an empty nested run.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import getpass
import importlib.metadata
import json
import logging
import os
import subprocess
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mlflow
import yaml
from mlflow import MlflowClient
from mlflow.entities import RunStatus
from mlflow.exceptions import MlflowException
from mlflow.utils.validation import (
    MAX_DATASET_DIGEST_SIZE,
    MAX_PARAM_VAL_LENGTH,
    MAX_PARAMS_TAGS_PER_BATCH,
    MAX_TAG_VAL_LENGTH,
)
from pydantic import BaseModel, ConfigDict

from scan_core.training import EpochLog

logger = logging.getLogger(__name__)

#: The project's root folder (a git checkout when run from one).
PROJECT_ROOT = Path(__file__).resolve().parents[1]
#: ``mlflow.source.name`` of every run: the flow's entry point.
SOURCE_NAME = "flows/pipeline.py:scan_pipeline"


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


def git_commit(folder: Path = PROJECT_ROOT) -> str | None:
    """The commit checked out in ``folder`` (None outside a git checkout or without git)."""
    try:
        done = subprocess.run(
            ["git", "-C", str(folder), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    commit = done.stdout.strip()
    return commit if done.returncode == 0 and len(commit) == 40 else None


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no passwd entry (containers) and no LOGNAME/USER
        return os.environ.get("USER") or "unknown"


@functools.cache
def source_tags() -> dict[str, str]:
    """The tags MLflow's fluent API would set, for runs made with ``create_run``: the code's
    git commit (when it runs from a checkout), source name and type, and the user."""
    tags = {
        "mlflow.source.name": SOURCE_NAME,
        "mlflow.source.type": "JOB",
        "mlflow.user": _user(),
    }
    commit = git_commit()
    if commit is not None:
        tags["mlflow.source.git.commit"] = commit
    return tags


def start_parent_run(
    tracking_uri: str, experiment_id: str, run_name: str, tags: dict[str, str]
) -> str:
    """Create the flow's parent run (with :func:`source_tags`); return its id."""
    client = MlflowClient(tracking_uri=tracking_uri)
    run = client.create_run(experiment_id, run_name=run_name, tags={**source_tags(), **tags})
    return str(run.info.run_id)


def start_stage_run(
    ref: TrackingRef, stage: str, params: dict[str, Any], tags: dict[str, str] | None = None
) -> str:
    """Create a nested run for ``stage`` under the parent run, with its config as params."""
    client = ref.client()
    all_tags = {
        **source_tags(),
        "mlflow.parentRunId": ref.parent_run_id,
        "stage": stage,
        **(tags or {}),
    }
    run = client.create_run(ref.experiment_id, run_name=stage, tags=all_tags)
    run_id = str(run.info.run_id)
    log_params(ref, run_id, flatten(params))
    return run_id


def log_params(ref: TrackingRef, run_id: str, params: dict[str, str]) -> None:
    """Log params in batches of MLflow's limit, values cut to its maximum length."""
    items = [mlflow.entities.Param(k, v[:MAX_PARAM_VAL_LENGTH]) for k, v in params.items()]
    client = ref.client()
    for start in range(0, len(items), MAX_PARAMS_TAGS_PER_BATCH):
        client.log_batch(run_id, params=items[start : start + MAX_PARAMS_TAGS_PER_BATCH])


def log_config(ref: TrackingRef, run_id: str, config: dict[str, Any]) -> None:
    """The whole resolved config on a run: flattened params (``scan.epochs``, ...) and the
    ``config.yaml`` artifact (loadable with ``--config``)."""
    log_params(ref, run_id, flatten(config))
    log_file(ref, run_id, "config.yaml", yaml.safe_dump(config, sort_keys=True).encode())


class LakeDataset(mlflow.data.meta_dataset.MetaDataset):
    """A lake as an MLflow dataset: its URL as source, its fingerprint as digest and its
    counts as profile (no data is read or logged)."""

    def __init__(self, lake_url: str, fingerprint: str, counts: dict[str, int]) -> None:
        from mlflow.data.dataset_source_registry import resolve_dataset_source

        self._counts = dict(counts)
        with warnings.catch_warnings():
            # MLflow registers its local artifact source twice and warns that a local path
            # "can be interpreted in multiple ways" (both are LocalArtifactDatasetSource)
            warnings.filterwarnings("ignore", message=".*interpreted in multiple ways.*")
            source = resolve_dataset_source(lake_url)
        super().__init__(
            source=source,
            name=lake_url[:500],
            digest=fingerprint[:MAX_DATASET_DIGEST_SIZE],
        )

    @property
    def profile(self) -> dict[str, int]:
        """The lake's counts (objects, images, unique images, quarantined)."""
        return self._counts

    def to_dict(self) -> dict[str, str]:
        """MetaDataset's fields and the profile (as JSON, which MLflow stores)."""
        return {**super().to_dict(), "profile": json.dumps(self._counts)}


def log_lake_input(
    ref: TrackingRef, run_id: str, lake_url: str, fingerprint: str, counts: dict[str, int]
) -> None:
    """Log the lake as the run's dataset input (context ``training``; the full fingerprint in
    the ``lake_fingerprint`` input tag)."""
    from mlflow.entities import DatasetInput, InputTag

    dataset = LakeDataset(lake_url, fingerprint, counts)._to_mlflow_entity()
    tags = [
        InputTag(key="mlflow.data.context", value="training"),
        InputTag(key="lake_fingerprint", value=fingerprint),
    ]
    ref.client().log_inputs(run_id, datasets=[DatasetInput(dataset=dataset, tags=tags)])


def record_stage(
    ref: TrackingRef, stage: str, key: str, cached: bool, run_id: str | None, how: str = ""
) -> None:
    """Record on the parent run how ``stage`` went: ``stage.<name>.cached``, ``.key`` and the
    MLflow run that made its output (``.run_id`` for a stage that ran in this flow run,
    ``.source_run_id`` for one served from cache, with ``.cache`` saying by what)."""
    tags = {f"stage.{stage}.cached": str(cached).lower(), f"stage.{stage}.key": key}
    if cached:
        tags[f"stage.{stage}.source_run_id"] = run_id or ""
        tags[f"stage.{stage}.cache"] = how
    else:
        tags[f"stage.{stage}.run_id"] = run_id or ""
    set_tags(ref, ref.parent_run_id, tags)


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
    """Set several tags on a run (batched; values cut to MLflow's maximum length)."""
    items = [mlflow.entities.RunTag(k, str(v)[:MAX_TAG_VAL_LENGTH]) for k, v in tags.items()]
    client = ref.client()
    for start in range(0, len(items), MAX_PARAMS_TAGS_PER_BATCH):
        client.log_batch(run_id, tags=items[start : start + MAX_PARAMS_TAGS_PER_BATCH])


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


def set_version_tags(
    ref: TrackingRef, registered_name: str, version: str, tags: dict[str, str]
) -> None:
    """Set several tags on a model version (values cut to MLflow's maximum length)."""
    client = ref.client()
    for key, value in tags.items():
        client.set_model_version_tag(registered_name, version, key, str(value)[:MAX_TAG_VAL_LENGTH])


def run_link(tracking_uri: str, experiment_id: str, run_id: str, ui_url: str | None = None) -> str:
    """Where the run shows in the MLflow UI: on the tracking server for an ``http(s)://``
    tracking URI, else on ``ui_url`` (``SCAN_LAKE_MLFLOW_UI_URL``) when given, else the UI's
    path ``#/experiments/<id>/runs/<id>`` (relative to wherever ``mlflow ui`` serves the local
    store: :func:`ui_command`)."""
    path = f"#/experiments/{experiment_id}/runs/{run_id}"
    if tracking_uri.startswith(("http://", "https://")):
        return f"{tracking_uri.rstrip('/')}/{path}"
    if ui_url:
        return f"{ui_url.rstrip('/')}/{path}"
    return path


def ui_command(tracking_uri: str) -> str | None:
    """The command that serves the MLflow UI of a local store (None for a tracking server)."""
    if tracking_uri.startswith(("http://", "https://")):
        return None
    return f"uv run mlflow ui --backend-store-uri {tracking_uri}"


def dumps(value: Any) -> str:
    """Compact JSON for a tag value."""
    return json.dumps(value, separators=(",", ":"), default=str)
