"""Task logic through ``.fn()`` and the plain functions behind the tasks, on a local folder."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from scan_core.config import ImageConfig, PipelineConfig
from scan_core.data import encode_png, lake_key
from scan_core.images import decode_image
from tasks import keys
from tasks.catalog import catalog
from tasks.config import build_config, parse_overrides
from tasks.errors import ScanLakeError
from tasks.lake import LakeSnapshot, scan_lake
from tasks.pixels import load_pixels
from tasks.stage import StageRequest
from tasks.storage import Storage
from tests.pipeline.conftest import lake_contents, write_local


@pytest.fixture
def lake(tmp_path: Path, fashion: tuple[np.ndarray, np.ndarray]) -> Path:
    images, labels = fashion
    root = tmp_path / "lake"
    write_local(root, lake_contents(images[:10], labels[:10]))
    (root / "extra" / "empty.png").write_bytes(b"")
    return root


def test_scan_quarantines_and_rereads_only_changed_objects(
    lake: Path, tmp_path: Path, fashion: tuple[np.ndarray, np.ndarray]
) -> None:
    workspace = str(tmp_path / "ws")
    Storage(workspace).check_reachable(create=True)
    config = ImageConfig().model_dump(mode="json")
    first = scan_lake.fn(str(lake), workspace, config)
    assert (first.num_objects, first.num_unique, first.num_quarantined) == (13, 10, 2)
    assert first.num_read == 13 and first.num_decoded == 10 and first.has_labels
    again = scan_lake.fn(str(lake), workspace, config)
    assert again.num_read == 0
    assert again.catalog_key == first.catalog_key and again.images_key == first.images_key
    (lake / lake_key(3)).write_bytes(encode_png(fashion[0][50]))  # new content, same key
    changed = scan_lake.fn(str(lake), workspace, config)
    assert changed.num_read == 1 and changed.num_decoded == 1
    assert changed.images_key != first.images_key
    # another image config decodes everything again into its own pixel store
    bigger = scan_lake.fn(str(lake), workspace, {**config, "size": 32})
    assert bigger.num_decoded == 10 and bigger.image_config_key != first.image_config_key


def test_catalog_task_writes_tables_and_reuses_its_manifest(lake: Path, tmp_path: Path) -> None:
    workspace = str(tmp_path / "ws")
    Storage(workspace).check_reachable(create=True)
    image_config = ImageConfig()
    snapshot: LakeSnapshot = scan_lake.fn(str(lake), workspace, image_config.model_dump())
    request = StageRequest(
        stage="catalog",
        key=snapshot.catalog_key,
        workspace=workspace,
        config={"image": image_config.model_dump(), "image_config_key": snapshot.image_config_key},
    )
    out = catalog.fn(request, snapshot.listing)
    assert not out.reused
    assert out.summary["images"] == 11 and out.summary["duplicates"] == 1
    assert out.summary["quarantined"] == 2 and out.summary["labelled"] == 10
    ws = Storage(workspace)
    reasons = ws.read_table(f"{out.rel_dir}/quarantine.parquet")["reason"].to_pylist()
    assert any("empty object" in r for r in reasons)
    assert ws.read_json(f"{request.rel_dir}/_manifest.json")["summary"]["images"] == 11
    assert catalog.fn(request, snapshot.listing).reused
    # the pixel store gives back exactly what decoding gives
    table = ws.read_table(f"{out.rel_dir}/catalog.parquet")
    ids = table["image_id"].to_pylist()[:3]
    pixels = load_pixels(ws, snapshot.image_config_key, ids, image_config)
    for row, uri in enumerate(table["uri"].to_pylist()[:3]):
        expected = decode_image(Path(uri).read_bytes(), image_config)
        assert bool((pixels[row] == expected).all())


def test_stage_keys_follow_inputs_and_config() -> None:
    base, changed = PipelineConfig(), PipelineConfig().with_overrides({"scan.epochs": 3})
    neighbors = keys.stage_key("neighbors", base.neighbors.fingerprint(), {"embed": "e"})
    assert neighbors == keys.stage_key("neighbors", changed.neighbors.fingerprint(), {"embed": "e"})
    scan_a = keys.stage_key("scan", base.scan.fingerprint(), {"neighbors": neighbors})
    scan_b = keys.stage_key("scan", changed.scan.fingerprint(), {"neighbors": neighbors})
    assert scan_a != scan_b
    assert keys.code_version("scan") != keys.code_version("pretext")
    assert keys.images_key(["b", "a"], "cfg") == keys.images_key(["a", "b"], "cfg")


def test_config_overrides_and_errors(tmp_path: Path) -> None:
    assert parse_overrides(["scan.epochs=5", "selflabel.enabled=false", "pretext.lr=0.1"]) == {
        "scan.epochs": 5,
        "selflabel.enabled": False,
        "pretext.lr": 0.1,
    }
    config = build_config(None, {"scan.epochs": 5}, clusters=7)
    assert config.scan.epochs == 5 and config.scan.num_clusters == 7
    with pytest.raises(ScanLakeError, match="not key=value"):
        parse_overrides(["scan.epochs"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("scan:\n  epochz: 3\n")
    with pytest.raises(ScanLakeError, match="scan.epochz"):
        build_config(bad)
    with pytest.raises(ScanLakeError, match="does not exist"):
        build_config(tmp_path / "missing.yaml")


def test_validate_request_refuses_impossible_runs() -> None:
    from flows.pipeline import validate_request

    snapshot = LakeSnapshot(
        lake="x",
        listing="l",
        images_key="i",
        catalog_key="c",
        image_config_key="p",
        num_objects=30,
        num_images=30,
        num_unique=30,
        num_quarantined=0,
        num_read=30,
        num_decoded=30,
        has_labels=False,
        labels_fingerprint=None,
    )
    validate_request(build_config(None, {"neighbors.k": 5}, clusters=10), snapshot)
    with pytest.raises(ScanLakeError, match="fewer than the 40 clusters"):
        validate_request(build_config(None, {"neighbors.k": 5}, clusters=40), snapshot)
    with pytest.raises(ScanLakeError, match="neighbors.k = 30"):
        validate_request(build_config(None, {"neighbors.k": 30}, clusters=3), snapshot)


def test_empty_lake_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "lake").mkdir()
    with pytest.raises(ScanLakeError, match="holds no objects"):
        scan_lake.fn(str(tmp_path / "lake"), str(tmp_path / "ws"), ImageConfig().model_dump())
