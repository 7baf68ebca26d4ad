"""Real parts for the pipeline tests: SeaweedFS S3 (``weed mini``), MLflow on a sqlite store and a
Prefect test server, all on 127.0.0.1, started once per session and stopped at the end."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from scan_core.data import LABELS_SIDECAR, labels_table, lake_objects, load_fashion_mnist
from tests.pipeline.weed import WeedServer, identity

TINY_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "tiny.yaml"
LAKE_IMAGES = 120


@pytest.fixture(scope="session")
def s3_endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A SeaweedFS S3 endpoint (anonymous access) for the session."""
    server = WeedServer(tmp_path_factory.mktemp("weed"))
    server.start()
    try:
        yield server.endpoint
    finally:
        server.stop()


@pytest.fixture(scope="session")
def pipeline_env(tmp_path_factory: pytest.TempPathFactory, s3_endpoint: str) -> Iterator[Path]:
    """Environment of the pipeline under test: a tmp state dir, MLflow on sqlite, the S3
    endpoint, dummy credentials (SeaweedFS allows anonymous access)."""
    state = tmp_path_factory.mktemp("state")
    values = {
        "SCAN_LAKE_STATE_DIR": str(state),
        "SCAN_LAKE_MLFLOW_TRACKING_URI": f"sqlite:///{state / 'mlflow.db'}",
        "SCAN_LAKE_S3_ENDPOINT_URL": s3_endpoint,
        "MLFLOW_S3_ENDPOINT_URL": s3_endpoint,
        "AWS_ACCESS_KEY_ID": "scan-lake-test",
        "AWS_SECRET_ACCESS_KEY": "scan-lake-test",
        "AWS_DEFAULT_REGION": "us-east-1",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
    }
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    yield state
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(scope="session")
def prefect_server(pipeline_env: Path) -> Iterator[None]:
    """One Prefect test server for the session (first start migrates: generous timeout)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="session")
def fashion() -> tuple[np.ndarray, np.ndarray]:
    """The first Fashion-MNIST images and labels (Debian package dataset-fashion-mnist)."""
    images, labels = load_fashion_mnist("train")
    return images[: 2 * LAKE_IMAGES], labels[: 2 * LAKE_IMAGES]


def lake_contents(
    images: np.ndarray, labels: np.ndarray, start: int = 0, extras: bool = True
) -> dict[str, bytes]:
    """Objects of a tiny lake: PNGs, the labels sidecar, a corrupt object and a duplicate."""
    objects = dict(lake_objects(images, start))
    keys = sorted(objects)
    if extras:
        first = next(iter(objects.values()))
        objects["extra/duplicate-of-first.png"] = first
        objects["extra/broken.png"] = b"\x89PNG\r\n\x1a\n not really"
    import io

    import pyarrow.parquet as pq

    buffer = io.BytesIO()
    pq.write_table(labels_table(keys, labels), buffer)
    objects[LABELS_SIDECAR] = buffer.getvalue()
    return objects


def write_objects(fs: object, root: str, objects: dict[str, bytes]) -> None:
    """Write ``objects`` under ``root`` of an fsspec filesystem."""
    for key, data in objects.items():
        path = f"{root}/{key}"
        fs.makedirs(path.rpartition("/")[0], exist_ok=True)  # type: ignore[attr-defined]
        fs.pipe_file(path, data)  # type: ignore[attr-defined]


def write_local(root: Path, objects: dict[str, bytes]) -> None:
    """Write ``objects`` under the local folder ``root``."""
    for key, data in objects.items():
        path = root / key
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)


@pytest.fixture
def s3fs_client(pipeline_env: Path) -> object:
    """An s3fs filesystem on the test endpoint."""
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    return s3fs.S3FileSystem(
        key="scan-lake-test",
        secret="scan-lake-test",
        client_kwargs={"endpoint_url": os.environ["SCAN_LAKE_S3_ENDPOINT_URL"]},
    )


@dataclass(frozen=True)
class SecureS3:
    """A SeaweedFS S3 that requires credentials: an admin identity for the tests, and the
    pipeline's identity, which may only read and list ``lake_bucket`` and read, write and list
    ``work_bucket``. Its secret is recognisable, to search for leaks."""

    endpoint: str
    admin: Any  # s3fs.S3FileSystem with the admin identity
    key: str
    secret: str
    lake_bucket: str = "secure-lake"
    work_bucket: str = "secure-work"

    def env(self) -> dict[str, str]:
        """Environment variables that point the pipeline at this server as its identity."""
        return {
            "SCAN_LAKE_S3_ENDPOINT_URL": self.endpoint,
            "MLFLOW_S3_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": self.key,
            "AWS_SECRET_ACCESS_KEY": self.secret,
        }


def start_secure_s3(data: Path) -> tuple[WeedServer, SecureS3]:
    """Start a credentialed SeaweedFS S3 with its data in ``data``: the server (stop it when
    done) and its :class:`SecureS3` (buckets created, a fresh planted secret)."""
    import s3fs

    secret = f"PLANTED-SECRET-{uuid.uuid4().hex}"
    lake, work = "secure-lake", "secure-work"
    pipeline_actions = [f"{a}:{lake}" for a in ("Read", "List")]
    pipeline_actions += [f"{a}:{work}" for a in ("Read", "Write", "List", "Tagging")]
    identities = [
        identity("admin", "scan-lake-admin", "admin-secret", ["Admin"]),
        identity("pipeline", "scan-lake-pipeline", secret, pipeline_actions),
    ]
    server = WeedServer(data, identities)
    server.start()
    admin = s3fs.S3FileSystem(
        key="scan-lake-admin",
        secret="admin-secret",
        client_kwargs={"endpoint_url": server.endpoint},
        skip_instance_cache=True,
    )
    try:
        admin.mkdir(lake)
        admin.mkdir(work)
    except BaseException:
        server.stop()
        raise
    return server, SecureS3(server.endpoint, admin, "scan-lake-pipeline", secret, lake, work)


@pytest.fixture(scope="session")
def secure_s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SecureS3]:
    """A credentialed SeaweedFS S3 (``-s3.config`` identities) for the session."""
    server, secure = start_secure_s3(tmp_path_factory.mktemp("weed-secure"))
    try:
        yield secure
    finally:
        server.stop()
