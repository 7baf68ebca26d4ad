"""The other methods through the whole flow on a tiny local lake: Han et al.'s two stages
(Super-AND pretext, two-stage class assignment) with ``--clusters auto``, and K-means with more
clusters than classes (many-to-one ACC); plus the pure pieces the flow and CLI use for them."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from mlflow import MlflowClient

from flows.report import overclustering_line
from scan_core.config import PipelineConfig, ScanConfig
from tasks import checkpoints, keys
from tasks.clustering import clustering_key, stage_config
from tasks.config import build_config, parse_clusters
from tasks.errors import ScanLakeError
from tasks.pretext import parse_pretext_config, plan_key, pretext_stage_config
from tasks.storage import Storage
from tests.pipeline.conftest import TINY_CONFIG, lake_contents, write_local
from tests.pipeline.helpers import all_cached, nested_runs

TINY_METHODS = {
    "twostage.epochs": 1,
    "twostage.batch_size": 32,
    "twostage.num_heads": 2,
    "iic.epochs": 1,
    "iic.batch_size": 32,
    "iic.num_heads": 2,
    "iic.repeats": 2,
    "cluster_count.k_min": 2,
    "cluster_count.k_max": 5,
    "cluster_count.num_heads": 3,
    "cluster_count.epochs": 5,
    "cluster_count.batch_size": 64,
}


def run_flow(lake: Path, workspace: Path, overrides: dict[str, Any], clusters: Any = None) -> Any:
    from flows.pipeline import scan_pipeline

    config = build_config(TINY_CONFIG, {**TINY_METHODS, **overrides})
    return scan_pipeline(
        lake=str(lake),
        workspace=str(workspace),
        config=config.model_dump(mode="json"),
        clusters=clusters,
    )


def record(result: dict[str, Any], stage: str) -> dict[str, Any]:
    return next(r for r in result["stages"] if r["stage"] == stage)


def summary_markdown_of(flow_run_id: str) -> str:
    from prefect.client.orchestration import get_client

    body = {
        "artifacts": {
            "key": {"any_": ["scan-pipeline-summary"]},
            "flow_run_id": {"any_": [flow_run_id]},
        },
        "limit": 1,
        "offset": 0,
        "sort": "CREATED_DESC",
    }
    with get_client(sync_client=True) as client:
        artifacts = client.request("POST", "/artifacts/filter", json=body).json()
    return str(artifacts[0]["data"])


@pytest.fixture(scope="module")
def lake(
    pipeline_env: Path,
    prefect_server: None,
    fashion: tuple[np.ndarray, np.ndarray],
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Path]:
    os.environ["SCAN_LAKE_MLFLOW_EXPERIMENT"] = "scan-lake-methods"
    root = tmp_path_factory.mktemp("methods") / "lake"
    images, labels = fashion
    write_local(root, lake_contents(images[:120], labels[:120], extras=False))
    yield root
    os.environ.pop("SCAN_LAKE_MLFLOW_EXPERIMENT", None)


@pytest.mark.integration
def test_superand_twostage_with_clusters_auto(lake: Path, tmp_path: Path) -> None:
    workspace = tmp_path / "ws"
    overrides = {
        "pretext.method": "superand",
        "pretext.lr": 0.03,
        "superand.rounds": 1,
        "clustering.method": "twostage",
    }
    result = run_flow(lake, workspace, overrides, clusters="auto")
    info = result["clustering"]
    k = info["num_clusters"]
    assert (info["pretext_method"], info["method"]) == ("superand", "twostage")
    assert info["auto"]["chosen_k"] == k and 2 <= k <= 5 and info["auto"]["ks"] == [2, 3, 4, 5]
    assert result["stages_run"] == [
        "catalog",
        "pretext",
        "embed",
        "mine_neighbors",
        "duplicates",
        "choose_k",
        "scan",
        "guard",
        "assign",
        "evaluate",
    ]
    assert "SCAN's step 4" in result["skipped"]["selflabel"]
    # Super-AND's 128-d embedding (the small CNN's backbone features are 64-d) was mined
    assert record(result, "pretext")["summary"]["method"] == "superand"
    assert record(result, "embed")["summary"]["dim"] == 128
    # the chosen k: MLflow metric and curves (step = k) and plot, summary, assignments
    client = MlflowClient(result["mlflow"]["tracking_uri"])
    parent = client.get_run(result["mlflow"]["parent_run_id"])
    assert parent.data.metrics["clusters/chosen_k"] == k
    assert parent.data.tags["clustering.method"] == "twostage"
    runs = nested_runs(result)
    history = client.get_metric_history(runs["choose_k"].info.run_id, "choose_k/stability")
    assert sorted(m.step for m in history) == [2, 3, 4, 5]
    # every head's held-out loss, training loss and smallest cluster share, per epoch
    scan_run = runs["scan"].info.run_id
    for h in range(2):
        for name in ("val_loss", "loss", "min_share"):
            steps = client.get_metric_history(scan_run, f"twostage/head_{h}_{name}")
            assert [m.step for m in steps] == [1]
    assert "twostage/head_1_selection_loss" in client.get_run(scan_run).data.metrics
    artifacts = {a.path for a in client.list_artifacts(runs["choose_k"].info.run_id)}
    assert {"cluster_count.png", "cluster_count.json"} <= artifacts
    assert Path(info["auto"]["plot"]).read_bytes().startswith(b"\x89PNG")
    markdown = summary_markdown_of(result["flow_run_id"])
    assert f"Clusters: {k}, chosen automatically" in markdown
    assert "selflabel: skipped" in markdown
    ws = Storage(str(workspace))
    asg = record(result, "assign")
    assert len(result["cluster_sizes"]) == k and sum(result["cluster_sizes"]) == 120
    description = ws.read_json(f"{_files(ws, 'scan', record(result, 'scan')['key'])}/model.json")
    assert description["cluster_head"]["kind"] == "normfc"
    assert description["embedding"] == {"head": "linear", "dim": 128}
    assignments = ws.read_table(f"{_files(ws, 'assign', asg['key'])}/assignments.parquet")
    assert len(set(assignments["cluster"].to_pylist())) <= k
    assert len(assignments["probabilities"][0].as_py()) == k
    # a rerun with no change: every stage, choose_k included, is a cache hit
    again = run_flow(lake, workspace, overrides, clusters="auto")
    assert all_cached(again)
    assert again["clustering"]["num_clusters"] == k


def _files(ws: Storage, stage: str, key: str) -> str:
    manifest = ws.read_json(f"{stage}/{key}/_manifest.json")
    return f"{stage}/{key}/{manifest['dir']}"


@pytest.mark.integration
def test_kmeans_overclustering_then_iic(lake: Path, tmp_path: Path) -> None:
    workspace = tmp_path / "ws"
    result = run_flow(lake, workspace, {"clustering.method": "kmeans"}, clusters=12)
    assert result["clustering"]["method"] == "kmeans" and result["clustering"]["auto"] is None
    assert "selflabel" not in result["stages_run"] and "choose_k" not in result["stages_run"]
    metrics = result["metrics"]
    assert (metrics["num_clusters"], metrics["num_classes"]) == (12.0, 10.0)
    assert metrics["many_to_one_acc"] >= metrics["acc"]
    # the saved nearest-centroid model reproduces K-means on the embeddings: the evaluate
    # stage's K-means baseline (same settings) scores exactly the same
    assert metrics["acc"] == pytest.approx(metrics["kmeans_acc"], abs=1e-9)
    client = MlflowClient(result["mlflow"]["tracking_uri"])
    evaluate_run = client.get_run(nested_runs(result)["evaluate"].info.run_id)
    assert "evaluate/many_to_one_acc" in evaluate_run.data.metrics
    markdown = summary_markdown_of(result["flow_run_id"])
    assert "Overclustering: 12 clusters for 10 label classes. Many-to-one ACC" in markdown
    # IIC on the same embeddings: only the clustering stage and what follows it run
    iic = run_flow(lake, workspace, {"clustering.method": "iic"}, clusters=12)
    assert iic["stages_run"] == ["scan", "guard", "assign", "evaluate"]
    assert iic["growth"]["start"] == "cold" and "selflabel" in iic["skipped"]
    ws = Storage(str(workspace))
    description = ws.read_json(f"{_files(ws, 'scan', record(iic, 'scan')['key'])}/model.json")
    assert "embedding" not in description and "cluster_head" not in description  # linear heads
    assert len(iic["cluster_sizes"]) == 12 and sum(iic["cluster_sizes"]) == 120


@pytest.mark.integration
def test_byol_pretext_through_the_flow(lake: Path, tmp_path: Path) -> None:
    """A pretext method added as one registry entry runs through every stage: BYOL's embedding
    is its backbone's (64-d for the small CNN), K-means clusters it, and the saved model
    rebuilds from its description."""
    workspace = tmp_path / "ws"
    overrides = {"pretext.method": "byol", "byol.hidden_dim": 32, "clustering.method": "kmeans"}
    result = run_flow(lake, workspace, overrides)
    assert result["clustering"]["pretext_method"] == "byol"
    pretext = record(result, "pretext")
    assert pretext["summary"]["method"] == "byol" and pretext["summary"]["epochs"] >= 1
    assert record(result, "embed")["summary"]["dim"] == 64
    ws = Storage(str(workspace))
    description = ws.read_json(f"{_files(ws, 'scan', record(result, 'scan')['key'])}/model.json")
    assert description["embedding"] == {"head": "none"}
    assert sum(result["cluster_sizes"]) == 120
    assert result["metrics"]["acc"] == pytest.approx(result["metrics"]["kmeans_acc"], abs=1e-9)
    assert "Pretext: BYOL" in summary_markdown_of(result["flow_run_id"])


# -- the pure pieces ---------------------------------------------------------------------------


def test_parse_clusters() -> None:
    assert parse_clusters(None) is None and parse_clusters(" Auto ") == "auto"
    assert parse_clusters("12") == 12 and parse_clusters(7) == 7
    with pytest.raises(ScanLakeError, match="neither a number nor 'auto'"):
        parse_clusters("many")


def test_method_stage_configs_and_keys() -> None:
    base = PipelineConfig().with_overrides({"scan.num_clusters": 4})
    # SCAN and SimCLR keep the keys they always had
    scan_config = base.scan.model_dump(mode="json")
    inputs = {"neighbors": "n", "pretext": "p"}
    assert clustering_key(scan_config, inputs) == keys.stage_key(
        "scan", ScanConfig.model_validate(scan_config).fingerprint(), inputs
    )
    simclr = pretext_stage_config(base)
    assert simclr == base.pretext.model_dump(mode="json")
    assert parse_pretext_config(simclr)[0].key_name == "pretext"
    superand = pretext_stage_config(base.with_overrides({"pretext.method": "superand"}))
    assert superand["method"] == "superand" and superand["rounds"] == 5
    assert parse_pretext_config(superand)[0].key_name == "superand"
    byol = pretext_stage_config(base.with_overrides({"pretext.method": "byol"}))
    assert byol["method"] == "byol" and byol["target_momentum"] == 0.99
    assert plan_key(byol, "i") != plan_key(superand, "i") != plan_key(simclr, "i")
    twostage = stage_config(base.with_overrides({"clustering.method": "twostage"}), 6)
    iic = stage_config(base.with_overrides({"clustering.method": "iic"}), 6)
    kmeans = stage_config(base.with_overrides({"clustering.method": "kmeans"}), 6)
    assert twostage["num_clusters"] == iic["num_clusters"] == kmeans["num_clusters"] == 6
    assert len({clustering_key(c, inputs) for c in (scan_config, twostage, iic, kmeans)}) == 4
    with pytest.raises(ScanLakeError, match="overcluster"):
        stage_config(
            base.with_overrides({"clustering.method": "twostage", "twostage.overcluster": 8}), 9
        )


def test_twostage_checkpoint_round_trip_and_reorder() -> None:
    torch.manual_seed(0)
    description = checkpoints.clustering_description(
        "small_cnn",
        1,
        4,
        {"head": "simclr", "dim": 16, "hidden": 64},
        {"kind": "normfc", "temperature": 0.1, "norm_axis": "feature"},
    )
    model = checkpoints.build_clustering_model(description).eval()
    copy = checkpoints.build_clustering_model(description).eval()
    copy.load_state_dict(model.state_dict())
    x = torch.rand(3, 1, 28, 28)
    before = model(x)[0].detach()
    torch.testing.assert_close(copy(x)[0].detach(), before)
    order = np.array([3, 1, 0, 2])
    checkpoints.reorder_clusters(model, order)  # Norm-FC heads have no bias
    torch.testing.assert_close(model(x)[0].detach(), before[:, order])


def test_overclustering_line() -> None:
    assert overclustering_line({"num_clusters": 10.0, "num_classes": 10.0}) is None
    assert overclustering_line({}) is None
    line = overclustering_line(
        {"num_clusters": 20.0, "num_classes": 10.0, "acc": 0.4, "many_to_one_acc": 0.7}
    )
    assert line is not None and "Many-to-one ACC 0.7000" in line and "Hungarian ACC 0.4000" in line
