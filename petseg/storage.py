"""Where files live: local directories and ``s3://`` prefixes, read and written one way.

Every reader and writer of the project goes through here:

- `Location`: a directory or ``s3://bucket/prefix`` read and written by
  relative names; a local write lands beside its target and is renamed into
  place (`replacing`), so a reader never sees half a file.
- `staged_directory`: a local directory that appears whole or not at all.
- `BlobStore`: files addressed by the sha256 of their bytes (shards and logs
  that travel between flow steps, which may run in separate pods).
- `failures`: the one mapping of storage failures (OSError, botocore's
  errors) to `StorageError`, naming the file or object.
- `s3_endpoint`: the one resolution of a non-AWS S3 server's endpoint.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlparse

from petseg.errors import ConfigError, StorageError

CHUNK = 1 << 20


def is_s3(uri: str) -> bool:
    """Whether ``uri`` names an S3 prefix rather than a local path."""
    return str(uri).startswith("s3://")


def split_s3(uri: str, *, what: str = "location") -> tuple[str, str]:
    """``s3://bucket/prefix`` -> ``(bucket, prefix)`` (prefix without slashes at either end).

    Raises:
        ConfigError: the URI names no bucket.
    """
    parsed = urlparse(uri)
    if parsed.scheme != "s3" or not parsed.netloc:
        raise ConfigError(f"{what} {uri!r} has no bucket: expected s3://bucket/prefix")
    return parsed.netloc, parsed.path.strip("/")


def s3_endpoint(explicit: str | None = None, *, metaflow: bool = False) -> str | None:
    """The endpoint of a non-AWS S3 server, or None (AWS): the one resolution every reader and writer uses.

    In order: ``explicit`` (a command's option), ``$AWS_ENDPOINT_URL`` (what a model server's pod is given),
    ``$METAFLOW_S3_ENDPOINT_URL``, and with ``metaflow`` (a flow step, a run look-up) Metaflow's configured
    ``S3_ENDPOINT_URL`` (its config file and profile). Metaflow is imported only then: model servers do not
    import it.
    """
    found = explicit or os.environ.get("AWS_ENDPOINT_URL") or os.environ.get("METAFLOW_S3_ENDPOINT_URL")
    if not found and metaflow:
        from metaflow.metaflow_config import S3_ENDPOINT_URL

        found = S3_ENDPOINT_URL
    return found or None


def s3_client(endpoint_url: str | None = None):
    """A boto3 S3 client; ``endpoint_url`` points it at a non-AWS server (None: AWS or $AWS_ENDPOINT_URL)."""
    import boto3  # slow to import; only S3 locations need it

    return boto3.client("s3", endpoint_url=endpoint_url)


@contextlib.contextmanager
def failures(where: str, action: str) -> Iterator[None]:
    """Turn an I/O failure inside the block into a `StorageError` naming ``where``."""
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        yield
    except StorageError:
        raise
    except ClientError as err:
        code = err.response.get("Error", {}).get("Code", "")
        missing = code in ("404", "NoSuchKey", "NoSuchBucket", "NotFound")
        raise StorageError(f"{where}: cannot {action} ({f'not found: {code}' if missing else err})") from None
    except (BotoCoreError, OSError) as err:
        raise StorageError(f"{where}: cannot {action} ({err})") from None


def file_sha256(path: str | os.PathLike) -> str:
    """The sha256 hex digest of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


@contextlib.contextmanager
def replacing(path: str | os.PathLike) -> Iterator[Path]:
    """A partial file beside ``path`` that replaces it when the block succeeds, and vanishes if not.

    A reader of ``path`` never sees half a file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, partial = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".partial")
    os.close(handle)
    try:
        yield Path(partial)
        os.replace(partial, path)
    except BaseException:
        Path(partial).unlink(missing_ok=True)
        raise


def write_atomic(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to a local file beside ``path``, then rename it into place."""
    with replacing(path) as partial:
        partial.write_bytes(data)
    return Path(path)


def copy_atomic(source: str | os.PathLike, path: str | os.PathLike) -> Path:
    """Copy a local file beside ``path``, then rename it into place."""
    with replacing(path) as partial:
        shutil.copyfile(source, partial)
    return Path(path)


