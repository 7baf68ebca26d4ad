"""What a reviewer and a user get out of a run (issue 29), from one ``scan-lake run --json -`` on
a tiny S3 lake in its own process, checked against the real SeaweedFS, MLflow store and Prefect
server: the JSON, the MLflow records, the registered pyfunc model (loaded and served in fresh
processes), promotion after evaluation, the Prefect artifacts and logs, and the cluster gallery
in a headless browser. Tests run in file order and share the run."""

from __future__ import annotations

import base64
import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import s3fs
import yaml
from mlflow import MlflowClient
from typer.testing import CliRunner

from flows.cli import app
from scan_core.config import PromotionConfig
from scan_core.data import encode_png
from tasks.config import build_config
from tasks.manifest import committed_dir, read_manifest
from tasks.promotion import decide, promote, version_tags
from tasks.storage import Storage
from tasks.tracking import TrackingRef, flatten
from tests.pipeline.cli_runs import ROOT, cli_env, run_cli
from tests.pipeline.conftest import TINY_CONFIG, lake_contents, write_objects
from tests.pipeline.helpers import ALL_STAGES, nested_runs, stage_tags
from tests.pipeline.leaks import prefect_records
from tests.pipeline.weed import free_ports

pytestmark = pytest.mark.integration

#: A lake key that is also HTML.
ODD_KEY = 'extra/<b>odd</b> & "quoted".png'
UI_URL = "http://mlflow-ui.test:5000"


