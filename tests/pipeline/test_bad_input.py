"""A messy lake on S3: every usable image is clustered, every other object is quarantined with
its reason, the counts reach MLflow and the run summary, and the lake is never written."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import s3fs
from mlflow import MlflowClient

from scan_core.data import lake_objects
from tasks.stage import stage_output
from tasks.storage import Storage
from tests.pipeline.conftest import write_objects
from tests.pipeline.helpers import all_cached, nested_runs, run_pipeline
from tests.pipeline.messy import MAX_OBJECT_BYTES, bad_objects, odd_images

pytestmark = pytest.mark.integration


def lake_state(fs: s3fs.S3FileSystem, root: str) -> dict[str, tuple[int, str]]:
    """Every object under ``root``: key -> (size, ETag), straight from the server."""
    fs.invalidate_cache()
    found = fs.find(root, detail=True)
    return {path[len(root) + 1 :]: (info["size"], info["ETag"]) for path, info in found.items()}


def stage_table(workspace: Storage, record: dict[str, Any], name: str) -> Any:
    """Table ``name`` of the committed stage of ``record`` (a result's stage record)."""
    committed = stage_output(workspace, record["stage"], record["key"])
    assert committed is not None
    return workspace.read_table(f"{committed.rel_dir}/{name}")


@pytest.fixture(scope="module")
def messy(
    pipeline_env: Path, prefect_server: None, fashion: tuple[np.ndarray, np.ndarray]
) -> Iterator[dict[str, Any]]:
    """30 plain PNGs, 20 usable oddities and 13 objects to quarantine; one run."""
    os.environ["SCAN_LAKE_MLFLOW_EXPERIMENT"] = "scan-lake-bad-input"
    os.environ["SCAN_LAKE_MAX_OBJECT_BYTES"] = str(MAX_OBJECT_BYTES)
    s3fs.S3FileSystem.clear_instance_cache()
    fs = s3fs.S3FileSystem(
        key="scan-lake-test",
        secret="scan-lake-test",
        client_kwargs={"endpoint_url": os.environ["SCAN_LAKE_S3_ENDPOINT_URL"]},
    )
    bucket = f"messy-{uuid.uuid4().hex[:8]}"
    fs.mkdir(bucket)
    images = fashion[0]
    good = {**dict(lake_objects(images[:30])), **odd_images(images[30:51])}
    bad = bad_objects(images[51:53])
    write_objects(fs, f"{bucket}/lake", {**good, **{k: v for k, (v, _) in bad.items()}})
    lake, workspace = f"s3://{bucket}/lake", f"s3://{bucket}/workspace"
    before = lake_state(fs, f"{bucket}/lake")
    result = run_pipeline(lake, workspace)
    yield {
        "lake": lake,
        "workspace": Storage(workspace),
        "good": good,
        "bad": bad,
        "before": before,
        "after": lake_state(fs, f"{bucket}/lake"),
        "result": result,
    }
    os.environ.pop("SCAN_LAKE_MLFLOW_EXPERIMENT", None)
    os.environ.pop("SCAN_LAKE_MAX_OBJECT_BYTES", None)


def test_every_object_is_clustered_or_quarantined_with_its_reason(messy: dict[str, Any]) -> None:
    result, lake, ws = messy["result"], messy["lake"], messy["workspace"]
    good, bad = messy["good"], messy["bad"]
    record = {r["stage"]: r for r in result["stages"]}
    quarantine = stage_table(ws, record["catalog"], "quarantine.parquet").to_pylist()
    reasons = {row["uri"]: row["reason"] for row in quarantine}
    assert set(reasons) == {f"{lake}/{key}" for key in bad}
    for key, (_, fragment) in bad.items():
        assert fragment in reasons[f"{lake}/{key}"], (key, reasons[f"{lake}/{key}"])

    assignments = stage_table(ws, record["assign"], "assignments.parquet")
    assert sorted(assignments["uri"].to_pylist()) == sorted(f"{lake}/{key}" for key in good)
    clusters = assignments["cluster"].to_pylist()
    assert set(clusters) <= {0, 1, 2}
    # the invariant: images in the lake = clustered + quarantined
    assert len(messy["before"]) == 63 == len(assignments) + len(quarantine)
    assert result["counts"]["objects"] == 63
    assert result["counts"]["quarantined"] == len(bad) == 13
    assert result["counts"]["unique_images"] == len(good) == 50
    assert sum(result["cluster_sizes"]) == 50


def test_counts_reach_mlflow_and_the_run_summary(messy: dict[str, Any]) -> None:
    from prefect.client.orchestration import get_client

    result = messy["result"]
    client = MlflowClient(result["mlflow"]["tracking_uri"])
    parent = client.get_run(result["mlflow"]["parent_run_id"])
    assert parent.data.metrics["lake/quarantined"] == 13.0
    assert parent.data.metrics["lake/objects"] == 63.0
    assert parent.data.metrics["lake/unique_images"] == 50.0
    catalog_run = nested_runs(result)["catalog"]
    assert catalog_run.data.metrics["catalog/quarantined"] == 13.0
    local = client.download_artifacts(catalog_run.info.run_id, "quarantine.tsv")
    lines = Path(local).read_text().splitlines()
    assert lines[0] == "uri\treason" and len(lines) == 14
    assert {line.split("\t")[0] for line in lines[1:]} == {
        f"{messy['lake']}/{key}" for key in messy["bad"]
    }

    body = {
        "artifacts": {
            "key": {"any_": ["scan-pipeline-summary"]},
            "flow_run_id": {"any_": [result["flow_run_id"]]},
        },
        "limit": 1,
    }
    with get_client(sync_client=True) as prefect:
        artifacts = prefect.request("POST", "/artifacts/filter", json=body).json()
    assert "Objects 63, images 50 (50 unique), quarantined 13." in str(artifacts[0]["data"])


def test_the_lake_is_never_written(messy: dict[str, Any]) -> None:
    """Same keys, sizes and ETags after the run as before it."""
    assert messy["after"] == messy["before"]
    assert len(messy["after"]) == 63


def test_a_rerun_reads_nothing_and_recomputes_nothing(messy: dict[str, Any]) -> None:
    again = run_pipeline(messy["lake"], messy["workspace"].url)
    assert again["counts"]["objects_read"] == 0  # quarantined objects are not read again either
    assert again["counts"]["quarantined"] == 13
    assert all_cached(again)
