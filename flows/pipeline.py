"""The ``scan_pipeline`` flow: lake -> catalog -> pretext -> embed -> mine_neighbors -> scan ->
selflabel -> assign -> evaluate, each a cached task keyed by its content fingerprint.

The flow only composes: it scans the lake (always), validates the request, computes every stage
key, calls the tasks, notes which stages came from cache (MLflow runs tagged ``cached``), and
publishes a Markdown summary.
"""

from __future__ import annotations

import logging
from typing import Any

from prefect import flow, get_run_logger, runtime
from prefect.artifacts import create_markdown_artifact
from pydantic import BaseModel

from scan_core.config import PipelineConfig
from tasks import keys, tracking
from tasks.assign import assign
from tasks.catalog import catalog
from tasks.clustering import scan
from tasks.config import as_config
from tasks.embed import embed
from tasks.errors import ScanLakeError
from tasks.evaluate import evaluate
from tasks.lake import LakeSnapshot, scan_lake
from tasks.neighbors import neighbors
from tasks.pretext import plan_pretext, pretext
from tasks.selflabel import selflabel
from tasks.settings import MachineSettings
from tasks.stage import StageOutput, StageRequest, result_storage_for
from tasks.storage import Storage
from tasks.tracking import TrackingRef

logger = logging.getLogger(__name__)

STAGES = (
    "catalog",
    "pretext",
    "embed",
    "mine_neighbors",
    "scan",
    "selflabel",
    "assign",
    "evaluate",
)


class StageRecord(BaseModel):
    """How one stage went in this flow run."""

    stage: str
    key: str
    state: str
    cached: bool
    run_id: str | None
    source_run_id: str | None
    seconds: float
    summary: dict[str, Any]


def validate_request(config: PipelineConfig, snapshot: LakeSnapshot) -> None:
    """Refuse requests that cannot train, before any training starts.

    Raises:
        ScanLakeError: too few images for the clusters or the neighbours asked for.
    """
    n = snapshot.num_unique
    if n < 2:
        raise ScanLakeError(
            f"The lake has only {n} usable unique image: add images (SCAN needs at least "
            "two, and more than the number of clusters)."
        )
    if config.scan.num_clusters > n:
        raise ScanLakeError(
            f"The lake has {n} unique usable images, fewer than the {config.scan.num_clusters} "
            "clusters asked for: lower --clusters or add images."
        )
    if config.neighbors.k >= n:
        raise ScanLakeError(
            f"neighbors.k = {config.neighbors.k} needs more than {config.neighbors.k} images but "
            f"the lake has {n}: lower it with --set neighbors.k=... or add images."
        )


class _Runner:
    """Calls stage tasks with the workspace's result storage and records cache hits."""

    def __init__(self, storage: Any, ref: TrackingRef) -> None:
        self.storage, self.ref = storage, ref
        self.records: dict[str, StageRecord] = {}

    def __call__(self, task_obj: Any, request: StageRequest, *inputs: Any) -> StageOutput:
        log = get_run_logger()
        state = task_obj.with_options(result_storage=self.storage)(
            request, *inputs, return_state=True
        )
        output: StageOutput = state.result()
        cached = state.name == "Cached" or output.reused
        name = task_obj.name
        run_id = output.run_id
        if cached:
            how = "Prefect cache" if state.name == "Cached" else "manifest"
            log.info("%s: cached (%s, key %s)", name, how, request.key[:12])
            run_id = tracking.record_cached_stage(self.ref, name, request.key, output.run_id)
        else:
            log.info("%s: ran in %.1fs (key %s)", name, output.seconds, request.key[:12])
        self.records[name] = StageRecord(
            stage=name,
            key=request.key,
            state=str(state.name),
            cached=cached,
            run_id=run_id,
            source_run_id=output.run_id if cached else None,
            seconds=output.seconds,
            summary=output.summary,
        )
        return output


