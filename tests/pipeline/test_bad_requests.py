"""Requests that cannot train stop with one sentence naming the cause and the fix, before any
training starts: through the real console script, exit status 2, no traceback, no stage folder
in the workspace and no MLflow stage run. The cases (``bad_requests.py``) run concurrently in
one fixture (each is a process of its own) and are checked one by one."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from mlflow import MlflowClient

from tests.pipeline.bad_requests import (
    CASE_NAMES,
    Refusal,
    cases,
    prepare,
    run_cases,
    stage_objects,
)
from tests.pipeline.cli_runs import error_lines, stage_runs
from tests.pipeline.conftest import SecureS3

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def refused(
    tmp_path_factory: pytest.TempPathFactory,
    pipeline_env: Path,
    prefect_server: None,
    secure_s3: SecureS3,
    fashion: tuple[np.ndarray, np.ndarray],
) -> dict[str, Refusal]:
    """Every case run once; case name -> how it went."""
    root = tmp_path_factory.mktemp("bad-requests")
    where = prepare(root, fashion, secure_s3)
    assert tuple(cases({**where, "workspace": "ws"})) == CASE_NAMES
    return run_cases(root, where, os.environ["SCAN_LAKE_MLFLOW_TRACKING_URI"])


@pytest.mark.parametrize("name", CASE_NAMES)
def test_refused_with_one_sentence_before_training(
    name: str, refused: dict[str, Refusal], secure_s3: SecureS3
) -> None:
    refusal = refused[name]
    case, workspace, done, env = refusal.case, refusal.workspace, refusal.done, refusal.env
    output = done.stdout + done.stderr
    assert done.returncode == 2, output[-3000:]
    errors = error_lines(done.stdout)
    assert len(errors) == 1, output[-3000:]
    for fragment in case.expect:
        assert fragment in errors[0], (fragment, errors[0])
    assert errors[0].endswith("."), errors[0]
    assert "Traceback" not in output, output[-3000:]
    assert secure_s3.secret not in output  # the planted secret, used by the secure cases
    assert stage_objects(workspace, secure_s3) == []
    tracking_uri = env["SCAN_LAKE_MLFLOW_TRACKING_URI"]
    if case.flow:  # the flow opened its parent run (failed), but no stage run
        experiment = env["SCAN_LAKE_MLFLOW_EXPERIMENT"]
        assert stage_runs(tracking_uri, experiment) == []
        client = MlflowClient(tracking_uri)
        runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
        assert [r.info.status for r in runs] == ["FAILED"]
    else:  # refused before MLflow was opened
        assert not Path(tracking_uri.removeprefix("sqlite:///")).exists()


def test_sentences_name_what_to_do(refused: dict[str, Refusal]) -> None:
    """Every sentence says how to fix it (an imperative after the cause)."""
    verbs = ("check", "fix", "create", "set", "add", "lower", "pass", "point", "grant", "Fix")
    for name, refusal in refused.items():
        sentence = error_lines(refusal.done.stdout)[0]
        assert any(f"{verb} " in sentence for verb in verbs), (name, sentence)
