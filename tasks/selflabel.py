"""Step 4 stage (SCAN's self-labeling, or SPICE's reliable pseudo-labels): fine-tune the SCAN
model on its own pseudo-labels, never at the cost of the run.

- Too few confident images: the step is skipped, with the reason in the summary; the flow keeps
  the SCAN model (the official code stops with an error there).
- With ``keep_only_if_better`` (default) the fine-tuned model is kept only when its clusters score
  a higher kNN modularity than the SCAN model's (:mod:`scan_core.guard`, the guard's criterion):
  the summary's ``kept`` says which, and why.
"""

from __future__ import annotations

from typing import Any

from prefect import task

from scan_core.config import ImageConfig, SelfLabelConfig
from scan_core.guard import score_partition
from scan_core.inference import predict_probabilities
from scan_core.selflabel import NoConfidentSamplesError, train_selflabel
from tasks import checkpoints
from tasks.guard import neighbour_graphs
from tasks.neighbors import read_neighbor_indices
from tasks.pixels import load_pixels
from tasks.stage import STAGE_TASK_OPTIONS, StageOutput, StageRequest, StageRun, run_stage


@task(name="selflabel", **STAGE_TASK_OPTIONS)
def selflabel(
    request: StageRequest, scan: StageOutput, catalog: StageOutput, neighbors: StageOutput
) -> StageOutput:
    """Fine-tune the SCAN model on its pseudo-labels; save it; say whether to keep it."""

    def body(run: StageRun) -> dict[str, Any]:
        config = SelfLabelConfig.model_validate(request.config)
        image_config = ImageConfig.model_validate(catalog.summary["image_config"])
        ids, I = read_neighbor_indices(run.workspace, neighbors)  # noqa: E741
        images = load_pixels(run.workspace, catalog.summary["image_config_key"], ids, image_config)
        model = checkpoints.load_clustering_model(run.workspace, scan.rel_dir)
        try:
            result = train_selflabel(images, model, config, progress=run.on_epoch, neighbors=I)
        except NoConfidentSamplesError as exc:
            reason = f"skipped: {exc}; the SCAN clusters stand"
            run.log_metrics({"selflabel/skipped": 1.0})
            return {"skipped": reason, "kept": False, "reason": reason, "images": len(ids)}
        run.write_bytes(checkpoints.CHECKPOINT, checkpoints.state_bytes(result.model), log=True)
        description = checkpoints.read_clustering_description(run.workspace, scan.rel_dir)
        run.write_json(checkpoints.DESCRIPTION, description.model_dump(exclude_none=True), log=True)
        k, device, graphs = model.num_clusters, config.device, neighbour_graphs(I, images)
        before = score_partition(
            predict_probabilities(model, images, device=device).argmax(axis=1), graphs, k
        )
        after = score_partition(
            predict_probabilities(result.model, images, device=device).argmax(axis=1), graphs, k
        )
        better = after.modularity > before.modularity
        kept = better or not config.keep_only_if_better
        reason = (
            f"kNN modularity {after.modularity:.4f} after step 4 against "
            f"{before.modularity:.4f} before: "
            + ("its model is kept" if kept else "the SCAN model is kept (step 4 did not help)")
        )
        run.log_metrics(
            {
                "selflabel/modularity_before": before.modularity,
                "selflabel/modularity_after": after.modularity,
                "selflabel/kept": float(kept),
            }
        )
        return {
            "epochs": len(result.history),
            "confident_start": result.confident_counts[0],
            "confident_best": max(result.confident_counts),
            "images": len(ids),
            "kept": kept,
            "reason": reason,
            "modularity_before": before.modularity,
            "modularity_after": after.modularity,
        }

    return run_stage(request, body)
