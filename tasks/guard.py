"""Guard stage: never hand out clusters worse than K-means on the run's own pretext embeddings
without saying so.

The trained model's partition (SCAN's, or step 4's, or another method's) and K-means on the embed
stage's vectors are compared without labels (:func:`scan_core.guard.compare_partitions`: modularity
on the kNN graphs of the embeddings and of the raw pixels). The stage saves the kept one as a
one-head clustering model (the trained model's checkpoint as it is, or K-means' nearest-centroid
model), so assign, evaluate and the registry treat both alike, and its summary says which was kept
and why.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa
import torch
from prefect import task

from scan_core.config import GuardConfig, ImageConfig, KMeansConfig
from scan_core.guard import compare_partitions, pixel_neighbors
from scan_core.inference import predict_probabilities
from scan_core.kmeans import fit_kmeans
from tasks import checkpoints
from tasks.clustering import save_kmeans_model
from tasks.embed import read_embeddings
from tasks.errors import ScanLakeError
from tasks.neighbors import read_neighbor_indices
from tasks.pixels import load_pixels
from tasks.schemas import PARTITIONS
from tasks.stage import STAGE_TASK_OPTIONS, StageOutput, StageRequest, StageRun, run_stage
from tasks.storage import Storage


def neighbour_graphs(neighbors: np.ndarray, images: torch.Tensor) -> dict[str, np.ndarray]:
    """The two graphs partitions are scored on (:mod:`scan_core.guard`): the mined neighbours
    of the pretext embeddings and as many neighbours by raw pixels."""
    return {"embedding": neighbors, "pixels": pixel_neighbors(images.numpy(), neighbors.shape[1])}


#: Both partitions, per unique image (columns image_id, model_cluster, kmeans_cluster).
PARTITIONS_FILE = "partitions.parquet"


def read_partitions(workspace: Storage, guard: StageOutput, ids: list[str]) -> pa.Table:
    """The guard stage's two partitions of the images ``ids`` (in that order).

    Raises:
        WorkspaceFileError: the file is not the guard's table, holds other images, or a cluster
            outside ``0 .. k-1`` of the stage's ``k`` clusters.
    """
    rel = f"{guard.rel_dir}/{PARTITIONS_FILE}"
    table = workspace.read_table(rel, schema=PARTITIONS)
    if table["image_id"].to_pylist() != ids:
        raise workspace.bad_file(rel, "holds other images than the run's neighbours")
    k = int(guard.summary["num_clusters"])
    for name in ("model_cluster", "kmeans_cluster"):
        values = table[name].to_numpy(zero_copy_only=False)
        if values.size and (values.min() < 0 or values.max() >= k):
            raise workspace.bad_file(rel, f"assigns clusters outside the stage's {k}")
    return table


#: The criterion the guard compares partitions with (recorded in summaries and tags).
CRITERION = "knn_modularity"


@task(name="guard", **STAGE_TASK_OPTIONS)
def guard(
    request: StageRequest,
    model: StageOutput,
    pretext: StageOutput,
    embed: StageOutput,
    neighbors: StageOutput,
    catalog: StageOutput,
) -> StageOutput:
    """Compare the model's clusters with K-means on the embeddings; keep the better one.

    ``request.config``: ``guard`` (:class:`GuardConfig`), ``kmeans`` (:class:`KMeansConfig`)
    and ``device``.
    """

    def body(run: StageRun) -> dict[str, Any]:
        settings = GuardConfig.model_validate(request.config["guard"])
        km_settings = KMeansConfig.model_validate(request.config["kmeans"])
        ids, I = read_neighbor_indices(run.workspace, neighbors)  # noqa: E741
        embed_ids, vectors = read_embeddings(run.workspace, embed)
        if embed_ids != ids:
            raise ScanLakeError(
                f"The embeddings of stage {embed.key[:12]} and the neighbours of stage "
                f"{neighbors.key[:12]} list different images: point --workspace at a fresh "
                "folder to recompute them."
            )
        image_config = ImageConfig.model_validate(catalog.summary["image_config"])
        images = load_pixels(run.workspace, catalog.summary["image_config_key"], ids, image_config)
        network = checkpoints.load_clustering_model(run.workspace, model.rel_dir)
        probabilities = predict_probabilities(
            network, images, device=str(request.config.get("device", "auto")), progress=None
        )
        k = probabilities.shape[1]
        kmeans = fit_kmeans(vectors, k, km_settings)
        decision = compare_partitions(
            probabilities.argmax(axis=1),
            kmeans.predictions,
            neighbour_graphs(I, images),
            k,
            settings.margin,
        )
        run.write_table(
            PARTITIONS_FILE,
            pa.table(
                {
                    "image_id": ids,
                    "model_cluster": pa.array(probabilities.argmax(axis=1), pa.int32()),
                    "kmeans_cluster": pa.array(kmeans.predictions, pa.int32()),
                },
                schema=PARTITIONS,
            ),
        )
        if decision.kept == "kmeans":
            save_kmeans_model(run, kmeans, km_settings.temperature, pretext, catalog)
        else:
            for name in (checkpoints.CHECKPOINT, checkpoints.DESCRIPTION):
                run.write_bytes(name, run.workspace.read_bytes(f"{model.rel_dir}/{name}"))
        run.log_metrics(
            {
                **{f"guard/model_{k}": v for k, v in decision.model.as_dict().items()},
                **{f"guard/kmeans_{k}": v for k, v in decision.kmeans.as_dict().items()},
                "guard/kept_kmeans": float(decision.kept == "kmeans"),
            }
        )
        return {
            "kept": decision.kept,
            "num_clusters": int(k),
            "criterion": CRITERION,
            "model_score": decision.model.modularity,
            "kmeans_score": decision.kmeans.modularity,
            "margin": decision.margin,
            "reason": decision.reason,
            "model_stage": model.stage,
            "scores": {
                "model": decision.model.as_dict(),
                "kmeans": decision.kmeans.as_dict(),
            },
        }

    return run_stage(request, body)
