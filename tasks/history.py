"""The run history of a lake in a workspace: what the last finished run built, and what the next
run builds on (docs/architecture.md, 'Growing lakes').

After every successful flow run :func:`record_run` writes a :class:`RunRecord` to
``<workspace>/history/<lake id>/latest.json`` (and a dated copy beside it). The next run's
:func:`plan_growth` reads it and decides (:func:`decide_growth`, pure):

- **warm start**: SCAN starts from the previous run's final model (the assign stage's checkpoint,
  in stable cluster order) with ``growth.warm_scan_epochs`` / ``growth.warm_selflabel_epochs``,
  when warm starts are on and the backbone, the number of clusters and the SCAN and self-labeling
  settings are the previous run's; otherwise a cold start from the backbone;
- **relabelling**: the assign stage matches its clusters to the previous run's assignments
  (:mod:`tasks.lineage`).

The plan becomes an input of the stage keys (the warm stages' keys hold the previous model's key,
the assign key the previous assignments' key), so caching stays exact. A run on the same images
with the same settings as the previous run repeats that run's plan: its keys are the previous
run's and every stage is a cache hit.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
from typing import Any, Literal

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.exceptions import MissingContextError
from pydantic import BaseModel, ConfigDict

from scan_core.config import GrowthConfig, ScanConfig, SelfLabelConfig
from tasks.errors import ScanLakeError, WorkspaceFileError
from tasks.stage import StageOutput, stage_output
from tasks.storage import Storage

logger = logging.getLogger(__name__)

HISTORY_DIR = "history"
LATEST = "latest.json"


class RunSignature(BaseModel):
    """What decides whether a run may warm-start from, or repeats, the previous one."""

    model_config = ConfigDict(frozen=True)

    images_key: str
    pretext_key: str
    num_clusters: int
    scan_fingerprint: str  # of the configured (cold) SCAN settings
    selflabel_fingerprint: str


class GrowthPlan(BaseModel):
    """What this run builds on: the model it warm-starts from and the run it relabels against."""

    model_config = ConfigDict(frozen=True)

    start: Literal["warm", "cold"]
    reason: str
    warm_from: StageOutput | None = None
    relabel_from: StageOutput | None = None
    previous_flow_run_id: str | None = None


class RunRecord(BaseModel):
    """One finished flow run of a lake, as the next run needs it (and the run's gallery,
    :mod:`tasks.gallery`: its evaluate and duplicates stages, absent from older records)."""

    model_config = ConfigDict(frozen=True)

    lake: str
    signature: RunSignature
    plan: GrowthPlan
    assign: StageOutput
    flow_run_id: str
    mlflow_run_id: str
    finished_at: str
    evaluate: StageOutput | None = None
    duplicates: StageOutput | None = None


def history_dir(lake_url: str) -> str:
    """Workspace-relative folder of a lake's run records (one folder per lake URL)."""
    return f"{HISTORY_DIR}/{hashlib.sha256(lake_url.encode()).hexdigest()[:24]}"


def warm_scan_config(scan: ScanConfig, growth: GrowthConfig) -> ScanConfig:
    """The SCAN settings of a warm start: at most ``growth.warm_scan_epochs`` epochs (never more
    than ``scan.epochs``, at least one), one head (the previous model has one), no head warm-up
    (the heads already cluster), the learning rate scaled by ``growth.warm_lr_scale``."""
    epochs = max(1, min(growth.warm_scan_epochs, scan.epochs))
    return ScanConfig.model_validate(
        {
            **scan.model_dump(),
            "epochs": epochs,
            "num_heads": 1,
            "head_warmup_epochs": 0,
            "lr": scan.lr * growth.warm_lr_scale,
        }
    )


def warm_selflabel_config(selflabel: SelfLabelConfig, growth: GrowthConfig) -> SelfLabelConfig:
    """The self-labeling settings of a warm start: at most ``growth.warm_selflabel_epochs``, the
    learning rate scaled by ``growth.warm_lr_scale``."""
    epochs = min(growth.warm_selflabel_epochs, selflabel.epochs)
    return SelfLabelConfig.model_validate(
        {**selflabel.model_dump(), "epochs": epochs, "lr": selflabel.lr * growth.warm_lr_scale}
    )


def decide_growth(
    previous: RunRecord | None, signature: RunSignature, growth: GrowthConfig
) -> GrowthPlan:
    """The plan of a run given the previous finished run of its lake (pure).

    Args:
        previous: The lake's last finished run whose outputs still exist, or None.
        signature: This run's lake fingerprint, backbone and settings.
        growth: The growth settings.
    """
    if previous is None:
        return GrowthPlan(start="cold", reason="no earlier finished run on this lake")
    if previous.signature == signature:
        return previous.plan  # a repeat: same keys, every stage a cache hit
    common: dict[str, Any] = {
        "relabel_from": previous.assign,
        "previous_flow_run_id": previous.flow_run_id,
    }
    before = previous.signature
    if not growth.warm_start:
        return GrowthPlan(start="cold", reason="growth.warm_start is off", **common)
    if before.pretext_key != signature.pretext_key:
        return GrowthPlan(
            start="cold",
            reason=f"the backbone changed ({before.pretext_key[:12]} -> "
            f"{signature.pretext_key[:12]})",
            **common,
        )
    if before.num_clusters != signature.num_clusters:
        return GrowthPlan(
            start="cold",
            reason=f"the number of clusters changed ({before.num_clusters} -> "
            f"{signature.num_clusters})",
            **common,
        )
    if (before.scan_fingerprint, before.selflabel_fingerprint) != (
        signature.scan_fingerprint,
        signature.selflabel_fingerprint,
    ):
        return GrowthPlan(
            start="cold", reason="the SCAN or self-labeling settings changed", **common
        )
    return GrowthPlan(
        start="warm",
        reason=f"warm start from the model of flow run {previous.flow_run_id} (same backbone, "
        f"{signature.num_clusters} clusters, same settings)",
        warm_from=previous.assign,
        **common,
    )


