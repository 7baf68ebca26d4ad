"""Choose-k stage (``--clusters auto``): pick the number of clusters without labels, after
neighbour mining, from the pretext embeddings and their mined neighbours
(:func:`scan_core.model_selection.choose_num_clusters`, settings in the ``cluster_count``
section). The chosen k feeds the clustering stage; the criteria curves go to MLflow as metrics
with ``step = k`` and as a plot.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from prefect import task

from scan_core.config import ClusterCountConfig
from scan_core.model_selection import choose_num_clusters
from scan_core.plots import plot_cluster_count
from tasks.embed import read_embeddings
from tasks.neighbors import read_neighbor_indices
from tasks.stage import STAGE_TASK_OPTIONS, StageOutput, StageRequest, StageRun, run_stage

CURVES_FILE = "cluster_count.json"
PLOT_FILE = "cluster_count.png"


def choose_k_fn(request: StageRequest, embed: StageOutput, neighbors: StageOutput) -> StageOutput:
    """Score every k of ``cluster_count.k_min .. k_max`` and choose one; write the curves
    (``cluster_count.json``) and their plot (``cluster_count.png``), both also to MLflow."""

    def body(run: StageRun) -> dict[str, Any]:
        config = ClusterCountConfig.model_validate(request.config)
        ids, vectors = read_embeddings(run.workspace, embed)
        neighbor_ids, I = read_neighbor_indices(run.workspace, neighbors)  # noqa: E741
        if neighbor_ids != ids:  # both are in sorted unique-id order; align if ever not
            row = {image_id: r for r, image_id in enumerate(ids)}
            order = np.array([row[i] for i in neighbor_ids], dtype=np.int64)
            vectors = vectors[order]
        result = choose_num_clusters(vectors, I, config)
        for i, k in enumerate(result.ks):
            run.log_metrics(
                {f"choose_k/{name}": values[i] for name, values in result.criteria.items()}, step=k
            )
        run.log_metrics({"choose_k/chosen_k": float(result.chosen_k)})
        png = plot_cluster_count(result.ks, result.criteria, result.criterion, result.chosen_k)
        run.write_bytes(PLOT_FILE, png, log=True)
        curves = {
            "ks": result.ks,
            "criteria": result.criteria,
            "criterion": result.criterion,
            "chosen_k": result.chosen_k,
            "explanation": result.explanation,
        }
        run.write_json(CURVES_FILE, curves, log=True)
        return {**curves, "plot": PLOT_FILE, "images": len(ids)}

    return run_stage(request, body)


@task(name="choose_k", **STAGE_TASK_OPTIONS)
def choose_k(request: StageRequest, embed: StageOutput, neighbors: StageOutput) -> StageOutput:
    """Choose-k stage task (cached on its key: the cluster_count settings and the neighbours)."""
    return choose_k_fn(request, embed, neighbors)
