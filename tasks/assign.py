"""Assign stage: cluster probabilities of every image, joined back to every lake object; the final
model is logged to MLflow and registered."""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa
from prefect import task

from scan_core.config import ImageConfig
from scan_core.inference import predict_probabilities
from scan_core.transforms import IdentityTransform
from tasks import checkpoints, tracking
from tasks.catalog import read_catalog
from tasks.lake import unique_ids
from tasks.pixels import load_pixels
from tasks.schemas import ASSIGNMENTS
from tasks.stage import STAGE_TASK_OPTIONS, StageOutput, StageRequest, StageRun, run_stage
from tasks.storage import Storage

ASSIGNMENTS_FILE = "assignments.parquet"


def read_assignments(workspace: Storage, assign: StageOutput) -> pa.Table:
    """The assignments table (one row per lake object)."""
    return workspace.read_table(f"{assign.rel_dir}/{ASSIGNMENTS_FILE}")


def assign_fn(request: StageRequest, model: StageOutput, catalog: StageOutput) -> StageOutput:
    """Predict clusters with the final model (selflabel's, or scan's when self-labeling is off).

    ``request.config``: ``device``, ``batch_size`` and ``registered_model`` (name to register the
    model under; empty to skip registration).
    """

    def body(run: StageRun) -> dict[str, Any]:
        image_config = ImageConfig.model_validate(catalog.summary["image_config"])
        table = read_catalog(run.workspace, catalog)
        ids = unique_ids(table)
        images = load_pixels(run.workspace, catalog.summary["image_config_key"], ids, image_config)
        network = checkpoints.load_clustering_model(run.workspace, model.rel_dir)
        probabilities = predict_probabilities(
            network,
            images,
            batch_size=int(request.config.get("batch_size", 1024)),
            device=str(request.config.get("device", "auto")),
            progress=run.on_batch,
        )
        position = {image_id: i for i, image_id in enumerate(ids)}
        rows = np.array([position[i] for i in table["image_id"].to_pylist()], dtype=np.int64)
        per_object = probabilities[rows]
        num_clusters = probabilities.shape[1]
        values = pa.FixedSizeListArray.from_arrays(
            pa.array(per_object.reshape(-1).astype(np.float32)), num_clusters
        ).cast(pa.list_(pa.float32()))
        assignments = pa.table(
            {
                "image_id": table["image_id"],
                "uri": table["uri"],
                "cluster": pa.array(per_object.argmax(axis=1).astype(np.int32)),
                "confidence": pa.array(per_object.max(axis=1).astype(np.float32)),
                "probabilities": values,
            },
            schema=ASSIGNMENTS,
        )
        run.write_table(ASSIGNMENTS_FILE, assignments)
        sizes = np.bincount(per_object.argmax(axis=1), minlength=num_clusters)
        summary: dict[str, Any] = {
            "objects": len(rows),
            "images": len(ids),
            "cluster_sizes": sizes.tolist(),
            "mean_confidence": float(per_object.max(axis=1).mean()),
            "model_stage": model.stage,
        }
        run.log_metrics(
            {
                "assign/mean_confidence": summary["mean_confidence"],
                "assign/empty_clusters": float((sizes == 0).sum()),
            }
        )
        name = str(request.config.get("registered_model") or "")
        if name and request.tracking is not None and run.run_id is not None:
            example = IdentityTransform()(images[:2]).numpy()  # the model's input
            summary["registered_model"] = name
            summary["model_version"] = tracking.log_and_register_model(
                request.tracking, run.run_id, network, example, name
            )
        return summary

    return run_stage(request, body)


@task(name="assign", **STAGE_TASK_OPTIONS)
def assign(request: StageRequest, model: StageOutput, catalog: StageOutput) -> StageOutput:
    """Assign stage task (cached on the assign key)."""
    return assign_fn(request, model, catalog)
