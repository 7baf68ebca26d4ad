"""The stage manifest: ``<workspace>/<stage>/<key>/_manifest.json``, the committed record of a
finished stage, and the one place it is validated when read back.

A manifest names the stage and key it commits, the attempt folder holding the stage's files, the
files, the MLflow run and a small summary that later stages read (counts, the image config, the
number of neighbours, the stable cluster ids, ...). A rerun reuses it instead of recomputing the
stage, so it is read back from a workspace that others may be able to write: :func:`read_manifest`
accepts it only as a :class:`StageManifest` whose stage and key are those of its folder, whose
attempt folder is one plain folder name, and whose summary has, with the right types, every field
that later stages read of it (:data:`SUMMARIES`). Anything else is a
:class:`~tasks.errors.WorkspaceFileError`: one sentence naming the file, the problem and the folder
to delete so that the stage is computed again.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from scan_core.config import BackboneName, ImageConfig
from tasks.storage import Storage, validation_problem

MANIFEST = "_manifest.json"

#: A stage key (SHA-256 hex, :func:`tasks.keys.digest`).
KEY_PATTERN = r"^[0-9a-f]{64}$"
#: A stage name, as it names a workspace folder.
STAGE_PATTERN = r"^[a-z][a-z_]{0,31}$"
#: An attempt folder (:attr:`tasks.stage.StageRun.attempt`): a UTC time and a random suffix.
ATTEMPT_PATTERN = r"^[0-9]{8}T[0-9]{6}-[0-9a-f]{8}$"
#: An MLflow run id.
RUN_ID_PATTERN = r"^[0-9a-f]{32}$"


class StageManifest(BaseModel):
    """A committed stage, as :meth:`tasks.stage.StageRun.finish` writes it (unknown keys are
    ignored, so a newer writer's manifests stay readable)."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    stage: str = Field(pattern=STAGE_PATTERN)
    key: str = Field(pattern=KEY_PATTERN)
    dir: str | None = Field(None, pattern=ATTEMPT_PATTERN)  # None: written before attempts
    config: dict[str, Any] = Field(default_factory=dict)
    files: dict[str, int] = Field(default_factory=dict)
    mlflow_run_id: str | None = Field(None, pattern=RUN_ID_PATTERN)
    seconds: float = Field(0.0, ge=0)
    finished_at: str | None = None
    summary: dict[str, Any] = Field(default_factory=dict)


class _Summary(BaseModel):
    """The fields of a stage summary that later stages read; other fields pass unchecked."""

    model_config = ConfigDict(extra="allow")


class CatalogSummary(_Summary):
    image_config: ImageConfig
    image_config_key: str = Field(pattern=r"^[0-9a-f]{32}$")
    has_labels: bool = False


class PretextSummary(_Summary):
    backbone: BackboneName
    config_fingerprint: str | None = None
    code_version: str | None = None
    image_config_key: str | None = None


class EmbedSummary(_Summary):
    embedded: int = Field(0, ge=0)


class NeighborsSummary(_Summary):
    k: int = Field(ge=1)


class ChooseKSummary(_Summary):
    chosen_k: int = Field(ge=2)
    criterion: str
    explanation: str
    ks: list[int] = Field(min_length=1)
    plot: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")


class AssignSummary(_Summary):
    cluster_sizes: list[int] = Field(min_length=1)
    cluster_ids: list[int] | None = None  # None: written before stable ids
    next_cluster_id: int | None = Field(None, ge=0)
    lineage: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _one_id_per_cluster(self) -> AssignSummary:
        ids = self.cluster_ids
        if ids is not None and (len(ids) != len(self.cluster_sizes) or len(set(ids)) != len(ids)):
            raise ValueError("cluster_ids must name each cluster of cluster_sizes once")
        if ids is not None and min(ids) < 0:
            raise ValueError("cluster_ids must be non-negative")
        return self


class EvaluateSummary(_Summary):
    metrics: dict[str, float] = Field(default_factory=dict)
    cluster_sizes: list[int] = Field(default_factory=list)
    cluster_ids: list[int] | None = None


#: The summary of each stage (by its name in the workspace) as later stages read it.
SUMMARIES: dict[str, type[_Summary]] = {
    "catalog": CatalogSummary,
    "pretext": PretextSummary,
    "embed": EmbedSummary,
    "mine_neighbors": NeighborsSummary,
    "choose_k": ChooseKSummary,
    "assign": AssignSummary,
    "evaluate": EvaluateSummary,
}


def check_summary(stage: str, summary: dict[str, Any]) -> None:
    """Raise ``ValueError`` (pydantic's) when ``summary`` lacks a field later stages read of
    ``stage``'s summary, or has it with another type."""
    model = SUMMARIES.get(stage)
    if model is not None:
        model.model_validate(summary)


def read_manifest(workspace: Storage, stage: str, key: str) -> StageManifest | None:
    """The manifest of stage ``stage`` with key ``key``, validated; None when there is none.

    Raises:
        WorkspaceFileError: the manifest is not JSON, not a manifest, commits another stage or
            key than its folder's, or its summary lacks what later stages read.
    """
    rel = f"{stage}/{key}/{MANIFEST}"
    if not workspace.exists(rel):
        return None
    manifest = workspace.read_model(rel, StageManifest, "stage manifest")
    if (manifest.stage, manifest.key) != (stage, key):
        raise workspace.bad_file(
            rel, f"commits {manifest.stage}/{manifest.key[:12]}..., not its own folder's stage"
        )
    try:
        check_summary(stage, manifest.summary)
    except ValidationError as exc:
        problem = f"has a summary that later stages cannot use ({validation_problem(exc)})"
        raise workspace.bad_file(rel, problem) from exc
    return manifest


def committed_dir(stage_dir: str, manifest: StageManifest) -> str:
    """Workspace-relative folder of a committed stage's files: the attempt folder its manifest
    names under ``stage_dir`` (``<stage>/<key>``), or ``stage_dir`` itself for manifests written
    before attempt folders existed."""
    return f"{stage_dir}/{manifest.dir}" if manifest.dir else stage_dir
