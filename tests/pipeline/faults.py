"""Fault scenarios on a SeaweedFS S3 that the scenario may kill and restart, run through the real
console script: the server dying mid-run, the pipeline killed (SIGKILL) while it writes a stage,
two runs on one workspace at once. Each scenario returns what happened; the tests assert on it
and ``bench/robustness.py`` tabulates it."""

from __future__ import annotations

import json
import signal
import subprocess
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import s3fs
from mlflow import MlflowClient

from flows.pipeline import STAGES
from tests.pipeline.cli_runs import (
    cli_env,
    error_lines,
    object_state,
    stage_folders,
    stage_run_records,
    start_cli,
    wait_for,
)
from tests.pipeline.conftest import TINY_CONFIG, lake_contents, write_objects
from tests.pipeline.weed import WeedServer

BUCKET = "faults"
#: The lake's objects: 40 PNGs, a duplicate, a corrupt object, the labels sidecar.
LAKE_OBJECTS = 43


@dataclass
class FaultLake:
    """A killable S3 server, its lake, its keys and ETags before any run, an MLflow store."""

    server: WeedServer
    fs: s3fs.S3FileSystem
    lake: str
    before: dict[str, tuple[int, str]]
    tracking_uri: str

    def env(self, home: Path, experiment: str) -> dict[str, str]:
        """CLI environment: this server, the MLflow store, a short storage backoff."""
        return cli_env(
            home,
            SCAN_LAKE_S3_ENDPOINT_URL=self.server.endpoint,
            MLFLOW_S3_ENDPOINT_URL=self.server.endpoint,
            SCAN_LAKE_MLFLOW_TRACKING_URI=self.tracking_uri,
            SCAN_LAKE_MLFLOW_EXPERIMENT=experiment,
            SCAN_LAKE_IO_BACKOFF_SECONDS="0.5",
        )

    def args(self, workspace: str, result: Path) -> list[str]:
        """``run`` arguments on the lake and ``s3://faults/<workspace>``."""
        return [
            "run",
            "--lake",
            self.lake,
            "--workspace",
            f"s3://{BUCKET}/{workspace}",
            "--config",
            str(TINY_CONFIG),
            "--json",
            str(result),
        ]

    def stages(self, workspace: str) -> dict[str, dict[str, Any]]:
        """Stage key folders of ``workspace``: committed or not, and their attempt folders."""
        return stage_folders(list(object_state(self.fs, f"{BUCKET}/{workspace}")), STAGES)

    def committed(self, workspace: str) -> set[str]:
        """Stages of ``workspace`` with a committed manifest."""
        return {k.split("/")[0] for k, v in self.stages(workspace).items() if v["committed"]}

    def lake_state(self) -> dict[str, tuple[int, str]]:
        """The lake's keys -> (size, ETag) now."""
        return object_state(self.fs, f"{BUCKET}/lake")

    def finished_stage_runs(self, experiment: str) -> Counter[str]:
        """How often each stage ran to its end (MLflow stage runs FINISHED, not from cache)."""
        return Counter(
            r.data.tags["stage"]
            for r in stage_run_records(self.tracking_uri, experiment)
            if r.info.status == "FINISHED" and r.data.tags.get("cached") == "false"
        )

    def committed_problems(self, workspace: str) -> list[str]:
        """What is wrong with the committed stages of ``workspace`` (empty: nothing): every
        stage folder must be committed and name one attempt folder holding exactly the
        manifest's files with the manifest's sizes, its Parquet files stamped with its key."""
        ws = f"{BUCKET}/{workspace}"
        state = object_state(self.fs, ws)
        problems = []
        for folder, entry in self.stages(workspace).items():
            if not entry["committed"]:
                problems.append(f"{folder}: no manifest")
                continue
            manifest = json.loads(self.fs.cat_file(f"{ws}/{folder}/_manifest.json"))
            attempt = manifest["dir"]
            if list(entry["attempts"]) != [attempt]:
                problems.append(f"{folder}: attempt folders {sorted(entry['attempts'])}")
            names = entry["attempts"].get(attempt, [])
            files = {name: state[f"{folder}/{attempt}/{name}"][0] for name in names}
            if files != manifest["files"]:
                problems.append(f"{folder}: files {files} != manifest {manifest['files']}")
            for name in (n for n in files if n.endswith(".parquet")):
                with self.fs.open(f"{ws}/{folder}/{attempt}/{name}") as handle:
                    metadata = pq.read_schema(handle).metadata or {}
                if metadata.get(b"scan_lake.stage_key", b"").decode() != manifest["key"]:
                    problems.append(f"{folder}/{attempt}/{name}: stage key metadata")
        return problems


@contextmanager
def fault_lake(
    data: Path, tracking_uri: str, fashion: tuple[np.ndarray, np.ndarray]
) -> Iterator[FaultLake]:
    """A SeaweedFS S3 with its data in ``data`` and a tiny lake on it, stopped on exit."""
    server = WeedServer(data)
    server.start()
    try:
        fs = s3fs.S3FileSystem(
            key="scan-lake-test",
            secret="scan-lake-test",
            client_kwargs={"endpoint_url": server.endpoint},
            skip_instance_cache=True,
        )
        fs.mkdir(BUCKET)
        images, labels = fashion
        write_objects(fs, f"{BUCKET}/lake", lake_contents(images[:40], labels[:40]))
        MlflowClient(tracking_uri).search_experiments()  # migrate once, not in each process
        before = object_state(fs, f"{BUCKET}/lake")
        yield FaultLake(server, fs, f"s3://{BUCKET}/lake", before, tracking_uri)
    finally:
        server.stop()


