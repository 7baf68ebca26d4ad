"""Security: a planted secret (the credentialed SeaweedFS's pipeline secret) never reaches MLflow,
Prefect or the workspace; checkpoints and config files are loaded safely; object keys never
address anything outside the workspace."""

from __future__ import annotations

import io
import json
import os
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from scan_core.data import lake_objects
from tasks.checkpoints import CHECKPOINT, load_state, state_bytes
from tasks.errors import ScanLakeError
from tasks.lake import refusal
from tasks.storage import ObjectInfo, Storage
from tests.pipeline.cli_runs import ROOT, cli_env, error_lines, run_cli
from tests.pipeline.conftest import TINY_CONFIG, SecureS3, lake_contents, write_objects
from tests.pipeline.leaks import leaks, prefect_database, search_run, server_state

pytestmark = pytest.mark.integration

#: Keys SeaweedFS stores as they are that look like paths elsewhere (SeaweedFS itself refuses
#: keys with ``.``/``..`` segments, folds ``//`` and reads a backslash as ``/``; AWS S3 does
#: not, see the unit test below).
ODD_KEYS = ("odd/%2e%2e/%2e%2e/dots.png", "odd/.../three-dots.png", "odd/~root/tilde.png")


@pytest.fixture(scope="module")
def secure_run(
    tmp_path_factory: pytest.TempPathFactory,
    pipeline_env: Path,
    prefect_server: None,
    secure_s3: SecureS3,
    fashion: tuple[np.ndarray, np.ndarray],
) -> dict[str, Any]:
    """One CLI run with the pipeline's identity (secret planted) on a lake with odd keys."""
    home = tmp_path_factory.mktemp("secure-run")
    images, labels = fashion
    objects = lake_contents(images[:30], labels[:30], extras=False)
    objects.update(dict(zip(ODD_KEYS, (v for _, v in lake_objects(images[30:33])), strict=True)))
    write_objects(secure_s3.admin, f"{secure_s3.lake_bucket}/lake-sec", objects)
    before = server_state(secure_s3.admin)
    workspace = f"s3://{secure_s3.work_bucket}/ws-secure"
    env = cli_env(home, SCAN_LAKE_MLFLOW_EXPERIMENT="secure", **secure_s3.env())
    args = ["run", "--lake", f"s3://{secure_s3.lake_bucket}/lake-sec", "--workspace", workspace]
    done = run_cli([*args, "--config", str(TINY_CONFIG), "--json", str(home / "result.json")], env)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    return {
        "home": home,
        "env": env,
        "output": done.stdout + done.stderr,
        "result": json.loads((home / "result.json").read_text()),
        "workspace": workspace,
        "before": before,
        "after": server_state(secure_s3.admin),
        "objects": objects,
    }


def test_leak_search_finds_a_planted_secret() -> None:
    """The search is not blind: raw bytes, Parquet metadata, and cells that compression hides
    from a byte search."""
    secret = f"PLANTED-SECRET-{uuid.uuid4().hex}"
    assert leaks(b"x" + secret.encode() + b"y", "a.json", secret)
    buffer = io.BytesIO()
    pq.write_table(pa.table({"a": [1]}).replace_schema_metadata({"k": secret}), buffer)
    assert leaks(buffer.getvalue(), "t.parquet", secret)
    buffer = io.BytesIO()
    column = pa.table({"a": [secret] * 50})
    options = {"compression": "gzip", "use_dictionary": False, "write_statistics": False}
    pq.write_table(column, buffer, **options)
    assert secret.encode() not in buffer.getvalue()  # Huffman-coded: only reading finds it
    assert leaks(buffer.getvalue(), "t.parquet", secret)


def test_the_secret_is_never_recorded(secure_run: dict[str, Any], secure_s3: SecureS3) -> None:
    """Not in the CLI output, the local state (MLflow database, Prefect home), MLflow params,
    tags and artifacts, any workspace object (Parquet metadata and values included), the
    Prefect logs, flow run and blocks (through the API) or the Prefect server's database."""
    secret, result = secure_s3.secret, secure_run["result"]
    assert secure_run["env"]["AWS_SECRET_ACCESS_KEY"] == secret  # the run had it
    search = search_run(secret, secure_run["home"], result, secure_s3.admin, secure_run["output"])
    assert search.hits == {}
    # the search saw what it had to see
    assert any(p.name == "mlflow.db" for p in search.local_files)
    names = search.workspace_objects
    assert any(n.startswith("_mlflow/") for n in names)  # MLflow artifacts live here
    assert not any(n.startswith("_prefect/") for n in names)  # Prefect persists no results
    assert sum(n.endswith(".parquet") for n in names) >= 8
    assert len(search.logs) > 20 and any("stages run" in log["message"] for log in search.logs)
    assert prefect_database().is_file()


