"""Faults: nothing lost, nothing redone. A SeaweedFS S3 of the module's own, killed and restarted
by the scenarios of ``faults.py``, and the real console script in its own processes: the server
dying mid-run, the pipeline killed (SIGKILL) while it writes a stage, two runs on one workspace
at once, and a lake that is only ever read."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from tests.pipeline.faults import LAKE_OBJECTS, FaultLake, concurrent, fault_lake, kill_mid_write
from tests.pipeline.faults import outage as outage_scenario

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def lake(
    tmp_path_factory: pytest.TempPathFactory,
    pipeline_env: Path,
    prefect_server: None,
    fashion: tuple[np.ndarray, np.ndarray],
) -> Iterator[FaultLake]:
    tracking_uri = f"sqlite:///{pipeline_env / 'faults-mlflow.db'}"
    with fault_lake(tmp_path_factory.mktemp("weed-faults"), tracking_uri, fashion) as made:
        yield made


def test_outage_fails_with_one_sentence_then_the_rerun_resumes(
    lake: FaultLake, tmp_path: Path
) -> None:
    """The server dies after the pretext stage is committed: storage calls retry with backoff,
    the run stops with one sentence; after the restart the same command redoes nothing that was
    committed and finishes the rest."""
    got = outage_scenario(lake, tmp_path)
    output = got["output"]
    assert got["status"] == 2, output[-3000:]
    assert len(got["errors"]) == 1, output[-3000:]
    sentence = got["errors"][0]
    assert "stopped answering" in sentence and "rerun the same command" in sentence, sentence
    assert "finished stages are kept" in sentence
    assert "Traceback" not in output, output[-3000:]
    assert "retry 1/3 in 0.5 s" in output and "retry 3/3 in 2.0 s" in output, output[-3000:]

    assert got["rerun_status"] == 0, got["rerun_output"][-3000:]
    result = got["result"]
    ran = [r["stage"] for r in result["stages"]]  # the whole pipeline of this config
    assert ran[0] == "catalog" and ran[-1] == "evaluate", ran
    committed = got["committed"]
    assert {"catalog", "pretext"} <= committed < set(ran), committed
    assert result["stages_run"] == [s for s in ran if s not in committed]
    assert {r["stage"] for r in result["stages"] if r["cached"]} == committed
    assert got["finished"] == Counter(ran)  # over both runs, every stage ran once
    assert lake.committed_problems("ws-outage") == []
    assert lake.lake_state() == lake.before


def test_a_kill_mid_write_never_leaves_a_finished_stage(lake: FaultLake, tmp_path: Path) -> None:
    """SIGKILL while the evaluate stage writes its files: its attempt folder has files but no
    manifest; the rerun recomputes evaluate only, into a new folder, and commits that."""
    got = kill_mid_write(lake, tmp_path, "evaluate")
    left, partial = got["left"], got["partial"]
    assert not left["committed"] and list(left["attempts"]) == [partial], left
    assert left["attempts"][partial], left  # files were written, the manifest was not
    assert got["stage_statuses"] == ["RUNNING"]  # killed: its MLflow run never ended

    assert got["rerun_status"] == 0, got["rerun_output"][-3000:]
    result = got["result"]
    assert result["stages_run"] == ["evaluate"]
    evaluate = next(r for r in result["stages"] if r["stage"] == "evaluate")
    assert f"evaluate/{evaluate['key']}" == got["folder"]
    assert got["manifest"]["dir"] != partial
    assert got["finished"] == Counter(r["stage"] for r in result["stages"])
    # the partial folder is left behind, never named by a manifest
    stages = got["stages"]
    assert set(stages[got["folder"]]["attempts"]) == {partial, got["manifest"]["dir"]}
    assert all(entry["committed"] for entry in stages.values())
    problems = lake.committed_problems("ws-killed")
    assert problems == [
        f"{got['folder']}: attempt folders {sorted(stages[got['folder']]['attempts'])}"
    ]
    assert lake.lake_state() == lake.before


def test_two_runs_on_one_workspace_at_once(lake: FaultLake, tmp_path: Path) -> None:
    """Both complete, agree on every stage, and each stage is one complete committed folder."""
    got = concurrent(lake, tmp_path)
    for status, output in zip(got["statuses"], got["outputs"], strict=True):
        assert status == 0, output[-3000:]
    a, b = got["results"]
    assert [(r["stage"], r["key"]) for r in a["stages"]] == [
        (r["stage"], r["key"]) for r in b["stages"]
    ]
    assert a["cluster_sizes"] == b["cluster_sizes"] and a["metrics"] == b["metrics"]
    assert sum(a["cluster_sizes"]) == a["counts"]["images"]
    # the registry's champion is the committed model, even if the losing run registered one
    assert got["champion"] == str(a["model_version"]) == str(b["model_version"])
    assert got["problems"] == []
    assert got["committed"] == {r["stage"] for r in a["stages"]}
    assert lake.lake_state() == lake.before


def test_the_lake_is_only_read(lake: FaultLake) -> None:
    """Keys, sizes and ETags of the lake after every run of this module (an outage with a
    restart, a killed run, two runs at once and their reruns) are those from before."""
    after = lake.lake_state()
    assert after == lake.before
    assert len(after) == LAKE_OBJECTS
