"""One retry policy: transient faults only, bounded attempts and time, one loop. Attempts are
counted as the HTTP requests the S3 client sends (a botocore ``before-send`` hook on the real
client), against a real SeaweedFS that the test stops mid-run."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from botocore.exceptions import ClientError, EndpointConnectionError

from tasks.errors import ScanLakeError, StorageUnavailableError, is_transient, storage_unavailable
from tasks.settings import MachineSettings
from tasks.storage import Storage
from tests.pipeline.conftest import SecureS3, lake_contents, write_objects
from tests.pipeline.weed import WeedServer

pytestmark = pytest.mark.integration

BUCKET = "retries"


@dataclass
class Requests:
    """HTTP requests an S3 client sent (every try, botocore's and s3fs's own included), and
    an optional moment to kill the server: just before the ``kill_at``-th ``GetObject``."""

    sent: list[str] = field(default_factory=list)
    kill_at: int | None = None
    server: WeedServer | None = None
    killed_at: int | None = None  # index in ``sent`` of the first request after the kill

    def hook(self, event_name: str, **_: Any) -> None:
        operation = event_name.rsplit(".", 1)[-1]
        self.sent.append(operation)
        due = self.kill_at is not None and self.sent.count("GetObject") == self.kill_at
        if due and self.killed_at is None and self.server is not None:
            self.server.kill()
            self.killed_at = len(self.sent) - 1

    def after_kill(self) -> list[str]:
        assert self.killed_at is not None, "the server was never killed"
        return self.sent[self.killed_at :]


def counted(storage: Storage, requests: Requests) -> Storage:
    """Count the requests of ``storage``'s S3 client (a hook on the client itself)."""
    client = storage.fs.s3  # type: ignore[attr-defined]
    client.meta.events.unregister("before-send.s3", requests.hook)
    client.meta.events.register("before-send.s3", requests.hook)
    return storage


@pytest.fixture(scope="module")
def weed(tmp_path_factory: pytest.TempPathFactory, pipeline_env: Path) -> Iterator[WeedServer]:
    """A SeaweedFS of this module's own, which the tests kill and restart."""
    server = WeedServer(tmp_path_factory.mktemp("weed-retries"))
    server.start()
    try:
        admin = Storage(f"s3://{BUCKET}", settings(server)).fs
        admin.mkdir(BUCKET)
        yield server
    finally:
        server.stop()


def settings(server: WeedServer, **io: Any) -> MachineSettings:
    """Machine settings for ``server`` with the ``io_*`` settings ``io``."""
    return MachineSettings.model_validate(
        {
            "SCAN_LAKE_S3_ENDPOINT_URL": server.endpoint,
            "AWS_ACCESS_KEY_ID": "scan-lake-test",
            "AWS_SECRET_ACCESS_KEY": "scan-lake-test",
            **{f"io_{k}": v for k, v in io.items()},
        }
    )


@pytest.fixture
def restart(weed: WeedServer) -> Iterator[WeedServer]:
    """The server, started again after the test if the test killed it."""
    yield weed
    if weed.process is None:
        weed.start()


def test_a_stopped_server_is_tried_io_attempts_times_then_one_sentence(
    restart: WeedServer,
) -> None:
    """Each storage call is tried at most ``io_attempts`` times in all: one HTTP request per
    try (no botocore or s3fs retries inside), then StorageUnavailableError, not retried."""
    requests = Requests()
    storage = counted(
        Storage(f"s3://{BUCKET}/ws-a", settings(restart, attempts=3, backoff_seconds=0.05)),
        requests,
    )
    storage.write_bytes("one.bin", b"1")
    assert storage.read_bytes("one.bin") == b"1"
    requests.sent.clear()
    restart.kill()
    with pytest.raises(StorageUnavailableError) as failed:
        storage.read_bytes("one.bin")
    assert len(requests.sent) == 3 and len(set(requests.sent)) == 1, requests.sent
    message = str(failed.value)
    assert "stopped answering while reading" in message and "after 3 attempts" in message


def test_the_time_budget_ends_the_retries_before_the_attempts_do(restart: WeedServer) -> None:
    """With 50 attempts allowed but ``io_max_seconds = 1``, the waits 0.2 + 0.4 s fit the
    budget and the next 0.8 s does not: three requests at most, then the sentence."""
    requests = Requests()
    io = {"attempts": 50, "backoff_seconds": 0.2, "max_seconds": 1.0}
    storage = counted(Storage(f"s3://{BUCKET}/ws-b", settings(restart, **io)), requests)
    storage.write_bytes("one.bin", b"1")
    requests.sent.clear()
    restart.kill()
    with pytest.raises(StorageUnavailableError, match=r"after [123] attempts"):
        storage.read_bytes("one.bin")
    assert 1 <= len(requests.sent) <= 3, requests.sent


