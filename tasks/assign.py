"""Assign stage: cluster probabilities of every image, joined back to every lake object, under
stable cluster ids; the final model is logged to MLflow as a servable pyfunc model
(:mod:`tasks.serving`) and registered (the flow promotes it after evaluation,
:mod:`tasks.promotion`).

Stable ids (docs/architecture.md, 'Growing lakes'): the clusters are matched to those of the
previous run of the lake on the images both runs share (:mod:`tasks.lineage`), and the model's
outputs are reordered so that output ``j`` is the ``j``-th smallest stable id (``cluster_ids`` in
the summary; ``0 .. C-1`` unless a cluster was born or the number of clusters changed). The
reordered model is saved here too: the next run warm-starts from it.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from prefect import task

from scan_core.config import ImageConfig
from scan_core.inference import predict_probabilities
from tasks import checkpoints, serving, tracking
from tasks.catalog import read_catalog
from tasks.errors import ScanLakeError
from tasks.lake import unique_ids
from tasks.lineage import ClusterMatch, churn, cluster_growth, first_ids, match_clusters
from tasks.pixels import load_pixels, png_bytes, stream_pixels
from tasks.schemas import ASSIGNMENTS, CLUSTER_LINEAGE
from tasks.stage import STAGE_TASK_OPTIONS, StageOutput, StageRequest, StageRun, run_stage
from tasks.storage import Storage

ASSIGNMENTS_FILE = "assignments.parquet"
LINEAGE_FILE = "cluster_lineage.parquet"


def read_assignments(workspace: Storage, assign: StageOutput) -> pa.Table:
    """The assignments table (one row per lake object).

    Raises:
        WorkspaceFileError: it is not an assignments table, or its clusters and probabilities
            are not those of the stage's cluster ids.
    """
    rel = f"{assign.rel_dir}/{ASSIGNMENTS_FILE}"
    table = workspace.read_table(rel, schema=ASSIGNMENTS)
    ids = cluster_ids_of(assign)
    lengths = pc.unique(pc.list_value_length(table["probabilities"])).to_pylist()
    if not set(table["cluster"].to_pylist()) <= set(ids) or lengths not in ([], [len(ids)]):
        raise workspace.bad_file(rel, f"does not assign the stage's {len(ids)} clusters")
    return table


def cluster_ids_of(assign: StageOutput) -> list[int]:
    """The stable id of each probability column of an assign stage (``0 .. C-1`` for outputs
    written before stable ids existed)."""
    ids = assign.summary.get("cluster_ids")
    return list(ids) if ids is not None else list(range(len(assign.summary["cluster_sizes"])))


def image_clusters(workspace: Storage, assign: StageOutput) -> dict[str, int]:
    """image_id -> stable cluster id of every image of an assign stage."""
    rel = f"{assign.rel_dir}/{ASSIGNMENTS_FILE}"
    table = workspace.read_table(rel, ["image_id", "cluster"], schema=ASSIGNMENTS)
    if not set(table["cluster"].to_pylist()) <= set(cluster_ids_of(assign)):
        raise workspace.bad_file(rel, "assigns clusters that are not the stage's cluster ids")
    return dict(zip(table["image_id"].to_pylist(), table["cluster"].to_pylist(), strict=True))


def relabel(
    ids: list[str],
    head: np.ndarray,
    num_clusters: int,
    previous: dict[str, int] | None,
    previous_ids: list[int],
    next_id: int | None,
) -> ClusterMatch:
    """Stable ids for the clusters ``head`` (model output of each image of ``ids``), matched to
    the previous run's clusters on the shared images (first run: the identity)."""
    if previous is None:
        return first_ids(num_clusters)
    rows = [r for r, image in enumerate(ids) if image in previous]
    old = np.array([previous[ids[r]] for r in rows], dtype=np.int64)
    return match_clusters(old, head[rows], num_clusters, previous_ids, next_id)


