"""The bad requests: ``scan-lake run`` invocations that cannot train, each with the fragments
its one error sentence must hold, the lakes, files and servers they need, and running them all
through the real console script (shared by ``test_bad_requests.py`` and
``bench/robustness.py``)."""

from __future__ import annotations

import subprocess
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from mlflow import MlflowClient

from flows.pipeline import STAGES
from tasks.storage import Storage
from tests.pipeline.cli_runs import cli_env, run_cli
from tests.pipeline.conftest import TINY_CONFIG, SecureS3, lake_contents, write_local
from tests.pipeline.weed import free_ports


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


@dataclass(frozen=True)
class Refusal:
    """How one bad request went: its case, workspace, finished process and environment."""

    case: Case
    workspace: str
    done: subprocess.CompletedProcess[str]
    env: dict[str, str]


def prepare(root: Path, fashion: tuple[np.ndarray, np.ndarray], secure: SecureS3) -> dict[str, Any]:
    """Lakes, config files and buckets of the cases under ``root`` (the anonymous S3 server of
    the environment, ``secure`` for the credential cases); the ``where`` of :func:`cases`."""
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
    return {
        "local_lake": str(root / "lake"),
        "junk_lake": str(root / "junk"),
        "missing_lake": str(root / "nowhere"),
        "empty_s3_lake": f"s3://{bucket}/empty",
        "s3_ws": f"s3://{bucket}/ws",
        "secure": secure,
        "secure_ws": f"s3://{secure.work_bucket}/ws-refused",
        "files": files,
        "home": str(root),
        "workspace": "",  # a local workspace per case, set by run_cases
    }


def run_cases(root: Path, where: dict[str, Any], tracking_uri: str) -> dict[str, Refusal]:
    """Every case through the console script, four at a time, each with its own home under
    ``root``; the cases refused by the flow log to ``tracking_uri`` (an experiment each)."""

    def launch(item: tuple[int, str]) -> tuple[str, Refusal]:
        index, name = item
        home = root / f"case-{index}"
        case = cases({**where, "workspace": str(home / "ws")})[name]
        env = cli_env(home, **case.env)
        if case.flow:  # a shared, already migrated MLflow store, an experiment per case
            env["SCAN_LAKE_MLFLOW_TRACKING_URI"] = tracking_uri
            env["SCAN_LAKE_MLFLOW_EXPERIMENT"] = f"refused-{uuid.uuid4().hex[:8]}"
        for key in case.drop_env:
            env.pop(key, None)
        done = run_cli(["run", *case.args], env)
        workspace = case.args[case.args.index("--workspace") + 1]
        return name, Refusal(case, workspace, done, env)

    # migrate the shared MLflow store here, not in four processes at once
    MlflowClient(tracking_uri).search_experiments()
    plan = cases({**where, "workspace": "ws"})
    slow_first = sorted(enumerate(plan), key=lambda item: not plan[item[1]].flow)
    with ThreadPoolExecutor(4) as pool:
        return dict(pool.map(launch, slow_first))


def stage_objects(workspace: str, secure: SecureS3) -> list[str]:
    """Keys under stage folders in a workspace (a local folder, or a prefix on one of the S3
    servers)."""
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
