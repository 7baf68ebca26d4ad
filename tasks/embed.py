"""Embed stage: L2-normalised pretext embeddings of the catalog's unique images: the embedding
head's output for SimCLR and Super-AND (the 128-d space their losses shape), the backbone
features for RotNet (whose head predicts rotations).

Embeddings are also kept in a store per backbone (``embedding-store/<pretext key>/``) keyed by image
content hash, so when the lake grows and the backbone is reused only new images are embedded. The
missing images are embedded in shards (:class:`EmbedShard`: the images of one pixel store file, at
most ``SCAN_LAKE_SHARD_IMAGES``), fanned out on the run's engine (:mod:`tasks.parallel`): one model
copy per process, one store file per shard named by its content; the stage reads each store file
once (the earlier ones before embedding, the new ones after) and writes the table. Memory: one
shard's pixels at a time, and the ``(N, D)`` vectors. Tables read back (the stage's, the store's
shards) must be embeddings tables (:func:`read_embeddings_table`).
"""

from __future__ import annotations

import hashlib
import os
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from prefect import task
from pydantic import BaseModel, ConfigDict

from scan_core.config import ImageConfig
from scan_core.inference import compute_embeddings
from tasks import checkpoints, pixels
from tasks.catalog import read_catalog
from tasks.errors import ScanLakeError
from tasks.lake import unique_ids
from tasks.parallel import chunks, fan_out
from tasks.schemas import embeddings_schema
from tasks.settings import MachineSettings
from tasks.stage import STAGE_TASK_OPTIONS, StageOutput, StageRequest, StageRun, run_stage
from tasks.storage import Storage

EMBEDDINGS_FILE = "embeddings.parquet"
STORE_DIR = "embedding-store"


def embeddings_table(ids: list[str], vectors: np.ndarray) -> pa.Table:
    """An embeddings table (schema :func:`tasks.schemas.embeddings_schema`)."""
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    dim = vectors.shape[1]
    values = pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), dim)
    return pa.table({"image_id": ids, "embedding": values}, schema=embeddings_schema(dim))


def table_vectors(table: pa.Table) -> np.ndarray:
    """The ``(N, D)`` float32 matrix of an embeddings table."""
    column = table["embedding"].combine_chunks()
    dim = column.type.list_size
    return column.flatten().to_numpy(zero_copy_only=False).reshape(-1, dim).astype(np.float32)


def read_embeddings_table(workspace: Storage, rel: str | list[str]) -> pa.Table:
    """One embeddings table, or several with one dimension (the store's shards).

    Raises:
        WorkspaceFileError: a file is not an embeddings table
            (:func:`tasks.schemas.embeddings_schema`).
    """
    table = workspace.read_table(rel)
    first = rel if isinstance(rel, str) else rel[0]
    kind = table.schema.field("embedding").type if "embedding" in table.schema.names else None
    dim = kind.list_size if isinstance(kind, pa.FixedSizeListType) else 0
    if dim < 1 or not table.schema.equals(embeddings_schema(dim)):
        raise workspace.bad_file(first, "is not an embeddings table (image_id, embedding vector)")
    if table["image_id"].null_count or table["embedding"].null_count:
        raise workspace.bad_file(first, "has embeddings without an image or vector")
    return table


def read_embeddings(workspace: Storage, embed: StageOutput) -> tuple[list[str], np.ndarray]:
    """Ids and vectors of an embed stage, in its (sorted unique id) order.

    Raises:
        WorkspaceFileError: the table is not an embeddings table.
    """
    table = read_embeddings_table(workspace, f"{embed.rel_dir}/{EMBEDDINGS_FILE}")
    return table["image_id"].to_pylist(), table_vectors(table)


class EmbedShard(BaseModel):
    """One embedding shard: images ``ids`` of the pixel store shard ``pixels``; its output file
    is named by the backbone and the shard's content, so a retried shard writes it again."""

    model_config = ConfigDict(frozen=True)

    pixels: str
    ids: list[str]

    def output(self, pretext_key: str) -> str:
        digest = hashlib.sha256("\n".join([self.pixels, *self.ids]).encode()).hexdigest()
        return f"{STORE_DIR}/{pretext_key}/shard-{digest[:32]}.parquet"


def _store_shards(workspace: Storage, pretext_key: str) -> list[str]:
    prefix = f"{STORE_DIR}/{pretext_key}"
    return [o.key for o in workspace.list_objects(prefix) if o.key.endswith(".parquet")]


