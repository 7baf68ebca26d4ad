"""The ``scan_pipeline`` flow: lake -> catalog -> pretext -> embed -> mine_neighbors (-> duplicates)
(-> choose_k) -> scan -> selflabel -> assign -> evaluate, each a cached task keyed by its content
fingerprint.

``pretext.method`` (simclr, rotnet, superand) picks what the pretext stage trains and
``clustering.method`` (scan, twostage, iic, kmeans) what the clustering stage (named ``scan``)
trains; self-labeling is SCAN's step 4 and runs for ``scan`` only (skipped, and recorded as
skipped, otherwise). ``clusters="auto"`` chooses the number of clusters after neighbour mining
(the cached ``choose_k`` stage) and explains the choice in the summary.

The flow only composes: it scans the lake (always), validates the request, plans what a growing lake
builds on (the pretext backbone, a warm start, the run whose cluster ids to keep;
docs/architecture.md, 'Growing lakes'), computes every stage key, calls the tasks, notes which
stages came from cache (``stage.<name>.*`` tags of the MLflow parent run), records the run for the
next one, promotes the registered model when the run passes the gate (:mod:`tasks.promotion`),
writes the cluster gallery (:mod:`tasks.gallery`) and publishes a Markdown summary, tables and links
in Prefect (:mod:`tasks.prefect_reports`).
"""

from __future__ import annotations

import logging
import time
from typing import Any, Literal

from mlflow.exceptions import MlflowException
from prefect import flow, get_run_logger, runtime
from prefect.artifacts import create_markdown_artifact
from pydantic import BaseModel, ValidationError

from flows.report import RunResult, StageRecord, report, to_markdown
from scan_core.config import PipelineConfig, ScanConfig
from scan_core.methods import clustering_method
from tasks import keys, parallel, progress, promotion, tracking
from tasks.assign import ASSIGNMENTS_FILE, assign
from tasks.auto import image_section, parse_budget, settings_for
from tasks.catalog import catalog
from tasks.choose_k import choose_k
from tasks.clustering import clustering_key, method_settings, scan
from tasks.config import as_config
from tasks.duplicates import duplicates
from tasks.embed import embed
from tasks.errors import ScanLakeError, mark_stage
from tasks.evaluate import evaluate
from tasks.gallery import publish_run_gallery
from tasks.guard import guard
from tasks.history import (
    GrowthPlan,
    RunRecord,
    RunSignature,
    now,
    plan_growth,
    record_run,
    warm_scan_config,
    warm_selflabel_config,
)
from tasks.lake import LakeSnapshot, scan_lake
from tasks.neighbors import neighbors
from tasks.prefect_reports import (
    ProgressArtifacts,
    library_logs_to_prefect,
    publish_links,
    publish_tables,
)
from tasks.pretext import PretextPlan, plan_pretext, pretext, pretext_stage_config
from tasks.profile import profile_lake
from tasks.selflabel import selflabel
from tasks.settings import MachineSettings
from tasks.stage import StageOutput, StageRequest
from tasks.storage import Storage
from tasks.tracking import TrackingRef

logger = logging.getLogger(__name__)

STAGES = (
    "catalog",
    "pretext",
    "embed",
    "mine_neighbors",
    "duplicates",
    "choose_k",
    "scan",
    "selflabel",
    "guard",
    "assign",
    "evaluate",
)


def validate_request(
    config: PipelineConfig, snapshot: LakeSnapshot, auto_clusters: bool = False
) -> None:
    """Refuse requests that cannot train, before any training starts.

    Raises:
        ScanLakeError: too few images for the clusters (with ``auto_clusters``: for the largest
            k tried) or the neighbours asked for.
    """
    n = snapshot.num_unique
    if n < 2:
        raise ScanLakeError(
            f"The lake has only {n} usable unique image: add images (SCAN needs at least "
            "two, and more than the number of clusters)."
        )
    if auto_clusters and config.cluster_count.k_max >= n:
        raise ScanLakeError(
            f"The lake has {n} unique usable images, too few to try up to "
            f"cluster_count.k_max = {config.cluster_count.k_max} clusters: lower it with "
            "--set cluster_count.k_max=... or add images."
        )
    if not auto_clusters and config.scan.num_clusters > n:
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
    """Calls stage tasks and records cache hits (a stage whose committed manifest was reused)."""

    def __init__(self, ref: TrackingRef) -> None:
        self.ref = ref
        self.records: dict[str, StageRecord] = {}

    def __call__(self, task_obj: Any, request: StageRequest, *inputs: Any) -> StageOutput:
        log = get_run_logger()
        name = task_obj.name
        state = task_obj(request, *inputs, return_state=True)
        try:
            output: StageOutput = state.result()
        except BaseException as exc:
            mark_stage(exc, name)
            raise
        cached = output.reused
        how = ""
        if cached:
            how = "manifest"
            log.info("%s: cached (manifest, key %s)", name, request.key[:12])
        else:
            log.info("%s: ran in %.1fs (key %s)", name, output.seconds, request.key[:12])
        tracking.record_stage(self.ref, name, request.key, cached, output.run_id, how)
        self.records[name] = StageRecord(
            stage=name,
            key=request.key,
            state=str(state.name),
            cached=cached,
            run_id=None if cached else output.run_id,
            source_run_id=output.run_id if cached else None,
            seconds=output.seconds,
            summary=output.summary,
        )
        return output


