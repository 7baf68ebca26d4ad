"""Pretext stage (SCAN step 1): train the representation on the catalog's unique images with the
``pretext.method`` of the registry (:data:`scan_core.methods.PRETEXT`: SimCLR, RotNet, Super-AND,
BYOL). A method with a section of its own (``superand``, ``byol``) takes the ``pretext`` section's
settings plus its section's, and its key is computed under its own name and code version, so the
keys of SimCLR and RotNet stages are those they always had.

Growing lakes reuse a backbone (docs/architecture.md, 'Growing lakes'): :func:`plan_pretext` keeps
the earlier pretext stage (same config and code) that covers most of the lake until the lake has
grown past ``growth.retrain_pretext_after`` since it was trained (:func:`choose_backbone`, pure).
"""

from __future__ import annotations

import logging
import re
from typing import Any

import pyarrow as pa
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel, ConfigDict

from scan_core.config import ImageConfig, PipelineConfig, StageConfig
from scan_core.methods import PretextMethod, pretext_method, pretext_method_of
from tasks import checkpoints, keys
from tasks.catalog import read_catalog
from tasks.errors import WorkspaceFileError
from tasks.lake import unique_ids
from tasks.manifest import KEY_PATTERN, MANIFEST
from tasks.pixels import load_pixels
from tasks.schemas import IMAGE_IDS, LISTING
from tasks.stage import (
    STAGE_TASK_OPTIONS,
    StageOutput,
    StageRequest,
    StageRun,
    run_stage,
    stage_output,
)
from tasks.storage import Storage

logger = logging.getLogger(__name__)

TRAIN_IDS = "train_ids.parquet"


def pretext_stage_config(config: PipelineConfig) -> dict[str, Any]:
    """The pretext stage's config of ``pretext.method`` (:meth:`PretextMethod.stage_config`)."""
    return pretext_method(config.pretext.method).stage_config(config)


def parse_pretext_config(config: dict[str, Any]) -> tuple[PretextMethod, StageConfig]:
    """The method and typed settings of a pretext stage config (:func:`pretext_stage_config`)."""
    method = pretext_method_of(config)
    return method, method.parse(config)


def plan_key(config: dict[str, Any], images_key: str) -> str:
    """The stage key of a pretext stage config on the images ``images_key``."""
    method, settings = parse_pretext_config(config)
    return keys.stage_key(method.key_name, settings.fingerprint(), {"images": images_key})


@task(name="pretext", **STAGE_TASK_OPTIONS)
def pretext(request: StageRequest, catalog: StageOutput) -> StageOutput:
    """Train the pretext model on the unique images of ``catalog``; save the checkpoint."""

    def body(run: StageRun) -> dict[str, Any]:
        method, config = parse_pretext_config(request.config)
        image_config = ImageConfig.model_validate(catalog.summary["image_config"])
        ids = unique_ids(read_catalog(run.workspace, catalog))
        images = load_pixels(run.workspace, catalog.summary["image_config_key"], ids, image_config)
        result = method.train(images, config, run.on_epoch)
        state = checkpoints.state_bytes(result.model)
        run.write_bytes(checkpoints.CHECKPOINT, state, log=True)
        description = {"config": request.config, "in_channels": image_config.channels}
        run.write_json(checkpoints.DESCRIPTION, description, log=True)
        run.write_table(TRAIN_IDS, pa.table({"image_id": ids}, schema=IMAGE_IDS))
        final = result.history[-1].metrics if result.history else {}
        return {
            "num_images": len(ids),
            "final_loss": final.get("loss"),
            "epochs": len(result.history),
            "backbone": request.config["backbone"],
            "method": method.name,
            "config_fingerprint": config.fingerprint(),
            "image_config_key": catalog.summary["image_config_key"],
            "code_version": keys.code_version(method.key_name),
        }

    return run_stage(request, body)


class PretextPlan(BaseModel):
    """Which pretext backbone a run uses and why (recorded in MLflow)."""

    model_config = ConfigDict(frozen=True)

    key: str
    own_key: str
    reused: bool
    reason: str
    growth: float | None = None
    trained_images: int | None = None
    new_images: int | None = None


class BackboneCandidate(BaseModel):
    """An earlier finished pretext stage: its key and how the current lake relates to it."""

    model_config = ConfigDict(frozen=True)

    key: str
    kept: int  # images it was trained on that are still in the lake
    new: int  # images of the lake it was not trained on

    @property
    def growth(self) -> float:
        """Images it was not trained on, as a fraction of those it was (still in the lake)."""
        return self.new / self.kept if self.kept else float("inf")


