"""The whole flow on a tiny lake in a local folder: first run, every stage reused from its
manifest (Prefect persists no results), and a lake that grew by 10% (backbone reused, only new
images embedded)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from scan_core.data import lake_key
from tests.pipeline.conftest import lake_contents, write_local
from tests.pipeline.helpers import (
    ALL_STAGES,
    all_cached,
    cached,
    nested_runs,
    run_pipeline,
    stage_tags,
)

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def local_setup(
    pipeline_env: Path,
    prefect_server: None,
    fashion: tuple[np.ndarray, np.ndarray],
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[dict[str, Any]]:
    os.environ["SCAN_LAKE_MLFLOW_EXPERIMENT"] = "scan-lake-local"
    root = tmp_path_factory.mktemp("local")
    lake, workspace = root / "lake", root / "lake" / "_workspace"  # a nested workspace
    images, labels = fashion
    write_local(lake, lake_contents(images[:120], labels[:120], extras=False))
    first = run_pipeline(str(lake), str(workspace))
    yield {"lake": lake, "workspace": workspace, "first": first, "fashion": fashion}
    os.environ.pop("SCAN_LAKE_MLFLOW_EXPERIMENT", None)


def test_first_run_on_a_local_folder(local_setup: dict[str, Any]) -> None:
    first = local_setup["first"]
    assert first["stages_run"] == ALL_STAGES
    assert first["counts"]["objects"] == 120  # the nested workspace is not part of the lake
    assert first["counts"]["quarantined"] == 0
    assert first["metrics"]["num_samples"] == 120.0
    workspace: Path = local_setup["workspace"]
    for record in first["stages"]:
        assert (workspace / record["stage"] / record["key"] / "_manifest.json").is_file()
    assert not (workspace / "_prefect").exists()  # no Prefect results on the workspace


def test_every_manifest_is_reused_on_a_rerun(local_setup: dict[str, Any]) -> None:
    again = run_pipeline(str(local_setup["lake"]), str(local_setup["workspace"]))
    assert all_cached(again)  # each task ran, found its manifest, reused it
    first_ids = {r["stage"]: r["run_id"] for r in local_setup["first"]["stages"]}
    assert nested_runs(again) == {}  # no empty "(cached)" runs
    tags = stage_tags(again)
    assert set(tags) == set(ALL_STAGES)
    for stage, tag in tags.items():
        assert tag["cached"] == "true" and tag["cache"] == "manifest"
        assert tag["source_run_id"] == first_ids[stage]
    assert not (local_setup["workspace"] / "_prefect").exists()


def test_new_images_reuse_the_backbone_and_embed_only_new_ones(
    local_setup: dict[str, Any],
) -> None:
    images, labels = local_setup["fashion"]
    lake: Path = local_setup["lake"]
    for i in range(120, 132):  # 10% more images
        from scan_core.data import encode_png

        path = lake / lake_key(i)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(encode_png(images[i]))
    grown = run_pipeline(str(lake), str(local_setup["workspace"]))
    assert "pretext" not in grown["stages_run"]
    assert "pretext" in cached(grown)
    assert grown["stages_run"] == [s for s in ALL_STAGES if s != "pretext"]
    assert grown["counts"]["images_embedded"] == 12
    assert grown["counts"]["objects_read"] == 12
    assert grown["counts"]["unique_images"] == 132