def summary_markdown(result: dict[str, Any]) -> str:
    """The run's Markdown summary (Prefect artifact)."""
    lines = [
        f"# scan-lake run on `{result['lake']}`",
        "",
        f"Workspace `{result['workspace']}`; MLflow run [{result['mlflow']['parent_run_id']}]"
        f"({result['mlflow']['link']}).",
        "",
        f"Objects {result['counts']['objects']}, images {result['counts']['images']} "
        f"({result['counts']['unique_images']} unique), quarantined "
        f"{result['counts']['quarantined']}.",
        "",
        "| stage | cached | seconds |",
        "|---|---|---|",
    ]
    for record in result["stages"]:
        lines.append(f"| {record['stage']} | {record['cached']} | {record['seconds']:.1f} |")
    lines += ["", "| metric | value |", "|---|---|"]
    lines += [f"| {k} | {v:.4f} |" for k, v in sorted(result["metrics"].items())]
    lines += ["", "| cluster | size |", "|---|---|"]
    lines += [f"| {i} | {s} |" for i, s in enumerate(result["cluster_sizes"])]
    return "\n".join(lines)


@flow(name="scan_pipeline", log_prints=True)
def scan_pipeline(
    lake: str,
    workspace: str,
    config: dict[str, Any] | None = None,
    reuse_pretext_growth: float = 0.2,
) -> dict[str, Any]:
    """Cluster the images of ``lake`` with SCAN, caching every stage under ``workspace``.

    Args:
        lake: Folder or URL of the images (``s3://bucket/prefix`` or a local path); an optional
            ``_labels.parquet`` sidecar (key, label) enables the accuracy metrics.
        workspace: Folder or URL for stage artifacts, Prefect results and the pixel store.
        config: :class:`PipelineConfig` as a dict (defaults when omitted).
        reuse_pretext_growth: Keep the pretext backbone while the images it was not trained on
            are at most this fraction of those it was (0 retrains on every change).

    Returns:
        A summary: stages (cached or not), stages_run, metrics, cluster sizes, counts, MLflow ids.
    """
    log = get_run_logger()
    settings = MachineSettings()
    cfg = as_config(config)
    lake_store, ws = Storage(lake, settings), Storage(workspace, settings)
    lake_store.check_reachable()
    ws.check_reachable(create=True)

    artifact_location = settings.mlflow_artifact_location
    if artifact_location is None and not ws.is_local:
        artifact_location = ws.uri("_mlflow")
    experiment_id = tracking.ensure_experiment(
        settings.tracking_uri, settings.mlflow_experiment, artifact_location
    )
    flow_run_id = str(runtime.flow_run.id or "")
    parent = tracking.start_parent_run(
        settings.tracking_uri,
        experiment_id,
        f"scan_pipeline {runtime.flow_run.name or ''}",
        {"prefect.flow_run_id": flow_run_id, "lake": lake_store.url, "workspace": ws.url},
    )
    ref = TrackingRef(
        tracking_uri=settings.tracking_uri, experiment_id=experiment_id, parent_run_id=parent
    )
    try:
        result = _run_stages(lake_store, ws, cfg, ref, reuse_pretext_growth, flow_run_id)
    except BaseException:
        tracking.end_run(ref, parent, ok=False)
        raise
    tracking.log_metrics(ref, parent, result["metrics"])
    tracking.set_tags(ref, parent, {"stages_run": ",".join(result["stages_run"]) or "none"})
    tracking.end_run(ref, parent, ok=True)
    create_markdown_artifact(
        key="scan-pipeline-summary",
        markdown=summary_markdown(result),
        description="scan-lake run summary",
    )
    log.info("stages run: %s", ", ".join(result["stages_run"]) or "none (all cached)")
    return result


