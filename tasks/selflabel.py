"""Self-labeling stage (SCAN step 4): fine-tune on confident predictions."""

from __future__ import annotations

from typing import Any

from prefect import task

from scan_core.config import ImageConfig, SelfLabelConfig
from scan_core.selflabel import NoConfidentSamplesError, train_selflabel
from tasks import checkpoints
from tasks.catalog import read_catalog
from tasks.errors import ScanLakeError
from tasks.lake import unique_ids
from tasks.pixels import load_pixels
from tasks.stage import STAGE_TASK_OPTIONS, StageOutput, StageRequest, StageRun, run_stage


def selflabel_fn(request: StageRequest, scan: StageOutput, catalog: StageOutput) -> StageOutput:
    """Self-label the SCAN model; save the fine-tuned model.

    Raises:
        ScanLakeError: no image passes the confidence threshold (the sentence says what to do).
    """

    def body(run: StageRun) -> dict[str, Any]:
        config = SelfLabelConfig.model_validate(request.config)
        image_config = ImageConfig.model_validate(catalog.summary["image_config"])
        ids = unique_ids(read_catalog(run.workspace, catalog))
        images = load_pixels(run.workspace, catalog.summary["image_config_key"], ids, image_config)
        model = checkpoints.load_clustering_model(run.workspace, scan.rel_dir)
        try:
            result = train_selflabel(images, model, config, progress=run.on_epoch)
        except NoConfidentSamplesError as exc:
            raise ScanLakeError(str(exc)) from exc
        run.write_bytes(checkpoints.CHECKPOINT, checkpoints.state_bytes(result.model), log=True)
        description = checkpoints.read_clustering_description(run.workspace, scan.rel_dir)
        run.write_json(checkpoints.DESCRIPTION, description.model_dump(exclude_none=True), log=True)
        return {
            "epochs": len(result.history),
            "confident_start": result.confident_counts[0],
            "confident_best": max(result.confident_counts),
            "images": len(ids),
        }

    return run_stage(request, body)


@task(name="selflabel", **STAGE_TASK_OPTIONS)
def selflabel(request: StageRequest, scan: StageOutput, catalog: StageOutput) -> StageOutput:
    """Self-labeling stage task (cached on the selflabel key)."""
    return selflabel_fn(request, scan, catalog)