@flow(name="scan_pipeline", log_prints=True, persist_result=False)
def scan_pipeline(
    lake: str,
    workspace: str,
    config: dict[str, Any] | None = None,
    clusters: int | Literal["auto"] | None = None,
    retrain_pretext: bool = False,
    preset: Literal["auto", "paper"] = "auto",
    overrides: dict[str, Any] | None = None,
    budget: str | float | None = None,
    workers: int | None = None,
    dask_address: str | None = None,
) -> dict[str, Any]:
    """Cluster the images of ``lake`` with SCAN, caching every stage under ``workspace``.

    Args:
        lake: Folder or URL of the images (``s3://bucket/prefix`` or a local path); an optional
            ``_labels.parquet`` sidecar (key, label) enables the accuracy metrics.
        workspace: Folder or URL for stage artifacts, Prefect results and the pixel store.
        config: :class:`PipelineConfig` as a dict. Omitted: the settings of ``preset``.
        preset: Without ``config``: ``auto`` chooses the settings from the lake and the device
            (:mod:`scan_core.auto`; the reasons are in the summary and MLflow), ``paper`` takes
            the paper's (the :class:`PipelineConfig` defaults).
        overrides: Dotted ``{"scan.epochs": 5}`` overrides applied on top of the settings.
        budget: Wall time the ``auto`` settings should fit on this machine (``"30m"``, seconds).
        clusters: Number of clusters (overrides ``scan.num_clusters``), or ``"auto"``: choose
            it without labels in ``cluster_count.k_min .. k_max`` after neighbour mining.
        retrain_pretext: Train the backbone on the current images even if the lake grew less than
            ``growth.retrain_pretext_after`` since the current one was trained.
        workers: Start a local Dask cluster of this many worker processes for the run's
            parallel work (:mod:`tasks.parallel`).
        dask_address: Run the parallel work on the Dask scheduler at this address (default:
            ``SCAN_LAKE_DASK_ADDRESS``). Neither: everything runs in the flow's process.

    Returns:
        A summary: stages (cached or not), stages_run, metrics, cluster ids and sizes, counts,
        the backbone and warm/cold plan, churn and per-cluster growth, duplicates, MLflow ids
        and link, the assignments URI, the gallery URI, the promotion decision and the engine
        (``parallel``: kind, workers, the process ids shards ran in).
    """
    log = get_run_logger()
    settings = MachineSettings()
    parallel.requested(workers, dask_address)  # a bad request stops before any work
    auto = clusters == "auto"
    choice = SettingsChoice(
        automatic=config is None and preset == "auto",
        config=as_config(config),
        overrides=dict(overrides or {}),
        budget_seconds=parse_budget(budget),
        clusters=clusters if isinstance(clusters, int) else None,
    )
    lake_store, ws = Storage(lake, settings), Storage(workspace, settings)
    lake_store.check_reachable()
    ws.check_reachable(create=True)

    flow_run_id = str(runtime.flow_run.id or "")
    ref = _open_parent_run(settings, lake_store, ws, flow_run_id)
    parent = ref.parent_run_id
    reporter = ProgressArtifacts()
    progress.add_reporter(reporter)
    try:
        with library_logs_to_prefect(), parallel.engine(workers, dask_address) as engine:
            params = {"engine": engine.kind, "workers": str(engine.workers)}
            tracking.log_params(ref, parent, {**params, "dask": engine.address or ""})
            result = _run_stages(lake_store, ws, choice, ref, retrain_pretext, flow_run_id, auto)
            result.parallel = engine.describe()
    except BaseException:
        tracking.end_run(ref, parent, ok=False)
        raise
    finally:
        progress.remove_reporter(reporter)
    tracking.log_metrics(ref, parent, result.metrics)
    tracking.set_tags(ref, parent, {"stages_run": ",".join(result.stages_run) or "none"})
    tracking.end_run(ref, parent, ok=True)
    _publish(result)
    log.info("stages run: %s", ", ".join(result.stages_run) or "none (all cached)")
    return result.as_dict()


