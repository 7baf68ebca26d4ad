"""Requests that cannot train stop with one sentence naming the cause and the fix, before any
training starts: through the real console script, exit status 2, no traceback, no stage folder
in the workspace and no MLflow stage run. The cases run concurrently in one fixture (each is a
process of its own) and are checked one by one."""

from __future__ import annotations

import os
import subprocess
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from mlflow import MlflowClient

from flows.pipeline import STAGES
from tasks.storage import Storage
from tests.pipeline.cli_runs import cli_env, error_lines, run_cli, stage_runs
from tests.pipeline.conftest import TINY_CONFIG, SecureS3, lake_contents, write_local
from tests.pipeline.weed import free_ports

pytestmark = pytest.mark.integration


@dataclass(frozen=True)
class Case:
    """One bad request: CLI arguments (after ``run``), environment changes, and the fragments
    its error sentence must contain."""

    args: list[str]
    expect: list[str]
    env: dict[str, str] = field(default_factory=dict)
    drop_env: tuple[str, ...] = ()
    flow: bool = False  # refused by the flow (after the lake scan), not by the CLI's checks


CASE_NAMES = (
    "clusters < 2",
    "unknown key in the config file",
    "wrong type in the config file",
    "config file that is not YAML",
    "missing config file",
    "unknown --set key",
    "unknown --set section",
    "wrong --set type",
    "--set without =",
    "missing lake folder",
    "unreachable endpoint",
    "missing bucket",
    "wrong secret",
    "unknown access key",
    "no credentials",
    "read-only workspace",
    "empty lake",
    "no usable image",
    "fewer images than clusters",
    "neighbours >= images",
)


