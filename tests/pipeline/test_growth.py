"""A growing lake in a local folder, run after run (tests run in file order on one workspace):

1. first run: 100 Fashion-MNIST images, an exact duplicate object and a near-duplicate image
   (one of them at twice the size), the only near pair reported;
2. 12 images added and 5 removed: exactly 12 embedded, the backbone reused (and why, in MLflow),
   a warm start, the removed images gone from every output, cluster ids matched to run 1;
3. no change: every stage a cache hit (the warm/relabel plan is repeated, so the keys are equal);
4. ``retrain_pretext``: the backbone is retrained on the current images and SCAN starts cold.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from mlflow import MlflowClient
from PIL import Image

from scan_core.config import DuplicatesConfig
from scan_core.data import encode_png, lake_key
from tasks.schemas import CLUSTER_LINEAGE, DUPLICATES
from tasks.storage import Storage, table_stage_key
from tests.pipeline.conftest import lake_contents, write_local
from tests.pipeline.helpers import ALL_STAGES, all_cached, nested_runs, run_pipeline, stage_tags

pytestmark = pytest.mark.integration

FIRST = 100
ADDED = range(100, 112)
REMOVED = range(90, 95)
#: SCAN trains 3 epochs cold and 1 warm, so the warm stage is visible in its params; the guard
#: runs but keeps the model (margin 1: K-means would need a modularity higher by 1), since a
#: warm start needs a SCAN model to start from and K-means may win on a tiny lake trained 3 epochs
OVERRIDES = {"scan.epochs": 3, "growth.warm_scan_epochs": 1, "guard.margin": 1.0}


def stage_dir(ws: Storage, result: dict[str, Any], stage: str) -> str:
    """Workspace-relative folder holding the files of ``stage`` of a run."""
    record = next(r for r in result["stages"] if r["stage"] == stage)
    manifest = ws.read_json(f"{stage}/{record['key']}/_manifest.json")
    attempt = manifest.get("dir")
    return f"{stage}/{record['key']}/{attempt}" if attempt else f"{stage}/{record['key']}"


def table(ws: Storage, result: dict[str, Any], stage: str, name: str) -> Any:
    return ws.read_table(f"{stage_dir(ws, result, stage)}/{name}")


@pytest.fixture(scope="module")
def growth(
    pipeline_env: Path,
    prefect_server: None,
    fashion: tuple[np.ndarray, np.ndarray],
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[dict[str, Any]]:
    os.environ["SCAN_LAKE_MLFLOW_EXPERIMENT"] = "scan-lake-growth"
    root = tmp_path_factory.mktemp("growth")
    lake, workspace = root / "lake", root / "workspace"
    images, labels = fashion
    objects = lake_contents(images[:FIRST], labels[:FIRST], extras=False)
    objects["extra/copy-of-0.png"] = objects[lake_key(0)]  # an exact duplicate object
    # image 1 stored again at twice the size: a near-duplicate (the pipeline decodes it to 28x28)
    near = Image.fromarray(images[1]).resize((56, 56), Image.Resampling.BICUBIC)
    objects["extra/almost-1.png"] = encode_png(np.asarray(near))
    write_local(lake, objects)
    first = run_pipeline(str(lake), str(workspace), OVERRIDES)
    yield {
        "lake": lake,
        "workspace": workspace,
        "ws": Storage(str(workspace)),
        "first": first,
        "images": images,
    }
    os.environ.pop("SCAN_LAKE_MLFLOW_EXPERIMENT", None)


def test_first_run_reports_duplicates_and_first_ids(growth: dict[str, Any]) -> None:
    first, ws = growth["first"], growth["ws"]
    assert first["stages_run"] == ALL_STAGES
    assert first["counts"]["unique_images"] == FIRST + 1
    assert first["counts"]["images_embedded"] == FIRST + 1
    assert first["growth"]["start"] == "cold"
    assert first["pretext"]["reason"].startswith("no earlier backbone")
    assert first["lineage"]["churn"] is None
    assert first["cluster_ids"] == [0, 1, 2]

    report = table(ws, first, "duplicates", "duplicates.parquet")
    assert report.schema.remove_metadata() == DUPLICATES
    assert table_stage_key(report) == next(
        r["key"] for r in first["stages"] if r["stage"] == "duplicates"
    )
    rows = report.to_pylist()
    exact = [r for r in rows if r["kind"] == "exact"]
    assert len(exact) == 1
    assert exact[0]["duplicate_uri"].endswith("images/000/000000.png")
    assert exact[0]["uri"].endswith("extra/copy-of-0.png")
    near = [r for r in rows if r["kind"] == "near"]
    pair = {
        frozenset((r["uri"].rsplit("/", 1)[1], r["duplicate_uri"].rsplit("/", 1)[1])) for r in near
    }
    # the copy and nothing else: distinct images of one class are not near-duplicates
    assert pair == {frozenset(("almost-1.png", "000001.png"))}
    rule = DuplicatesConfig()
    assert all(r["similarity"] >= rule.min_pixel_similarity for r in near)
    assert all(r["hamming"] <= rule.max_hamming and r["cosine"] >= rule.min_cosine for r in near)
    assert first["duplicates"]["exact_duplicate_objects"] == 1
    assert first["duplicates"]["near_pairs"] == len(near)


def test_grown_lake_embeds_only_new_images_and_forgets_removed_ones(
    growth: dict[str, Any],
) -> None:
    lake: Path = growth["lake"]
    images = growth["images"]
    for i in ADDED:
        path = lake / lake_key(i)
        path.write_bytes(encode_png(images[i]))
    removed_ids = set()
    first_catalog = table(growth["ws"], growth["first"], "catalog", "catalog.parquet")
    uri_to_id = dict(
        zip(first_catalog["uri"].to_pylist(), first_catalog["image_id"].to_pylist(), strict=True)
    )
    for i in REMOVED:
        removed_ids.add(uri_to_id[str(lake / lake_key(i))])
        (lake / lake_key(i)).unlink()
    grown = run_pipeline(str(lake), str(growth["workspace"]), OVERRIDES)
    growth["grown"] = grown
    ws = growth["ws"]

    # exactly the new images were embedded, and MLflow says so
    assert grown["counts"]["images_embedded"] == len(ADDED)
    assert grown["counts"]["unique_images"] == FIRST + 1 + len(ADDED) - len(REMOVED)
    runs = nested_runs(grown)
    client = MlflowClient(grown["mlflow"]["tracking_uri"])
    assert runs["embed"].data.metrics["embed/embedded"] == len(ADDED)
    parent = client.get_run(grown["mlflow"]["parent_run_id"])
    assert parent.data.metrics["images_embedded"] == len(ADDED)

    # the backbone was reused, and the runs say why
    assert "pretext" not in grown["stages_run"]
    assert grown["pretext"]["reused"] is True
    assert grown["pretext"]["new_images"] == len(ADDED)
    assert grown["pretext"]["trained_images"] == FIRST + 1 - len(REMOVED)
    assert "reusing it" in grown["pretext"]["reason"] and "<= 50%" in grown["pretext"]["reason"]
    assert parent.data.tags["pretext.reused"] == "true"
    assert parent.data.tags["pretext.reason"] == grown["pretext"]["reason"]
    assert parent.data.tags["pretext.backbone_key"] == grown["pretext"]["key"]
    # the cached pretext stage has no run of its own: the parent names the run that made it
    assert "pretext" not in runs
    pretext_tags = stage_tags(grown)["pretext"]
    assert pretext_tags["cached"] == "true" and pretext_tags["key"] == grown["pretext"]["key"]

    # warm start from run 1's model, with the warm epochs
    assert grown["growth"]["start"] == "warm", grown["growth"]["reason"]
    assert grown["growth"]["warm_from"] == next(
        r["key"] for r in growth["first"]["stages"] if r["stage"] == "assign"
    )
    assert parent.data.tags["start"] == "warm"
    assert runs["scan"].data.params["epochs"] == "1"
    assert runs["scan"].data.params["num_heads"] == "1"

    # removed images are gone from every output of the new run
    current = set(table(ws, grown, "catalog", "catalog.parquet")["image_id"].to_pylist())
    assert not current & removed_ids
    embedded = table(ws, grown, "embed", "embeddings.parquet")["image_id"].to_pylist()
    assert set(embedded) == current and len(embedded) == len(current)
    nbrs = table(ws, grown, "mine_neighbors", "neighbors.parquet")
    assert set(nbrs["image_id"].to_pylist()) == current
    assert {i for row in nbrs["neighbor_ids"].to_pylist() for i in row} <= current
    assignments = table(ws, grown, "assign", "assignments.parquet")
    assert set(assignments["image_id"].to_pylist()) == current
    # the sidecar labels the first 100 keys: the 5 removed ones are no longer scored
    assert grown["metrics"]["num_samples"] == FIRST - len(REMOVED)
    assert sum(grown["cluster_sizes"]) == len(current) + 1  # + the duplicate object


def test_cluster_ids_follow_the_previous_run(growth: dict[str, Any]) -> None:
    first, grown, ws = growth["first"], growth["grown"], growth["ws"]
    before = table(ws, first, "assign", "assignments.parquet")
    after = table(ws, grown, "assign", "assignments.parquet")
    old = dict(zip(before["image_id"].to_pylist(), before["cluster"].to_pylist(), strict=True))
    new = dict(zip(after["image_id"].to_pylist(), after["cluster"].to_pylist(), strict=True))
    shared = sorted(set(old) & set(new))
    lineage = grown["lineage"]
    assert lineage["shared_images"] == len(shared) == FIRST + 1 - len(REMOVED)
    assert lineage["new_images"] == len(ADDED) and lineage["removed_images"] == len(REMOVED)
    changed = sum(old[i] != new[i] for i in shared)
    assert lineage["changed_images"] == changed
    assert lineage["churn"] == pytest.approx(changed / len(shared))
    # the relabelling is optimal: no permutation of today's ids agrees more with yesterday's
    ids = grown["cluster_ids"]
    agree = sum(old[i] == new[i] for i in shared)
    for perm in itertools.permutations(ids):
        relabel = dict(zip(ids, perm, strict=True))
        assert sum(old[i] == relabel[new[i]] for i in shared) <= agree
    # per-cluster growth table: in the workspace, in the result and in MLflow
    rows = table(ws, grown, "assign", "cluster_lineage.parquet")
    assert rows.schema.remove_metadata() == CLUSTER_LINEAGE
    assert sum(rows["size"].to_pylist()) == len(new)
    assert sum(rows["previous_size"].to_pylist()) == len(old)
    assert sum(rows["new_images"].to_pylist()) == len(ADDED)
    assert sum(rows["moved_in"].to_pylist()) == changed
    assert rows.to_pylist() == lineage["clusters"]
    client = MlflowClient(grown["mlflow"]["tracking_uri"])
    parent = client.get_run(grown["mlflow"]["parent_run_id"])
    assert parent.data.metrics["lineage/churn"] == pytest.approx(lineage["churn"])
    assert parent.data.metrics["lineage/shared_images"] == len(shared)
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert "cluster_lineage.json" in artifacts


def test_growth_is_in_the_prefect_summary(growth: dict[str, Any]) -> None:
    from prefect.client.orchestration import get_client

    grown = growth["grown"]
    body = {
        "artifacts": {
            "key": {"any_": ["scan-pipeline-summary"]},
            "flow_run_id": {"any_": [grown["flow_run_id"]]},
        },
        "limit": 10,
        "offset": 0,
        "sort": "CREATED_DESC",
    }
    with get_client(sync_client=True) as client:
        artifacts = client.request("POST", "/artifacts/filter", json=body).json()
    markdown = str(artifacts[0]["data"])
    assert "## Growth" in markdown and "Warm start:" in markdown
    assert f"Churn: {100 * grown['lineage']['churn']:.1f}%" in markdown
    assert f"Images embedded: {len(ADDED)} of" in markdown
    assert grown["pretext"]["reason"] in markdown
    assert "| cluster | status | before | now |" in markdown
    assert "## Duplicates" in markdown and "Exact: 1 extra objects" in markdown


def test_unchanged_lake_repeats_the_plan_and_hits_every_cache(growth: dict[str, Any]) -> None:
    again = run_pipeline(str(growth["lake"]), str(growth["workspace"]), OVERRIDES)
    assert all_cached(again)
    assert again["growth"] == growth["grown"]["growth"]
    assert again["counts"]["images_embedded"] == 0


def test_retrain_pretext_trains_on_the_current_images_and_starts_cold(
    growth: dict[str, Any],
) -> None:
    retrained = run_pipeline(
        str(growth["lake"]), str(growth["workspace"]), OVERRIDES, retrain_pretext=True
    )
    assert "pretext" in retrained["stages_run"]
    assert retrained["pretext"]["reused"] is False
    assert retrained["pretext"]["reason"] == "retrain requested (--retrain-pretext)"
    assert retrained["pretext"]["key"] != growth["grown"]["pretext"]["key"]
    assert retrained["counts"]["images_embedded"] == retrained["counts"]["unique_images"]
    assert retrained["growth"]["start"] == "cold"
    assert "the backbone changed" in retrained["growth"]["reason"]
    assert retrained["lineage"]["shared_images"] == retrained["counts"]["unique_images"]
    assert nested_runs(retrained)["scan"].data.params["epochs"] == "3"