def _open_parent_run(
    settings: MachineSettings, lake: Storage, ws: Storage, flow_run_id: str
) -> TrackingRef:
    """The run's MLflow experiment (artifacts under the workspace when it is on S3) and its
    parent run, named after the Prefect flow run."""
    artifact_location = settings.mlflow_artifact_location
    if artifact_location is None and not ws.is_local:
        artifact_location = ws.uri("_mlflow")
    experiment_id = tracking.ensure_experiment(
        settings.tracking_uri, settings.mlflow_experiment, artifact_location
    )
    parent = tracking.start_parent_run(
        settings.tracking_uri,
        experiment_id,
        f"scan_pipeline {runtime.flow_run.name or ''}",
        {"prefect.flow_run_id": flow_run_id, "lake": lake.url, "workspace": ws.url},
    )
    return TrackingRef(
        tracking_uri=settings.tracking_uri, experiment_id=experiment_id, parent_run_id=parent
    )


def _track_request(
    ref: TrackingRef,
    cfg: PipelineConfig,
    choice: SettingsChoice,
    auto_clusters: bool,
    retrain_pretext: bool,
) -> None:
    """The whole resolved config on the parent run (params and ``config.yaml``), and the flow's
    other parameters (``clusters``: the number, ``auto`` or ``config``; ``settings``: ``auto``
    (chosen from the lake), or ``given`` (a config or the paper's preset); the budget)."""
    tracking.log_config(ref, ref.parent_run_id, cfg.model_dump(mode="json"))
    clusters = "auto" if auto_clusters else choice.clusters
    tracking.log_params(
        ref,
        ref.parent_run_id,
        {
            "clusters": "config" if clusters is None else str(clusters),
            "retrain_pretext": str(retrain_pretext).lower(),
            "settings": "auto" if choice.automatic else "given",
            "budget_seconds": str(choice.budget_seconds),
        },
    )


def _publish(result: RunResult) -> None:
    """The run's Prefect artifacts: the Markdown summary, the metrics and cluster tables, and
    links to the MLflow run (where the UI has an address), the assignments and the gallery."""
    create_markdown_artifact(
        key="scan-pipeline-summary",
        markdown=to_markdown(report(result)),
        description="scan-lake run summary",
    )
    publish_tables(result.as_dict())
    info = result.mlflow
    links = {"scan-pipeline-assignments": (result.assignments, "Assignments of the run")}
    if info.link.startswith(("http://", "https://")):
        links["scan-pipeline-mlflow-run"] = (info.link, f"MLflow run {info.parent_run_id}")
    if result.gallery:
        links["scan-pipeline-gallery"] = (result.gallery, "Cluster gallery of the run")
    publish_links(links)


def _promote(
    ref: TrackingRef,
    registered_name: str,
    cfg: PipelineConfig,
    assign_output: StageOutput,
    evaluation: StageOutput,
    produced: bool,
    record: dict[str, Any],
    guard: dict[str, Any] | None = None,
) -> dict[str, Any] | None:
    """Decide the promotion of the model version this run's assign stage registered
    (:mod:`tasks.promotion`); a version from the cache keeps the decision of the run that made
    it. Returns the decision for the result (None when no model was registered)."""
    version = assign_output.summary.get("model_version")
    if not registered_name or not version:
        return None
    out: dict[str, Any] = {"registered_model": registered_name, "version": str(version)}
    if not produced:
        try:
            tags = ref.client().get_model_version(registered_name, str(version)).tags
        except MlflowException:
            tags = {}
        earlier = tags.get("promotion.reason", "no decision recorded")
        return {
            **out,
            "decided": False,
            "promoted": tags.get("promoted") == "true",
            "reason": f"decided by the run that made it (assign stage from cache): {earlier}",
        }
    decision = promotion.decide(
        evaluation.summary["cluster_sizes"],
        guard,
        cfg.promotion,
        evaluation.summary.get("cluster_ids"),
    )
    tags = promotion.version_tags(decision, guard, evaluation.summary.get("metrics", {}), record)
    promotion.promote(ref, registered_name, str(version), decision, tags)
    tracking.set_tags(
        ref,
        ref.parent_run_id,
        {"promotion.promoted": str(decision.promote).lower(), "promotion.reason": decision.reason},
    )
    return {**out, "decided": True, "promoted": decision.promote, "reason": decision.reason}


def _gallery(
    lake: Storage, ws: Storage, record: RunRecord, ref: TrackingRef
) -> tuple[str | None, str | None]:
    """Write the run's gallery; ``(index URI, None)``, or ``(None, why not)``: the run's outputs
    are all committed by now, so a gallery that cannot be written does not fail the run."""
    try:
        return publish_run_gallery(lake, ws, record, ref), None
    except Exception as exc:
        why = f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}"
        get_run_logger().warning(
            "the cluster gallery was not written (%s): `scan-lake export` writes it later", why
        )
        return None, why


