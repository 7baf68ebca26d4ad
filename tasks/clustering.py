"""Clustering stage (SCAN step 3 and its alternatives; the stage keeps the name ``scan``).

``clustering.method`` picks the registry entry (:data:`scan_core.methods.CLUSTERING`) that trains;
the methods share the stages and differ in the losses plugged into them (docs/architecture.md,
'Methods'):

- ``scan`` (default): SCAN heads on the mined neighbours, from the pretext backbone (cold) or
  from the previous run's model (warm start, docs/architecture.md, 'Growing lakes');
- ``twostage``: Han et al.'s stage 2, IIC + ``L_cp`` with Norm-FC heads on the pretext embedding
  (the pretext model's embedding head is refined; RotNet and BYOL have none, so a fresh one is
  trained);
- ``iic``: IIC on its authors' recipe (light/heavy views, an overclustering head alternated with
  the main one), linear heads on the pretext backbone;
- ``kmeans``: K-means centroids on the embed stage's embeddings, as a nearest-centroid head on the
  pretext embedding network.

Every method saves a one-head :class:`~scan_core.models.ClusteringModel` with a description
(:mod:`tasks.checkpoints`), so assign, evaluate and the model registry need not know which method
made it. The stage config of ``scan`` is the ``scan`` section as before (same keys); the other
methods' configs carry ``method`` and their keys are computed under the method's name
(:func:`clustering_key`).
"""

from __future__ import annotations

from typing import Any

from prefect import task
from pydantic import ValidationError
from torch import nn

from scan_core.config import ImageConfig, PipelineConfig, StageConfig
from scan_core.kmeans import KMeansResult, build_kmeans_model
from scan_core.methods import (
    ClusteringData,
    ClusteringMethod,
    clustering_method,
    clustering_method_of,
)
from scan_core.models import ClusteringModel
from scan_core.twostage import EmbeddingBackbone
from tasks import checkpoints, keys
from tasks.catalog import read_catalog
from tasks.embed import read_embeddings
from tasks.errors import ScanLakeError
from tasks.lake import unique_ids
from tasks.neighbors import read_neighbor_indices
from tasks.pixels import load_pixels
from tasks.stage import STAGE_TASK_OPTIONS, StageOutput, StageRequest, StageRun, run_stage


def method_settings(config: PipelineConfig, num_clusters: int) -> StageConfig:
    """The settings of ``clustering.method`` for ``num_clusters`` clusters.

    Raises:
        ScanLakeError: the method's settings do not fit ``num_clusters`` (two-stage
            ``overcluster``).
    """
    method = clustering_method(config.clustering.method)
    try:
        return method.settings_for(config, num_clusters)
    except ValidationError as exc:
        raise ScanLakeError(
            f"{method.name} settings do not fit {num_clusters} clusters "
            f"({exc.errors()[0]['msg']}): fix the {method.name} section."
        ) from exc


def stage_config(config: PipelineConfig, num_clusters: int) -> dict[str, Any]:
    """The clustering stage config of ``clustering.method`` for ``num_clusters`` clusters (a warm
    SCAN start adjusts SCAN's, :func:`tasks.history.warm_scan_config`)."""
    method = clustering_method(config.clustering.method)
    return method.stage_config(method_settings(config, num_clusters))


def clustering_key(config: dict[str, Any], inputs: dict[str, str]) -> str:
    """The stage key of a clustering stage config, under its method's name (SCAN's is ``scan``,
    as it always was)."""
    method = clustering_method_of(config)
    return keys.stage_key(method.name, method.parse(config).fingerprint(), inputs)


