"""The storage module against a real S3 (SeaweedFS) and a local folder."""

from __future__ import annotations

import uuid
from pathlib import Path

import pyarrow as pa
import pytest

from tasks.errors import ScanLakeError
from tasks.storage import Storage, table_stage_key


@pytest.fixture(params=["s3", "local"])
def storage(request: pytest.FixtureRequest, s3fs_client: object, tmp_path: Path) -> Storage:
    if request.param == "s3":
        bucket = f"st-{uuid.uuid4().hex[:8]}"
        s3fs_client.mkdir(bucket)  # type: ignore[attr-defined]
        return Storage(f"s3://{bucket}/ws")
    return Storage(str(tmp_path / "ws"))


def test_write_read_list_roundtrip(storage: Storage) -> None:
    storage.check_reachable(create=True)
    storage.write_bytes("a/b/one.bin", b"1")
    storage.write_json("a/two.json", {"x": 2})
    table = pa.table({"image_id": ["f", "e"]})
    size = storage.write_table("t/table.parquet", table, "stage-key-123")
    assert size > 0
    assert storage.read_bytes("a/b/one.bin") == b"1"
    assert storage.read_json("a/two.json") == {"x": 2}
    read = storage.read_table("t/table.parquet")
    assert read["image_id"].to_pylist() == ["f", "e"]
    assert table_stage_key(read) == "stage-key-123"
    listed = storage.list_objects()
    assert [o.key for o in listed] == ["a/b/one.bin", "a/two.json", "t/table.parquet"]
    assert all(o.version for o in listed)  # ETag on S3, mtime locally: no temp names left
    got = dict(storage.read_many(["a/b/one.bin", "a/two.json"], batch=1))
    assert got["a/b/one.bin"] == b"1"
    assert storage.uri("a") == f"{storage.url}/a"


def test_missing_bucket_is_a_clear_error(pipeline_env: Path) -> None:
    with pytest.raises(ScanLakeError, match="bucket 'no-such-bucket-x' .* does not exist"):
        Storage("s3://no-such-bucket-x/lake").check_reachable()


def test_unreachable_endpoint_is_a_clear_error(
    pipeline_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import s3fs

    from tests.pipeline.weed import free_ports

    s3fs.S3FileSystem.clear_instance_cache()
    monkeypatch.setenv("SCAN_LAKE_S3_ENDPOINT_URL", f"http://127.0.0.1:{free_ports(1)[0]}")
    with pytest.raises(ScanLakeError, match="Cannot reach"):
        Storage("s3://bucket/lake").check_reachable()
    s3fs.S3FileSystem.clear_instance_cache()


def test_missing_local_folder(tmp_path: Path) -> None:
    with pytest.raises(ScanLakeError, match="does not exist"):
        Storage(str(tmp_path / "nope")).check_reachable()