def cases(where: dict[str, Any]) -> dict[str, Case]:
    """The bad requests, given the lakes, workspaces and servers of ``where``."""
    local, ws = where["local_lake"], where["workspace"]
    plain = ["--lake", local, "--workspace", ws, "--config", str(TINY_CONFIG)]
    secure: SecureS3 = where["secure"]
    dead = f"http://127.0.0.1:{free_ports(1)[0]}"
    files: dict[str, Path] = where["files"]
    return {
        "clusters < 2": Case(
            [*plain, "--clusters", "1"],
            ["--clusters 1 is invalid", "greater than or equal to 2", "pass --clusters 2 or more"],
        ),
        "unknown key in the config file": Case(
            ["--lake", local, "--workspace", ws, "--config", str(files["unknown-key"])],
            ["scan.epochz", "Extra inputs are not permitted", "fix the config file"],
        ),
        "wrong type in the config file": Case(
            ["--lake", local, "--workspace", ws, "--config", str(files["wrong-type"])],
            ["pretext.epochs", "valid integer", "'many'", "fix the config file"],
        ),
        "config file that is not YAML": Case(
            ["--lake", local, "--workspace", ws, "--config", str(files["not-yaml"])],
            ["is not valid YAML", "fix it"],
        ),
        "missing config file": Case(
            ["--lake", local, "--workspace", ws, "--config", str(files["missing"])],
            ["does not exist", "check the --config path"],
        ),
        "unknown --set key": Case(
            [*plain, "--set", "scan.epochz=3"],
            ["Unknown config key 'scan.epochz'", "Fix the config file or --set key"],
        ),
        "unknown --set section": Case(
            [*plain, "--set", "nope.x=1"], ["Unknown config section 'nope'"]
        ),
        "wrong --set type": Case(
            [*plain, "--set", "pretext.epochs=many"], ["pretext.epochs", "valid integer"]
        ),
        "--set without =": Case([*plain, "--set", "scan.epochs"], ["is not key=value"]),
        "missing lake folder": Case(
            ["--lake", where["missing_lake"], "--workspace", ws, "--clusters", "3"],
            ["does not exist", "check the path or create the folder"],
        ),
        "unreachable endpoint": Case(
            ["--lake", "s3://bucket/lake", "--workspace", "s3://bucket/ws", "--clusters", "3"],
            ["Cannot reach 's3://bucket/lake'", "EndpointConnectionError", "that the server is up"],
            env={"SCAN_LAKE_S3_ENDPOINT_URL": dead},
        ),
        "missing bucket": Case(
            ["--lake", "s3://no-such-bucket-x/lake", "--workspace", where["s3_ws"]],
            ["The S3 bucket 'no-such-bucket-x'", "does not exist: create it or fix the URL"],
        ),
        "wrong secret": Case(
            ["--lake", f"s3://{secure.lake_bucket}/lake", "--workspace", where["secure_ws"]],
            ["was denied", "signature", "check AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"],
            env={**secure.env(), "AWS_SECRET_ACCESS_KEY": "not-the-secret"},
        ),
        "unknown access key": Case(
            ["--lake", f"s3://{secure.lake_bucket}/lake", "--workspace", where["secure_ws"]],
            ["was denied", "access key ID you provided does not exist", "AWS_ACCESS_KEY_ID"],
            env={**secure.env(), "AWS_ACCESS_KEY_ID": "nobody"},
        ),
        "no credentials": Case(
            ["--lake", f"s3://{secure.lake_bucket}/lake", "--workspace", where["secure_ws"]],
            ["No S3 credentials were found", "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"],
            env={
                **secure.env(),
                "AWS_EC2_METADATA_DISABLED": "true",
                "HOME": where["home"],
            },
            drop_env=("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"),
        ),
        "read-only workspace": Case(
            ["--lake", f"s3://{secure.lake_bucket}/lake"]
            + ["--workspace", f"s3://{secure.lake_bucket}/ws", "--clusters", "3"],
            ["workspace 's3://secure-lake/ws' cannot be written", "grant them write access"],
            env=secure.env(),
        ),
        # refused by the flow after the lake scan, before the first stage
        "empty lake": Case(
            ["--lake", where["empty_s3_lake"], "--workspace", where["s3_ws"], "--clusters", "3"],
            ["holds no objects", "point --lake at a folder or prefix with images"],
            flow=True,
        ),
        "no usable image": Case(
            ["--lake", where["junk_lake"], "--workspace", ws, "--clusters", "3"],
            ["None of the 3 objects", "is a usable image", "add PNG/JPEG"],
            flow=True,
        ),
        "fewer images than clusters": Case(
            [*plain, "--clusters", "50"],
            ["The lake has 20 unique usable images, fewer than the 50 clusters", "lower --clust"],
            flow=True,
        ),
        "neighbours >= images": Case(
            [*plain, "--set", "neighbors.k=20"],
            ["neighbors.k = 20 needs more than 20 images but the lake has 20", "--set neighbors.k"],
            flow=True,
        ),
    }


