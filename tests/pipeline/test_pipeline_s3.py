"""The whole flow on a tiny lake on S3 (SeaweedFS), then reruns that prove the caching rules by
Prefect state names and MLflow tags. Tests run in file order and share the workspace."""

from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pytest
import s3fs
from mlflow import MlflowClient

from tasks.manifest import StageManifest, committed_dir
from tasks.storage import Storage, table_stage_key
from tests.pipeline.conftest import TINY_CONFIG, lake_contents, write_objects
from tests.pipeline.helpers import (
    ALL_STAGES,
    all_cached,
    cached,
    nested_runs,
    run_pipeline,
    stage_tags,
    states,
)

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def s3_setup(
    pipeline_env: Path, prefect_server: None, fashion: tuple[np.ndarray, np.ndarray]
) -> Iterator[dict[str, Any]]:
    """A lake of 120 PNGs + a duplicate + a corrupt object + labels on S3; the first run."""
    os.environ["SCAN_LAKE_MLFLOW_EXPERIMENT"] = "scan-lake-s3"
    s3fs.S3FileSystem.clear_instance_cache()
    fs = s3fs.S3FileSystem(
        key="scan-lake-test",
        secret="scan-lake-test",
        client_kwargs={"endpoint_url": os.environ["SCAN_LAKE_S3_ENDPOINT_URL"]},
    )
    bucket = f"lake-{uuid.uuid4().hex[:8]}"
    fs.mkdir(bucket)
    images, labels = fashion
    write_objects(fs, f"{bucket}/lake", lake_contents(images[:120], labels[:120]))
    lake, workspace = f"s3://{bucket}/lake", f"s3://{bucket}/workspace"
    first = run_pipeline(lake, workspace)
    yield {"lake": lake, "workspace": workspace, "first": first, "fs": fs, "bucket": bucket}
    os.environ.pop("SCAN_LAKE_MLFLOW_EXPERIMENT", None)


def test_first_run_runs_every_stage(s3_setup: dict[str, Any]) -> None:
    first = s3_setup["first"]
    assert first["stages_run"] == ALL_STAGES
    assert set(states(first).values()) == {"Completed"}
    assert first["counts"]["objects"] == 122
    assert first["counts"]["unique_images"] == 120
    assert first["counts"]["quarantined"] == 1
    assert 0.0 <= first["metrics"]["acc"] <= 1.0
    assert first["metrics"]["num_samples"] == 120.0  # the duplicate key has no sidecar label
    assert sum(first["cluster_sizes"]) == 121
    assert first["model_version"] is not None

    ws = Storage(s3_setup["workspace"])
    stage = {r["stage"]: r for r in first["stages"]}
    manifest = ws.read_json(f"assign/{stage['assign']['key']}/_manifest.json")
    assign_dir = committed_dir(f"assign/{stage['assign']['key']}", StageManifest(**manifest))
    assignments = ws.read_table(f"{assign_dir}/assignments.parquet")
    assert assignments.num_rows == 121  # every usable key, the duplicate included
    assert any(u.endswith("extra/duplicate-of-first.png") for u in assignments["uri"].to_pylist())
    assert table_stage_key(assignments) == stage["assign"]["key"]
    assert manifest["mlflow_run_id"] == stage["assign"]["run_id"]
    assert "assignments.parquet" in manifest["files"]
    catalog_dir = f"catalog/{stage['catalog']['key']}"
    catalog_manifest = ws.read_model(f"{catalog_dir}/_manifest.json", StageManifest, "manifest")
    catalog_dir = committed_dir(catalog_dir, catalog_manifest)
    quarantine = ws.read_table(f"{catalog_dir}/quarantine.parquet")
    assert quarantine["uri"].to_pylist()[0].endswith("extra/broken.png")
    assert "not an image" in quarantine["reason"].to_pylist()[0]
    # the manifests are the cache records: Prefect persists no results, on the workspace or
    # anywhere else
    assert not ws.list_objects("_prefect")


