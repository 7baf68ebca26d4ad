"""Parallel work on a real Dask ``LocalCluster`` of 2 worker processes, through Prefect's
``DaskTaskRunner``: the lake scan's decoding, the embedding shards and the ks of
``--clusters auto`` run in both workers (neither is the flow's process), and every stage's
output equals the single-process run's on the same lake (the tiny config, small shards so that
each stage has several)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest

from tasks.config import build_config
from tasks.errors import ScanLakeError
from tasks.parallel import engine_sentence, requested
from tests.pipeline.conftest import TINY_CONFIG, lake_contents, write_local

pytestmark = pytest.mark.integration


def _run(lake: Path, workspace: Path, workers: int | None) -> dict[str, Any]:
    from flows.pipeline import scan_pipeline

    overrides = {"cluster_count.k_min": 2, "cluster_count.k_max": 5, "cluster_count.epochs": 2}
    config = build_config(TINY_CONFIG, overrides)
    return scan_pipeline(
        lake=str(lake),
        workspace=str(workspace),
        config=config.model_dump(mode="json"),
        clusters="auto",
        workers=workers,
    )


def _assignments(result: dict[str, Any]) -> dict[str, int]:
    table = pq.read_table(result["assignments"], columns=["uri", "cluster"])
    return dict(zip(table["uri"].to_pylist(), table["cluster"].to_pylist(), strict=True))


@pytest.fixture(scope="module")
def runs(
    pipeline_env: Path,
    prefect_server: None,
    fashion: tuple[np.ndarray, np.ndarray],
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[dict[str, dict[str, Any]]]:
    root = tmp_path_factory.mktemp("parallel")
    images, labels = fashion
    write_local(root / "lake", lake_contents(images[:120], labels[:120], extras=False))
    saved = os.environ.get("SCAN_LAKE_SHARD_IMAGES")
    os.environ["SCAN_LAKE_SHARD_IMAGES"] = "32"  # 120 images: 4 shards per stage
    try:
        single = _run(root / "lake", root / "single", None)
        dask = _run(root / "lake", root / "dask", 2)
    finally:
        if saved is None:
            os.environ.pop("SCAN_LAKE_SHARD_IMAGES", None)
        else:
            os.environ["SCAN_LAKE_SHARD_IMAGES"] = saved
    yield {"single": single, "dask": dask, "root": {"path": root}}


def test_single_process_run_stays_in_the_flow_process(runs: dict[str, dict[str, Any]]) -> None:
    engine = runs["single"]["parallel"]
    assert engine["engine"] == "process"
    assert engine["worker_pids"] == [os.getpid()]
    assert engine["shards"] == 4 + 4 + 4  # lake scan, embedding, the ks 2..5


def test_two_workers_share_the_shards(runs: dict[str, dict[str, Any]]) -> None:
    engine = runs["dask"]["parallel"]
    assert engine["engine"] == "local" and engine["workers"] == 2
    assert engine["shards"] == 12
    pids = engine["worker_pids"]
    assert len(pids) == 2, pids  # both worker processes ran shards
    assert os.getpid() not in pids and engine["flow_pid"] not in pids


def test_dask_run_equals_the_single_process_run(runs: dict[str, dict[str, Any]]) -> None:
    single, dask = runs["single"], runs["dask"]
    assert dask["counts"] == single["counts"]
    assert dask["clustering"]["num_clusters"] == single["clustering"]["num_clusters"]
    assert dask["clustering"]["auto"]["criteria"] == single["clustering"]["auto"]["criteria"]
    # the same stage keys: the same inputs, wherever the shards ran
    assert [r["key"] for r in dask["stages"]] == [r["key"] for r in single["stages"]]
    assert _assignments(dask) == _assignments(single)
    assert len(_assignments(single)) == 120


def test_embedding_store_files_are_named_by_content(runs: dict[str, dict[str, Any]]) -> None:
    root: Path = runs["root"]["path"]
    single = sorted(p.name for p in (root / "single" / "embedding-store").rglob("*.parquet"))
    dask = sorted(p.name for p in (root / "dask" / "embedding-store").rglob("*.parquet"))
    assert single == dask and len(single) == 4
    pixels = sorted(p.name for p in (root / "dask" / "pixels").rglob("*.parquet"))
    assert pixels == sorted(p.name for p in (root / "single" / "pixels").rglob("*.parquet"))


def test_the_engine_is_told_in_one_sentence(runs: dict[str, dict[str, Any]]) -> None:
    single = engine_sentence(runs["single"]["parallel"])
    assert single.startswith("Parallel work: 12 shards in the run's own process")
    dask = engine_sentence(runs["dask"]["parallel"])
    assert "12 shards on a local Dask cluster of 2 worker processes" in dask
    assert all(str(pid) in dask for pid in runs["dask"]["parallel"]["worker_pids"])


@pytest.mark.parametrize(
    ("workers", "address", "words"),
    [
        (2, "127.0.0.1:8786", "not both"),
        (0, None, "between 1 and"),
        (None, "http://example.org/x y", "not a scheduler address"),
    ],
)
def test_bad_engine_requests_are_one_sentence(
    workers: int | None, address: str | None, words: str
) -> None:
    with pytest.raises(ScanLakeError, match=words):
        requested(workers, address)