def load_previous(workspace: Storage, lake_url: str) -> tuple[RunRecord | None, str]:
    """The lake's last finished run, if its assign stage is still in the workspace.

    The record is read back from the workspace, so it is validated (:class:`RunRecord`: stage
    names and keys of the right form, files under their stage folders) and its stage outputs are
    read again from the stages' own validated manifests (:func:`tasks.stage.stage_output`). A
    record that fails, of another lake, or naming an invalid manifest or a missing assign stage
    means a cold start (with a note).

    Returns:
        The record (or None) and a note when a record exists but cannot be used.
    """
    rel = f"{history_dir(lake_url)}/{LATEST}"
    if not workspace.exists(rel):
        return None, ""
    try:
        record = workspace.read_model(rel, RunRecord, "run record")
    except WorkspaceFileError as exc:
        return None, f"{exc} Starting cold."
    if record.lake != lake_url:
        return None, f"the last run record {rel} is of another lake ({record.lake}); starting cold"
    try:
        assign = stage_output(workspace, record.assign.stage, record.assign.key)
        earlier = {
            name: stage_output(workspace, output.stage, output.key)
            for name, output in (
                ("warm_from", record.plan.warm_from),
                ("relabel_from", record.plan.relabel_from),
            )
            if output is not None
        }
    except WorkspaceFileError as exc:
        return None, f"{exc} Starting cold."
    if assign is None:
        return None, f"the last run's assign stage {record.assign.key[:12]} is gone; starting cold"
    # a plan's earlier stages matter only to a repeat of that run (same keys, all cached): one
    # that is gone since stays as recorded (validated), as it always did
    plan = record.plan.model_copy(update={k: v for k, v in earlier.items() if v is not None})
    return record.model_copy(update={"assign": assign, "plan": plan}), ""


def find_record(workspace: Storage, lake_url: str, run_id: str | None = None) -> RunRecord:
    """The lake's latest finished run, or the one whose Prefect flow run id or MLflow run id is
    ``run_id``.

    Raises:
        ScanLakeError: no finished run of the lake in the workspace, no run ``run_id``, or an
            unreadable record.
    """
    folder = history_dir(lake_url)
    if run_id is None:
        paths = [f"{folder}/{LATEST}"] if workspace.exists(f"{folder}/{LATEST}") else []
    else:
        paths = sorted(
            (o.key for o in workspace.list_objects(f"{folder}/runs") if o.key.endswith(".json")),
            reverse=True,
        )
    if not paths:
        raise ScanLakeError(
            f"The workspace {workspace.url} holds no finished run of the lake {lake_url}: run "
            "`scan-lake run` on it first, and pass --lake exactly as that run did."
        )
    for rel in paths:
        try:
            record = RunRecord.model_validate(workspace.read_json(rel))
        except ValueError as exc:
            raise ScanLakeError(
                f"The run record {workspace.uri(rel)} is unreadable ({type(exc).__name__}): "
                "rerun the pipeline on the lake to write a new one."
            ) from exc
        if run_id is None or run_id in (record.flow_run_id, record.mlflow_run_id):
            return record
    raise ScanLakeError(
        f"No finished run {run_id} of the lake {lake_url} in {workspace.url}: pass a Prefect "
        "flow run id or MLflow run id of one of its runs, or leave --run out for the latest."
    )


def _log() -> Any:
    try:
        return get_run_logger()
    except MissingContextError:
        return logger


@task(
    name="plan-growth",
    cache_policy=NO_CACHE,
    persist_result=False,
)
def plan_growth(
    workspace_url: str, lake_url: str, signature: RunSignature, growth_config: dict[str, Any]
) -> GrowthPlan:
    """Read the lake's last finished run and decide this run's plan (:func:`decide_growth`)."""
    previous, note = load_previous(Storage(workspace_url), lake_url)
    if note:
        _log().warning(note)
    plan = decide_growth(previous, signature, GrowthConfig.model_validate(growth_config))
    _log().info("%s start: %s", plan.start, plan.reason)
    return plan


@task(
    name="record-run",
    cache_policy=NO_CACHE,
    persist_result=False,
)
def record_run(workspace_url: str, record: RunRecord) -> str:
    """Write ``record`` as the lake's latest run (and a dated copy); return its path."""
    workspace = Storage(workspace_url)
    folder = history_dir(record.lake)
    value = record.model_dump(mode="json")
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%S%fZ")
    workspace.write_json(f"{folder}/runs/{stamp}.json", value)
    workspace.write_json(f"{folder}/{LATEST}", value)
    return f"{folder}/{LATEST}"


def now() -> str:
    """The current UTC time (ISO 8601) for :attr:`RunRecord.finished_at`."""
    return dt.datetime.now(dt.UTC).isoformat()
