"""One storage module: local directories and S3 (a real moto server) read and written the same way."""

import uuid

import pytest

from petseg import storage
from petseg.errors import ConfigError, StorageError


@pytest.fixture(params=["local", "s3"])
def location(request, tmp_path):
    if request.param == "local":
        return storage.Location(str(tmp_path / "root"))
    bucket = f"store-{uuid.uuid4().hex[:12]}"  # the S3 server lives for the whole session
    request.getfixturevalue("s3").create_bucket(Bucket=bucket)
    return storage.Location(f"s3://{bucket}/some/prefix", s3_endpoint_url=request.getfixturevalue("moto_endpoint"))


def test_write_read_list_and_download(location, tmp_path):
    assert not location.exists("a/b.txt")
    url = location.write_bytes("a/b.txt", b"hello")
    assert url == location.url("a/b.txt") and url.endswith("a/b.txt")
    source = tmp_path / "c.bin"
    source.write_bytes(b"\x00\x01")
    location.upload("c.bin", source)
    assert location.exists("a/b.txt") and location.read_bytes("a/b.txt") == b"hello"
    assert location.names() == ["a/b.txt", "c.bin"]
    assert location.download("c.bin", tmp_path / "out" / "c.bin").read_bytes() == b"\x00\x01"


def test_a_missing_file_is_a_storage_error_naming_it(location, tmp_path):
    with pytest.raises(StorageError, match=r"missing\.txt: cannot read"):
        location.read_bytes("missing.txt")
    with pytest.raises(StorageError, match=r"missing\.txt: cannot read"):
        location.download("missing.txt", tmp_path / "x")


def test_bad_roots_are_config_errors():
    with pytest.raises(ConfigError, match="release is empty"):
        storage.Location("", what="release")
    with pytest.raises(ConfigError, match="'s3:///x' has no bucket"):
        storage.Location("s3:///x")
    with pytest.raises(ConfigError, match="'s3://' has no bucket"):
        storage.Location("s3://")


def test_local_writes_leave_no_partial_files(tmp_path):
    target = tmp_path / "d" / "f.json"
    storage.write_atomic(target, b"{}")
    assert [p.name for p in target.parent.iterdir()] == ["f.json"]
    with pytest.raises(RuntimeError):
        with storage.staged_directory(tmp_path / "release") as staging:
            (staging / "model.keras").write_bytes(b"half")
            raise RuntimeError("interrupted")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]
    with storage.staged_directory(tmp_path / "release") as staging:
        (staging / "model.keras").write_bytes(b"whole")
    assert (tmp_path / "release" / "model.keras").read_bytes() == b"whole"


def test_blob_store_is_content_addressed_and_checks_hashes(tmp_path):
    blobs = storage.BlobStore(str(tmp_path / "blobs"))
    shard = tmp_path / "shard.tfrecord"
    shard.write_bytes(b"records")
    key = blobs.put(shard)
    assert key == storage.file_sha256(shard) and blobs.put(shard) == key
    assert blobs.get(key, tmp_path / "back").read_bytes() == b"records"
    (tmp_path / "blobs" / key[:2] / key).write_bytes(b"changed")
    with pytest.raises(StorageError, match=f"blob {key} .* is corrupt"):
        blobs.get(key, tmp_path / "again")
    assert not (tmp_path / "again").exists()
    with pytest.raises(StorageError, match="not found"):
        blobs.get("0" * 64, tmp_path / "none")


def test_the_s3_endpoint_is_the_option_then_the_servers_then_metaflows(monkeypatch):
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    monkeypatch.delenv("METAFLOW_S3_ENDPOINT_URL", raising=False)
    assert storage.s3_endpoint() is None
    monkeypatch.setenv("METAFLOW_S3_ENDPOINT_URL", "http://metaflow:9000")
    assert storage.s3_endpoint() == "http://metaflow:9000"
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://aws:9000")
    assert storage.s3_endpoint() == "http://aws:9000"
    assert storage.s3_endpoint("http://option:9000") == "http://option:9000"


def test_metaflows_configured_s3_endpoint_only_when_asked(monkeypatch):
    import metaflow.metaflow_config

    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    monkeypatch.delenv("METAFLOW_S3_ENDPOINT_URL", raising=False)
    monkeypatch.setattr(metaflow.metaflow_config, "S3_ENDPOINT_URL", "http://configured:9000")
    assert storage.s3_endpoint() is None
    assert storage.s3_endpoint(metaflow=True) == "http://configured:9000"
