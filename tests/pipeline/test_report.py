"""The run's result is one typed model, and its report is made once: the Prefect summary
(Markdown) and the CLI (terminal) render the same blocks."""

from __future__ import annotations

import io
import re
from typing import Any

import pytest
from pydantic import ValidationError
from rich.console import Console

from flows.report import RunResult, Text, report, to_console, to_markdown


def result_dict(**changes: Any) -> dict[str, Any]:
    stage = {
        "stage": "duplicates",
        "key": "d" * 64,
        "state": "Completed",
        "cached": False,
        "run_id": "r1",
        "source_run_id": None,
        "seconds": 1.25,
        "summary": {
            "thresholds": {"max_hamming": 4, "min_pixel_similarity": 0.985, "min_cosine": 0.8}
        },
    }
    value: dict[str, Any] = {
        "lake": "s3://lake/images",
        "workspace": "s3://lake/ws",
        "flow_run_id": "f-1",
        "lake_fingerprint": "e" * 64,
        "counts": {
            "objects": 12,
            "images": 11,
            "unique_images": 10,
            "quarantined": 1,
            "objects_read": 12,
            "images_decoded": 10,
            "images_embedded": 10,
        },
        "lake_scan_seconds": 0.5,
        "stages": [stage],
        "stages_run": ["duplicates"],
        "metrics": {"acc": 0.75, "num_clusters": 12.0, "num_classes": 10.0, "many_to_one_acc": 0.8},
        "cluster_sizes": [6, 4],
        "cluster_ids": [0, 1],
        "pretext": {
            "key": "p" * 64,
            "own_key": "p" * 64,
            "reused": False,
            "reason": "no earlier backbone",
        },
        "growth": {
            "start": "cold",
            "reason": "first run",
            "warm_from": None,
            "relabel_from": None,
            "previous_flow_run_id": None,
        },
        "lineage": {
            "churn": 0.1,
            "shared_images": 10,
            "changed_images": 1,
            "new_images": 0,
            "removed_images": 0,
            "born": [],
            "vanished": [1],
            "clusters": [
                {
                    "cluster": 0,
                    "status": "kept",
                    "previous_size": 5,
                    "size": 6,
                    "growth": 1,
                    "stayed": 5,
                    "moved_in": 1,
                    "moved_out": 0,
                    "new_images": 0,
                    "removed_images": 0,
                }
            ],
        },
        "clustering": {
            "pretext_method": "byol",
            "method": "kmeans",
            "num_clusters": 2,
            "auto": None,
        },
        "skipped": {"selflabel": "self-labeling is SCAN's step 4"},
        "settings": {"pretext.epochs": "5 min on a machine | like this"},
        "guard": None,
        "step4": {"method": "selflabel", "ran": False, "kept": False},
        "duplicates": {
            "exact_duplicate_objects": 1,
            "exact_groups": 1,
            "near_pairs": 2,
            "near_images": 3,
        },
        "duplicates_report": "s3://lake/ws/duplicates/x/duplicates.parquet",
        "promotion": {
            "registered_model": "scan-lake",
            "version": 3,
            "reason": "not promoted (a cluster is empty)",
        },
        "assignments": "s3://lake/ws/assign/a/assignments.parquet",
        "gallery": None,
        "gallery_error": "the lake is unreachable",
        "mlflow": {
            "tracking_uri": "sqlite:///m.db",
            "experiment_id": "1",
            "parent_run_id": "abc123",
            "link": "#/experiments/1/runs/abc123",
            "ui_command": "mlflow ui --backend-store-uri sqlite:///m.db",
        },
    }
    value.update(changes)
    return value


def terminal(result: RunResult) -> str:
    buffer = io.StringIO()
    to_console(report(result), Console(file=buffer, width=300, color_system=None))
    return buffer.getvalue()


def test_the_markdown_and_the_terminal_say_the_same_sentences() -> None:
    result = RunResult.model_validate(result_dict())
    blocks = report(result)
    markdown, text = to_markdown(blocks), terminal(result)
    sentences = [b.text.replace("`", "") for b in blocks if isinstance(b, Text)]
    assert len(sentences) >= 12
    for sentence in sentences:
        assert sentence in markdown.replace("`", "") and sentence in text
    for expected in (
        "Pretext: BYOL; clustering: K-means on the pretext embeddings.",
        "Overclustering: 12 clusters for 10 label classes.",
        "Exact: 1 extra objects in 1 groups; near (same picture after an edit: hashes within "
        "4 bits",
        "Churn: 10.0% of 10 previously seen images",
        "Model scan-lake version 3: not promoted",
        "Assignments: s3://lake/ws/assign/a/assignments.parquet",
        "mlflow ui --backend-store-uri sqlite:///m.db",
    ):
        assert expected in text
    # tables: a pipe inside a cell is escaped in Markdown, the titles are in both
    assert "| pretext.epochs | 5 min on a machine \\| like this |" in markdown
    assert "| cluster | status | before | now | growth |" in markdown
    assert "| acc | 0.7500 |" in markdown
    for title in ("Stages", "Metrics", "Cluster sizes", "Settings (why)", "Cluster growth"):
        assert title in text and f"**{title}**" in markdown
    assert not re.search(r"\[/?[a-z]+\]", text.replace("[bold]", ""))  # no Rich markup left


def test_an_http_mlflow_link_is_a_markdown_link() -> None:
    mlflow = {**result_dict()["mlflow"], "link": "http://mlflow:5000/#/runs/abc123"}
    result = RunResult.model_validate(result_dict(mlflow=mlflow, gallery="/ws/gallery.html"))
    markdown = to_markdown(report(result))
    assert "MLflow run [abc123](http://mlflow:5000/#/runs/abc123)." in markdown
    assert "Cluster gallery: [/ws/gallery.html](/ws/gallery.html)." in markdown
    assert "http://mlflow:5000/#/runs/abc123" in terminal(result)


def test_the_result_is_validated_and_round_trips() -> None:
    result = RunResult.model_validate(result_dict())
    assert RunResult.model_validate(result.as_dict()) == result
    assert result.as_dict()["stages"][0]["summary"]["thresholds"]["max_hamming"] == 4
    with pytest.raises(ValidationError, match="surprise"):
        RunResult.model_validate(result_dict(surprise=1))
    with pytest.raises(ValidationError, match="counts"):
        RunResult.model_validate(result_dict(counts={"objects": 1}))
