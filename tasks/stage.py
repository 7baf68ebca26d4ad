"""What every stage task shares: its request, its output, its directory and manifest, its MLflow
run, and its Prefect task options (docs/architecture.md, 'The stage contract').

A stage run writes its files into a folder of its own, ``<workspace>/<stage>/<key>/<attempt>/``,
then commits ``<stage>/<key>/_manifest.json`` last, naming that folder. The commit is exclusive
(:meth:`tasks.storage.Storage.create_exclusive`): when two runs compute the same stage at once,
the first commit wins, the other run adopts it and drops its own folder, so every consumer reads
one complete set of files. A folder no manifest names (a crashed or killed run) is never read.

**The manifest is the cache record; Prefect persists no results.** A stage task always runs and
:func:`run_stage` returns the committed output (``reused``) when the stage's manifest exists,
without recomputing; the flow counts that as a cache hit. Prefect's result persistence was the
other record (``<workspace>/_prefect``), and it cannot be made safe: Prefect reads a persisted
result with the serializer *named in the file's own metadata* (``ResultRecord.deserialize`` in
prefect 3.8.8), cloudpickle by default, so whoever can write the workspace could plant a record
naming ``pickle`` and run code on the next run's workers, whatever serializer the task
configured; even Prefect's ``json`` serializer imports any class a file names in
``__class__``, and looking for a cache hit already deserializes the whole record. So the stage
tasks run with ``persist_result=False`` and no cache policy (:data:`STAGE_TASK_OPTIONS`), nothing
under the workspace is ever unpickled (checkpoints are loaded with ``weights_only=True``), and
everything read back is validated (:mod:`tasks.manifest`, :meth:`tasks.storage.Storage.read_model`,
:meth:`tasks.storage.Storage.read_table`). A ``_prefect`` folder left by earlier versions is
ignored.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import re
import time
import uuid
from collections.abc import Callable
from typing import Any

import pyarrow as pa
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel, ConfigDict, Field, model_validator

from scan_core.training import EpochLog
from tasks import progress, tracking
from tasks.manifest import (
    ATTEMPT_PATTERN,
    KEY_PATTERN,
    MANIFEST,
    STAGE_PATTERN,
    check_summary,
    committed_dir,
    read_manifest,
)
from tasks.storage import Storage
from tasks.tracking import TrackingRef

logger = logging.getLogger(__name__)


class StageRequest(BaseModel):
    """What the flow hands a stage task: small values only (docs/architecture.md, 'The stage
    contract')."""

    model_config = ConfigDict(frozen=True)

    stage: str = Field(pattern=STAGE_PATTERN)
    key: str = Field(pattern=KEY_PATTERN)
    workspace: str
    config: dict[str, Any] = Field(default_factory=dict)
    tracking: TrackingRef | None = None

    @property
    def rel_dir(self) -> str:
        """The stage directory relative to the workspace."""
        return f"{self.stage}/{self.key}"


class StageOutput(BaseModel):
    """What a stage returns; also what the run history records of a stage (validated when read
    back: its files lie in ``<stage>/<key>`` or one attempt folder under it, nowhere else)."""

    model_config = ConfigDict(frozen=True)

    stage: str = Field(pattern=STAGE_PATTERN)
    key: str = Field(pattern=KEY_PATTERN)
    uri: str
    rel_dir: str
    run_id: str | None = None
    summary: dict[str, Any] = Field(default_factory=dict)
    seconds: float = 0.0
    reused: bool = False

    @model_validator(mode="after")
    def _files_under_the_stage_folder(self) -> StageOutput:
        folder = f"{self.stage}/{self.key}"
        attempt = self.rel_dir.removeprefix(folder + "/")
        if self.rel_dir != folder and (
            attempt == self.rel_dir or not re.fullmatch(ATTEMPT_PATTERN, attempt)
        ):
            raise ValueError(f"rel_dir must be {folder} or an attempt folder under it")
        return self


def stage_output(workspace: Storage, stage: str, key: str) -> StageOutput | None:
    """The committed output of stage ``stage`` with key ``key`` (``reused``), from its validated
    manifest (:func:`tasks.manifest.read_manifest`); None when it has none.

    Raises:
        WorkspaceFileError: the manifest is not valid.
    """
    manifest = read_manifest(workspace, stage, key)
    if manifest is None:
        return None
    rel_dir = committed_dir(f"{stage}/{key}", manifest)
    return StageOutput(
        stage=stage,
        key=key,
        uri=workspace.uri(rel_dir),
        rel_dir=rel_dir,
        run_id=manifest.mlflow_run_id,
        summary=manifest.summary,
        seconds=manifest.seconds,
        reused=True,
    )


class StageRun:
    """One execution of a stage: its files, its MLflow run, its manifest.

    Args:
        request: The stage request.
    """

    def __init__(self, request: StageRequest) -> None:
        self.request = request
        self.workspace = Storage(request.workspace)
        self.run_id: str | None = None
        self.files: dict[str, int] = {}
        self._start = time.perf_counter()
        self.attempt = f"{dt.datetime.now(dt.UTC):%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:8]}"
        self.dir = f"{request.rel_dir}/{self.attempt}"

    @property
    def manifest_path(self) -> str:
        """Workspace-relative path of the stage's manifest."""
        return f"{self.request.rel_dir}/{MANIFEST}"

    def rel(self, name: str) -> str:
        """Workspace-relative path of file ``name`` of this stage run (in its attempt folder)."""
        return f"{self.dir}/{name}"

    def load_manifest(self) -> StageOutput | None:
        """The finished stage's output if its manifest exists, else None.

        Raises:
            WorkspaceFileError: the manifest is not valid (:func:`tasks.manifest.read_manifest`).
        """
        return stage_output(self.workspace, self.request.stage, self.request.key)

    # -- tracking -----------------------------------------------------------------------------

    def start(self) -> None:
        """Open the stage's nested MLflow run (params = the stage config)."""
        ref = self.request.tracking
        if ref is not None:
            self.run_id = tracking.start_stage_run(
                ref,
                self.request.stage,
                self.request.config,
                tags={"stage_key": self.request.key, "cached": "false"},
            )

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        """Log metrics to the stage run."""
        if self.request.tracking is not None and self.run_id is not None:
            tracking.log_metrics(self.request.tracking, self.run_id, metrics, step)

    def on_epoch(self, log: EpochLog) -> None:
        """Progress callback for scan_core training loops: MLflow metrics and progress reports
        (the epoch's log line is scan_core's own, which reaches the run's logs,
        :mod:`tasks.prefect_reports`)."""
        if self.request.tracking is not None and self.run_id is not None:
            tracking.log_epoch(self.request.tracking, self.run_id, log)
        shown = " ".join(f"{k}={v:.4g}" for k, v in log.metrics.items())
        progress.report(self.request.stage, log.epoch, log.epochs, shown)

    def on_batch(self, done: int, total: int) -> None:
        """Progress callback for batched inference."""
        progress.report(self.request.stage, done, total, "images")

    def log_artifact(self, name: str, data: bytes, folder: str | None = None) -> None:
        """Log bytes as an MLflow artifact of the stage run."""
        if self.request.tracking is not None and self.run_id is not None:
            tracking.log_file(self.request.tracking, self.run_id, name, data, folder)

    # -- files --------------------------------------------------------------------------------

    def write_bytes(self, name: str, data: bytes, log: bool = False) -> None:
        """Write a file of the stage (and log it to MLflow when ``log``)."""
        self.workspace.write_bytes(self.rel(name), data)
        self.files[name] = len(data)
        if log:
            self.log_artifact(name, data)

    def write_json(self, name: str, value: Any, log: bool = False) -> None:
        """Write a JSON file of the stage (and log it to MLflow when ``log``)."""
        self.write_bytes(name, json.dumps(value, indent=2, sort_keys=True).encode(), log=log)

    def write_table(self, name: str, table: pa.Table) -> None:
        """Write a Parquet table of the stage, stamped with the stage key."""
        self.files[name] = self.workspace.write_table(self.rel(name), table, self.request.key)

    def read_table(self, name: str, columns: list[str] | None = None) -> pa.Table:
        """Read a table of this stage."""
        return self.workspace.read_table(self.rel(name), columns)

    def finish(self, summary: dict[str, Any]) -> StageOutput:
        """Commit the manifest (last), close the MLflow run and return the stage output.

        When another run committed this stage first, its output is returned (``reused``) and
        this run's folder is removed; its MLflow run ends ``KILLED`` with a ``discarded`` tag.
        """
        seconds = time.perf_counter() - self._start
        check_summary(self.request.stage, summary)  # what later stages and reruns read of it
        manifest = {
            "stage": self.request.stage,
            "key": self.request.key,
            "dir": self.attempt,
            "config": self.request.config,
            "files": self.files,
            "mlflow_run_id": self.run_id,
            "seconds": seconds,
            "finished_at": dt.datetime.now(dt.UTC).isoformat(),
            "summary": summary,
        }
        data = json.dumps(manifest, indent=2, sort_keys=True).encode()
        committed = self.workspace.create_exclusive(self.manifest_path, data)
        winner = None if committed else self.load_manifest()
        if winner is not None and winner.rel_dir != self.dir:
            return self._discard(winner)
        if self.request.tracking is not None and self.run_id is not None:
            self.log_metrics({"stage_seconds": seconds})
            tracking.end_run(self.request.tracking, self.run_id, ok=True)
        return StageOutput(
            stage=self.request.stage,
            key=self.request.key,
            uri=self.workspace.uri(self.dir),
            rel_dir=self.dir,
            run_id=self.run_id,
            summary=summary,
            seconds=seconds,
        )

    def _discard(self, winner: StageOutput) -> StageOutput:
        logger.info(
            "%s %s: another run committed this stage first; using its output",
            self.request.stage,
            self.request.key[:12],
        )
        if self.request.tracking is not None and self.run_id is not None:
            tracking.set_tags(
                self.request.tracking,
                self.run_id,
                {"discarded": "another run committed this stage first", "winner": winner.rel_dir},
            )
            self.request.tracking.client().set_terminated(self.run_id, "KILLED")
        self.workspace.remove(self.dir)
        return winner

    def fail(self) -> None:
        """Mark the MLflow run failed (no manifest is written)."""
        if self.request.tracking is not None and self.run_id is not None:
            tracking.end_run(self.request.tracking, self.run_id, ok=False)


def run_stage(request: StageRequest, body: Callable[[StageRun], dict[str, Any]]) -> StageOutput:
    """Run ``body`` as stage ``request`` unless its manifest already exists.

    ``body`` writes the stage's files through the :class:`StageRun` and returns a small summary
    (counts, metrics) that goes into the manifest and the output.
    """
    run = StageRun(request)
    existing = run.load_manifest()
    if existing is not None:
        logger.info("%s %s: manifest found, reusing it", request.stage, request.key[:12])
        return existing
    run.start()
    try:
        summary = body(run)
    except BaseException:
        run.fail()
        raise
    output = run.finish(summary)
    logger.info("%s %s: done in %.1fs", request.stage, request.key[:12], output.seconds)
    return output


#: Prefect options of every stage task: no Prefect cache and no persisted result; the stage's
#: manifest is its cache record (see the module docstring for why).
STAGE_TASK_OPTIONS: dict[str, Any] = {
    "cache_policy": NO_CACHE,
    "persist_result": False,
}
