"""A content-addressed blob store for files too big to be Metaflow artifacts.

Shards and logs travel between flow steps (which may run in separate pods)
through this store: a local directory for local runs, an S3 prefix next to
Metaflow's datastore for runs on Kubernetes. A blob's key is the sha256 of its
bytes, so storing the same shard twice costs nothing and a key names content.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path
from urllib.parse import urlparse

from petseg.errors import ConfigError, DataError

CHUNK = 1 << 20


def file_sha256(path: str | os.PathLike) -> str:
    """Return the sha256 hex digest of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


class BlobStore:
    """Put and get files by content hash under a local directory or an s3:// prefix.

    Args:
        root: a local directory or ``s3://bucket/prefix``.
        s3_endpoint_url: endpoint of a non-AWS S3 server (None for AWS).
    """

    def __init__(self, root: str, *, s3_endpoint_url: str | None = None):
        if not root:
            raise ConfigError("blob store root is empty: expected a directory or s3://bucket/prefix")
        self.root = root.rstrip("/")
        self._s3 = None
        if self.root.startswith("s3://"):
            import boto3

            parsed = urlparse(self.root)
            if not parsed.netloc:
                raise ConfigError(f"blob store root {root!r} has no bucket: expected s3://bucket/prefix")
            self._bucket, self._prefix = parsed.netloc, parsed.path.strip("/")
            self._s3 = boto3.client("s3", endpoint_url=s3_endpoint_url)

    def put(self, path: str | os.PathLike) -> str:
        """Store a file and return its key (the sha256 of its bytes)."""
        key = file_sha256(path)
        if self._s3 is not None:
            self._s3.upload_file(str(path), self._bucket, self._object(key))
            return key
        target = Path(self.root) / key[:2] / key
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            # Copy beside the target, then rename: a reader never sees half a blob.
            with tempfile.NamedTemporaryFile(dir=target.parent, delete=False) as tmp:
                with open(path, "rb") as src:
                    shutil.copyfileobj(src, tmp)
            os.replace(tmp.name, target)
        return key

    def get(self, key: str, dest: str | os.PathLike) -> Path:
        """Fetch the blob ``key`` to the file ``dest``, checking its hash."""
        dest = Path(dest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        if self._s3 is not None:
            try:
                self._s3.download_file(self._bucket, self._object(key), str(dest))
            except Exception as exc:  # botocore raises several unrelated types
                raise DataError(f"blob {key} not found under {self.root}: {exc}") from exc
        else:
            source = Path(self.root) / key[:2] / key
            if not source.exists():
                raise DataError(f"blob {key} not found under {self.root}: was the store root moved or cleaned?")
            shutil.copyfile(source, dest)
        if file_sha256(dest) != key:
            dest.unlink()
            raise DataError(f"blob {key} under {self.root} is corrupt: its content no longer matches its hash")
        return dest

    def url(self, key: str) -> str:
        """Return where the blob ``key`` lives, for manifests and lineage."""
        if self._s3 is not None:
            return f"s3://{self._bucket}/{self._object(key)}"
        return str(Path(self.root) / key[:2] / key)

    def _object(self, key: str) -> str:
        return f"{self._prefix}/{key[:2]}/{key}" if self._prefix else f"{key[:2]}/{key}"


def put_files(store: BlobStore, paths: list[str]) -> list[dict]:
    """Store files and return ``[{"name", "sha256"}]`` records in the given order."""
    return [{"name": Path(p).name, "sha256": store.put(p)} for p in paths]


def get_files(store: BlobStore, records: list[dict], dest_dir: str | os.PathLike) -> list[str]:
    """Fetch stored files into ``dest_dir``; returns their local paths in order."""
    return [str(store.get(r["sha256"], Path(dest_dir) / r["name"])) for r in records]
