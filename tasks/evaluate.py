"""Evaluate stage (SCAN step 5): metrics when labels exist, and always sizes, confidences,
prototypes and plots (docs/architecture.md, 'The method')."""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
from prefect import task

from scan_core.config import ImageConfig
from scan_core.data import FASHION_MNIST_CLASSES
from scan_core.evaluation import cluster_sizes, confusion_matrix, evaluate_clustering, kmeans
from scan_core.neighbors import neighbor_purity
from scan_core.plots import (
    plot_cluster_sizes,
    plot_confidence_histogram,
    plot_confusion_matrix,
    plot_embedding_map,
    plot_prototype_grid,
    select_prototypes,
)
from tasks.assign import cluster_ids_of, read_assignments
from tasks.catalog import read_catalog
from tasks.embed import read_embeddings
from tasks.guard import read_partitions
from tasks.lake import first_labels
from tasks.neighbors import read_neighbor_indices
from tasks.pixels import load_pixels
from tasks.stage import STAGE_TASK_OPTIONS, StageOutput, StageRequest, StageRun, run_stage

logger = logging.getLogger(__name__)


def evaluate_fn(
    request: StageRequest,
    assign: StageOutput,
    catalog: StageOutput,
    neighbors: StageOutput,
    embed: StageOutput,
    guard: StageOutput | None = None,
) -> StageOutput:
    """Score the assignments; write ``metrics.json`` and the plots (also to MLflow).

    With labels and a ``guard`` stage, also the ACC of both partitions the guard compared
    (``guard_model_acc``, ``guard_kmeans_acc``), so a benchmark can check its choice.
    """

    def body(run: StageRun) -> dict[str, Any]:
        assignments = read_assignments(run.workspace, assign)
        table = read_catalog(run.workspace, catalog)
        cluster_ids = cluster_ids_of(assign)
        num_clusters = len(cluster_ids)
        # per object (every lake key), aligned with the catalog rows; a stable cluster id's
        # column of the probabilities is its position in cluster_ids
        column = {c: j for j, c in enumerate(cluster_ids)}
        predictions = np.array(
            [column[c] for c in assignments["cluster"].to_pylist()], dtype=np.int64
        )
        confidence = assignments["confidence"].to_numpy()
        probabilities = (
            assignments["probabilities"]
            .combine_chunks()
            .flatten()
            .to_numpy(zero_copy_only=False)
            .astype(np.float32, copy=False)
            .reshape(len(assignments), num_clusters)
        )
        labels = np.array(
            [-1 if v is None else v for v in table["label"].to_pylist()], dtype=np.int64
        )
        sizes = cluster_sizes(predictions, num_clusters)
        metrics: dict[str, float] = {
            "mean_confidence": float(confidence.mean()),
            "empty_clusters": float((sizes == 0).sum()),
            "largest_cluster_fraction": float(sizes.max() / max(sizes.sum(), 1)),
        }
        # per unique image: prototypes, neighbour purity, k-means baseline
        ids, I = read_neighbor_indices(run.workspace, neighbors)  # noqa: E741
        first: dict[str, int] = {}
        for row, image_id in enumerate(assignments["image_id"].to_pylist()):
            first.setdefault(image_id, row)
        unique_rows = np.array([first[i] for i in ids], dtype=np.int64)
        unique_probs = probabilities[unique_rows]
        unique_labels = first_labels(table, ids)
        image_config = ImageConfig.model_validate(catalog.summary["image_config"])
        # only the prototypes' pixels are read: memory does not grow with the lake's pixels
        shown = np.unique(np.concatenate(list(select_prototypes(unique_probs, 8).values())))
        images = load_pixels(
            run.workspace,
            catalog.summary["image_config_key"],
            [ids[r] for r in shown],
            image_config,
        )
        grid = plot_prototype_grid(
            images.numpy(),
            unique_probs[shown],
            sizes=np.bincount(unique_probs.argmax(axis=1), minlength=num_clusters),
        )
        run.write_bytes("prototypes.png", grid, log=True)
        run.write_bytes("cluster_sizes.png", plot_cluster_sizes(sizes), log=True)
        run.write_bytes("confidence.png", plot_confidence_histogram(confidence), log=True)
        embed_ids, vectors = read_embeddings(run.workspace, embed)
        run.write_bytes(
            "embedding_map.png", plot_embedding_map(vectors, unique_probs.argmax(axis=1)), log=True
        )
        has_labels = bool((labels >= 0).any())
        if has_labels:
            scores = evaluate_clustering(
                labels, predictions, probabilities, num_clusters=num_clusters
            )
            metrics.update(scores.as_dict())
            known = unique_labels >= 0
            if known.all():
                metrics["neighbor_purity"] = neighbor_purity(I, unique_labels)
            if known.sum() >= num_clusters:
                baseline = kmeans(vectors[known], num_clusters)
                metrics["kmeans_acc"] = evaluate_clustering(
                    unique_labels[known], baseline, num_clusters=num_clusters
                ).acc
            if guard is not None and known.sum() >= num_clusters:
                parts = read_partitions(run.workspace, guard, ids)
                for name in ("model", "kmeans"):
                    column = parts[f"{name}_cluster"].to_numpy()
                    metrics[f"guard_{name}_acc"] = evaluate_clustering(
                        unique_labels[known], column[known], num_clusters=num_clusters
                    ).acc
            num_classes = int(labels.max()) + 1
            confusion = confusion_matrix(labels, predictions, num_classes, num_clusters, match=True)
            names = (
                list(FASHION_MNIST_CLASSES) if num_classes == len(FASHION_MNIST_CLASSES) else None
            )
            run.write_bytes("confusion.png", plot_confusion_matrix(confusion, names), log=True)
            run.write_json("confusion.json", confusion.tolist())
        run.log_metrics({f"evaluate/{k}": v for k, v in metrics.items()})
        summary = {
            "metrics": metrics,
            "cluster_sizes": sizes.tolist(),
            "cluster_ids": cluster_ids,
            "has_labels": has_labels,
        }
        run.write_json("metrics.json", summary, log=True)
        return summary

    return run_stage(request, body)


@task(name="evaluate", **STAGE_TASK_OPTIONS)
def evaluate(
    request: StageRequest,
    assign: StageOutput,
    catalog: StageOutput,
    neighbors: StageOutput,
    embed: StageOutput,
    guard: StageOutput | None = None,
) -> StageOutput:
    """Evaluate stage task (cached on the evaluate key)."""
    return evaluate_fn(request, assign, catalog, neighbors, embed, guard)