def _track_growth(
    ref: TrackingRef,
    pretext_run_id: str | None,
    plan: PretextPlan,
    growth: GrowthPlan,
    embedded: int,
    lineage: dict[str, Any],
    dup: dict[str, Any],
) -> None:
    """Record in MLflow which backbone was used and why, warm or cold, churn and duplicates."""
    tags = {
        "pretext.backbone_key": plan.key,
        "pretext.reused": str(plan.reused).lower(),
        "pretext.reason": plan.reason[:5000],
    }
    for run_id in (ref.parent_run_id, pretext_run_id):
        if run_id:
            tracking.set_tags(ref, run_id, tags)
    tracking.set_tags(
        ref,
        ref.parent_run_id,
        {
            "start": growth.start,
            "start.reason": growth.reason[:5000],
            "start.warm_from": growth.warm_from.key if growth.warm_from else "",
            "lineage.previous_flow_run_id": growth.previous_flow_run_id or "",
        },
    )
    metrics: dict[str, float] = {"images_embedded": float(embedded)}
    if plan.growth is not None:
        metrics["pretext/growth"] = plan.growth
    if lineage.get("churn") is not None:
        metrics.update(
            {
                "lineage/churn": lineage["churn"],
                "lineage/changed_images": float(lineage["changed_images"]),
                "lineage/shared_images": float(lineage["shared_images"]),
                "lineage/born": float(len(lineage["born"])),
                "lineage/vanished": float(len(lineage["vanished"])),
            }
        )
    metrics.update({f"duplicates/{k}": float(v) for k, v in dup.items() if k != "thresholds"})
    tracking.log_metrics(ref, ref.parent_run_id, metrics)
    tracking.log_table(ref, ref.parent_run_id, lineage.get("clusters", []), "cluster_lineage.json")


def _with_clusters(cfg: PipelineConfig, num_clusters: int) -> PipelineConfig:
    """``cfg`` with ``scan.num_clusters`` set to the chosen number of clusters.

    Raises:
        ScanLakeError: the settings do not allow that many clusters (e.g. two-stage
            ``overcluster``).
    """
    try:
        return cfg.with_overrides({"scan.num_clusters": num_clusters})
    except (ValidationError, ValueError) as exc:
        raise ScanLakeError(
            f"The chosen number of clusters {num_clusters} does not fit the config ({exc}): "
            "adjust cluster_count.k_min/k_max or the conflicting setting."
        ) from exc


def _track_choice(ref: TrackingRef, chosen: dict[str, Any]) -> None:
    """Record the ``--clusters auto`` choice on the parent run (the curves and the plot are in
    the choose_k stage's run)."""
    tracking.set_tags(
        ref,
        ref.parent_run_id,
        {
            "clusters": "auto",
            "clusters.criterion": str(chosen["criterion"]),
            "clusters.explanation": str(chosen["explanation"])[:5000],
        },
    )
    tracking.log_metrics(ref, ref.parent_run_id, {"clusters/chosen_k": float(chosen["chosen_k"])})


class SettingsChoice(BaseModel):
    """How the run's settings are chosen: a given config (or the paper preset) with overrides,
    or the automatic settings for the lake (:mod:`tasks.auto`)."""

    automatic: bool
    config: PipelineConfig
    overrides: dict[str, Any] = {}
    budget_seconds: float | None = None
    clusters: int | None = None

    def given(self) -> PipelineConfig:
        """The given config with the overrides and the number of clusters applied."""
        cfg = self.config
        if self.overrides:
            try:
                cfg = cfg.with_overrides(self.overrides)
            except (ValidationError, ValueError) as exc:
                raise ScanLakeError(
                    f"Invalid --set override ({exc}): fix the key or the value."
                ) from exc
        return cfg if self.clusters is None else _with_clusters(cfg, self.clusters)


def _choose_settings(
    lake: Storage, ws: Storage, choice: SettingsChoice, ref: TrackingRef
) -> tuple[LakeSnapshot, PipelineConfig, dict[str, str]]:
    """Scan the lake under the chosen image settings; return the snapshot, the whole config and
    why each automatic setting was chosen (``{"settings": "..."}`` for a given config)."""
    if not choice.automatic:
        cfg = choice.given()
        snapshot = scan_lake(lake.url, ws.url, cfg.image.model_dump(mode="json"))
        how = "the given config" if choice.config != PipelineConfig() else "the paper's preset"
        return snapshot, cfg, {"settings": how}
    profile = profile_lake(lake.url, ws.url)
    image, _ = image_section(profile, choice.overrides)
    snapshot = scan_lake(lake.url, ws.url, image)
    chosen = settings_for(profile, snapshot.num_unique, choice.budget_seconds, choice.overrides)
    cfg = chosen.config
    if choice.clusters is not None:
        cfg = _with_clusters(cfg, choice.clusters)
    log = get_run_logger()
    for line in chosen.lines():
        log.info("settings: %s", line)
    tracking.set_tags(
        ref,
        ref.parent_run_id,
        {"settings": "auto", **{f"settings.{k}": v[:5000] for k, v in chosen.reasons.items()}},
    )
    if "total" in chosen.estimate:
        tracking.log_metrics(
            ref, ref.parent_run_id, {"settings/estimated_seconds": chosen.estimate["total"]}
        )
    return snapshot, cfg, chosen.reasons