def stream_probabilities(
    run: StageRun,
    network: Any,
    ids: list[str],
    catalog: StageOutput,
    batch_size: int,
    device: str,
) -> np.ndarray:
    """Cluster probabilities ``(len(ids), k)`` of ``network``'s first head, reading the pixel
    store one shard at a time (:func:`tasks.pixels.stream_pixels`)."""
    image_config = ImageConfig.model_validate(catalog.summary["image_config"])
    out: np.ndarray | None = None
    done = 0
    for rows, images in stream_pixels(
        run.workspace, catalog.summary["image_config_key"], ids, image_config
    ):
        part = predict_probabilities(network, images, batch_size=batch_size, device=device)
        if out is None:
            out = np.zeros((len(ids), part.shape[1]), dtype=np.float32)
        out[rows] = part
        done += len(rows)
        run.on_batch(done, len(ids))
    if out is None:
        raise ScanLakeError("The catalog holds no images to assign: rerun the pipeline.")
    return out


@task(name="assign", **STAGE_TASK_OPTIONS)
def assign(
    request: StageRequest,
    model: StageOutput,
    catalog: StageOutput,
    previous: StageOutput | None = None,
) -> StageOutput:
    """Predict clusters with the final model under ids matched to ``previous`` (the previous
    run's assign stage, part of the stage key). ``request.config``: ``device``, ``batch_size``,
    ``registered_model`` (name to register the model under; empty to skip) and ``lake`` (where
    the served model may read ``uri`` inputs). The version gets no alias here: the flow promotes
    it after evaluation. A run that loses the commit to a concurrent one
    (:meth:`tasks.stage.StageRun.finish`) tags the version it registered ``promoted=false``."""
    own: dict[str, str] = {}  # MLflow run id -> version registered by this call

    def body(run: StageRun) -> dict[str, Any]:
        image_config = ImageConfig.model_validate(catalog.summary["image_config"])
        config_key = catalog.summary["image_config_key"]
        table = read_catalog(run.workspace, catalog)
        ids = unique_ids(table)
        network = checkpoints.load_clustering_model(run.workspace, model.rel_dir)
        batch, device = int(request.config.get("batch_size", 1024)), request.config.get("device")
        probabilities = stream_probabilities(
            run, network, ids, catalog, batch, str(device or "auto")
        )
        num_clusters = probabilities.shape[1]
        before = image_clusters(run.workspace, previous) if previous is not None else None
        match = relabel(
            ids,
            probabilities.argmax(axis=1),
            num_clusters,
            before,
            cluster_ids_of(previous) if previous is not None else [],
            previous.summary.get("next_cluster_id") if previous is not None else None,
        )
        probabilities = probabilities[:, match.order]
        network = checkpoints.reorder_clusters(network, match.order)
        cluster_ids = match.sorted_ids
        now = dict(zip(ids, cluster_ids[probabilities.argmax(axis=1)].tolist(), strict=True))
        lineage = _lineage(run, before, now, cluster_ids.tolist(), previous, match)
        assignments, per_object = _assignments_table(table, ids, probabilities, cluster_ids)
        run.write_table(ASSIGNMENTS_FILE, assignments)
        run.write_bytes(checkpoints.CHECKPOINT, checkpoints.state_bytes(network))
        description = run.workspace.read_json(f"{model.rel_dir}/{checkpoints.DESCRIPTION}")
        run.write_json(checkpoints.DESCRIPTION, description)
        sizes = np.bincount(per_object.argmax(axis=1), minlength=num_clusters)
        summary: dict[str, Any] = {
            "objects": len(per_object),
            "images": len(ids),
            "cluster_sizes": sizes.tolist(),
            "cluster_ids": cluster_ids.tolist(),
            "next_cluster_id": match.next_id,
            "mean_confidence": float(per_object.max(axis=1).mean()),
            "model_stage": model.stage,
            "guard_kept": model.summary.get("kept") if model.stage == "guard" else None,
            "lineage": lineage,
        }
        empty = float((sizes == 0).sum())
        run.log_metrics(
            {"assign/mean_confidence": summary["mean_confidence"], "assign/empty_clusters": empty}
        )
        name = str(request.config.get("registered_model") or "")
        if name and request.tracking is not None and run.run_id is not None:
            served = serving.ServingDescription(
                cluster_ids=cluster_ids.tolist(),
                image=image_config,
                lake=str(request.config.get("lake") or ""),
            )
            example = load_pixels(run.workspace, config_key, ids[:1], image_config)[0]
            summary["registered_model"] = name
            summary["model_version"] = serving.log_servable_model(
                request.tracking, run.run_id, network, description, served, png_bytes(example), name
            )
            own[run.run_id] = summary["model_version"]
        return summary

    output = run_stage(request, body)
    _untag_lost_versions(request, output, own)
    return output