def test_first_run_is_tracked_in_mlflow(s3_setup: dict[str, Any], tmp_path: Path) -> None:
    first = s3_setup["first"]
    client = MlflowClient(first["mlflow"]["tracking_uri"])
    parent = client.get_run(first["mlflow"]["parent_run_id"])
    assert parent.data.tags["prefect.flow_run_id"] == first["flow_run_id"]
    assert parent.data.tags["lake_fingerprint"] == first["lake_fingerprint"]
    runs = nested_runs(first)
    assert set(runs) == set(ALL_STAGES)
    assert all(r.data.tags["cached"] == "false" for r in runs.values())
    assert {s: t["run_id"] for s, t in stage_tags(first).items()} == {
        s: r.info.run_id for s, r in runs.items()
    }
    assert runs["scan"].data.params["num_clusters"] == "3"
    history = client.get_metric_history(runs["pretext"].info.run_id, "pretext/loss")
    assert [m.step for m in history] == [1]
    artifacts = {a.path for a in client.list_artifacts(runs["evaluate"].info.run_id)}
    assert {"confusion.png", "prototypes.png", "metrics.json"} <= artifacts
    # artifacts went to S3 (experiment artifact location on the workspace)
    experiment = client.get_experiment(first["mlflow"]["experiment_id"])
    assert experiment.artifact_location.startswith("s3://")
    assert s3_setup["fs"].find(f"{s3_setup['bucket']}/workspace/_mlflow")
    version = client.get_model_version_by_alias("scan-lake", "champion")
    assert str(version.version) == str(first["model_version"])
    # the model pins torch's public version: a CUDA build's "+cu130" label is not on PyPI, and
    # MLflow warned on every run that the pin did not match the installed distribution
    model_uri = client.get_model_version_download_uri("scan-lake", version.version)
    requirements = mlflow.artifacts.download_artifacts(
        artifact_uri=f"{model_uri}/requirements.txt",
        tracking_uri=first["mlflow"]["tracking_uri"],
        dst_path=str(tmp_path),
    )
    assert f"torch=={importlib.metadata.version('torch')}" in Path(requirements).read_text().split()


def test_no_change_every_stage_cached(s3_setup: dict[str, Any]) -> None:
    again = run_pipeline(s3_setup["lake"], s3_setup["workspace"])
    assert all_cached(again)
    assert again["counts"]["objects_read"] == 0
    # the model version is the first run's, and so is its promotion
    assert again["promotion"]["decided"] is False
    assert again["promotion"]["version"] == s3_setup["first"]["promotion"]["version"]
    # cached stages are tags on the parent run, not empty nested runs
    assert nested_runs(again) == {}
    first_ids = {r["stage"]: r["run_id"] for r in s3_setup["first"]["stages"]}
    tags = stage_tags(again)
    assert set(tags) == set(ALL_STAGES)
    for stage, tag in tags.items():
        assert tag["cached"] == "true" and tag["cache"] == "manifest"
        assert tag["source_run_id"] == first_ids[stage]
        assert tag["key"] == {r["stage"]: r["key"] for r in again["stages"]}[stage]


def test_scan_config_change_reruns_only_scan_onwards(s3_setup: dict[str, Any]) -> None:
    changed = run_pipeline(s3_setup["lake"], s3_setup["workspace"], {"scan.epochs": 2})
    assert changed["stages_run"] == ["scan", "selflabel", "guard", "assign", "evaluate"]
    assert {"catalog", "pretext", "embed", "mine_neighbors"} <= cached(changed)


def test_fresh_prefect_home_still_hits_the_cache(s3_setup: dict[str, Any], tmp_path: Path) -> None:
    """A new machine: another process, an empty PREFECT_HOME and its own Prefect server."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env["PREFECT_HOME"] = str(tmp_path / "prefect-home")
    env["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
    env["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"] = "120"
    out = tmp_path / "result.json"
    command = [
        sys.executable,
        "-m",
        "flows.cli",
        "run",
        "--lake",
        s3_setup["lake"],
        "--workspace",
        s3_setup["workspace"],
        "--config",
        str(TINY_CONFIG),
        "--set",
        "scan.epochs=2",
        "--json",
        str(out),
    ]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert all_cached(result)
    assert "Metrics" in done.stdout and "mlflow ui --backend-store-uri" in done.stdout


def test_prefect_markdown_summary(s3_setup: dict[str, Any]) -> None:
    from prefect.client.orchestration import get_client

    first = s3_setup["first"]
    body = {
        "artifacts": {
            "key": {"any_": ["scan-pipeline-summary"]},
            "flow_run_id": {"any_": [first["flow_run_id"]]},
        },
        "limit": 10,
        "offset": 0,
        "sort": "CREATED_DESC",
    }
    with get_client(sync_client=True) as client:
        artifacts = client.request("POST", "/artifacts/filter", json=body).json()
    assert len(artifacts) == 1
    markdown = str(artifacts[0]["data"])
    assert "| acc |" in markdown and first["mlflow"]["parent_run_id"] in markdown
    assert "quarantined 1" in markdown