class _Stages:
    """The stages of one flow run, one short method each, in the order of the method: each
    builds its stage's key from its config and its inputs' keys, and runs the stage task
    through :class:`_Runner` (which records cache hits)."""

    def __init__(self, ws: Storage, ref: TrackingRef, snapshot: LakeSnapshot) -> None:
        self.ws, self.ref, self.snapshot = ws, ref, snapshot
        self.run = _Runner(ref)

    def request(self, stage: str, key: str, config: dict[str, Any]) -> StageRequest:
        return StageRequest(
            stage=stage, key=key, workspace=self.ws.url, config=config, tracking=self.ref
        )

    def catalog(self, cfg: PipelineConfig) -> StageOutput:
        """SCAN's input: the lake's usable images, as the lake scan found them."""
        config = {
            "image": cfg.image.model_dump(mode="json"),
            "image_config_key": self.snapshot.image_config_key,
        }
        request = self.request("catalog", self.snapshot.catalog_key, config)
        return self.run(catalog, request, self.snapshot.listing)

    def pretext(
        self, cfg: PipelineConfig, cat: StageOutput, retrain: bool
    ) -> tuple[StageOutput, PretextPlan]:
        """Step 1: the self-supervised backbone (reused from an earlier run while the lake has
        not outgrown it)."""
        config = pretext_stage_config(cfg)
        plan = plan_pretext(
            self.ws.url,
            config,
            self.snapshot.images_key,
            self.snapshot.image_config_key,
            self.snapshot.listing,
            cfg.growth.retrain_pretext_after,
            retrain,
        )
        return self.run(pretext, self.request("pretext", plan.key, config), cat), plan

    def embed(self, cfg: PipelineConfig, pre: StageOutput, cat: StageOutput) -> StageOutput:
        """The backbone's embedding of every image (only new images are embedded)."""
        key = keys.stage_key("embed", "", {"pretext": pre.key, "images": self.snapshot.images_key})
        config = {"device": cfg.pretext.device, "batch_size": 1024}
        return self.run(embed, self.request("embed", key, config), pre, cat)

    def neighbors(self, cfg: PipelineConfig, emb: StageOutput) -> StageOutput:
        """Step 2: the k nearest neighbours of every image in the embedding."""
        key = keys.stage_key("neighbors", cfg.neighbors.fingerprint(), {"embed": emb.key})
        config = cfg.neighbors.model_dump(mode="json")
        return self.run(neighbors, self.request("mine_neighbors", key, config), emb)

    def duplicates(self, cfg: PipelineConfig, cat: StageOutput, emb: StageOutput) -> StageOutput:
        """Exact and near-duplicate images (reported, not removed)."""
        key = keys.stage_key(
            "duplicates", cfg.duplicates.fingerprint(), {"catalog": cat.key, "embed": emb.key}
        )
        config = cfg.duplicates.model_dump(mode="json")
        return self.run(duplicates, self.request("duplicates", key, config), cat, emb)

    def choose_k(
        self, cfg: PipelineConfig, emb: StageOutput, nbr: StageOutput
    ) -> tuple[PipelineConfig, dict[str, Any]]:
        """``--clusters auto``: the number of clusters, chosen without labels."""
        key = keys.stage_key("choose_k", cfg.cluster_count.fingerprint(), {"neighbors": nbr.key})
        config = cfg.cluster_count.model_dump(mode="json")
        count = self.run(choose_k, self.request("choose_k", key, config), emb, nbr)
        chosen = {**count.summary, "plot": self.ws.uri(f"{count.rel_dir}/{count.summary['plot']}")}
        _track_choice(self.ref, chosen)
        return _with_clusters(cfg, int(chosen["chosen_k"])), chosen

    def cluster(
        self,
        cfg: PipelineConfig,
        plan: GrowthPlan,
        inputs: tuple[StageOutput, StageOutput, StageOutput, StageOutput],
    ) -> StageOutput:
        """Step 3: the clustering model (SCAN, warm-started from the last run when the growth
        plan says so, or the configured other method)."""
        pre, emb, nbr, cat = inputs
        method = clustering_method(cfg.clustering.method)
        settings = method_settings(cfg, cfg.scan.num_clusters)
        warm = plan.warm_from if method.warm_start else None
        if warm is not None and isinstance(settings, ScanConfig):
            settings = warm_scan_config(settings, cfg.growth)
        config = method.stage_config(settings)
        available = {
            "neighbors": nbr.key,
            "pretext": pre.key,
            "images": self.snapshot.images_key,
            "embed": emb.key,
        }
        key_inputs = {name: available[name] for name in method.key_inputs}
        if warm is not None:
            key_inputs["init"] = warm.key
        request = self.request("scan", clustering_key(config, key_inputs), config)
        embeddings = emb if "embeddings" in method.needs else None
        return self.run(scan, request, pre, nbr, cat, warm, embeddings)

    def selflabel(
        self,
        cfg: PipelineConfig,
        plan: GrowthPlan,
        model: StageOutput,
        cat: StageOutput,
        nbr: StageOutput,
    ) -> tuple[StageOutput, dict[str, str], dict[str, Any]]:
        """Step 4, SCAN's only: self-labeling, kept only when its rules say so. Returns the
        model that goes on, why step 4 was skipped (if it was) and what it did."""
        method = cfg.clustering.method
        step4: dict[str, Any] = {"method": cfg.selflabel.method, "ran": False, "kept": False}
        if not clustering_method(method).self_labels:
            reason = f"self-labeling is SCAN's step 4; clustering.method is {method}"
            return model, {"selflabel": reason}, step4
        if not cfg.selflabel.enabled:
            return model, {"selflabel": "selflabel.enabled is false"}, step4
        warm = plan.warm_from
        sl_cfg = warm_selflabel_config(cfg.selflabel, cfg.growth) if warm else cfg.selflabel
        key = keys.stage_key(
            "selflabel", sl_cfg.fingerprint(), {"scan": model.key, "neighbors": nbr.key}
        )
        request = self.request("selflabel", key, sl_cfg.model_dump(mode="json"))
        sl = self.run(selflabel, request, model, cat, nbr)
        step4 = {"method": sl_cfg.method, **sl.summary}
        if sl.summary.get("skipped"):
            return model, {"selflabel": str(sl.summary["skipped"])}, step4
        if sl.summary.get("kept", True):
            return sl, {}, step4
        return model, {"selflabel": str(sl.summary.get("reason", "its model was not kept"))}, step4

    def guard(
        self, cfg: PipelineConfig, model: StageOutput, inputs: tuple[StageOutput, ...]
    ) -> tuple[StageOutput, dict[str, Any] | None]:
        """The guard: keep the model's partition or K-means' on the same embedding, whichever
        scores better without labels (not for K-means itself, nor when disabled)."""
        if not clustering_method(cfg.clustering.method).guarded or not cfg.guard.enabled:
            return model, None
        pre, emb, nbr, cat = inputs
        config = {
            "guard": cfg.guard.model_dump(mode="json"),
            "kmeans": cfg.kmeans.model_dump(mode="json"),
            "device": cfg.scan.device,
        }
        inputs_keys = {"model": model.key, "embed": emb.key, "neighbors": nbr.key}
        key = keys.stage_key("guard", keys.digest(config), inputs_keys)
        kept = self.run(guard, self.request("guard", key, config), model, pre, emb, nbr, cat)
        return kept, dict(kept.summary)

    def assign(
        self,
        cfg: PipelineConfig,
        lake: Storage,
        model: StageOutput,
        cat: StageOutput,
        plan: GrowthPlan,
    ) -> StageOutput:
        """Step 5: every lake object's cluster, under ids matched to the last run's; registers
        the servable model."""
        config = {
            "device": cfg.scan.device,
            "batch_size": 1024,
            "registered_model": MachineSettings().registered_model,
            "lake": lake.url,
        }
        inputs = {"model": model.key, "catalog": cat.key}
        if plan.relabel_from is not None:
            inputs["previous"] = plan.relabel_from.key
        key = keys.stage_key("assign", "", inputs)
        return self.run(assign, self.request("assign", key, config), model, cat, plan.relabel_from)

    def evaluate(
        self, asg: StageOutput, inputs: tuple[StageOutput, ...], guard_out: StageOutput | None
    ) -> StageOutput:
        """Metrics (with labels), sizes, confidences and plots."""
        cat, nbr, emb = inputs
        eval_inputs = {"assign": asg.key, "catalog": cat.key, "neighbors": nbr.key}
        eval_inputs["embed"] = emb.key
        if guard_out is not None:
            eval_inputs["guard"] = guard_out.key
        key = keys.stage_key("evaluate", "", eval_inputs)
        return self.run(evaluate, self.request("evaluate", key, {}), asg, cat, nbr, emb, guard_out)