def test_object_keys_never_lead_outside_the_workspace(
    secure_run: dict[str, Any], secure_s3: SecureS3
) -> None:
    """Lake keys that look like paths are catalogued as keys; every object the run wrote lies
    under the workspace prefix, and nothing else on the server changed."""
    before, after = secure_run["before"], secure_run["after"]
    changed = {k for k in after if before.get(k) != after[k]}
    prefix = secure_run["workspace"].removeprefix("s3://") + "/"
    assert changed and all(k.startswith(prefix) for k in changed), sorted(changed)[:5]
    assert all(after.get(k) == etag for k, etag in before.items())  # nothing removed or rewritten
    result = secure_run["result"]
    assert result["counts"]["images"] == 33 and result["counts"]["quarantined"] == 0
    assert sum(result["cluster_sizes"]) == 33


@pytest.mark.parametrize(
    "key", ["../escape.png", "a/../../escape.png", "/etc/passwd", "a/./b.png", "..", "a\x00b"]
)
def test_unsafe_keys_are_quarantined_and_never_paths(key: str, tmp_path: Path) -> None:
    """Keys AWS S3 accepts (SeaweedFS refuses them, so no lake here can hold them): the lake
    scan quarantines them unread, and no storage call turns them into a path."""
    reason = refusal(ObjectInfo(key=key, size=10, version="v"), max_bytes=1000)
    assert reason is not None and reason.startswith("unsafe object key"), reason
    workspace = Storage(str(tmp_path / "ws"))
    workspace.check_reachable(create=True)
    for call in (
        lambda: workspace.write_bytes(key, b"x"),
        lambda: workspace.read_bytes(key),
        lambda: workspace.create_exclusive(key, b"x"),
        lambda: workspace.remove(key),
    ):
        with pytest.raises(ValueError, match="refusing the path"):
            call()
    assert [p.name for p in tmp_path.rglob("*")] == ["ws"]


def test_checkpoints_refuse_pickled_code(tmp_path: Path) -> None:
    """A checkpoint that would run code when unpickled is refused with one sentence and the
    code never runs; a plain state_dict loads; every torch.load passes weights_only=True."""
    marker = tmp_path / "code-ran"

    class RunsCode:
        def __reduce__(self) -> tuple[Any, tuple[str]]:
            return (os.mkdir, (str(marker),))

    workspace = Storage(str(tmp_path / "ws"))
    buffer = io.BytesIO()
    torch.save({"weight": torch.zeros(2), "payload": RunsCode()}, buffer)
    workspace.write_bytes(f"scan/key/evil/{CHECKPOINT}", buffer.getvalue())
    with pytest.raises(ScanLakeError) as refused:
        load_state(workspace, "scan/key/evil")
    message = str(refused.value)
    assert "is not a checkpoint of tensors only: the tensors-only loader refused it" in message
    assert f"delete {workspace.uri('scan/key')} so that the next run computes it again" in message
    assert "\n" not in message
    assert not marker.exists()

    workspace.write_bytes(f"scan/key/cut/{CHECKPOINT}", state_bytes(torch.nn.Linear(2, 3))[:90])
    with pytest.raises(ScanLakeError, match="is not a readable PyTorch checkpoint"):
        load_state(workspace, "scan/key/cut")

    workspace.write_bytes(f"scan/key/good/{CHECKPOINT}", state_bytes(torch.nn.Linear(2, 3)))
    assert set(load_state(workspace, "scan/key/good")) == {"weight", "bias"}

    calls = [
        (path, line)
        for folder in ("scan_core", "tasks", "flows", "deployments")
        for path in (ROOT / folder).rglob("*.py")
        for line in path.read_text().splitlines()
        if "torch.load(" in line
    ]
    assert calls and all("weights_only=True" in line for _, line in calls), calls


def test_config_files_are_parsed_safely(tmp_path: Path) -> None:
    """A YAML tag that would build a Python object is refused with one sentence, unrun."""
    marker = tmp_path / "code-ran"
    config = tmp_path / "evil.yaml"
    config.write_text(f"scan: !!python/object/apply:os.mkdir ['{marker}']\n")
    args = ["run", "--lake", str(tmp_path), "--workspace", str(tmp_path / "ws")]
    done = run_cli([*args, "--config", str(config)], cli_env(tmp_path, prefect_api=False))
    output = done.stdout + done.stderr
    assert done.returncode == 2, output
    errors = error_lines(done.stdout)
    assert len(errors) == 1, output
    assert "is not valid YAML (could not determine a constructor for the tag" in errors[0]
    assert "python/object/apply:os.mkdir" in errors[0] and errors[0].endswith("fix it.")
    assert "Traceback" not in output
    assert not marker.exists()