@pytest.fixture(scope="module")
def outputs(
    pipeline_env: Path,
    prefect_server: None,
    fashion: tuple[np.ndarray, np.ndarray],
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[dict[str, Any]]:
    """The first run of a 120-image S3 lake (plus a duplicate, a corrupt object and an image
    under an HTML key), its environment and the parsed ``--json -`` output."""
    s3fs.S3FileSystem.clear_instance_cache()
    fs = s3fs.S3FileSystem(
        key="scan-lake-test",
        secret="scan-lake-test",
        client_kwargs={"endpoint_url": os.environ["SCAN_LAKE_S3_ENDPOINT_URL"]},
    )
    bucket = f"outputs-{uuid.uuid4().hex[:8]}"
    fs.mkdir(bucket)
    images, labels = fashion
    objects = lake_contents(images[:120], labels[:120])
    objects[ODD_KEY] = encode_png(images[150])
    write_objects(fs, f"{bucket}/lake", objects)
    home = tmp_path_factory.mktemp("outputs")
    env = cli_env(home, SCAN_LAKE_MLFLOW_UI_URL=UI_URL)
    lake, workspace = f"s3://{bucket}/lake", f"s3://{bucket}/workspace"
    args = ["run", "--lake", lake, "--workspace", workspace, "--config", str(TINY_CONFIG)]
    done = run_cli([*args, "--json", "-"], env, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    yield {
        "result": json.loads(done.stdout),
        "done": done,
        "args": args,
        "env": env,
        "home": home,
        "fs": fs,
        "bucket": bucket,
        "lake": lake,
        "workspace": workspace,
        "tracking_uri": env["SCAN_LAKE_MLFLOW_TRACKING_URI"],
    }


def _assignments(outputs: dict[str, Any]) -> dict[str, int]:
    table = Storage(outputs["workspace"]).read_table(
        outputs["result"]["assignments"][len(outputs["workspace"]) + 1 :]
    )
    return dict(zip(table["uri"].to_pylist(), table["cluster"].to_pylist(), strict=True))


def test_json_on_stdout_names_the_assignments(outputs: dict[str, Any]) -> None:
    result, done = outputs["result"], outputs["done"]
    assert result["ok"] is True and result["stages_run"] == ALL_STAGES
    assert "Metrics" not in done.stdout + done.stderr  # --json - prints no tables
    assert result["assignments"].startswith(outputs["workspace"] + "/assign/")
    assert result["assignments"].endswith("/assignments.parquet")
    clusters = _assignments(outputs)
    assert len(clusters) == 122 and set(clusters.values()) <= set(result["cluster_ids"])
    assert f"{outputs['lake']}/{ODD_KEY}" in clusters
    assert result["mlflow"]["link"] == (
        f"{UI_URL}/#/experiments/{result['mlflow']['experiment_id']}/runs/"
        f"{result['mlflow']['parent_run_id']}"
    )
    assert result["mlflow"]["ui_command"].endswith(outputs["tracking_uri"])


def test_parent_run_holds_config_lake_and_source(outputs: dict[str, Any], tmp_path: Path) -> None:
    result = outputs["result"]
    client = MlflowClient(outputs["tracking_uri"])
    parent = client.get_run(result["mlflow"]["parent_run_id"])
    config = build_config(TINY_CONFIG).model_dump(mode="json")
    params = parent.data.params
    assert {k: params[k] for k in flatten(config)} == {
        k: v[:6000] for k, v in flatten(config).items()
    }
    assert params["scan.num_clusters"] == "3" and params["clusters"] == "config"
    local = client.download_artifacts(parent.info.run_id, "config.yaml", str(tmp_path))
    assert yaml.safe_load(Path(local).read_text()) == config

    (entry,) = parent.inputs.dataset_inputs
    assert entry.dataset.name == outputs["lake"]
    assert entry.dataset.digest == result["lake_fingerprint"][:36]
    assert outputs["lake"] in entry.dataset.source
    profile = json.loads(entry.dataset.profile)
    assert profile == {"objects": 123, "images": 122, "unique_images": 121, "quarantined": 1}
    assert {t.key: t.value for t in entry.tags}["lake_fingerprint"] == result["lake_fingerprint"]

    commit = subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    for run in [parent, *nested_runs(result).values()]:
        tags = run.data.tags
        assert tags["mlflow.source.git.commit"] == commit
        assert tags["mlflow.source.name"] == "flows/pipeline.py:scan_pipeline"
        assert tags["mlflow.source.type"] == "JOB" and tags["mlflow.user"]
    assert {s: t["cached"] for s, t in stage_tags(result).items()} == dict.fromkeys(
        ALL_STAGES, "false"
    )


def test_model_is_promoted_after_evaluation_with_its_record(outputs: dict[str, Any]) -> None:
    result = outputs["result"]
    client = MlflowClient(outputs["tracking_uri"])
    decision = result["promotion"]
    assert decision["decided"] and decision["promoted"], decision
    version = client.get_model_version_by_alias("scan-lake", "champion")
    assert str(version.version) == decision["version"] == str(result["model_version"])
    tags = version.tags
    assert tags["promoted"] == "true" and tags["promotion.reason"] == decision["reason"]
    assert tags["lake_fingerprint"] == result["lake_fingerprint"]
    assert tags["mlflow_run_id"] == result["mlflow"]["parent_run_id"]
    assert tags["prefect.flow_run_id"] == result["flow_run_id"]
    # the partition the guard kept (on this tiny lake it may be K-means)
    assert tags["partition"] == result["guard"]["kept"]
    assert tags["assignments"] == result["assignments"]
    assert json.loads(tags["cluster_ids"]) == result["cluster_ids"]
    assert json.loads(tags["cluster_sizes"]) == result["cluster_sizes"]
    assert float(tags["metric.acc"]) == pytest.approx(result["metrics"]["acc"], rel=1e-5)
    parent = client.get_run(result["mlflow"]["parent_run_id"]).data.tags
    assert parent["promotion.promoted"] == "true"
    assert version.run_id == nested_runs(result)["assign"].info.run_id


PREDICT = """
import json, sys
import mlflow, pandas as pd
from tasks import serving

request = json.load(open(sys.argv[1]))
checked = serving.load_model("models:/scan-lake@champion")
plain = mlflow.pyfunc.load_model("models:/scan-lake@champion")
blobs = [open(p, "rb").read() for p in request["files"]]
out = {
    "bytes": checked.predict(pd.DataFrame({"image": blobs}))["cluster"].tolist(),
    "plain": plain.predict(pd.DataFrame({"image": blobs}))["cluster"].tolist(),
    "s3": checked.predict(pd.DataFrame({"uri": request["uris"]}))["cluster"].tolist(),
    "local": checked.predict(pd.DataFrame({"uri": request["files"]}))["cluster"].tolist(),
    "metadata": plain.metadata.metadata,
    "signature": plain.metadata.signature.to_dict(),
}
try:
    checked.predict(pd.DataFrame({"uri": ["/etc/passwd"]}))
except Exception as exc:
    out["refused"] = f"{type(exc).__name__}: {exc}"
print(json.dumps(out))
"""


def test_registered_model_predicts_in_a_fresh_process(
    outputs: dict[str, Any], tmp_path: Path
) -> None:
    """``models:/scan-lake@champion`` from the registry, by bytes, by s3:// URI and by local
    path: the clusters are the run's assignments."""
    clusters = _assignments(outputs)
    uris = sorted(clusters)[:6]
    files = []
    for i, uri in enumerate(uris):
        path = tmp_path / f"copy-{i}.png"
        path.write_bytes(outputs["fs"].cat_file(uri.removeprefix("s3://")))
        files.append(str(path))
    request = tmp_path / "request.json"
    request.write_text(json.dumps({"files": files, "uris": uris}))
    env = {
        **outputs["env"],
        "MLFLOW_TRACKING_URI": outputs["tracking_uri"],
        "SCAN_LAKE_SERVING_URI_ROOTS": str(tmp_path),
    }
    done = subprocess.run(
        [sys.executable, "-c", PREDICT, str(request)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    expected = [clusters[u] for u in uris]
    assert out["bytes"] == out["plain"] == out["s3"] == out["local"] == expected
    assert out["metadata"]["cluster_ids"] == outputs["result"]["cluster_ids"]
    assert "ScanLakeError" in out["refused"] and "not under a root" in out["refused"]
    inputs = json.loads(out["signature"]["inputs"])
    assert [(c["name"], c["type"]) for c in inputs] == [("image", "binary"), ("uri", "string")]


def test_mlflow_models_serve_answers_a_request(outputs: dict[str, Any], tmp_path: Path) -> None:
    """``mlflow models serve -m models:/scan-lake@champion --env-manager local`` and a real
    POST /invocations with a base64 image."""
    clusters = _assignments(outputs)
    uri = sorted(clusters)[0]
    image = outputs["fs"].cat_file(uri.removeprefix("s3://"))
    port = free_ports(1)[0]
    env = {**outputs["env"], "MLFLOW_TRACKING_URI": outputs["tracking_uri"]}
    command = [
        str(Path(sys.executable).parent / "mlflow"),
        *("models", "serve", "-m", "models:/scan-lake@champion", "--env-manager", "local"),
        *("-h", "127.0.0.1", "-p", str(port)),
    ]
    log = tmp_path / "serve.log"
    with log.open("wb") as sink:
        server = subprocess.Popen(
            command, cwd=ROOT, env=env, stdout=sink, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + 240
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=5):
                    break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                assert server.poll() is None, log.read_text()[-3000:]
                assert time.monotonic() < deadline, log.read_text()[-3000:]
                time.sleep(1)
        body = {
            "dataframe_split": {"columns": ["image"], "data": [[base64.b64encode(image).decode()]]}
        }
        ask = urllib.request.Request(
            f"http://127.0.0.1:{port}/invocations",
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(ask, timeout=60) as response:
            (prediction,) = json.loads(response.read())["predictions"]
        assert prediction["cluster"] == clusters[uri]
        assert len(prediction["probabilities"]) == len(outputs["result"]["cluster_ids"])
        assert max(prediction["probabilities"]) == pytest.approx(prediction["confidence"])
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(timeout=30)


def _artifacts(flow_run_id: str) -> list[dict[str, Any]]:
    from prefect.client.orchestration import get_client

    body = {
        "artifacts": {"flow_run_id": {"any_": [flow_run_id]}},
        "limit": 200,
        "offset": 0,
        "sort": "CREATED_DESC",
    }
    with get_client(sync_client=True) as client:
        return list(client.request("POST", "/artifacts/filter", json=body).json())


def test_prefect_artifacts_progress_and_library_logs(outputs: dict[str, Any]) -> None:
    result = outputs["result"]
    found = _artifacts(result["flow_run_id"])
    keyed = {a["key"]: a for a in found if a["key"]}
    metrics = keyed["scan-pipeline-metrics"]
    assert metrics["type"] == "table"
    rows = json.loads(metrics["data"]) if isinstance(metrics["data"], str) else metrics["data"]
    assert {r["metric"]: r["value"] for r in rows}["acc"] == pytest.approx(
        result["metrics"]["acc"], abs=1e-6
    )
    sizes = keyed["scan-pipeline-clusters"]["data"]
    sizes = json.loads(sizes) if isinstance(sizes, str) else sizes
    assert [(r["cluster"], r["size"]) for r in sizes] == list(
        zip(result["cluster_ids"], result["cluster_sizes"], strict=True)
    )
    # Prefect stores link artifacts as Markdown links
    for key, link in (
        ("scan-pipeline-assignments", result["assignments"]),
        ("scan-pipeline-mlflow-run", result["mlflow"]["link"]),
        ("scan-pipeline-gallery", result["gallery"]),
    ):
        assert f"]({link})" in str(keyed[key]["data"]), keyed[key]
    progress = {a["key"]: a for a in found if a["type"] == "progress"}
    assert {"progress-pretext", "progress-scan", "progress-selflabel", "progress-embed"} <= set(
        progress
    )
    assert {"progress-assign", "progress-catalog"} <= set(progress)
    assert all(float(a["data"]) == 100.0 for a in progress.values())
    assert all(a["task_run_id"] for a in progress.values())  # filed under the stage's task run
    summary = str(keyed["scan-pipeline-summary"]["data"])
    assert f"[{result['gallery']}]({result['gallery']})" in summary
    assert result["assignments"] in summary and f": {result['promotion']['reason']}." in summary

    logs = prefect_records(result["flow_run_id"])["logs"]
    names = {r["name"] for r in logs}
    assert {"scan_core.training", "scan_core.evaluation", "tasks.promotion"} <= names
    epochs = [r["message"] for r in logs if r["name"] == "scan_core.training"]
    assert any(m.startswith("scan epoch 1/1") for m in epochs)
    assert all(r["task_run_id"] for r in logs if r["name"] == "scan_core.training")


def _chromium(args: list[str]) -> subprocess.CompletedProcess[str]:
    browser = shutil.which("chromium")
    assert browser, "Debian's chromium is missing: run scripts/bootstrap"
    return subprocess.run(
        [browser, "--headless", "--disable-gpu", "--no-sandbox", "--enable-logging=stderr",
         "--v=0", *args],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip


def test_gallery_opens_in_a_browser(outputs: dict[str, Any], tmp_path: Path) -> None:
    """The flow's gallery is logged to MLflow; ``scan-lake export`` writes the same report to a
    folder and to an S3 prefix; chromium loads it without console messages and shows every
    cluster, with every thumbnail file present."""
    result = outputs["result"]
    client = MlflowClient(outputs["tracking_uri"])
    logged = {a.path for a in client.list_artifacts(result["mlflow"]["parent_run_id"], "gallery")}
    assert "gallery/index.html" in logged and "gallery/least_confident.csv" in logged
    parent = client.get_run(result["mlflow"]["parent_run_id"]).data.tags
    assert parent["gallery"] == result["gallery"]

    out = tmp_path / "gallery"
    exported = CliRunner().invoke(
        app,
        [
            "export",
            *("--lake", outputs["lake"], "--workspace", outputs["workspace"]),
            *("--out", str(out), "--run", result["flow_run_id"]),
        ],
    )
    assert exported.exit_code == 0, exported.output
    assert str(out / "index.html") in exported.output
    page = (out / "index.html").read_text()
    flow_copy = Storage(result["gallery"].rsplit("/", 1)[0]).read_bytes("index.html")
    assert page == flow_copy.decode()  # the flow's gallery and the export agree
    assert "<b>odd</b>" not in page
    listed = [
        row["uri"]
        for path in (out / "clusters").glob("*.csv")
        for row in csv.DictReader(path.open())
    ]
    assert sorted(listed) == sorted(_assignments(outputs))  # every object, the raw HTML key too

    dom = _chromium(["--dump-dom", (out / "index.html").as_uri()])
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert "CONSOLE" not in dom.stderr, dom.stderr
    for cluster in result["cluster_ids"]:
        assert f'id="cluster-{cluster}"' in dom.stdout
    sources = [s.split('"', 1)[0] for s in dom.stdout.split('src="')[1:]]
    assert len(sources) > len(result["cluster_ids"]) * 3
    assert all((out / s).is_file() for s in sources), [
        s for s in sources if not (out / s).is_file()
    ]
    shot = tmp_path / "gallery.png"
    assert (
        _chromium(
            ["--window-size=1100,1400", f"--screenshot={shot}", (out / "index.html").as_uri()]
        ).returncode
        == 0
    )
    assert shot.read_bytes().startswith(b"\x89PNG")

    to_s3 = CliRunner().invoke(
        app,
        [
            "export",
            *("--lake", outputs["lake"], "--workspace", outputs["workspace"]),
            *("--out", f"s3://{outputs['bucket']}/report"),
        ],
    )
    assert to_s3.exit_code == 0, to_s3.output
    remote = Storage(f"s3://{outputs['bucket']}/report")
    assert remote.read_bytes("index.html").decode() == page
    assert len([o for o in remote.list_objects("thumbs")]) == len(list((out / "thumbs").iterdir()))


def test_a_run_refused_by_the_gate_leaves_the_champion(
    outputs: dict[str, Any], tmp_path: Path
) -> None:
    """A rerun with 2 self-labeling epochs and a gate no 122 objects in 3 clusters can pass
    (balance 1.0): its new version is tagged ``promoted=false`` with the reason and the champion
    stays; the stages before selflabel come from cache (parent run tags, no nested runs)."""
    strict = ["--set", "promotion.min_balance=1.0", "--set", "promotion.allowed_empty_clusters=0"]
    json_file = tmp_path / "refused.json"
    done = run_cli(
        [*outputs["args"], "--set", "selflabel.epochs=2", *strict, "--json", str(json_file)],
        outputs["env"],
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    refused = json.loads(json_file.read_text())
    assert refused["ok"] is True
    assert refused["stages_run"] == ["selflabel", "guard", "assign", "evaluate"]
    assert "Assignments: " + refused["assignments"] in done.stdout.replace("\n", "")
    decision = refused["promotion"]
    assert decision["decided"] and not decision["promoted"]
    assert "below promotion.min_balance 1.00" in decision["reason"]
    client = MlflowClient(outputs["tracking_uri"])
    tags = client.get_model_version("scan-lake", decision["version"]).tags
    assert tags["promoted"] == "false" and tags["promotion.reason"] == decision["reason"]
    champion = client.get_model_version_by_alias("scan-lake", "champion")
    assert str(champion.version) == outputs["result"]["promotion"]["version"]
    assert f"version {decision['version']}: not promoted" in done.stdout.replace("\n", "")

    assert set(nested_runs(refused)) == {"selflabel", "guard", "assign", "evaluate"}
    first = {r["stage"]: r["run_id"] for r in outputs["result"]["stages"]}
    for stage, tag in stage_tags(refused).items():
        if stage in refused["stages_run"]:
            assert (
                tag["cached"] == "false"
                and tag["run_id"] == nested_runs(refused)[stage].info.run_id
            )
        else:
            assert tag["cached"] == "true" and tag["source_run_id"] == first[stage]
    assert refused["gallery"] != outputs["result"]["gallery"]  # a new partition, a new report


def test_gate_refusals_leave_the_alias_and_say_why(outputs: dict[str, Any]) -> None:
    """On the real registry: a version with an empty cluster, and one whose model scores below
    K-means on the guard's criterion, are tagged ``promoted=false`` and the champion stays; a
    passing one takes the alias."""
    result = outputs["result"]
    client = MlflowClient(outputs["tracking_uri"])
    champion = client.get_model_version_by_alias("scan-lake", "champion")
    source = client.get_model_version_download_uri("scan-lake", champion.version)
    ref = TrackingRef(
        tracking_uri=outputs["tracking_uri"],
        experiment_id=result["mlflow"]["experiment_id"],
        parent_run_id=result["mlflow"]["parent_run_id"],
    )
    guard = {
        "kept": "model",
        "criterion": "knn_modularity",
        "model_score": 0.4,
        "kmeans_score": 0.5,
        "reason": "the model was kept within the guard's margin",
    }
    cases = [([60, 0, 61], None, "empty cluster"), ([40, 40, 41], guard, "scores below K-means")]
    for sizes, case_guard, why in cases:
        other = client.create_model_version("scan-lake", source, champion.run_id)
        decision = decide(sizes, case_guard, PromotionConfig())
        promote(
            ref, "scan-lake", other.version, decision, version_tags(decision, case_guard, {}, {})
        )
        tags = client.get_model_version("scan-lake", other.version).tags
        assert tags["promoted"] == "false" and why in tags["promotion.reason"]
        now = client.get_model_version_by_alias("scan-lake", "champion")
        assert now.version == champion.version
    passing = client.create_model_version("scan-lake", source, champion.run_id)
    decision = decide([40, 40, 41], {**guard, "kmeans_score": 0.3}, PromotionConfig())
    promote(ref, "scan-lake", passing.version, decision, version_tags(decision, None, {}, {}))
    assert client.get_model_version_by_alias("scan-lake", "champion").version == passing.version
    client.set_registered_model_alias("scan-lake", "champion", champion.version)


def test_failed_run_still_writes_json(outputs: dict[str, Any], tmp_path: Path) -> None:
    """A run that stops in a stage (here: scan, on a truncated pretext checkpoint)
    writes ``{"ok": false, "error": ..., "stage": "scan"}``."""
    ws = Storage(outputs["workspace"])
    pretext = next(r for r in outputs["result"]["stages"] if r["stage"] == "pretext")
    manifest = read_manifest(ws, "pretext", pretext["key"])
    assert manifest is not None
    folder = f"pretext/{pretext['key']}"
    checkpoint = f"{committed_dir(folder, manifest)}/model.pt"
    saved = ws.read_bytes(checkpoint)
    ws.write_bytes(checkpoint, saved[: len(saved) // 2])  # a partial write
    json_file = tmp_path / "failed.json"
    try:
        done = run_cli(
            [*outputs["args"], "--set", "scan.epochs=3", "--json", str(json_file)],
            outputs["env"],
        )
    finally:
        ws.write_bytes(checkpoint, saved)
    assert done.returncode == 2, done.stdout[-2000:] + done.stderr[-2000:]
    failure = json.loads(json_file.read_text())
    assert failure["ok"] is False and failure["stage"] == "scan"
    assert failure["exit_status"] == 2
    assert "is not a readable PyTorch checkpoint" in failure["error"]
    assert failure["error"] in done.stdout.replace("\n", "")


def test_version_and_repeated_set_are_documented() -> None:
    import importlib.metadata

    runner = CliRunner()
    version = runner.invoke(app, ["--version"])
    assert version.exit_code == 0
    assert version.output.strip() == f"scan-lake {importlib.metadata.version('scan-lake')}"
    help_text = " ".join(
        runner.invoke(app, ["run", "--help"], env={"COLUMNS": "1000"}).output.split()
    )
    assert "repeat it for several keys" in help_text and "--set scan.epochs=20 --set" in help_text
    assert "'-' for stdout" in help_text


def test_json_failure_before_the_flow_starts(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        app,
        [
            "run",
            *("--lake", str(tmp_path / "nowhere"), "--workspace", str(tmp_path / "ws")),
            *("--json", str(tmp_path / "out.json")),
        ],
    )
    assert result.exit_code == 2
    failure = json.loads((tmp_path / "out.json").read_text())
    assert failure["ok"] is False and failure["stage"] is None
    assert "does not exist" in failure["error"]
