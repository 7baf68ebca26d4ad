"""Embed stage: L2-normalised pretext embeddings of the catalog's unique images: the embedding
head's output for SimCLR and Super-AND (the 128-d space their losses shape), the backbone
features for RotNet (whose head predicts rotations).

Embeddings are also kept in a store per backbone (``embedding-store/<pretext key>/``) keyed by
image content hash, so when the lake grows and the backbone is reused only new images are embedded.
Tables read back (the stage's, the store's shards) must be embeddings tables
(:func:`read_embeddings_table`).
"""

from __future__ import annotations

import uuid
from typing import Any

import numpy as np
import pyarrow as pa
from prefect import task

from scan_core.config import ImageConfig
from scan_core.inference import compute_embeddings
from scan_core.models import RotNetHead
from tasks import checkpoints
from tasks.catalog import read_catalog
from tasks.lake import unique_ids
from tasks.pixels import load_pixels
from tasks.schemas import embeddings_schema
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


def _stored(workspace: Storage, pretext_key: str) -> dict[str, np.ndarray]:
    prefix = f"{STORE_DIR}/{pretext_key}"
    shards = [o.key for o in workspace.list_objects(prefix) if o.key.endswith(".parquet")]
    if not shards:
        return {}
    table = read_embeddings_table(workspace, shards)
    vectors = table_vectors(table)
    return dict(zip(table["image_id"].to_pylist(), vectors, strict=True))


def embed_fn(request: StageRequest, pretext: StageOutput, catalog: StageOutput) -> StageOutput:
    """Embed the catalog's unique images with the pretext model, reusing stored embeddings."""

    def body(run: StageRun) -> dict[str, Any]:
        ids = unique_ids(read_catalog(run.workspace, catalog))
        stored = _stored(run.workspace, pretext.key)
        missing = [i for i in ids if i not in stored]
        if missing:
            image_config = ImageConfig.model_validate(catalog.summary["image_config"])
            images = load_pixels(
                run.workspace, catalog.summary["image_config_key"], missing, image_config
            )
            model = checkpoints.load_pretext_model(run.workspace, pretext.rel_dir)
            vectors = compute_embeddings(
                model,
                images,
                batch_size=int(request.config.get("batch_size", 1024)),
                device=str(request.config.get("device", "auto")),
                use_head=not isinstance(model.head, RotNetHead),
                progress=run.on_batch,
            )
            run.workspace.write_table(
                f"{STORE_DIR}/{pretext.key}/part-{uuid.uuid4().hex}.parquet",
                embeddings_table(missing, vectors),
                pretext.key,
            )
            stored.update(zip(missing, vectors, strict=True))
        matrix = np.stack([stored[i] for i in ids])
        run.write_table(EMBEDDINGS_FILE, embeddings_table(ids, matrix))
        counts = {
            "images": len(ids),
            "embedded": len(missing),
            "reused": len(ids) - len(missing),
            "dim": int(matrix.shape[1]),
        }
        run.log_metrics({f"embed/{k}": float(v) for k, v in counts.items()})
        return counts

    return run_stage(request, body)


@task(name="embed", **STAGE_TASK_OPTIONS)
def embed(request: StageRequest, pretext: StageOutput, catalog: StageOutput) -> StageOutput:
    """Embed stage task (cached on the embed key)."""
    return embed_fn(request, pretext, catalog)
