"""The ``scan-lake`` CLI: clear one-sentence errors without tracebacks, before any training."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from flows.cli import app
from tests.pipeline.conftest import TINY_CONFIG, lake_contents, write_local

runner = CliRunner()
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def small_lake(tmp_path: Path, fashion: tuple[np.ndarray, np.ndarray]) -> Path:
    images, labels = fashion
    lake = tmp_path / "lake"
    write_local(lake, lake_contents(images[:20], labels[:20], extras=False))
    return lake


def test_too_many_clusters_is_refused_before_training(
    small_lake: Path, tmp_path: Path, pipeline_env: Path, prefect_server: None
) -> None:
    """Through the console script in its own process (Prefect's log handlers keep the streams
    they were created with, so in-process runners would hand them closed files)."""
    from prefect.settings import PREFECT_API_URL

    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env["PREFECT_API_URL"] = str(PREFECT_API_URL.value())  # the session's test server
    env["PREFECT_HOME"] = str(tmp_path / "prefect-home")
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "flows.cli",
            "run",
            "--lake",
            str(small_lake),
            "--workspace",
            str(tmp_path / "ws"),
            "--clusters",
            "50",
            "--config",
            str(TINY_CONFIG),
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    output = done.stdout + done.stderr
    assert done.returncode == 2, output[-3000:]
    assert "error: The lake has 20 unique usable images, fewer than the 50 clusters" in done.stdout
    assert "Traceback" not in output
    assert not (tmp_path / "ws" / "pretext").exists()


def test_unknown_config_key(small_lake: Path, tmp_path: Path) -> None:
    result = runner.invoke(
        app,
        [
            "run",
            "--lake",
            str(small_lake),
            "--workspace",
            str(tmp_path / "ws"),
            "--clusters",
            "3",
            "--set",
            "scan.epochz=3",
        ],
    )
    assert result.exit_code == 2
    assert "Unknown config key 'scan.epochz'" in result.output


def test_wrong_type_and_too_few_clusters(small_lake: Path, tmp_path: Path) -> None:
    result = runner.invoke(
        app,
        [
            "run",
            "--lake",
            str(small_lake),
            "--workspace",
            str(tmp_path / "ws"),
            "--clusters",
            "1",
        ],
    )
    assert result.exit_code == 2
    assert "scan.num_clusters" in result.output and "greater than or equal to 2" in result.output
    result = runner.invoke(
        app,
        [
            "run",
            "--lake",
            str(small_lake),
            "--workspace",
            str(tmp_path / "ws"),
            "--set",
            "pretext.epochs=many",
        ],
    )
    assert result.exit_code == 2
    assert "pretext.epochs" in result.output


def test_missing_lake_folder(tmp_path: Path) -> None:
    result = runner.invoke(
        app,
        [
            "run",
            "--lake",
            str(tmp_path / "nowhere"),
            "--workspace",
            str(tmp_path / "ws"),
            "--clusters",
            "3",
        ],
    )
    assert result.exit_code == 2
    assert "does not exist" in result.output


def test_debug_shows_the_traceback(small_lake: Path, tmp_path: Path) -> None:
    result = runner.invoke(
        app,
        [
            "--debug",
            "run",
            "--lake",
            str(small_lake),
            "--workspace",
            str(tmp_path / "ws"),
            "--set",
            "nope.x=1",
        ],
    )
    assert result.exit_code != 0
    assert result.exception is not None and "Unknown config section" in str(result.exception)
