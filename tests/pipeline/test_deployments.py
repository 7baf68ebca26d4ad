"""The scheduled deployment against a real Prefect server (``prefect server start`` on 127.0.0.1):

- ``scan-lake serve`` registers the deployment (cron schedule, lake/workspace/clusters/config
  parameters) and its runner executes a run requested through the API;
- ``scan-lake deploy`` registers it on a process work pool and a real ``prefect worker`` runs it.

Both runs go to the same tiny lake and workspace, so the worker's run is all cache hits.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from mlflow import MlflowClient

from tests.pipeline.conftest import TINY_CONFIG, lake_contents, write_local
from tests.pipeline.weed import free_ports

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
CRON = "0 3 * * *"
EXPERIMENT = "scan-lake-deployments"


def _stop(process: subprocess.Popen[bytes], timeout: float = 20) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _start(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    handle = log.open("wb")
    return subprocess.Popen(args, cwd=ROOT, env=env, stdout=handle, stderr=subprocess.STDOUT)


@pytest.fixture(scope="module")
def prefect_api(pipeline_env: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """A real Prefect server in a subprocess, and the environment of processes that use it."""
    root = tmp_path_factory.mktemp("deploy")
    port = free_ports(1)[0]
    url = f"http://127.0.0.1:{port}/api"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(
        {
            "PREFECT_HOME": str(root / "prefect-home"),
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_UI_ENABLED": "false",
            "PREFECT_RUNNER_POLL_FREQUENCY": "1",
            "PREFECT_WORKER_QUERY_SECONDS": "1",
            "SCAN_LAKE_MLFLOW_EXPERIMENT": EXPERIMENT,
        }
    )
    server = _start(
        [
            sys.executable,
            "-m",
            "prefect",
            "server",
            "start",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ],
        env,
        root / "server.log",
    )
    try:
        deadline = time.monotonic() + 150
        while True:
            if server.poll() is not None:
                pytest.fail(f"prefect server exited: {(root / 'server.log').read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as answer:
                    if answer.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail("the Prefect server did not answer within 150 s")
            time.sleep(1)
        env["PREFECT_API_URL"] = url
        yield {"url": url, "env": env, "root": root}
    finally:
        _stop(server)


@pytest.fixture(scope="module")
def tiny_lake(prefect_api: Any, fashion: tuple[np.ndarray, np.ndarray]) -> dict[str, str]:
    root: Path = prefect_api["root"]
    images, labels = fashion
    write_local(root / "lake", lake_contents(images[:40], labels[:40], extras=False))
    return {"lake": str(root / "lake"), "workspace": str(root / "workspace")}


def _client(url: str) -> Any:
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    class _Client:
        def __enter__(self) -> Any:
            self.settings = temporary_settings(updates={PREFECT_API_URL: url})
            self.settings.__enter__()
            self.client = get_client(sync_client=True)
            return self.client.__enter__()

        def __exit__(self, *exc: object) -> None:
            self.client.__exit__(*exc)
            self.settings.__exit__(*exc)

    return _Client()


def _wait_for_deployment(
    url: str, name: str, process: subprocess.Popen[bytes], log: Path, timeout: float = 120
) -> Any:
    from prefect.exceptions import ObjectNotFound

    deadline = time.monotonic() + timeout
    with _client(url) as client:
        while True:
            try:
                return client.read_deployment_by_name(name)
            except ObjectNotFound:
                pass
            if process.poll() is not None and process.returncode != 0:
                pytest.fail(f"{process.args} exited: {log.read_text()[-3000:]}")
            if time.monotonic() > deadline:
                pytest.fail(f"deployment {name} not registered in {timeout} s: {log.read_text()}")
            time.sleep(1)


def _run_and_wait(url: str, deployment_id: Any, logs: list[Path], timeout: float = 400) -> Any:
    with _client(url) as client:
        flow_run = client.create_flow_run_from_deployment(deployment_id)
        deadline = time.monotonic() + timeout
        while True:
            flow_run = client.read_flow_run(flow_run.id)
            if flow_run.state is not None and flow_run.state.is_final():
                break
            if time.monotonic() > deadline:
                tails = "\n".join(log.read_text()[-2000:] for log in logs)
                pytest.fail(f"flow run {flow_run.id} not finished in {timeout} s: {tails}")
            time.sleep(2)
    return flow_run


def _mlflow_run_of(flow_run_id: str) -> Any:
    client = MlflowClient(os.environ["SCAN_LAKE_MLFLOW_TRACKING_URI"])
    experiment = client.get_experiment_by_name(EXPERIMENT)
    assert experiment is not None
    runs = client.search_runs(
        [experiment.experiment_id], f"tags.`prefect.flow_run_id` = '{flow_run_id}'"
    )
    assert len(runs) == 1
    return runs[0]


def test_serve_registers_the_schedule_and_runs_the_flow(
    prefect_api: Any, tiny_lake: dict[str, str]
) -> None:
    root: Path = prefect_api["root"]
    log = root / "serve.log"
    command = [sys.executable, "-m", "flows.cli", "serve", "--lake", tiny_lake["lake"]]
    command += ["--workspace", tiny_lake["workspace"], "--config", str(TINY_CONFIG)]
    command += ["--cron", CRON, "--name", "served", "--clusters", "3"]
    serve = _start(command, prefect_api["env"], log)
    try:
        deployment = _wait_for_deployment(prefect_api["url"], "scan_pipeline/served", serve, log)
        assert [s.schedule.cron for s in deployment.schedules] == [CRON]
        assert deployment.parameters["lake"] == tiny_lake["lake"]
        assert deployment.parameters["workspace"] == tiny_lake["workspace"]
        assert deployment.parameters["clusters"] == 3
        assert deployment.parameters["config"]["pretext"]["backbone"] == "small_cnn"
        assert deployment.work_pool_name is None  # served, not on a pool
        flow_run = _run_and_wait(prefect_api["url"], deployment.id, [log])
        assert flow_run.state.is_completed(), log.read_text()[-3000:]
        mlflow_run = _mlflow_run_of(str(flow_run.id))
        assert mlflow_run.data.tags["lake"] == tiny_lake["lake"]
        assert mlflow_run.info.status == "FINISHED"
        assert mlflow_run.data.tags["stages_run"].startswith("catalog,pretext")
    finally:
        _stop(serve)


def test_deploy_on_a_work_pool_runs_through_a_process_worker(
    prefect_api: Any, tiny_lake: dict[str, str]
) -> None:
    root: Path = prefect_api["root"]
    env = prefect_api["env"]
    command = [sys.executable, "-m", "flows.cli", "deploy", "--lake", tiny_lake["lake"]]
    command += ["--workspace", tiny_lake["workspace"], "--config", str(TINY_CONFIG)]
    command += ["--cron", CRON, "--name", "pooled", "--work-pool", "scan-lake-test"]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "prefect worker start --pool scan-lake-test" in " ".join(done.stdout.split())

    log = root / "worker.log"
    worker = _start(
        [sys.executable, "-m", "prefect", "worker", "start", "--pool", "scan-lake-test"],
        env,
        log,
    )
    try:
        deployment = _wait_for_deployment(prefect_api["url"], "scan_pipeline/pooled", worker, log)
        assert deployment.work_pool_name == "scan-lake-test"
        assert [s.schedule.cron for s in deployment.schedules] == [CRON]
        flow_run = _run_and_wait(prefect_api["url"], deployment.id, [log])
        assert flow_run.state.is_completed(), log.read_text()[-3000:]
        mlflow_run = _mlflow_run_of(str(flow_run.id))
        assert mlflow_run.data.tags["stages_run"] == "none"  # the served run made every stage
    finally:
        _stop(worker)
