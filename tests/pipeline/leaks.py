"""Searching everything a run recorded for a planted secret: local state (MLflow database,
Prefect home), MLflow params and tags, workspace objects (MLflow artifacts, Prefect results,
Parquet metadata and values) and the Prefect server (logs, flow run, blocks, its database),
shared by ``test_security.py`` and ``bench/robustness.py``."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from mlflow import MlflowClient


def leaks(data: bytes, name: str, secret: str) -> bool:
    """Whether ``secret`` is in ``data``: the raw bytes, and for a Parquet file (compressed
    columns) its schema and file metadata and every value."""
    if secret.encode() in data:
        return True
    if not name.endswith(".parquet"):
        return False
    parquet = pq.ParquetFile(pa.BufferReader(data))
    metadata = dict(parquet.metadata.metadata or {})
    if any(secret.encode() in k + v for k, v in metadata.items()):
        return True
    return secret in str(parquet.read().to_pylist())


def server_state(admin: Any) -> dict[str, str]:
    """Every object of every bucket of an S3 server (an admin s3fs filesystem): ``bucket/key``
    -> ETag."""
    admin.invalidate_cache()
    out: dict[str, str] = {}
    for bucket in admin.ls(""):
        for path, info in admin.find(bucket, detail=True).items():
            if info.get("type") != "directory":
                out[path] = info["ETag"]
    return out


def prefect_records(flow_run_id: str) -> dict[str, Any]:
    """The Prefect API's logs of a flow run, the flow run, and every block document (secrets
    included), from the server of the current Prefect settings."""
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as prefect:
        logs: list[dict[str, Any]] = []
        while True:
            body = {
                "logs": {"flow_run_id": {"any_": [flow_run_id]}},
                "limit": 200,
                "offset": len(logs),
            }
            page = prefect.request("POST", "/logs/filter", json=body).json()
            logs += page
            if len(page) < 200:
                break
        flow_run = prefect.request("GET", f"/flow_runs/{flow_run_id}").json()
        blocks = prefect.request(
            "POST", "/block_documents/filter", json={"include_secrets": True}
        ).json()
    return {"logs": logs, "flow_run": flow_run, "blocks": blocks}


def prefect_database() -> Path:
    """The sqlite database file of the Prefect server of the current settings."""
    from prefect.settings import PREFECT_SERVER_DATABASE_CONNECTION_URL

    url = str(PREFECT_SERVER_DATABASE_CONNECTION_URL.value())
    return Path(re.sub(r"^sqlite\+aiosqlite:///", "", url))


@dataclass
class SecretSearch:
    """Where a secret was searched: place -> (what was searched, where it was found), and what
    the search saw (to check it was not blind)."""

    places: dict[str, tuple[str, list[str]]] = field(default_factory=dict)
    logs: list[dict[str, Any]] = field(default_factory=list)
    blocks: list[dict[str, Any]] = field(default_factory=list)
    workspace_objects: list[str] = field(default_factory=list)
    local_files: list[Path] = field(default_factory=list)

    @property
    def hits(self) -> dict[str, list[str]]:
        """The places where the secret was found, and where in them."""
        return {place: found for place, (_, found) in self.places.items() if found}


def search_run(
    secret: str, home: Path, result: dict[str, Any], admin: Any, output: str
) -> SecretSearch:
    """Search a finished CLI run for ``secret`` everywhere it could have been recorded.

    Args:
        secret: The planted secret.
        home: The run's home (its MLflow store and Prefect home live there).
        result: The run's ``--json`` result (workspace, MLflow ids, flow run id).
        admin: An s3fs filesystem that may read the whole workspace.
        output: What the CLI printed.
    """
    search = SecretSearch()
    places = search.places
    places["CLI output"] = (f"{len(output)} characters", ["output"] if secret in output else [])
    local = [p for p in home.rglob("*") if p.is_file()]
    search.local_files = local
    places["local state (MLflow database, Prefect home)"] = (
        f"{len(local)} files",
        [str(p) for p in local if secret.encode() in p.read_bytes()],
    )
    client = MlflowClient(result["mlflow"]["tracking_uri"])
    runs = client.search_runs([result["mlflow"]["experiment_id"]])
    places["MLflow params and tags"] = (
        f"{len(runs)} runs",
        [
            r.info.run_id
            for r in runs
            if secret in json.dumps([r.data.params, r.data.tags, r.info.artifact_uri])
        ],
    )
    ws = result["workspace"].removeprefix("s3://")
    names = [p[len(ws) + 1 :] for p in admin.find(ws)]
    search.workspace_objects = names
    artifacts = [n for n in names if n.startswith("_mlflow/")]
    parquet = [n for n in names if n.endswith(".parquet")]
    others = [n for n in names if n not in artifacts and n not in parquet]
    for place, group in (
        ("MLflow artifacts (workspace _mlflow/)", artifacts),
        ("Parquet files of the workspace (metadata and values)", parquet),
        ("other workspace objects (manifests, Prefect results, pixels)", others),
    ):
        places[place] = (
            f"{len(group)} objects",
            [n for n in group if leaks(admin.cat_file(f"{ws}/{n}"), n, secret)],
        )
    records = prefect_records(result["flow_run_id"])
    search.logs, search.blocks = records["logs"], records["blocks"]
    for place, value, size in (
        ("Prefect logs (API)", records["logs"], f"{len(records['logs'])} log records"),
        ("Prefect flow run (API)", records["flow_run"], "parameters, state, tags"),
        (
            "Prefect blocks (API, secrets included)",
            records["blocks"],
            f"{len(records['blocks'])} blocks",
        ),
    ):
        places[place] = (size, [place] if secret in json.dumps(value) else [])
    database = prefect_database()
    files = [p for p in database.parent.glob(f"{database.name}*") if p.is_file()]  # -wal too
    places["Prefect server database"] = (
        f"{sum(p.stat().st_size for p in files)} bytes in {len(files)} files",
        [str(p) for p in files if secret.encode() in p.read_bytes()],
    )
    return search
