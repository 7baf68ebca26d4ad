"""Pretext stage (SCAN step 1): train the representation on the catalog's unique images.

Growing lakes reuse a backbone (DESIGN.md §2): :func:`find_reusable_pretext` picks an earlier
pretext stage with the same config and code whose training images still make up most of the lake.
"""

from __future__ import annotations

import logging
from typing import Any

import pyarrow as pa
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from scan_core.config import ImageConfig, PretextConfig
from scan_core.pretext import train_pretext
from tasks import checkpoints, keys
from tasks.catalog import read_catalog
from tasks.lake import unique_ids
from tasks.pixels import load_pixels
from tasks.schemas import IMAGE_IDS
from tasks.stage import (
    MANIFEST,
    STAGE_TASK_OPTIONS,
    StageOutput,
    StageRequest,
    StageRun,
    committed_dir,
    run_stage,
)
from tasks.storage import Storage

logger = logging.getLogger(__name__)

TRAIN_IDS = "train_ids.parquet"


def pretext_fn(request: StageRequest, catalog: StageOutput) -> StageOutput:
    """Train the pretext model on the unique images of ``catalog``; save the checkpoint."""

    def body(run: StageRun) -> dict[str, Any]:
        config = PretextConfig.model_validate(request.config)
        image_config = ImageConfig.model_validate(catalog.summary["image_config"])
        ids = unique_ids(read_catalog(run.workspace, catalog))
        images = load_pixels(run.workspace, catalog.summary["image_config_key"], ids, image_config)
        result = train_pretext(images, config, progress=run.on_epoch)
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
            "backbone": config.backbone,
            "config_fingerprint": config.fingerprint(),
            "image_config_key": catalog.summary["image_config_key"],
            "code_version": keys.code_version("pretext"),
        }

    return run_stage(request, body)


@task(name="pretext", **STAGE_TASK_OPTIONS)
def pretext(request: StageRequest, catalog: StageOutput) -> StageOutput:
    """Pretext stage task (cached on the pretext key)."""
    return pretext_fn(request, catalog)


def find_reusable_pretext(
    workspace: Storage,
    config: PretextConfig,
    image_config_key: str,
    current_ids: set[str],
    max_growth: float,
) -> tuple[str, int] | None:
    """An earlier finished pretext stage to reuse for a lake that grew a little.

    A candidate has the same pretext config, code version and image config, and the images it was
    not trained on are at most ``max_growth`` times the images it was trained on that are still in
    the lake. The candidate with the most such images wins.

    Returns:
        ``(stage key, new images)`` or None.
    """
    if max_growth <= 0:
        return None
    best: tuple[int, str, int] | None = None
    for obj in workspace.list_objects("pretext"):
        if not obj.key.endswith(f"/{MANIFEST}"):
            continue
        key = obj.key.split("/")[1]
        manifest = workspace.read_json(obj.key)
        summary = manifest.get("summary", {})
        if (
            summary.get("config_fingerprint") != config.fingerprint()
            or summary.get("code_version") != keys.code_version("pretext")
            or summary.get("image_config_key") != image_config_key
        ):
            continue
        files = committed_dir(f"pretext/{key}", manifest)
        trained = set(workspace.read_table(f"{files}/{TRAIN_IDS}")["image_id"].to_pylist())
        kept = len(trained & current_ids)
        new = len(current_ids - trained)
        if kept and new <= max_growth * kept and (best is None or kept > best[0]):
            best = (kept, key, new)
    if best is None:
        return None
    logger.info("reusing pretext %s: %d new images on %d trained", best[1][:12], best[2], best[0])
    return best[1], best[2]


@task(
    name="plan-pretext",
    retries=2,
    retry_delay_seconds=[2, 10],
    cache_policy=NO_CACHE,
    persist_result=False,
)
def plan_pretext(
    workspace_url: str,
    pretext_config: dict[str, Any],
    images_key: str,
    image_config_key: str,
    listing: str,
    max_growth: float,
) -> str:
    """The pretext stage key for this lake: its own, or a reusable earlier one when the lake only
    grew a little (see :func:`find_reusable_pretext`)."""
    config = PretextConfig.model_validate(pretext_config)
    own = keys.stage_key("pretext", config.fingerprint(), {"images": images_key})
    workspace = Storage(workspace_url)
    if workspace.exists(f"pretext/{own}/{MANIFEST}"):
        return own
    rows = workspace.read_table(listing, columns=["image_id", "reason"])
    current = {
        i
        for i, r in zip(rows["image_id"].to_pylist(), rows["reason"].to_pylist(), strict=True)
        if r is None
    }
    found = find_reusable_pretext(workspace, config, image_config_key, current, max_growth)
    if found is None:
        return own
    get_run_logger().info(
        "reusing pretext backbone %s (%d new images are within the %.0f%% growth allowance)",
        found[0][:12],
        found[1],
        100 * max_growth,
    )
    return found[0]
