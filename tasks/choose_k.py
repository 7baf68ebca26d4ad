"""Choose-k stage (``--clusters auto``): pick the number of clusters without labels, after
neighbour mining, from the pretext embeddings and their mined neighbours
(:func:`scan_core.model_selection.choose_num_clusters`, settings in the ``cluster_count``
section). The chosen k feeds the clustering stage; the criteria curves go to MLflow as metrics
with ``step = k`` and as a plot. Each k trains its own heads, so the ks are shards fanned out on
the run's engine (:mod:`tasks.parallel`).
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
from prefect import task

from scan_core.config import ClusterCountConfig
from scan_core.model_selection import choose_num_clusters, score_cluster_count
from scan_core.plots import plot_cluster_count
from tasks.embed import read_embeddings
from tasks.neighbors import read_neighbor_indices
from tasks.parallel import fan_out
from tasks.stage import STAGE_TASK_OPTIONS, StageOutput, StageRequest, StageRun, run_stage
from tasks.storage import Storage

CURVES_FILE = "cluster_count.json"
PLOT_FILE = "cluster_count.png"


_inputs: dict[tuple[str, str, str], tuple[np.ndarray, np.ndarray]] = {}


def _vectors_and_neighbors(
    workspace: Storage, embed: StageOutput, neighbors: StageOutput
) -> tuple[np.ndarray, np.ndarray]:
    """The embeddings in the neighbour table's row order and the neighbour indices, read once
    per process (each worker scoring several ks reads them once)."""
    key = (workspace.url, embed.rel_dir, neighbors.rel_dir)
    if key not in _inputs:
        ids, vectors = read_embeddings(workspace, embed)
        neighbor_ids, I = read_neighbor_indices(workspace, neighbors)  # noqa: E741
        if neighbor_ids != ids:  # both are in sorted unique-id order; align if ever not
            row = {image_id: r for r, image_id in enumerate(ids)}
            order = np.array([row[i] for i in neighbor_ids], dtype=np.int64)
            vectors = vectors[order]
        _inputs.clear()
        _inputs[key] = (vectors, I)
    return _inputs[key]


@task(name="score-k", **STAGE_TASK_OPTIONS)
def score_k(
    shard: int,
    workspace: str,
    embed: StageOutput,
    neighbors: StageOutput,
    config: dict[str, Any],
) -> dict[str, Any]:
    """Train and score the heads of one k
    (:func:`scan_core.model_selection.score_cluster_count`)."""
    vectors, I = _vectors_and_neighbors(Storage(workspace), embed, neighbors)  # noqa: E741
    criteria, prediction = score_cluster_count(
        vectors, I, shard, ClusterCountConfig.model_validate(config)
    )
    return {"pid": os.getpid(), "criteria": criteria, "prediction": prediction}


@task(name="choose_k", **STAGE_TASK_OPTIONS)
def choose_k(request: StageRequest, embed: StageOutput, neighbors: StageOutput) -> StageOutput:
    """Score every k of ``cluster_count.k_min .. k_max`` (one k per shard, fanned out on the
    run's engine) and choose one; write the curves (``cluster_count.json``) and their plot
    (``cluster_count.png``), both also to MLflow."""

    def body(run: StageRun) -> dict[str, Any]:
        config = ClusterCountConfig.model_validate(request.config)
        vectors, I = _vectors_and_neighbors(run.workspace, embed, neighbors)  # noqa: E741

        def scorer(ks: list[int]) -> list[tuple[dict[str, float], np.ndarray]]:
            scored = fan_out(
                score_k,
                ks,
                stage="choose_k",
                note="cluster counts",
                workspace=run.workspace.url,
                embed=embed,
                neighbors=neighbors,
                config=request.config,
            )
            return [(s["criteria"], s["prediction"]) for s in scored]

        result = choose_num_clusters(vectors, I, config, scorer)
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
        return {**curves, "plot": PLOT_FILE, "images": len(vectors)}

    return run_stage(request, body)
