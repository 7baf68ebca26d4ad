"""Running the ``scan-lake`` console script in its own process, as a user does, and looking at
what a run left behind (shared by the bad-request, fault and security tests and
``bench/robustness.py``)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from mlflow import MlflowClient

ROOT = Path(__file__).resolve().parents[2]
COMMAND = [sys.executable, "-m", "flows.cli"]

T = TypeVar("T")


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


def wait_for(
    found: Callable[[], T | None],
    process: subprocess.Popen[bytes],
    log: Path,
    timeout: float = 300,
    every: float = 0.1,
) -> T:
    """Poll ``found`` until it returns something (not None) while ``process`` runs.

    Raises:
        AssertionError: the process ended first, or ``timeout`` passed (with the log's tail).
    """
    deadline = time.monotonic() + timeout
    while True:
        value = found()
        if value is not None:
            return value
        if process.poll() is not None:
            raise AssertionError(
                f"the run ended (status {process.returncode}) before the awaited moment:\n"
                + log.read_text(errors="replace")[-3000:]
            )
        if time.monotonic() > deadline:
            raise AssertionError(f"waited {timeout} s:\n" + log.read_text()[-3000:])
        time.sleep(every)


def error_lines(output: str) -> list[str]:
    """The ``error: ...`` lines the CLI printed."""
    return [line for line in output.splitlines() if line.startswith("error: ")]


def stage_runs(tracking_uri: str, experiment: str) -> list[str]:
    """Stages of every MLflow stage run (nested run tagged ``stage``) of an experiment."""
    return [r.data.tags["stage"] for r in stage_run_records(tracking_uri, experiment)]


def stage_run_records(tracking_uri: str, experiment: str) -> list[Any]:
    """Every MLflow stage run (nested run tagged ``stage``) of an experiment."""
    client = MlflowClient(tracking_uri)
    found = client.get_experiment_by_name(experiment)
    runs = client.search_runs([found.experiment_id], max_results=1000) if found else []
    return [r for r in runs if "stage" in r.data.tags]


def object_state(fs: Any, root: str) -> dict[str, tuple[int, str]]:
    """Every object under ``root`` of an s3fs filesystem: key -> (size, ETag), fresh from the
    server."""
    fs.invalidate_cache()
    if not fs.exists(root):
        return {}
    found = fs.find(root, detail=True)
    return {
        path[len(root) + 1 :]: (info["size"], info["ETag"])
        for path, info in found.items()
        if info.get("type") != "directory"
    }


def stage_folders(keys: list[str], stages: tuple[str, ...]) -> dict[str, dict[str, Any]]:
    """What a workspace listing (``keys`` relative to the workspace) holds per stage key
    folder ``<stage>/<key>``: ``committed`` (its manifest exists) and ``attempts`` (attempt
    folder -> its file names)."""
    out: dict[str, dict[str, Any]] = {}
    for key in keys:
        parts = key.split("/")
        if parts[0] not in stages or len(parts) < 3:
            continue
        entry = out.setdefault("/".join(parts[:2]), {"committed": False, "attempts": {}})
        if len(parts) == 3 and parts[2] == "_manifest.json":
            entry["committed"] = True
        elif len(parts) >= 4:
            entry["attempts"].setdefault(parts[2], []).append("/".join(parts[3:]))
    return out