def _track_lake(
    ref: TrackingRef, lake: Storage, snapshot: LakeSnapshot, scan_seconds: float
) -> None:
    """The lake as the run found it: fingerprint tags, the MLflow dataset input, counts."""
    tracking.set_tags(
        ref,
        ref.parent_run_id,
        {"lake_fingerprint": snapshot.images_key, "catalog_key": snapshot.catalog_key},
    )
    counts = {
        "objects": snapshot.num_objects,
        "images": snapshot.num_images,
        "unique_images": snapshot.num_unique,
        "quarantined": snapshot.num_quarantined,
    }
    tracking.log_lake_input(ref, ref.parent_run_id, lake.url, snapshot.images_key, counts)
    metrics = {f"lake/{k}": float(v) for k, v in counts.items()}
    metrics.update({"lake/objects_read": snapshot.num_read, "lake/scan_seconds": scan_seconds})
    tracking.log_metrics(ref, ref.parent_run_id, metrics)


def _plan_growth(
    ws: Storage, lake: Storage, cfg: PipelineConfig, snapshot: LakeSnapshot, pre: StageOutput
) -> tuple[RunSignature, GrowthPlan]:
    """What this run builds on (warm start, cluster ids to keep): :func:`tasks.history.plan_growth`,
    cold for methods other than SCAN and after a run that kept K-means' clusters."""
    method = cfg.clustering.method
    # a method's settings stand in for SCAN's: a change of method or settings starts cold
    own = method_settings(cfg, cfg.scan.num_clusters).fingerprint()
    fingerprint = own if method == "scan" else keys.digest(method, own)  # SCAN's as it was
    signature = RunSignature(
        images_key=snapshot.images_key,
        pretext_key=pre.key,
        num_clusters=cfg.scan.num_clusters,
        scan_fingerprint=fingerprint,
        selflabel_fingerprint=cfg.selflabel.fingerprint(),
    )
    plan: GrowthPlan = plan_growth(ws.url, lake.url, signature, cfg.growth.model_dump(mode="json"))
    cold = None
    if not clustering_method(method).warm_start and plan.start == "warm":
        cold = f"warm starts are SCAN's; clustering.method is {method}"
    elif plan.warm_from is not None and plan.warm_from.summary.get("guard_kept") == "kmeans":
        cold = "the last run kept K-means' clusters (the guard), not a SCAN model"
    if cold is not None:
        plan = plan.model_copy(update={"start": "cold", "warm_from": None, "reason": cold})
    return signature, plan


