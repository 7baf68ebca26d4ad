"""Running the flow the way the CLI does, for the pipeline tests."""

from __future__ import annotations

from typing import Any

from mlflow import MlflowClient

from tasks.config import build_config
from tests.pipeline.conftest import TINY_CONFIG

ALL_STAGES = [
    "catalog",
    "pretext",
    "embed",
    "mine_neighbors",
    "duplicates",
    "scan",
    "selflabel",
    "guard",
    "assign",
    "evaluate",
]


def run_pipeline(
    lake: str,
    workspace: str,
    overrides: dict[str, Any] | None = None,
    retrain_pretext: bool = False,
) -> dict[str, Any]:
    """Run ``scan_pipeline`` with the tiny config (plus overrides)."""
    from flows.pipeline import scan_pipeline

    config = build_config(TINY_CONFIG, overrides)
    return scan_pipeline(
        lake=lake,
        workspace=workspace,
        config=config.model_dump(mode="json"),
        retrain_pretext=retrain_pretext,
    )


def states(result: dict[str, Any]) -> dict[str, str]:
    """Stage -> Prefect state name."""
    return {r["stage"]: r["state"] for r in result["stages"]}


def cached(result: dict[str, Any]) -> set[str]:
    """The stages of a run that reused their committed manifest (cache hits)."""
    return {r["stage"] for r in result["stages"] if r["cached"]}


def all_cached(result: dict[str, Any]) -> bool:
    """Every stage of the run was a cache hit: nothing ran, every task completed."""
    return (
        result["stages_run"] == []
        and cached(result) == {r["stage"] for r in result["stages"]}
        and set(states(result).values()) == {"Completed"}
    )


def nested_runs(result: dict[str, Any]) -> dict[str, Any]:
    """Stage -> MLflow nested run of this flow run (stages that ran; cached ones have none)."""
    client = MlflowClient(result["mlflow"]["tracking_uri"])
    parent = result["mlflow"]["parent_run_id"]
    runs = client.search_runs(
        [result["mlflow"]["experiment_id"]], f"tags.mlflow.parentRunId = '{parent}'"
    )
    return {r.data.tags["stage"]: r for r in runs}


def stage_tags(result: dict[str, Any]) -> dict[str, dict[str, str]]:
    """Stage -> its ``stage.<name>.*`` tags on the flow run's MLflow parent run."""
    client = MlflowClient(result["mlflow"]["tracking_uri"])
    tags = client.get_run(result["mlflow"]["parent_run_id"]).data.tags
    out: dict[str, dict[str, str]] = {}
    for key, value in tags.items():
        if key.startswith("stage."):
            stage, _, field = key[len("stage.") :].partition(".")
            out.setdefault(stage, {})[field] = value
    return out