def _data(
    run: StageRun,
    method: ClusteringMethod,
    pretext: StageOutput,
    neighbors: StageOutput,
    catalog: StageOutput,
    init: StageOutput | None,
    embed: StageOutput | None,
) -> ClusteringData:
    """Load what ``method`` reads (its ``needs``)."""
    pretext_model = checkpoints.load_pretext_model(run.workspace, pretext.rel_dir)
    data: dict[str, Any] = {"pretext": pretext_model}
    if "neighbors" in method.needs:
        ids, data["neighbors"] = read_neighbor_indices(run.workspace, neighbors)
    else:
        ids = unique_ids(read_catalog(run.workspace, catalog))
    if "images" in method.needs:
        image_config = ImageConfig.model_validate(catalog.summary["image_config"])
        key = catalog.summary["image_config_key"]
        data["images"] = load_pixels(run.workspace, key, ids, image_config)
    if "embeddings" in method.needs:
        if embed is None:
            raise ValueError(f"the {method.name} clustering stage needs the embed stage's output")
        data["embeddings"] = read_embeddings(run.workspace, embed)[1]
    if init is not None:
        data["init"] = checkpoints.load_clustering_model(run.workspace, init.rel_dir)
    return ClusteringData(**data)


def save_model(
    run: StageRun,
    model: ClusteringModel,
    pretext: StageOutput,
    catalog: StageOutput,
    cluster_head: dict[str, Any] | None = None,
) -> None:
    """Write a one-head clustering model's checkpoint and description into the stage run; an
    embedding network between backbone and cluster head is read off the model."""
    image_config = ImageConfig.model_validate(catalog.summary["image_config"])
    embedding = None
    if isinstance(model.backbone, EmbeddingBackbone):
        head = model.backbone.head
        embedding = checkpoints.embedding_description(
            None if isinstance(head, nn.Identity) else head
        )
    run.write_bytes(checkpoints.CHECKPOINT, checkpoints.state_bytes(model), log=True)
    run.write_json(
        checkpoints.DESCRIPTION,
        checkpoints.clustering_description(
            pretext.summary["backbone"],
            image_config.channels,
            model.num_clusters,
            embedding,
            cluster_head,
        ),
        log=True,
    )


def save_kmeans_model(
    run: StageRun,
    result: KMeansResult,
    temperature: float,
    pretext: StageOutput,
    catalog: StageOutput,
) -> None:
    """Write the nearest-centroid clustering model of a K-means ``result`` on the pretext
    embeddings into the stage run (the guard keeping K-means' partition)."""
    pretext_model = checkpoints.load_pretext_model(run.workspace, pretext.rel_dir)
    model = build_kmeans_model(
        pretext_model.backbone, result.centroids, temperature, pretext_model.embedding_head
    )
    save_model(run, model, pretext, catalog)


@task(name="scan", **STAGE_TASK_OPTIONS)
def scan(
    request: StageRequest,
    pretext: StageOutput,
    neighbors: StageOutput,
    catalog: StageOutput,
    init: StageOutput | None = None,
    embed: StageOutput | None = None,
) -> StageOutput:
    """Train the configured clustering method (``request.config["method"]``, default SCAN) and
    save its one-head clustering model.

    SCAN trains from the pretext backbone, or from the clustering model of ``init`` (a warm
    start; its key is part of the stage key). K-means needs ``embed`` (the embeddings it
    clusters).

    Raises:
        ScanLakeError: the warm-start model has another number of clusters.
    """
    method = clustering_method_of(request.config)

    def body(run: StageRun) -> dict[str, Any]:
        settings = method.parse(request.config)
        data = _data(run, method, pretext, neighbors, catalog, init, embed)
        k = int(request.config["num_clusters"])
        if data.init is not None and data.init.num_clusters != k:
            assert init is not None
            raise ScanLakeError(
                f"The warm-start model {init.key[:12]} has {data.init.num_clusters} "
                f"clusters, not {k}: set growth.warm_start=false."
            )
        outcome = method.train(data, settings, run.on_epoch)
        save_model(run, outcome.model, pretext, catalog, outcome.cluster_head)
        run.log_metrics(outcome.metrics)
        final = outcome.history[-1].metrics if outcome.history else {}
        return {
            **({} if method.name == "scan" else {"method": method.name}),
            **outcome.summary,
            "final_loss": final.get("loss"),
            "epochs": len(outcome.history),
            "num_clusters": k,
            "start": "cold" if init is None else "warm",
            "warm_from": None if init is None else init.key,
        }

    return run_stage(request, body)
