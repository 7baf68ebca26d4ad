"""Evaluate stage (SCAN step 5): metrics when labels exist, and always sizes, confidences,
prototypes and plots (docs/architecture.md, 'The method')."""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import pyarrow as pa
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


def _per_object(
    assignments: pa.Table, table: pa.Table, cluster_ids: list[int]
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per object (every lake key, aligned with the catalog rows): the cluster column (a stable
    cluster id's column is its position in ``cluster_ids``), the confidence, the probabilities
    ``(objects, k)`` and the label (``-1`` unknown)."""
    column = {c: j for j, c in enumerate(cluster_ids)}
    predictions = np.array([column[c] for c in assignments["cluster"].to_pylist()], dtype=np.int64)
    probabilities = (
        assignments["probabilities"]
        .combine_chunks()
        .flatten()
        .to_numpy(zero_copy_only=False)
        .astype(np.float32, copy=False)
        .reshape(len(assignments), len(cluster_ids))
    )
    labels = np.array([-1 if v is None else v for v in table["label"].to_pylist()], dtype=np.int64)
    return predictions, assignments["confidence"].to_numpy(), probabilities, labels


def _plots(
    run: StageRun,
    catalog: StageOutput,
    ids: list[str],
    unique_probs: np.ndarray,
    vectors: np.ndarray,
) -> None:
    """Prototypes (only their pixels are read), cluster sizes, confidences, embedding map."""
    image_config = ImageConfig.model_validate(catalog.summary["image_config"])
    shown = np.unique(np.concatenate(list(select_prototypes(unique_probs, 8).values())))
    images = load_pixels(
        run.workspace, catalog.summary["image_config_key"], [ids[r] for r in shown], image_config
    )
    sizes = np.bincount(unique_probs.argmax(axis=1), minlength=unique_probs.shape[1])
    grid = plot_prototype_grid(images.numpy(), unique_probs[shown], sizes=sizes)
    run.write_bytes("prototypes.png", grid, log=True)
    run.write_bytes(
        "embedding_map.png", plot_embedding_map(vectors, unique_probs.argmax(axis=1)), log=True
    )


def _label_metrics(
    run: StageRun,
    per_object: tuple[np.ndarray, np.ndarray, np.ndarray],
    unique: tuple[np.ndarray, np.ndarray, np.ndarray],
    partitions: pa.Table | None,
    num_clusters: int,
) -> dict[str, float]:
    """With labels: ACC, NMI, ARI and top-5 of the objects, neighbour purity, the K-means
    baseline, both guard partitions' ACC; the confusion matrix (plot and JSON)."""
    labels, predictions, probabilities = per_object
    unique_labels, I, vectors = unique  # noqa: E741
    metrics = evaluate_clustering(
        labels, predictions, probabilities, num_clusters=num_clusters
    ).as_dict()
    known = unique_labels >= 0
    if known.all():
        metrics["neighbor_purity"] = neighbor_purity(I, unique_labels)
    if known.sum() >= num_clusters:
        baseline = kmeans(vectors[known], num_clusters)
        metrics["kmeans_acc"] = evaluate_clustering(
            unique_labels[known], baseline, num_clusters=num_clusters
        ).acc
        for name in ("model", "kmeans"):
            if partitions is not None:
                column = partitions[f"{name}_cluster"].to_numpy()
                metrics[f"guard_{name}_acc"] = evaluate_clustering(
                    unique_labels[known], column[known], num_clusters=num_clusters
                ).acc
    num_classes = int(labels.max()) + 1
    confusion = confusion_matrix(labels, predictions, num_classes, num_clusters, match=True)
    names = list(FASHION_MNIST_CLASSES) if num_classes == len(FASHION_MNIST_CLASSES) else None
    run.write_bytes("confusion.png", plot_confusion_matrix(confusion, names), log=True)
    run.write_json("confusion.json", confusion.tolist())
    return metrics


@task(name="evaluate", **STAGE_TASK_OPTIONS)
def evaluate(
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
        predictions, confidence, probabilities, labels = _per_object(
            assignments, table, cluster_ids
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
        unique_probs = probabilities[np.array([first[i] for i in ids], dtype=np.int64)]
        _, vectors = read_embeddings(run.workspace, embed)
        _plots(run, catalog, ids, unique_probs, vectors)
        run.write_bytes("cluster_sizes.png", plot_cluster_sizes(sizes), log=True)
        run.write_bytes("confidence.png", plot_confidence_histogram(confidence), log=True)
        has_labels = bool((labels >= 0).any())
        if has_labels:
            parts = read_partitions(run.workspace, guard, ids) if guard is not None else None
            metrics.update(
                _label_metrics(
                    run,
                    (labels, predictions, probabilities),
                    (first_labels(table, ids), I, vectors),
                    parts,
                    num_clusters,
                )
            )
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