def _joined(workspace: Storage, stored: list[str], tables: list[pa.Table]) -> pa.Table:
    """The store files read before embedding and those the shards wrote, as one table.

    Raises:
        WorkspaceFileError: the earlier files hold vectors of another size than the new ones.
    """
    try:
        return pa.concat_tables(tables)
    except pa.ArrowException as exc:
        raise workspace.bad_file(
            stored[0], f"holds embeddings of another size than this backbone's ({exc})"
        ) from exc


def plan_shards(
    workspace: Storage, image_config_key: str, missing: list[str], size: int
) -> list[EmbedShard]:
    """The shards that embed ``missing``: grouped by the pixel store shard that holds them
    (each shard reads one pixel file), at most ``size`` images each, in a deterministic order.

    Raises:
        ScanLakeError: an image is in no pixel store shard.
    """
    plan: list[EmbedShard] = []
    for path, mine in pixels.group_by_shard(workspace, image_config_key, missing):
        plan += [EmbedShard(pixels=path, ids=part) for part in chunks(sorted(mine), size)]
    return plan


_models: dict[tuple[str, str], Any] = {}


def _pretext_model(workspace: Storage, rel_dir: str) -> Any:
    """The pretext model of ``rel_dir``, loaded once per process (one copy per worker)."""
    key = (workspace.url, rel_dir)
    if key not in _models:
        _models.clear()
        _models[key] = checkpoints.load_pretext_model(workspace, rel_dir)
    return _models[key]


@task(name="embed-shard", **STAGE_TASK_OPTIONS)
def embed_shard(
    shard: EmbedShard,
    workspace: str,
    pretext_key: str,
    pretext_dir: str,
    image_config: dict[str, Any],
    image_config_key: str,
    device: str,
    batch_size: int,
) -> dict[str, Any]:
    """Embed one shard and write its store file (:meth:`EmbedShard.output`)."""
    store = Storage(workspace)
    config = ImageConfig.model_validate(image_config)
    images = pixels.load_pixels(store, image_config_key, shard.ids, config, [shard.pixels])
    model = _pretext_model(store, pretext_dir)
    vectors = compute_embeddings(
        model,
        images,
        batch_size=batch_size,
        device=device,
    )
    rel = shard.output(pretext_key)
    store.write_table(rel, embeddings_table(shard.ids, vectors), pretext_key)
    return {"pid": os.getpid(), "file": rel, "images": len(shard.ids)}


@task(name="embed", **STAGE_TASK_OPTIONS)
def embed(request: StageRequest, pretext: StageOutput, catalog: StageOutput) -> StageOutput:
    """Embed the catalog's unique images with the pretext model, reusing stored embeddings:
    the missing ones in shards fanned out on the run's engine (:func:`tasks.parallel.fan_out`),
    then one table in the catalog's order."""

    def body(run: StageRun) -> dict[str, Any]:
        ids = unique_ids(read_catalog(run.workspace, catalog))
        stored_files = _store_shards(run.workspace, pretext.key)
        tables = [read_embeddings_table(run.workspace, stored_files)] if stored_files else []
        stored = set(tables[0]["image_id"].to_pylist()) if tables else set()
        missing = [i for i in ids if i not in stored]
        config_key = catalog.summary["image_config_key"]
        size = MachineSettings().shard_images
        plan = plan_shards(run.workspace, config_key, missing, size) if missing else []
        written = fan_out(
            embed_shard,
            plan,
            stage="embed",
            note="shards",
            gpu=True,
            workspace=run.workspace.url,
            pretext_key=pretext.key,
            pretext_dir=pretext.rel_dir,
            image_config=catalog.summary["image_config"],
            image_config_key=config_key,
            device=str(request.config.get("device", "auto")),
            batch_size=int(request.config.get("batch_size", 1024)),
        )
        if written:  # only the new files: the earlier ones were read above
            tables.append(read_embeddings_table(run.workspace, [w["file"] for w in written]))
        table = _joined(run.workspace, stored_files, tables)
        rows = pc.index_in(pa.array(ids, pa.string()), value_set=table["image_id"])
        if rows.null_count:
            raise ScanLakeError(
                f"{rows.null_count} images have no stored embedding after embedding them: "
                f"delete {run.workspace.uri(f'{STORE_DIR}/{pretext.key}')} and rerun."
            )
        matrix = table_vectors(table.take(rows))
        del table
        run.write_table(EMBEDDINGS_FILE, embeddings_table(ids, matrix))
        counts = {
            "images": len(ids),
            "embedded": len(missing),
            "reused": len(ids) - len(missing),
            "dim": int(matrix.shape[1]),
            "shards": len(plan),
        }
        run.log_metrics({f"embed/{k}": float(v) for k, v in counts.items()})
        return counts

    return run_stage(request, body)
