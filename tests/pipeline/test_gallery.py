"""The gallery's files from a hand-made run on a local lake: escaping of object keys, CSV lists,
thumbnails, objects gone or changed since the run (the browser test is in
``test_run_outputs.py``)."""

from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from scan_core.data import encode_png
from scan_core.images import image_id
from tasks.gallery import PER_GROUP, GalleryData, choose, gallery_files
from tasks.history import GrowthPlan, RunRecord, RunSignature
from tasks.schemas import ASSIGNMENTS
from tasks.stage import StageOutput
from tasks.storage import Storage

ODD = "odd/<b>bold</b> & \"quoted\" 'key'.png"


@pytest.fixture
def run(tmp_path: Path, fashion: tuple[np.ndarray, np.ndarray]) -> tuple[Storage, GalleryData]:
    images, _ = fashion
    lake = tmp_path / "lake"
    keys = [f"images/{i:03d}.png" for i in range(11)] + [ODD]
    blobs = {key: encode_png(images[i]) for i, key in enumerate(keys)}
    for key, data in blobs.items():
        (lake / key).parent.mkdir(parents=True, exist_ok=True)
        (lake / key).write_bytes(data)
    store = Storage(str(lake))
    uris = [store.uri(k) for k in keys]
    clusters = [0] * 6 + [2] * 6  # cluster 1 is empty
    confidence = np.linspace(0.4, 0.95, len(keys)).astype(np.float32)
    probabilities = [[0.0, 0.0, 0.0] for _ in keys]
    table = pa.table(
        {
            "image_id": [image_id(blobs[k]) for k in keys],
            "uri": uris,
            "cluster": pa.array(clusters, pa.int32()),
            "confidence": pa.array(confidence, pa.float32()),
            "probabilities": probabilities,
        },
        schema=ASSIGNMENTS,
    )
    (lake / keys[0]).unlink()  # gone since the run
    (lake / keys[1]).write_bytes(encode_png(images[20]))  # changed since the run
    assign = StageOutput(
        stage="assign",
        key="0" * 64,
        uri="ws",
        rel_dir="assign/" + "0" * 64,
        summary={"cluster_ids": [0, 1, 2], "lineage": {"clusters": []}},
    )
    record = RunRecord(
        lake=store.url,
        signature=RunSignature(
            images_key="i",
            pretext_key="p",
            num_clusters=3,
            scan_fingerprint="s",
            selflabel_fingerprint="l",
        ),
        plan=GrowthPlan(start="cold", reason="no earlier finished run <on> this lake"),
        assign=assign,
        flow_run_id="flow-<run>",
        mlflow_run_id="mlflow-run",
        finished_at="2026-12-05T00:00:00+00:00",
    )
    pairs = [
        {"kind": "near", "uri": uris[11], "duplicate_uri": uris[10], "similarity": 0.99},
    ]
    return store, GalleryData(record, table, [], pairs, {"confidence.png": b"\x89PNG fake"})


def test_keys_from_the_lake_are_escaped_and_listed_raw(run: tuple[Storage, GalleryData]) -> None:
    lake, data = run
    files = gallery_files(lake, data)
    page = files["index.html"].decode()
    assert "<b>bold</b>" not in page and "flow-<run>" not in page and "<on>" not in page
    assert "odd/&lt;b&gt;bold&lt;/b&gt; &amp; &quot;quoted&quot; &#x27;key&#x27;.png" in page
    listed = list(csv.DictReader(io.StringIO(files["clusters/cluster-2.csv"].decode())))
    assert lake.uri(ODD) in [row["uri"] for row in listed]
    assert [float(r["confidence"]) for r in listed] == sorted(
        (float(r["confidence"]) for r in listed), reverse=True
    )
    least = list(csv.DictReader(io.StringIO(files["least_confident.csv"].decode())))
    assert len(least) == 12 and least[0]["uri"].endswith("images/000.png")


def test_every_cluster_is_shown_with_thumbnails_or_why_not(
    run: tuple[Storage, GalleryData],
) -> None:
    lake, data = run
    files = gallery_files(lake, data)
    page = files["index.html"].decode()
    for cluster in (0, 1, 2):
        assert f'id="cluster-{cluster}"' in page
    assert "Empty: no object is in this cluster." in page
    assert ">gone<" in page and ">changed since the run<" in page
    thumbs = [name for name in files if name.startswith("thumbs/")]
    assert len(thumbs) == 10  # 12 objects, one gone, one changed
    assert all(files[name].startswith(b"\x89PNG") for name in thumbs)
    for name in thumbs:
        assert f'src="{name}"' in page
    assert 'src="plots/confidence.png"' in page and "plots/confidence.png" in files
    assert "1 pairs with an object of this cluster" in page  # the near pair, in cluster 2


def test_choose_is_seeded_and_ordered() -> None:
    confidence = np.array([0.1, 0.9, 0.5, 0.7, 0.3] * 4)
    rows = list(range(20))
    first, again = choose(rows, confidence, seed=4), choose(rows, confidence, seed=4)
    assert first == again
    assert len(first["random"]) == PER_GROUP == len(first["most"])
    assert all(confidence[r] == 0.9 for r in first["most"][:4])
    assert all(confidence[r] == 0.1 for r in first["least"][:4])
