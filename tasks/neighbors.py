"""Neighbour mining stage (SCAN step 2): the k nearest neighbours of every unique image."""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from prefect import task

from scan_core.config import NeighborsConfig
from scan_core.neighbors import mine_neighbors
from tasks.embed import read_embeddings
from tasks.schemas import NEIGHBORS
from tasks.stage import STAGE_TASK_OPTIONS, StageOutput, StageRequest, StageRun, run_stage
from tasks.storage import Storage

NEIGHBORS_FILE = "neighbors.parquet"


def read_neighbor_indices(
    workspace: Storage, neighbors: StageOutput
) -> tuple[list[str], np.ndarray]:
    """Ids (sorted unique order) and the ``(N, k)`` neighbour index matrix ``I`` into them.

    Raises:
        WorkspaceFileError: the table is not a neighbours table, or its neighbours are not ``k``
            of its own images each.
    """
    rel = f"{neighbors.rel_dir}/{NEIGHBORS_FILE}"
    table = workspace.read_table(rel, schema=NEIGHBORS)
    id_array = table["image_id"].combine_chunks()
    ids = id_array.to_pylist()
    k = int(neighbors.summary["k"])
    lists = table["neighbor_ids"].combine_chunks()
    # vectorised (no Python string per neighbour): positions of the neighbours among the ids
    positions = pc.index_in(lists.flatten(), value_set=id_array)
    if (
        id_array.null_count
        or len(set(ids)) != len(ids)
        or pc.any(pc.not_equal(pc.list_value_length(lists), k)).as_py()
        or len(positions) != k * len(ids)
        or positions.null_count
    ):
        raise workspace.bad_file(rel, f"does not list {k} of its own images for each image")
    I = positions.to_numpy(zero_copy_only=False).astype(np.int64)  # noqa: E741
    return ids, I.reshape(len(ids), k)


@task(name="mine_neighbors", **STAGE_TASK_OPTIONS)
def neighbors(request: StageRequest, embed: StageOutput) -> StageOutput:
    """Mine neighbours on the embeddings of ``embed``; write the neighbours table."""

    def body(run: StageRun) -> dict[str, Any]:
        config = NeighborsConfig.model_validate(request.config)
        ids, vectors = read_embeddings(run.workspace, embed)
        result = mine_neighbors(
            vectors,
            config.k,
            index=config.index,
            exact_below=config.exact_below,
            recall_sample=config.recall_sample,
            min_recall=config.min_recall,
        )
        n, k = result.I.shape
        neighbor_ids = pa.ListArray.from_arrays(
            pa.array(np.arange(0, n * k + 1, k, dtype=np.int32)),
            pa.array(ids, pa.string()).take(pa.array(result.I.reshape(-1))),
        )
        similarities = pa.ListArray.from_arrays(
            pa.array(np.arange(0, n * k + 1, k, dtype=np.int32)),
            pa.array(result.D.reshape(-1).astype(np.float32)),
        )
        run.write_table(
            NEIGHBORS_FILE,
            pa.table(
                {"image_id": ids, "neighbor_ids": neighbor_ids, "similarities": similarities},
                schema=NEIGHBORS,
            ),
        )
        stats = {
            "recall": result.recall,
            "seconds": result.seconds,
            "mean_similarity": float(result.D.mean()),
            "nprobe": float(result.nprobe),
        }
        run.log_metrics({f"neighbors/{k_}": v for k_, v in stats.items()})
        return {"k": k, "images": n, "index": result.index_kind, **stats}

    return run_stage(request, body)
