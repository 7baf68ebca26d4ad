"""A run without a config file: the automatic settings (``--preset auto``, ``--budget``), chosen
from the lake and recorded in the CLI's output, the JSON result and MLflow; bad flags are one
sentence before anything starts."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from mlflow import MlflowClient
from typer.testing import CliRunner

from flows.cli import app
from tasks.auto import parse_budget
from tasks.errors import ScanLakeError
from tests.pipeline.cli_runs import cli_env, run_cli
from tests.pipeline.conftest import TINY_CONFIG, lake_contents, write_local

runner = CliRunner()

#: Overrides that keep the automatic run short (they win over the automatic choices, which the
#: run still makes and records).
SHORT = {
    "pretext.epochs": 1,
    "scan.epochs": 2,
    "scan.head_warmup_epochs": 0,
    "selflabel.epochs": 1,
}


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("90", 90.0), ("90s", 90.0), ("30m", 1800.0), ("2h", 7200.0), ("1h30m", 5400.0)],
)
def test_budgets_are_durations(text: str, seconds: float) -> None:
    assert parse_budget(text) == seconds


@pytest.mark.parametrize(
    ("text", "sentence"),
    [("soon", "is not a duration"), ("10s", "under one minute"), ("-5m", "is not a duration")],
)
def test_bad_budgets_are_one_sentence(text: str, sentence: str) -> None:
    with pytest.raises(ScanLakeError, match=sentence):
        parse_budget(text)


@pytest.mark.parametrize(
    ("flags", "sentence"),
    [
        (["--budget", "30m", "--config", str(TINY_CONFIG)], "--budget sizes the automatic"),
        (["--budget", "30m", "--preset", "paper"], "--budget sizes the automatic"),
        (["--preset", "fast"], "--preset 'fast' is unknown: choose auto or paper."),
        (["--budget", "soon"], "--budget 'soon' is not a duration"),
    ],
)
def test_bad_settings_flags_stop_before_the_run(
    tmp_path: Path, flags: list[str], sentence: str
) -> None:
    lake = tmp_path / "lake"
    lake.mkdir()
    result = runner.invoke(
        app,
        ["run", "--lake", str(lake), "--workspace", str(tmp_path / "ws"), *flags],
        env={"COLUMNS": "250"},
    )
    assert result.exit_code == 2, result.output
    assert sentence in " ".join(result.output.split())
    assert "Traceback" not in result.output
    assert not (tmp_path / "ws").exists()


@pytest.fixture(scope="module")
def auto_run(
    tmp_path_factory: pytest.TempPathFactory,
    fashion: tuple[np.ndarray, np.ndarray],
    pipeline_env: Path,
    prefect_server: None,
) -> dict[str, Any]:
    """A 40-image greyscale lake run twice with no config, a budget and short epochs."""
    images, labels = fashion
    root = tmp_path_factory.mktemp("auto")
    lake = root / "lake"
    write_local(lake, lake_contents(images[:40], labels[:40], extras=False))
    env = cli_env(root)
    args = ["run", "--lake", str(lake), "--workspace", str(root / "ws"), "--clusters", "3"]
    args += ["--budget", "5m"]
    for key, value in SHORT.items():
        args += ["--set", f"{key}={value}"]
    runs = []
    for name in ("first", "second"):
        out = root / f"{name}.json"
        done = run_cli([*args, "--json", str(out)], env, timeout=600)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        runs.append((done.stdout, json.loads(out.read_text())))
    return {"root": root, "runs": runs}


def test_a_run_without_config_chooses_records_and_repeats_its_settings(
    auto_run: dict[str, Any],
) -> None:
    (stdout, first), (_, second) = auto_run["runs"]
    settings = first["settings"]
    # what was chosen, and why: the views, the schedules, the budget, the overrides on top
    assert "greyscale images" in settings["pretext"] and "photo views" in settings["pretext"]
    assert "steps for a lake of about" in settings["pretext.epochs"]
    assert "5 min on a machine" in settings["budget"]
    assert settings["overrides"] == ", ".join(f"{k}={v}" for k, v in SHORT.items())
    assert "Settings (why)" in stdout and "5 min on a machine" in " ".join(stdout.split())
    # the overrides won over the automatic choices, and MLflow has both
    client = MlflowClient(first["mlflow"]["tracking_uri"])
    parent = client.get_run(first["mlflow"]["parent_run_id"]).data
    assert parent.params["settings"] == "auto" and parent.params["budget_seconds"] == "300.0"
    assert parent.params["pretext.epochs"] == "1" and parent.params["scan.epochs"] == "2"
    assert parent.params["image.channels"] == "1" and parent.params["pretext.augment"] == "photo"
    assert parent.tags["settings"] == "auto"
    assert parent.tags["settings.budget"] == settings["budget"]
    assert parent.tags["settings.pretext"] == settings["pretext"]
    # the machine's speed is measured once and kept, so the rerun chooses the same settings
    speed = json.loads((auto_run["root"] / "state" / "machine-speed.json").read_text())
    assert speed["speed"] > 0
    assert second["settings"] == settings
    assert second["stages_run"] == [] and second["metrics"] == first["metrics"]