def _assignments_table(
    table: pa.Table, ids: list[str], probabilities: np.ndarray, cluster_ids: np.ndarray
) -> tuple[pa.Table, np.ndarray]:
    """The assignments of every catalog row (object) and their ``(objects, k)`` probabilities,
    from the probabilities of the unique images ``ids`` (columns in ``cluster_ids`` order)."""
    position = {image_id: i for i, image_id in enumerate(ids)}
    rows = np.array([position[i] for i in table["image_id"].to_pylist()], dtype=np.int64)
    per_object = probabilities[rows]
    values = pa.FixedSizeListArray.from_arrays(
        pa.array(per_object.reshape(-1).astype(np.float32)), probabilities.shape[1]
    ).cast(pa.list_(pa.float32()))
    assignments = pa.table(
        {
            "image_id": table["image_id"],
            "uri": table["uri"],
            "cluster": pa.array(cluster_ids[per_object.argmax(axis=1)].astype(np.int32)),
            "confidence": pa.array(per_object.max(axis=1).astype(np.float32)),
            "probabilities": values,
        },
        schema=ASSIGNMENTS,
    )
    return assignments, per_object


def _untag_lost_versions(request: StageRequest, output: StageOutput, own: dict[str, str]) -> None:
    """Tag ``promoted=false`` the model versions this call registered for a stage run that lost
    the commit to a concurrent one."""
    lost = {run_id: v for run_id, v in own.items() if run_id != output.run_id}
    if request.tracking is None or not lost:
        return
    name = str(request.config.get("registered_model"))
    for version in lost.values():
        tracking.set_version_tags(
            request.tracking,
            name,
            version,
            {
                "promoted": "false",
                "promotion.reason": "another run committed this assign stage first; its "
                f"model version {output.summary.get('model_version')} is the one in use",
            },
        )


def _lineage(
    run: StageRun,
    before: dict[str, int] | None,
    now: dict[str, int],
    cluster_ids: list[int],
    previous: StageOutput | None,
    match: ClusterMatch,
) -> dict[str, Any]:
    """Write the per-cluster growth table, log churn to MLflow; return the lineage summary."""
    previous_ids = cluster_ids_of(previous) if previous is not None else []
    rows = cluster_growth(before or {}, now, cluster_ids, previous_ids)
    run.write_table(LINEAGE_FILE, pa.Table.from_pylist(rows, schema=CLUSTER_LINEAGE))
    if before is None:
        return {
            "previous": None,
            "churn": None,
            "shared_images": 0,
            "changed_images": 0,
            "born": [],
            "vanished": [],
            "new_images": len(now),
            "removed_images": 0,
            "clusters": rows,
        }
    shared = [i for i in now if i in before]
    old = np.array([before[i] for i in shared], dtype=np.int64)
    new = np.array([now[i] for i in shared], dtype=np.int64)
    churned, changed = churn(old, new), int((old != new).sum())
    new_images, removed = len(now) - len(shared), sum(1 for i in before if i not in now)
    summary = {
        "previous": previous.key if previous is not None else None,
        "churn": churned,
        "shared_images": len(shared),
        "changed_images": changed,
        "born": list(match.born),
        "vanished": list(match.vanished),
        "new_images": new_images,
        "removed_images": removed,
        "clusters": rows,
    }
    run.log_metrics(
        {
            "lineage/churn": churned,
            "lineage/shared_images": float(len(shared)),
            "lineage/changed_images": float(changed),
            "lineage/born": float(len(match.born)),
            "lineage/vanished": float(len(match.vanished)),
            "lineage/new_images": float(new_images),
            "lineage/removed_images": float(removed),
        }
    )
    ref = run.request.tracking
    if ref is not None and run.run_id is not None:
        tracking.log_table(ref, run.run_id, rows, "cluster_lineage.json")
    return summary