def _run_stages(
    lake: Storage,
    ws: Storage,
    cfg: PipelineConfig,
    ref: TrackingRef,
    reuse_pretext_growth: float,
    flow_run_id: str,
) -> dict[str, Any]:
    settings = MachineSettings()
    snapshot: LakeSnapshot = scan_lake(lake.url, ws.url, cfg.image.model_dump(mode="json"))
    tracking.set_tags(
        ref,
        ref.parent_run_id,
        {"lake_fingerprint": snapshot.images_key, "catalog_key": snapshot.catalog_key},
    )
    tracking.log_metrics(
        ref,
        ref.parent_run_id,
        {
            "lake/objects": snapshot.num_objects,
            "lake/images": snapshot.num_images,
            "lake/unique_images": snapshot.num_unique,
            "lake/quarantined": snapshot.num_quarantined,
            "lake/objects_read": snapshot.num_read,
        },
    )
    validate_request(cfg, snapshot)
    run = _Runner(result_storage_for(ws), ref)

    def request(stage: str, key: str, config: dict[str, Any]) -> StageRequest:
        return StageRequest(stage=stage, key=key, workspace=ws.url, config=config, tracking=ref)

    image_cfg = cfg.image.model_dump(mode="json")
    cat = run(
        catalog,
        request(
            "catalog",
            snapshot.catalog_key,
            {"image": image_cfg, "image_config_key": snapshot.image_config_key},
        ),
        snapshot.listing,
    )

    pretext_key = plan_pretext(
        ws.url,
        cfg.pretext.model_dump(mode="json"),
        snapshot.images_key,
        snapshot.image_config_key,
        snapshot.listing,
        reuse_pretext_growth,
    )
    pre = run(pretext, request("pretext", pretext_key, cfg.pretext.model_dump(mode="json")), cat)

    embed_config = {"device": cfg.pretext.device, "batch_size": 1024}
    embed_key = keys.stage_key("embed", "", {"pretext": pre.key, "images": snapshot.images_key})
    emb = run(embed, request("embed", embed_key, embed_config), pre, cat)

    nbr_key = keys.stage_key("neighbors", cfg.neighbors.fingerprint(), {"embed": emb.key})
    nbr = run(
        neighbors, request("mine_neighbors", nbr_key, cfg.neighbors.model_dump(mode="json")), emb
    )

    scan_key = keys.stage_key(
        "scan", cfg.scan.fingerprint(), {"neighbors": nbr.key, "pretext": pre.key}
    )
    model = run(scan, request("scan", scan_key, cfg.scan.model_dump(mode="json")), pre, nbr, cat)

    if cfg.selflabel.enabled:
        sl_key = keys.stage_key("selflabel", cfg.selflabel.fingerprint(), {"scan": model.key})
        model = run(
            selflabel,
            request("selflabel", sl_key, cfg.selflabel.model_dump(mode="json")),
            model,
            cat,
        )

    assign_config = {
        "device": cfg.scan.device,
        "batch_size": 1024,
        "registered_model": settings.registered_model,
    }
    assign_key = keys.stage_key("assign", "", {"model": model.key, "catalog": cat.key})
    asg = run(assign, request("assign", assign_key, assign_config), model, cat)

    eval_key = keys.stage_key(
        "evaluate",
        "",
        {"assign": asg.key, "catalog": cat.key, "neighbors": nbr.key, "embed": emb.key},
    )
    ev = run(evaluate, request("evaluate", eval_key, {}), asg, cat, nbr, emb)

    records = [run.records[name] for name in STAGES if name in run.records]
    return {
        "lake": lake.url,
        "workspace": ws.url,
        "flow_run_id": flow_run_id,
        "lake_fingerprint": snapshot.images_key,
        "counts": {
            "objects": snapshot.num_objects,
            "images": snapshot.num_images,
            "unique_images": snapshot.num_unique,
            "quarantined": snapshot.num_quarantined,
            "objects_read": snapshot.num_read,
            "images_decoded": snapshot.num_decoded,
            "images_embedded": int(emb.summary.get("embedded", 0))
            if not run.records["embed"].cached
            else 0,
        },
        "stages": [r.model_dump() for r in records],
        "stages_run": [r.stage for r in records if not r.cached],
        "metrics": dict(ev.summary.get("metrics", {})),
        "cluster_sizes": list(ev.summary.get("cluster_sizes", [])),
        "model_version": asg.summary.get("model_version"),
        "mlflow": {
            "tracking_uri": ref.tracking_uri,
            "experiment_id": ref.experiment_id,
            "parent_run_id": ref.parent_run_id,
            "link": tracking.run_link(ref.tracking_uri, ref.experiment_id, ref.parent_run_id),
        },
    }