def test_the_lake_scan_task_stopped_mid_run_is_tried_within_the_bound(
    restart: WeedServer,
    prefect_server: None,
    fashion: tuple[np.ndarray, np.ndarray],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    """The Prefect task ``scan-lake`` reads a lake of 12 images one object at a time; the
    server dies just before the 5th read. That read is sent ``io_attempts`` times, nothing
    after it is sent, the task run fails once with the one sentence (no task retries)."""
    from prefect.states import State

    from tasks.lake import scan_lake

    lake = f"s3://{BUCKET}/lake-{uuid.uuid4().hex[:6]}"
    images, labels = fashion
    admin = Storage(f"s3://{BUCKET}", settings(restart)).fs
    write_objects(admin, lake.removeprefix("s3://"), lake_contents(images[:12], labels[:12]))
    for name, value in {
        "SCAN_LAKE_S3_ENDPOINT_URL": restart.endpoint,
        "SCAN_LAKE_IO_ATTEMPTS": "3",
        "SCAN_LAKE_IO_BACKOFF_SECONDS": "0.05",
        "SCAN_LAKE_READ_BATCH": "1",
    }.items():
        monkeypatch.setenv(name, value)
    requests = Requests(kill_at=5, server=restart)
    counted(Storage(lake), requests)  # the client the task's Storage objects share
    state: State[Any] = scan_lake(
        lake, str(tmp_path / "ws"), {"channels": 1, "size": 28}, return_state=True
    )
    assert state.is_failed()
    with pytest.raises(StorageUnavailableError, match="after 3 attempts"):
        state.result()
    # the request the server died on, then two more tries of that read (each one request)
    assert len(requests.after_kill()) == 3, requests.sent


def test_faults_that_are_not_transient_are_tried_once(
    restart: WeedServer, secure_s3: SecureS3, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A missing object, a 403, a ScanLakeError (even one caused by a lost connection) and a
    programming error surface after one try."""
    requests = Requests()
    storage = counted(Storage(f"s3://{BUCKET}/ws-c", settings(restart, attempts=5)), requests)
    with pytest.raises(FileNotFoundError):
        storage.read_bytes("missing.bin")
    assert sorted(requests.sent) == ["HeadObject", "ListObjectsV2"]  # s3fs's one look, no retry

    calls: list[str] = []

    def broken() -> None:
        calls.append("broken")
        raise TypeError("a bug")

    with pytest.raises(TypeError):
        storage._io("calling broken code", broken)

    def decided() -> None:
        calls.append("decided")
        lost = EndpointConnectionError(endpoint_url=restart.endpoint)
        raise storage_unavailable(restart.endpoint, "an inner call", lost) from lost

    with pytest.raises(ScanLakeError):
        storage._io("calling a call that already gave up", decided)
    assert calls == ["broken", "decided"]

    for name, value in secure_s3.env().items():
        monkeypatch.setenv(name, value)
    denied = Requests()
    read_only = counted(Storage(f"s3://{secure_s3.lake_bucket}/no-write"), denied)
    with pytest.raises(PermissionError):
        read_only.write_bytes("x.bin", b"x")  # the pipeline's identity may only read the lake
    assert denied.sent == ["PutObject"]


def test_is_transient_sorts_faults() -> None:
    def answer(code: str, status: int) -> ClientError:
        response: Any = {"Error": {"Code": code}, "ResponseMetadata": {"HTTPStatusCode": status}}
        return ClientError(response, "GetObject")

    assert is_transient(EndpointConnectionError(endpoint_url="http://127.0.0.1:1"))
    assert is_transient(answer("SlowDown", 503)) and is_transient(answer("Whatever", 502))
    assert is_transient(OSError(5, "wrapped")) is False
    wrapped = OSError(5, "wrapped")
    wrapped.__cause__ = answer("InternalError", 500)
    assert is_transient(wrapped)
    assert not is_transient(answer("NoSuchKey", 404))
    assert not is_transient(answer("AccessDenied", 403))
    assert not is_transient(TypeError("a bug")) and not is_transient(KeyError("x"))
    assert not is_transient(StorageUnavailableError("gave up"))


def test_no_prefect_task_retries() -> None:
    """Every task of the flow leaves retrying to the storage loop."""
    from tasks.assign import assign
    from tasks.catalog import catalog
    from tasks.choose_k import choose_k
    from tasks.clustering import scan
    from tasks.duplicates import duplicates
    from tasks.embed import embed
    from tasks.evaluate import evaluate
    from tasks.history import plan_growth, record_run
    from tasks.lake import scan_lake
    from tasks.neighbors import neighbors
    from tasks.pretext import plan_pretext, pretext
    from tasks.selflabel import selflabel

    tasks = [scan_lake, catalog, plan_pretext, pretext, embed, neighbors, duplicates, choose_k]
    tasks += [plan_growth, scan, selflabel, assign, evaluate, record_run]
    assert {t.name: t.retries for t in tasks} == {t.name: 0 for t in tasks}