def _finish(process: subprocess.Popen[bytes], log: Path, timeout: float) -> tuple[int, str]:
    try:
        status = process.wait(timeout=timeout)
    finally:
        process.kill()
    return status, log.read_text(errors="replace")


def _result(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.exists() else None


def outage(lake: FaultLake, home: Path, after: str = "pretext") -> dict[str, Any]:
    """Kill the S3 server once stage ``after`` is committed, let the run fail, restart the
    server and run the same command again.

    Returns:
        status, output and errors of the failed run; committed (stages committed before the
        rerun); rerun_status, rerun_output and result of the rerun; finished (MLflow stage runs
        that ran to their end, over both runs).
    """
    env = lake.env(home, "faults-outage")
    log = home / "first.log"
    first = start_cli(lake.args("ws-outage", home / "first.json"), env, log)
    killed = False
    try:
        wait_for(lambda: True if after in lake.committed("ws-outage") else None, first, log)
        lake.server.kill()
        killed = True
        status, output = _finish(first, log, 300)
    finally:
        first.kill()
        if killed:
            lake.server.start()
    committed = lake.committed("ws-outage")
    log = home / "second.log"
    second = start_cli(lake.args("ws-outage", home / "second.json"), env, log)
    rerun_status, rerun_output = _finish(second, log, 300)
    return {
        "status": status,
        "output": output,
        "errors": error_lines(output),
        "committed": committed,
        "rerun_status": rerun_status,
        "rerun_output": rerun_output,
        "result": _result(home / "second.json"),
        "finished": lake.finished_stage_runs("faults-outage"),
    }


def kill_mid_write(lake: FaultLake, home: Path, stage: str = "evaluate") -> dict[str, Any]:
    """SIGKILL the run while ``stage`` has written files into its attempt folder but not its
    manifest, then run the same command again.

    Returns:
        folder (``<stage>/<key>``), partial (the killed run's attempt folder), left (that
        folder's listing right after the kill), stage_statuses (MLflow statuses of the stage's
        runs after the kill); rerun_status, rerun_output, result; manifest (committed by the
        rerun), finished (over both runs), stages (the workspace's stage folders at the end).
    """
    env = lake.env(home, "faults-kill")
    log = home / "first.log"
    first = start_cli(lake.args("ws-killed", home / "first.json"), env, log)

    def writing() -> str | None:
        for folder, entry in lake.stages("ws-killed").items():
            if folder.startswith(f"{stage}/") and entry["attempts"] and not entry["committed"]:
                return folder
        return None

    try:
        folder = wait_for(writing, first, log, every=0.05)
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=60)
    finally:
        first.kill()
    left = lake.stages("ws-killed")[folder]
    statuses = [
        r.info.status
        for r in stage_run_records(lake.tracking_uri, "faults-kill")
        if r.data.tags["stage"] == stage
    ]
    log = home / "second.log"
    second = start_cli(lake.args("ws-killed", home / "second.json"), env, log)
    rerun_status, rerun_output = _finish(second, log, 300)
    manifest_key = f"{BUCKET}/ws-killed/{folder}/_manifest.json"
    lake.fs.invalidate_cache()
    return {
        "folder": folder,
        "partial": next(iter(left["attempts"]), None),
        "left": left,
        "stage_statuses": statuses,
        "rerun_status": rerun_status,
        "rerun_output": rerun_output,
        "result": _result(home / "second.json"),
        "manifest": json.loads(lake.fs.cat_file(manifest_key)) if rerun_status == 0 else None,
        "finished": lake.finished_stage_runs("faults-kill"),
        "stages": lake.stages("ws-killed"),
    }


def concurrent(lake: FaultLake, home: Path) -> dict[str, Any]:
    """Two runs of the same command on one workspace, started together.

    Returns:
        statuses, outputs and results of both; problems (:meth:`FaultLake.committed_problems`);
        committed; discarded (stage runs that lost a commit race and adopted the winner's);
        champion (the model version the registry's ``champion`` alias names).
    """
    env = lake.env(home, "faults-twice")
    logs = [home / "a.log", home / "b.log"]
    outs = [home / "a.json", home / "b.json"]
    runs = [
        start_cli(lake.args("ws-twice", out), env, log) for out, log in zip(outs, logs, strict=True)
    ]
    finished = [_finish(run, log, 400) for run, log in zip(runs, logs, strict=True)]
    discarded = [
        r.data.tags["stage"]
        for r in stage_run_records(lake.tracking_uri, "faults-twice")
        if "discarded" in r.data.tags
    ]
    return {
        "statuses": [status for status, _ in finished],
        "outputs": [output for _, output in finished],
        "results": [_result(out) for out in outs],
        "problems": lake.committed_problems("ws-twice"),
        "committed": lake.committed("ws-twice"),
        "discarded": sorted(discarded),
        "champion": str(
            MlflowClient(lake.tracking_uri)
            .get_model_version_by_alias("scan-lake", "champion")
            .version
        ),
    }
