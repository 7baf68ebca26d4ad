"""Running the ``scan-lake`` console script in its own process, as a user does, and looking at
what a run left behind (shared by the bad-request, fault and security tests)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from mlflow import MlflowClient

ROOT = Path(__file__).resolve().parents[2]
COMMAND = [sys.executable, "-m", "flows.cli"]


def cli_env(home: Path, prefect_api: bool = True, **extra: str) -> dict[str, str]:
    """The test process's environment for a CLI run with its own state under ``home``: MLflow
    store, PREFECT_HOME, and the session's Prefect test server (``prefect_api``)."""
    from prefect.settings import PREFECT_API_URL

    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    if prefect_api:
        env["PREFECT_API_URL"] = str(PREFECT_API_URL.value())
    state = home / "state"
    env.update(
        {
            "PREFECT_HOME": str(home / "prefect-home"),
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "SCAN_LAKE_STATE_DIR": str(state),
            "SCAN_LAKE_MLFLOW_TRACKING_URI": f"sqlite:///{state / 'mlflow.db'}",
            "PYTHONUNBUFFERED": "1",
            "COLUMNS": "250",
        }
    )
    env.update(extra)
    return env


def run_cli(
    args: list[str], env: dict[str, str], timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    """``scan-lake ARGS`` to completion; stdout and stderr captured."""
    return subprocess.run(
        [*COMMAND, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )


def start_cli(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    """``scan-lake ARGS`` in the background, stdout and stderr into ``log``."""
    with log.open("wb") as out:
        return subprocess.Popen(
            [*COMMAND, *args], cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT
        )


def error_lines(output: str) -> list[str]:
    """The ``error: ...`` lines the CLI printed."""
    return [line for line in output.splitlines() if line.startswith("error: ")]


def stage_runs(tracking_uri: str, experiment: str) -> list[str]:
    """Stages of every MLflow stage run (nested run tagged ``stage``) of an experiment."""
    client = MlflowClient(tracking_uri)
    found = client.get_experiment_by_name(experiment)
    runs = client.search_runs([found.experiment_id], max_results=1000) if found else []
    return [r.data.tags["stage"] for r in runs if "stage" in r.data.tags]
