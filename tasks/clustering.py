"""Clustering stage (SCAN step 3 and its alternatives; the stage keeps the name ``scan``).

``clustering.method`` picks what it trains; the methods share the stages and differ in the losses
plugged into them (docs/architecture.md, 'The method'):

- ``scan`` (default): SCAN heads on the mined neighbours, from the pretext backbone (cold) or
  from the previous run's model (warm start, docs/architecture.md, 'Growing lakes');
- ``twostage``: Han et al.'s stage 2, IIC + ``L_cp`` with Norm-FC heads on the pretext embedding
  (the pretext model's embedding head is refined; RotNet has none, so a fresh one is trained);
- ``iic``: IIC alone, linear heads on the backbone;
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

from scan_core.clustering import train_scan
from scan_core.config import ImageConfig, KMeansConfig, PipelineConfig, ScanConfig, TwoStageConfig
from scan_core.kmeans import KMeansResult, build_kmeans_model, fit_kmeans
from scan_core.models import RotNetHead
from scan_core.twostage import EmbeddingBackbone, train_twostage
from tasks import checkpoints, keys
from tasks.catalog import read_catalog
from tasks.embed import read_embeddings
from tasks.errors import ScanLakeError
from tasks.lake import unique_ids
from tasks.neighbors import read_neighbor_indices
from tasks.pixels import load_pixels
from tasks.stage import STAGE_TASK_OPTIONS, StageOutput, StageRequest, StageRun, run_stage


def method_of(config: dict[str, Any]) -> str:
    """The clustering method of a stage config (configs of ``scan`` carry no ``method``)."""
    return str(config.get("method", "scan"))


def stage_config(config: PipelineConfig, num_clusters: int) -> dict[str, Any]:
    """The stage config of a non-SCAN ``clustering.method`` for ``num_clusters`` clusters (SCAN's
    is its ``ScanConfig``, warm-start adjusted by the flow).

    Raises:
        ScanLakeError: the method's settings do not fit ``num_clusters`` (two-stage
            ``overcluster``).
    """
    method = config.clustering.method
    if method in ("twostage", "iic"):
        try:
            settings = config.twostage_config(num_clusters)
        except ValidationError as exc:
            raise ScanLakeError(
                f"twostage settings do not fit {num_clusters} clusters "
                f"({exc.errors()[0]['msg']}): fix twostage.overcluster."
            ) from exc
        return {"method": method, **settings.model_dump(mode="json")}
    if method == "kmeans":
        return {"method": method, "num_clusters": num_clusters, **config.kmeans.model_dump()}
    raise ValueError(f"stage_config is for the methods other than scan, got {method}")


def clustering_key(config: dict[str, Any], inputs: dict[str, str]) -> str:
    """The stage key of a clustering stage config: SCAN's as it always was; the other methods
    under their own name and code version (:data:`tasks.keys.STAGE_ENTRIES`)."""
    method = method_of(config)
    if method == "scan":
        return keys.stage_key("scan", ScanConfig.model_validate(config).fingerprint(), inputs)
    return keys.stage_key(method, keys.digest(config), inputs)


def _embedding_head(pretext_head: nn.Module) -> nn.Module | None:
    """The pretext model's embedding head (SimCLR, Super-AND); None for RotNet (the pretext
    embedding is the normalised backbone output, as in :func:`compute_embeddings`)."""
    return None if isinstance(pretext_head, RotNetHead) else pretext_head


def _scan(
    run: StageRun,
    config: ScanConfig,
    pretext: StageOutput,
    neighbors: StageOutput,
    catalog: StageOutput,
    init: StageOutput | None,
) -> dict[str, Any]:
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
    result = train_scan(images, I, backbone, config, progress=run.on_epoch, init_model=init_model)
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


def _twostage(
    run: StageRun, method: str, config: TwoStageConfig, pretext: StageOutput, catalog: StageOutput
) -> dict[str, Any]:
    image_config = ImageConfig.model_validate(catalog.summary["image_config"])
    ids = unique_ids(read_catalog(run.workspace, catalog))
    images = load_pixels(run.workspace, catalog.summary["image_config_key"], ids, image_config)
    pretext_model = checkpoints.load_pretext_model(run.workspace, pretext.rel_dir)
    result = train_twostage(
        images,
        pretext_model.backbone,
        config,
        progress=run.on_epoch,
        method="twostage" if method == "twostage" else "iic",
        embedding_head=_embedding_head(pretext_model.head),
    )
    embedding, cluster_head = None, None
    net = result.model.backbone
    if method == "twostage" and isinstance(net, EmbeddingBackbone):
        embedding = checkpoints.embedding_description(net.head)
        cluster_head = {
            "kind": "normfc",
            "temperature": config.head_temperature,
            "norm_axis": config.head_norm_axis,
        }
    run.write_bytes(checkpoints.CHECKPOINT, checkpoints.state_bytes(result.model), log=True)
    run.write_json(
        checkpoints.DESCRIPTION,
        checkpoints.clustering_description(
            pretext.summary["backbone"],
            image_config.channels,
            config.num_clusters,
            embedding,
            cluster_head,
        ),
        log=True,
    )
    losses = {f"{method}/head_{i}_val_loss": v for i, v in enumerate(result.head_losses)}
    run.log_metrics({**losses, f"{method}/best_head": float(result.best_head)})
    final = result.history[-1].metrics if result.history else {}
    return {
        "method": method,
        "best_head": result.best_head,
        "val_loss": result.head_losses[result.best_head],
        "final_loss": final.get("loss"),
        "epochs": len(result.history),
        "num_clusters": config.num_clusters,
        "start": "cold",
        "warm_from": None,
    }


def save_kmeans_model(
    run: StageRun,
    result: KMeansResult,
    temperature: float,
    pretext: StageOutput,
    catalog: StageOutput,
) -> None:
    """Write the nearest-centroid clustering model of a K-means ``result`` on the pretext
    embeddings (checkpoint and description) into the stage run."""
    pretext_model = checkpoints.load_pretext_model(run.workspace, pretext.rel_dir)
    head = _embedding_head(pretext_model.head)
    model = build_kmeans_model(pretext_model.backbone, result.centroids, temperature, head)
    image_config = ImageConfig.model_validate(catalog.summary["image_config"])
    run.write_bytes(checkpoints.CHECKPOINT, checkpoints.state_bytes(model), log=True)
    run.write_json(
        checkpoints.DESCRIPTION,
        checkpoints.clustering_description(
            pretext.summary["backbone"],
            image_config.channels,
            len(result.centroids),
            checkpoints.embedding_description(head),
        ),
        log=True,
    )


def _kmeans(
    run: StageRun,
    num_clusters: int,
    settings: KMeansConfig,
    pretext: StageOutput,
    catalog: StageOutput,
    embed: StageOutput,
) -> dict[str, Any]:
    _, vectors = read_embeddings(run.workspace, embed)
    result = fit_kmeans(vectors, num_clusters, settings)
    save_kmeans_model(run, result, settings.temperature, pretext, catalog)
    run.log_metrics({"kmeans/inertia": result.inertia})
    return {
        "method": "kmeans",
        "inertia": result.inertia,
        "num_clusters": num_clusters,
        "epochs": 0,
        "start": "cold",
        "warm_from": None,
    }


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
    method = method_of(request.config)

    def body(run: StageRun) -> dict[str, Any]:
        if method == "scan":
            config = ScanConfig.model_validate(request.config)
            return _scan(run, config, pretext, neighbors, catalog, init)
        settings = {k: v for k, v in request.config.items() if k != "method"}
        if method in ("twostage", "iic"):
            twostage = TwoStageConfig.model_validate(settings)
            return _twostage(run, method, twostage, pretext, catalog)
        if method == "kmeans":
            if embed is None:
                raise ValueError("the kmeans clustering stage needs the embed stage's output")
            k = int(settings.pop("num_clusters"))
            kmeans = KMeansConfig.model_validate(settings)
            return _kmeans(run, k, kmeans, pretext, catalog, embed)
        raise ValueError(f"unknown clustering method {method!r}")

    return run_stage(request, body)
