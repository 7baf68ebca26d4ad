"""SCAN stage (SCAN step 3): train the cluster heads on the mined neighbours, from the pretext
backbone (cold) or from the previous run's model (warm start, DESIGN.md §2 "Growing lakes")."""

from __future__ import annotations

from typing import Any

from prefect import task

from scan_core.clustering import train_scan
from scan_core.config import ImageConfig, ScanConfig
from tasks import checkpoints
from tasks.errors import ScanLakeError
from tasks.neighbors import read_neighbor_indices
from tasks.pixels import load_pixels
from tasks.stage import STAGE_TASK_OPTIONS, StageOutput, StageRequest, StageRun, run_stage


def scan_fn(
    request: StageRequest,
    pretext: StageOutput,
    neighbors: StageOutput,
    catalog: StageOutput,
    init: StageOutput | None = None,
) -> StageOutput:
    """Train SCAN from the pretext backbone, or from the clustering model of ``init`` (a warm
    start; its key is part of the stage key); save the one-head clustering model.

    Raises:
        ScanLakeError: the warm-start model has another number of clusters.
    """

    def body(run: StageRun) -> dict[str, Any]:
        config = ScanConfig.model_validate(request.config)
        image_config = ImageConfig.model_validate(catalog.summary["image_config"])
        ids, I = read_neighbor_indices(run.workspace, neighbors)  # noqa: E741
        images = load_pixels(run.workspace, catalog.summary["image_config_key"], ids, image_config)
        backbone = checkpoints.load_pretext_model(run.workspace, pretext.rel_dir).backbone
        init_model = None
        if init is not None:
            init_model = checkpoints.load_clustering_model(run.workspace, init.rel_dir)
            if init_model.num_clusters != config.num_clusters:
                raise ScanLakeError(
                    f"The warm-start model {init.key[:12]} has {init_model.num_clusters} "
                    f"clusters, not {config.num_clusters}: set growth.warm_start=false."
                )
        result = train_scan(
            images, I, backbone, config, progress=run.on_epoch, init_model=init_model
        )
        run.write_bytes(checkpoints.CHECKPOINT, checkpoints.state_bytes(result.model), log=True)
        run.write_json(
            checkpoints.DESCRIPTION,
            checkpoints.clustering_description(
                pretext.summary["backbone"], image_config.channels, config.num_clusters
            ),
            log=True,
        )
        losses = {f"scan/head_{i}_val_loss": v for i, v in enumerate(result.head_losses)}
        run.log_metrics({**losses, "scan/best_head": float(result.best_head)})
        final = result.history[-1].metrics if result.history else {}
        return {
            "best_head": result.best_head,
            "val_loss": result.head_losses[result.best_head],
            "final_loss": final.get("loss"),
            "epochs": len(result.history),
            "num_clusters": config.num_clusters,
            "start": "cold" if init is None else "warm",
            "warm_from": None if init is None else init.key,
        }

    return run_stage(request, body)


@task(name="scan", **STAGE_TASK_OPTIONS)
def scan(
    request: StageRequest,
    pretext: StageOutput,
    neighbors: StageOutput,
    catalog: StageOutput,
    init: StageOutput | None = None,
) -> StageOutput:
    """SCAN stage task (cached on the scan key)."""
    return scan_fn(request, pretext, neighbors, catalog, init)