@contextlib.contextmanager
def staged_directory(final: str | os.PathLike) -> Iterator[Path]:
    """A scratch directory beside ``final`` that replaces it when the block succeeds, and vanishes if not."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".partial", dir=final.parent))
    try:
        yield staging
        if final.exists():
            shutil.rmtree(final)
        os.replace(staging, final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


class Location:
    """A directory or an ``s3://bucket/prefix``, read and written by names relative to it.

    Args:
        root: a local directory or ``s3://bucket/prefix``.
        s3_endpoint_url: endpoint of a non-AWS S3 server (None for AWS).
        what: what the location is, for messages (``"release"``, ``"feedback store"``).

    Raises:
        ConfigError: ``root`` is empty, or an S3 URI without a bucket.
    """

    def __init__(self, root: str, *, s3_endpoint_url: str | None = None, what: str = "location"):
        if not root:
            raise ConfigError(f"{what} is empty: expected a directory or s3://bucket/prefix")
        self.what = what
        self._client = None
        if is_s3(root):
            self.bucket, self.prefix = split_s3(root, what=what)
            self.root = f"s3://{self.bucket}/{self.prefix}".rstrip("/")
            self._client = s3_client(s3_endpoint_url)
        else:
            self.root = str(root).rstrip("/") or "/"

    @property
    def is_s3(self) -> bool:
        """Whether this location is an S3 prefix."""
        return self._client is not None

    def url(self, name: str) -> str:
        """The full path or ``s3://`` URI of ``name``."""
        if self.is_s3:
            return f"s3://{self.bucket}/{self._key(name)}"
        return str(Path(self.root, name))

    def exists(self, name: str) -> bool:
        """Whether ``name`` is there."""
        if not self.is_s3:
            return Path(self.root, name).is_file()
        try:
            with failures(self.url(name), "look up"):
                self._client.head_object(Bucket=self.bucket, Key=self._key(name))
        except StorageError as err:
            if "(not found: " in str(err):
                return False
            raise
        return True

    def read_bytes(self, name: str) -> bytes:
        """The bytes of ``name``."""
        with failures(self.url(name), "read"):
            if self.is_s3:
                return self._client.get_object(Bucket=self.bucket, Key=self._key(name))["Body"].read()
            return Path(self.root, name).read_bytes()

    def write_bytes(self, name: str, data: bytes) -> str:
        """Write ``name`` whole (locally: beside, then renamed); returns its URL."""
        with failures(self.url(name), "write"):
            if self.is_s3:
                self._client.put_object(Bucket=self.bucket, Key=self._key(name), Body=data)
            else:
                write_atomic(Path(self.root, name), data)
        return self.url(name)

    def upload(self, name: str, source: str | os.PathLike) -> str:
        """Copy the local file ``source`` to ``name``; returns its URL."""
        with failures(self.url(name), "write"):
            if self.is_s3:
                self._client.upload_file(str(source), self.bucket, self._key(name))
            else:
                copy_atomic(source, Path(self.root, name))
        return self.url(name)

    def download(self, name: str, dest: str | os.PathLike) -> Path:
        """Copy ``name`` to the local file ``dest``."""
        dest = Path(dest)
        with failures(self.url(name), "read"):
            dest.parent.mkdir(parents=True, exist_ok=True)
            if self.is_s3:
                self._client.download_file(self.bucket, self._key(name), str(dest))
            else:
                shutil.copyfile(Path(self.root, name), dest)
        return dest

    def delete(self, name: str) -> None:
        """Remove ``name``; nothing happens when it is not there."""
        with failures(self.url(name), "delete"):
            if self.is_s3:
                self._client.delete_object(Bucket=self.bucket, Key=self._key(name))
            else:
                Path(self.root, name).unlink(missing_ok=True)

    def names(self) -> list[str]:
        """Every file under the location, relative to it, sorted."""
        with failures(self.root, "list"):
            if not self.is_s3:
                root = Path(self.root)
                return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())
            prefix = f"{self.prefix}/" if self.prefix else ""
            pages = self._client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix)
            keys = [item["Key"] for page in pages for item in page.get("Contents", [])]
        return sorted(key[len(prefix):] for key in keys if not key.endswith("/"))

    def _key(self, name: str) -> str:
        return f"{self.prefix}/{name}" if self.prefix else name


class BlobStore:
    """Put and get files by content hash under a local directory or an ``s3://`` prefix.

    A blob's key is the sha256 of its bytes, so storing the same shard twice
    costs nothing and a key names content.

    Args:
        root: a local directory or ``s3://bucket/prefix``.
        s3_endpoint_url: endpoint of a non-AWS S3 server (None for AWS).
    """

    def __init__(self, root: str, *, s3_endpoint_url: str | None = None):
        self.location = Location(root, s3_endpoint_url=s3_endpoint_url, what="blob store root")
        self.root = self.location.root

    def put(self, path: str | os.PathLike) -> str:
        """Store a file and return its key (the sha256 of its bytes)."""
        key = file_sha256(path)
        if self.location.is_s3 or not self.location.exists(self._name(key)):
            self.location.upload(self._name(key), path)
        return key

    def get(self, key: str, dest: str | os.PathLike) -> Path:
        """Fetch the blob ``key`` to the file ``dest``, checking its hash.

        Raises:
            StorageError: the blob is missing, unreadable or no longer matches its hash.
        """
        if not self.location.is_s3 and not self.location.exists(self._name(key)):
            raise StorageError(f"blob {key} not found under {self.root}: was the store root moved or cleaned?")
        dest = self.location.download(self._name(key), dest)
        if file_sha256(dest) != key:
            dest.unlink()
            raise StorageError(f"blob {key} under {self.root} is corrupt: its content no longer matches its hash")
        return dest

    def url(self, key: str) -> str:
        """Where the blob ``key`` lives, for manifests and lineage."""
        return self.location.url(self._name(key))

    @staticmethod
    def _name(key: str) -> str:
        return f"{key[:2]}/{key}"


def put_files(store: BlobStore, paths: list[str]) -> list[dict]:
    """Store files and return ``[{"name", "sha256"}]`` records in the given order."""
    return [{"name": Path(p).name, "sha256": store.put(p)} for p in paths]


def get_files(store: BlobStore, records: list[dict], dest_dir: str | os.PathLike) -> list[str]:
    """Fetch stored files into ``dest_dir``; returns their local paths in order."""
    return [str(store.get(r["sha256"], Path(dest_dir) / r["name"])) for r in records]