def _track_outcome(
    ref: TrackingRef, cfg: PipelineConfig, skipped: dict[str, str], guard_summary: dict | None
) -> None:
    """Which methods ran, which stages were skipped and why, and what the guard kept."""
    tags = {
        "pretext.method": cfg.pretext.method,
        "clustering.method": cfg.clustering.method,
        **{f"{stage}.skipped": reason for stage, reason in skipped.items()},
    }
    if guard_summary is not None:
        tags["guard.kept"] = str(guard_summary["kept"])
        tags["guard.reason"] = str(guard_summary["reason"])[:5000]
    tracking.set_tags(ref, ref.parent_run_id, tags)


def _run_stages(
    lake: Storage,
    ws: Storage,
    choice: SettingsChoice,
    ref: TrackingRef,
    retrain_pretext: bool,
    flow_run_id: str,
    auto_clusters: bool = False,
) -> RunResult:
    """The method, stage after stage (SCAN: pretext, neighbours, clustering, self-labeling),
    then the guard, the assignments and their evaluation; then what the run leaves."""
    scan_start = time.perf_counter()
    snapshot, cfg, reasons = _choose_settings(lake, ws, choice, ref)
    lake_scan_seconds = time.perf_counter() - scan_start
    _track_request(ref, cfg, choice, auto_clusters, retrain_pretext)
    _track_lake(ref, lake, snapshot, lake_scan_seconds)
    validate_request(cfg, snapshot, auto_clusters)

    stages = _Stages(ws, ref, snapshot)
    cat = stages.catalog(cfg)
    pre, pretext_plan = stages.pretext(cfg, cat, retrain_pretext)
    emb = stages.embed(cfg, pre, cat)
    nbr = stages.neighbors(cfg, emb)
    dup = stages.duplicates(cfg, cat, emb)
    chosen = None
    if auto_clusters:
        cfg, chosen = stages.choose_k(cfg, emb, nbr)
    signature, plan = _plan_growth(ws, lake, cfg, snapshot, pre)
    model = stages.cluster(cfg, plan, (pre, emb, nbr, cat))
    model, skipped, step4 = stages.selflabel(cfg, plan, model, cat, nbr)
    model, guard_summary = stages.guard(cfg, model, (pre, emb, nbr, cat))
    _track_outcome(ref, cfg, skipped, guard_summary)
    asg = stages.assign(cfg, lake, model, cat, plan)
    ev = stages.evaluate(asg, (cat, nbr, emb), model if guard_summary is not None else None)

    outputs = {"pretext": pre, "embed": emb, "duplicates": dup, "assign": asg, "evaluate": ev}
    parts = _RunParts(
        snapshot=snapshot,
        cfg=cfg,
        reasons=reasons,
        lake_scan_seconds=lake_scan_seconds,
        pretext_plan=pretext_plan,
        signature=signature,
        plan=plan,
        chosen=chosen,
        skipped=skipped,
        step4=step4,
        guard=guard_summary,
        records=stages.run.records,
    )
    return _finish_run(lake, ws, ref, flow_run_id, outputs, parts)


class _RunParts(BaseModel):
    """What the stages of a run decided, for what the run leaves (:func:`_finish_run`)."""

    model_config = {"arbitrary_types_allowed": True}

    snapshot: LakeSnapshot
    cfg: PipelineConfig
    reasons: dict[str, str]
    lake_scan_seconds: float
    pretext_plan: PretextPlan
    signature: RunSignature
    plan: GrowthPlan
    chosen: dict[str, Any] | None
    skipped: dict[str, str]
    step4: dict[str, Any]
    guard: dict[str, Any] | None
    records: dict[str, StageRecord]