@pytest.fixture(scope="module")
def refused(
    tmp_path_factory: pytest.TempPathFactory,
    pipeline_env: Path,
    prefect_server: None,
    secure_s3: SecureS3,
    fashion: tuple[np.ndarray, np.ndarray],
) -> dict[str, Any]:
    """Every case run once, four at a time; case -> (Case, workspace, process, env)."""
    root = tmp_path_factory.mktemp("bad-requests")
    images, labels = fashion
    write_local(root / "lake", lake_contents(images[:20], labels[:20], extras=False))
    write_local(root / "junk", {"a.txt": b"text", "b.html": b"<html></html>", "c.png": b""})
    files = {
        "unknown-key": root / "unknown-key.yaml",
        "wrong-type": root / "wrong-type.yaml",
        "not-yaml": root / "not-yaml.yaml",
        "missing": root / "missing.yaml",
    }
    files["unknown-key"].write_text("scan:\n  num_clusters: 3\n  epochz: 3\n")
    files["wrong-type"].write_text("scan:\n  num_clusters: 3\npretext:\n  epochs: many\n")
    files["not-yaml"].write_text("scan: [1, 2\n")
    bucket = f"req-{uuid.uuid4().hex[:8]}"
    Storage(f"s3://{bucket}").fs.mkdir(bucket)
    where = {
        "local_lake": str(root / "lake"),
        "junk_lake": str(root / "junk"),
        "missing_lake": str(root / "nowhere"),
        "empty_s3_lake": f"s3://{bucket}/empty",
        "s3_ws": f"s3://{bucket}/ws",
        "secure": secure_s3,
        "secure_ws": f"s3://{secure_s3.work_bucket}/ws-refused",
        "files": files,
        "home": str(root),
        "workspace": "",  # set per case below
    }

    def launch(item: tuple[int, str]) -> tuple[str, Any]:
        index, name = item
        home = root / f"case-{index}"
        local_ws = str(home / "ws")
        case = cases({**where, "workspace": local_ws})[name]
        env = cli_env(home, **case.env)
        if case.flow:  # the session's MLflow store (migrated once), an experiment per case
            env["SCAN_LAKE_MLFLOW_TRACKING_URI"] = os.environ["SCAN_LAKE_MLFLOW_TRACKING_URI"]
            env["SCAN_LAKE_MLFLOW_EXPERIMENT"] = f"refused-{uuid.uuid4().hex[:8]}"
        for key in case.drop_env:
            env.pop(key, None)
        done: subprocess.CompletedProcess[str] = run_cli(["run", *case.args], env)
        workspace = case.args[case.args.index("--workspace") + 1]
        return name, (case, workspace, done, env)

    # the flow cases share the session's MLflow store: migrate it here, not in four processes
    MlflowClient(os.environ["SCAN_LAKE_MLFLOW_TRACKING_URI"]).search_experiments()
    plan = cases({**where, "workspace": "ws"})
    assert tuple(plan) == CASE_NAMES
    slow_first = sorted(enumerate(CASE_NAMES), key=lambda item: not plan[item[1]].flow)
    with ThreadPoolExecutor(4) as pool:
        return dict(pool.map(launch, slow_first))


def stage_folders(workspace: str, secure: SecureS3) -> list[str]:
    """Stage folders in a workspace (a local folder, or a prefix on one of the S3 servers)."""
    if workspace.startswith(f"s3://{secure.lake_bucket}/") or workspace.startswith(
        f"s3://{secure.work_bucket}/"
    ):
        root = workspace[5:]
        keys = [p[len(root) + 1 :] for p in secure.admin.find(root)]
    elif workspace.startswith("s3://"):
        keys = [o.key for o in Storage(workspace).list_objects()]
    else:
        root = Path(workspace)
        keys = [str(p.relative_to(root)) for p in root.rglob("*")] if root.exists() else []
    return [k for k in keys if k.split("/")[0] in STAGES]


@pytest.mark.parametrize("name", CASE_NAMES)
def test_refused_with_one_sentence_before_training(
    name: str, refused: dict[str, Any], secure_s3: SecureS3
) -> None:
    case, workspace, done, env = refused[name]
    output = done.stdout + done.stderr
    assert done.returncode == 2, output[-3000:]
    errors = error_lines(done.stdout)
    assert len(errors) == 1, output[-3000:]
    for fragment in case.expect:
        assert fragment in errors[0], (fragment, errors[0])
    assert errors[0].endswith("."), errors[0]
    assert "Traceback" not in output, output[-3000:]
    assert stage_folders(workspace, secure_s3) == []
    tracking_uri = env["SCAN_LAKE_MLFLOW_TRACKING_URI"]
    if case.flow:  # the flow opened its parent run (failed), but no stage run
        experiment = env["SCAN_LAKE_MLFLOW_EXPERIMENT"]
        assert stage_runs(tracking_uri, experiment) == []
        client = MlflowClient(tracking_uri)
        runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
        assert [r.info.status for r in runs] == ["FAILED"]
    else:  # refused before MLflow was opened
        assert not Path(tracking_uri.removeprefix("sqlite:///")).exists()


def test_sentences_name_what_to_do(refused: dict[str, Any]) -> None:
    """Every sentence says how to fix it (an imperative after the cause)."""
    verbs = ("check", "fix", "create", "set", "add", "lower", "pass", "point", "grant", "Fix")
    for name, (_, _, done, _) in refused.items():
        sentence = error_lines(done.stdout)[0]
        assert any(f"{verb} " in sentence for verb in verbs), (name, sentence)