def choose_backbone(
    own_key: str,
    own_exists: bool,
    candidates: list[BackboneCandidate],
    retrain_after: float,
    retrain: bool = False,
) -> PretextPlan:
    """The pretext policy of a growing lake (pure).

    Keep using the backbone that covers most of the lake until the lake has grown by more than
    ``retrain_after`` (a fraction of the images it was trained on) or a retrain is requested;
    then train on the current images (stage key ``own_key``). A backbone trained on exactly the
    current images is always used.
    """
    if own_exists:
        return PretextPlan(
            key=own_key,
            own_key=own_key,
            reused=False,
            reason="a backbone trained on exactly these images exists",
        )
    if retrain:
        return PretextPlan(
            key=own_key,
            own_key=own_key,
            reused=False,
            reason="retrain requested (--retrain-pretext)",
        )
    usable = [c for c in candidates if c.kept > 0]
    if not usable:
        return PretextPlan(
            key=own_key,
            own_key=own_key,
            reused=False,
            reason="no earlier backbone with this pretext config: training one",
        )
    best = max(usable, key=lambda c: (c.kept, -c.new, c.key))
    facts = {"growth": best.growth, "trained_images": best.kept, "new_images": best.new}
    grew = (
        f"lake grew {100 * best.growth:.0f}% ({best.new} new images on {best.kept} trained) "
        f"since backbone {best.key[:12]} was trained"
    )
    if retrain_after > 0 and best.growth <= retrain_after:
        return PretextPlan(
            key=best.key,
            own_key=own_key,
            reused=True,
            reason=f"{grew}: {100 * best.growth:.0f}% <= {100 * retrain_after:.0f}%, reusing it",
            **facts,
        )
    return PretextPlan(
        key=own_key,
        own_key=own_key,
        reused=False,
        reason=f"{grew}: {100 * best.growth:.0f}% > {100 * retrain_after:.0f}%, retraining",
        **facts,
    )


def backbone_candidates(
    workspace: Storage, config: dict[str, Any], image_config_key: str, current_ids: set[str]
) -> list[BackboneCandidate]:
    """Earlier finished pretext stages with the same pretext config, code and image config.

    Their manifests and training-image tables are validated; one that fails is left out (with
    a warning): this run then trains a backbone of its own rather than build on it.
    """
    method, settings = parse_pretext_config(config)
    found = []
    for obj in workspace.list_objects("pretext"):
        parts = obj.key.split("/")
        if len(parts) != 3 or parts[2] != MANIFEST or not re.fullmatch(KEY_PATTERN, parts[1]):
            continue
        key = parts[1]
        try:
            output = stage_output(workspace, "pretext", key)
            if output is None:
                continue
            summary = output.summary
            if (
                summary.get("config_fingerprint") != settings.fingerprint()
                or summary.get("code_version") != keys.code_version(method.key_name)
                or summary.get("image_config_key") != image_config_key
            ):
                continue
            table = workspace.read_table(f"{output.rel_dir}/{TRAIN_IDS}", schema=IMAGE_IDS)
        except WorkspaceFileError as exc:
            logger.warning("%s Not reusing backbone %s.", exc, key[:12])
            continue
        trained = set(table["image_id"].to_pylist())
        kept, new = len(trained & current_ids), len(current_ids - trained)
        found.append(BackboneCandidate(key=key, kept=kept, new=new))
    return found


@task(
    name="plan-pretext",
    cache_policy=NO_CACHE,
    persist_result=False,
)
def plan_pretext(
    workspace_url: str,
    pretext_config: dict[str, Any],
    images_key: str,
    image_config_key: str,
    listing: str,
    retrain_after: float,
    retrain: bool = False,
) -> PretextPlan:
    """The pretext backbone for this lake: its own stage key, or an earlier backbone while the
    lake has grown by at most ``retrain_after`` since it was trained (:func:`choose_backbone`).

    The policy picks an *input*; the pretext stage key itself is a content fingerprint (config,
    images, code) and never depends on ``retrain_after``.
    """
    own = plan_key(pretext_config, images_key)
    workspace = Storage(workspace_url)
    own_exists = workspace.exists(f"pretext/{own}/{MANIFEST}")
    candidates: list[BackboneCandidate] = []
    if not own_exists and not retrain and retrain_after > 0:
        rows = workspace.read_table(listing, columns=["image_id", "reason"], schema=LISTING)
        current = {
            i
            for i, r in zip(rows["image_id"].to_pylist(), rows["reason"].to_pylist(), strict=True)
            if r is None
        }
        candidates = backbone_candidates(workspace, pretext_config, image_config_key, current)
    plan = choose_backbone(own, own_exists, candidates, retrain_after, retrain)
    get_run_logger().info("pretext backbone %s: %s", plan.key[:12], plan.reason)
    return plan
