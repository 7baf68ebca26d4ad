"""The servable model's predictor without MLflow: input validation, URI roots, stable ids
(``test_run_outputs.py`` loads the registered model of a real run in a fresh process)."""

from __future__ import annotations

import base64
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from scan_core.config import ImageConfig
from scan_core.data import encode_png
from tasks.checkpoints import build_clustering_model, clustering_description
from tasks.errors import ScanLakeError
from tasks.serving import ClusterPredictor, ServingDescription, _load_pyfunc, write_model_data


@pytest.fixture
def lake(tmp_path: Path, fashion: tuple[np.ndarray, np.ndarray]) -> Path:
    root = tmp_path / "lake"
    root.mkdir()
    for i in range(4):
        (root / f"{i}.png").write_bytes(encode_png(fashion[0][i]))
    (root / "notes.txt").write_text("not an image")
    return root


@pytest.fixture
def predictor(lake: Path, tmp_path: Path) -> ClusterPredictor:
    torch.manual_seed(0)
    architecture = clustering_description("small_cnn", 1, 3)
    network = build_clustering_model(architecture)
    description = ServingDescription(cluster_ids=[3, 7, 9], image=ImageConfig(), lake=str(lake))
    folder = tmp_path / "model" / "data"
    write_model_data(folder, network, architecture, description)
    return _load_pyfunc(str(folder))  # what MLflow calls: JSON and a weights-only state_dict


def test_bytes_base64_and_uris_give_the_same_stable_clusters(
    predictor: ClusterPredictor, lake: Path
) -> None:
    files = sorted(lake.glob("*.png"))
    blobs = [f.read_bytes() for f in files]
    by_bytes = predictor.predict(pd.DataFrame({"image": blobs}))
    by_b64 = predictor.predict(
        pd.DataFrame({"image": [base64.b64encode(b).decode() for b in blobs]})
    )
    by_uri = predictor.predict(pd.DataFrame({"uri": [str(f) for f in files]}))
    for other in (by_b64, by_uri):
        pd.testing.assert_frame_equal(by_bytes, other)
    assert set(by_bytes["cluster"]) <= {3, 7, 9}
    probabilities = np.array(by_bytes["probabilities"].tolist())
    assert probabilities.shape == (4, 3) and np.allclose(probabilities.sum(axis=1), 1, atol=1e-5)
    best = np.array([3, 7, 9])[probabilities.argmax(axis=1)]
    assert best.tolist() == by_bytes["cluster"].tolist()
    assert np.allclose(by_bytes["confidence"], probabilities.max(axis=1))
    mixed = predictor.predict(
        pd.DataFrame({"image": [blobs[0], None], "uri": [None, str(files[1])]})
    )
    assert mixed["cluster"].tolist() == by_bytes["cluster"].tolist()[:2]
    assert len(predictor.predict(pd.DataFrame({"image": []}))) == 0


@pytest.mark.parametrize(
    ("frame", "message"),
    [
        ({"picture": [b"x"]}, "The input has no 'image' or 'uri' column"),
        ({"image": [None]}, "Row 0 has neither an 'image' nor a 'uri'"),
        ({"image": [b"not an image"]}, "Row 0 is not an image the model can read"),
        ({"image": ["%%% not base64"]}, "Row 0: 'image' is a string but not base64"),
        ({"uri": ["http://example.org/a.png"]}, "neither a local path nor an s3:// URL"),
        ({"uri": ["/etc/passwd"]}, "is not under a root the model may read"),
        ({"uri": ["LAKE/../secret.png"]}, "is not under a root the model may read"),
        ({"uri": ["LAKE/missing.png"]}, "does not exist"),
        ({"uri": ["LAKE/notes.txt"]}, "Row 0 is not an image the model can read"),
    ],
)
def test_bad_inputs_are_one_clear_sentence(
    predictor: ClusterPredictor, lake: Path, frame: dict[str, list[object]], message: str
) -> None:
    values = {
        k: [v.replace("LAKE", str(lake)) if isinstance(v, str) else v for v in vs]
        for k, vs in frame.items()
    }
    with pytest.raises(ScanLakeError, match=message.replace("(", r"\(").replace(")", r"\)")):
        predictor.predict(pd.DataFrame(values))


def test_extra_roots_come_from_the_environment(
    predictor: ClusterPredictor, lake: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    other = tmp_path / "elsewhere"
    other.mkdir()
    (other / "a.png").write_bytes((lake / "0.png").read_bytes())
    monkeypatch.setenv("SCAN_LAKE_SERVING_URI_ROOTS", f" {other} , s3://bucket/prefix")
    again = ClusterPredictor(predictor.network, predictor.description)
    assert [r.url for r in again.roots] == [str(lake), str(other), "s3://bucket/prefix"]
    out = again.predict(pd.DataFrame({"uri": [f"file://{other}/a.png"]}))
    assert (
        out["cluster"].tolist()
        == predictor.predict(pd.DataFrame({"uri": [str(lake / "0.png")]}))["cluster"].tolist()
    )


def test_a_model_folder_without_a_valid_description_is_refused(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "serving.json").write_text('{"format": 2}')
    with pytest.raises(ScanLakeError, match="has no valid serving.json"):
        _load_pyfunc(str(tmp_path / "data"))