def _finish_run(
    lake: Storage,
    ws: Storage,
    ref: TrackingRef,
    flow_run_id: str,
    out: dict[str, StageOutput],
    parts: _RunParts,
) -> RunResult:
    """What a finished run leaves: growth and duplicates in MLflow, the promotion decision,
    the run record for the next run, the gallery, and the result."""
    asg, ev, dup = out["assign"], out["evaluate"], out["duplicates"]
    records = parts.records
    embedded = 0 if records["embed"].cached else int(out["embed"].summary.get("embedded", 0))
    lineage = dict(asg.summary.get("lineage", {}))
    dup_counts = {k: v for k, v in dup.summary.items() if isinstance(v, int | float)}
    _track_growth(
        ref,
        records["pretext"].run_id,
        parts.pretext_plan,
        parts.plan,
        embedded,
        lineage,
        dup_counts,
    )
    assignments = ws.uri(f"{asg.rel_dir}/{ASSIGNMENTS_FILE}")
    promotion_record = {
        "lake": lake.url,
        "lake_fingerprint": parts.snapshot.images_key,
        "mlflow_run_id": ref.parent_run_id,
        "prefect.flow_run_id": flow_run_id,
        "assign_key": asg.key,
        "assignments": assignments,
        "cluster_ids": ev.summary.get("cluster_ids", []),
        "cluster_sizes": ev.summary.get("cluster_sizes", []),
    }
    decision = _promote(
        ref,
        MachineSettings().registered_model,
        parts.cfg,
        asg,
        ev,
        not records["assign"].cached,
        promotion_record,
        parts.guard,
    )
    record = RunRecord(
        lake=lake.url,
        signature=parts.signature,
        plan=parts.plan,
        assign=asg,
        flow_run_id=flow_run_id,
        mlflow_run_id=ref.parent_run_id,
        finished_at=now(),
        evaluate=ev,
        duplicates=dup,
    )
    record_run(ws.url, record)
    gallery, gallery_error = _gallery(lake, ws, record, ref)
    extras = {
        "embedded": embedded,
        "lineage": lineage,
        "duplicates": dup_counts,
        "duplicates_report": ws.uri(f"{dup.rel_dir}/duplicates.parquet"),
        "assignments": assignments,
        "promotion": decision,
        "gallery": gallery,
        "gallery_error": gallery_error,
    }
    return _result(lake, ws, ref, flow_run_id, asg, ev, parts, extras)


def _result(
    lake: Storage,
    ws: Storage,
    ref: TrackingRef,
    flow_run_id: str,
    asg: StageOutput,
    ev: StageOutput,
    parts: _RunParts,
    extras: dict[str, Any],
) -> RunResult:
    """The run's result (the flow's return value; the CLI's report and ``--json``)."""
    snapshot, plan, cfg = parts.snapshot, parts.plan, parts.cfg
    records = [parts.records[name] for name in STAGES if name in parts.records]
    sizes = list(ev.summary.get("cluster_sizes", []))
    result = {
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
            "images_embedded": extras["embedded"],
        },
        "lake_scan_seconds": parts.lake_scan_seconds,
        "stages": records,
        "stages_run": [r.stage for r in records if not r.cached],
        "metrics": dict(ev.summary.get("metrics", {})),
        "cluster_sizes": sizes,
        "cluster_ids": list(ev.summary.get("cluster_ids", range(len(sizes)))),
        "pretext": parts.pretext_plan,
        "growth": {
            "start": plan.start,
            "reason": plan.reason,
            "warm_from": plan.warm_from.key if plan.warm_from else None,
            "relabel_from": plan.relabel_from.key if plan.relabel_from else None,
            "previous_flow_run_id": plan.previous_flow_run_id,
        },
        "lineage": extras["lineage"],
        "clustering": {
            "pretext_method": cfg.pretext.method,
            "method": cfg.clustering.method,
            "num_clusters": cfg.scan.num_clusters,
            "auto": parts.chosen,
        },
        "skipped": parts.skipped,
        "settings": parts.reasons,
        "guard": parts.guard,
        "step4": parts.step4,
        "duplicates": extras["duplicates"],
        "duplicates_report": extras["duplicates_report"],
        "model_version": asg.summary.get("model_version"),
        "promotion": extras["promotion"],
        "assignments": extras["assignments"],
        "gallery": extras["gallery"],
        "gallery_error": extras["gallery_error"],
        "mlflow": {
            "tracking_uri": ref.tracking_uri,
            "experiment_id": ref.experiment_id,
            "parent_run_id": ref.parent_run_id,
            "link": tracking.run_link(
                ref.tracking_uri,
                ref.experiment_id,
                ref.parent_run_id,
                MachineSettings().mlflow_ui_url,
            ),
            "ui_command": tracking.ui_command(ref.tracking_uri),
        },
    }
    return RunResult.model_validate(result)
