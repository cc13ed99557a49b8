"""The feedback store: samples held as pending until a person accepts them into what training may read.

A server adds what clients send (`FeedbackStore.add`); `petseg feedback
list|accept|reject` reviews it. Under ``root`` (a directory or an
``s3://bucket/prefix``, `petseg.storage`):

- ``pending/<identity>/<id>.json``, ``.jpg``, ``.png``: a sample waiting for
  review, with who sent it (the token's identity), when, which release
  answered, its reward, breed and content hash;
- ``accepted/``: accepted samples in the Oxford layout (``images/<id>.jpg``,
  ``annotations/trimaps/<id>.png``, ``annotations/list.txt``) with their
  records in ``accepted/feedback/<id>.json``, which also name who accepted
  them and when, and the reviewer's signed acceptance of the sample's bytes and
  record, ``accepted/feedback/<id>.sig`` (`petseg.data.reviews`). Only this
  folder is read by ``--feedback`` (`petseg.data.warehouse.ingest`), only samples
  whose acceptance verifies against a trusted key, and only into the training
  split (`petseg.data.split`);
- ``rejected/<id>.json``: the record of a rejected sample (its files are deleted);
- ``seen/<id>``: every id ever stored, so that a duplicate is dropped.

A server writes ``pending/`` and ``seen/`` only (and a lock file in a
directory): its credential needs no more, and holds no key a reviewer's
acceptance could be signed with (see k8s/base/serving-s3-secret.template.yaml).

Ids are ``feedback_<16 hex digits of the sha256 of image and trimap bytes>``.
A sender may hold at most ``quota`` pending samples and the store at most
``pending_cap``; more answers `QuotaExceeded` (HTTP 429). In a directory,
adds are serialised by a lock file; on S3 two replicas adding at the same
instant may each pass a count that one of them should have failed.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
from datetime import datetime, timezone
from pathlib import Path

from petseg import keys, oxford
from petseg.data import reviews
from petseg.errors import DataError
from petseg.serving.feedback import FeedbackSample, png
from petseg.serving.messages import BadRequest
from petseg.storage import Location, failures

STATUSES = ("pending", "accepted", "rejected")
DEFAULT_QUOTA = 100
DEFAULT_PENDING_CAP = 1000


class QuotaExceeded(BadRequest):
    """A sender over its quota of pending samples, or a full pending store: HTTP 429."""

    def __init__(self, where: str, expected: str, got: str):
        super().__init__("TOO_MANY", where=where, expected=expected, got=got)


class FeedbackStore:
    """Pending, accepted and rejected feedback samples under a directory or ``s3://`` prefix.

    Args:
        root: Directory or ``s3://bucket/prefix``.
        quota: Most pending samples one identity may hold.
        pending_cap: Most pending samples in the store.
        s3_endpoint_url: Endpoint of a non-AWS S3 server.
    """

    def __init__(self, root: str, *, quota: int = DEFAULT_QUOTA, pending_cap: int = DEFAULT_PENDING_CAP,
                 s3_endpoint_url: str | None = None):
        self.location = Location(root, s3_endpoint_url=s3_endpoint_url, what="feedback store root")
        self.root = self.location.root
        self.quota, self.pending_cap = quota, pending_cap
        self._endpoint = s3_endpoint_url

    def add(self, sample: FeedbackSample, *, identity: str, model_version: str, model_fingerprint: str) -> dict:
        """Stores one sample as pending.

        Returns:
            ``{"sample_id", "status"}``: ``pending``, or ``duplicate`` when the
            same image and truth were stored before (nothing is written then).

        Raises:
            QuotaExceeded: ``identity`` holds ``quota`` pending samples, or the store ``pending_cap``.
            StorageError: a file could not be written.
        """
        trimap_png = png(sample.trimap)
        content = hashlib.sha256(sample.jpeg + trimap_png).hexdigest()
        sample_id = "feedback_" + content[:16]
        with self._lock():
            if self.location.exists(f"seen/{sample_id}"):
                return {"sample_id": sample_id, "status": "duplicate"}
            pending = self._pending_records()
            mine = sum(1 for owner, _ in pending if owner == identity)
            if mine >= self.quota:
                raise QuotaExceeded(f"feedback from {identity!r}", f"at most {self.quota} samples awaiting review",
                                    f"{mine} pending; wait until they are reviewed")
            if len(pending) >= self.pending_cap:
                raise QuotaExceeded("feedback store", f"at most {self.pending_cap} samples awaiting review",
                                    f"{len(pending)} pending; wait until they are reviewed")
            record = {
                "id": sample_id,
                "status": "pending",
                "identity": identity,
                "received": _now(),
                "model_version": model_version,
                "model_fingerprint": model_fingerprint,
                "content_sha256": content,
                "reward": sample.reward,
                "breed": sample.breed,
            }
            base = f"pending/{identity}/{sample_id}"
            self.location.write_bytes(f"{base}.jpg", sample.jpeg)
            self.location.write_bytes(f"{base}.png", trimap_png)
            self.location.write_bytes(f"{base}.json", _json(record))
            self.location.write_bytes(f"seen/{sample_id}", b"")
        return {"sample_id": sample_id, "status": "pending"}

    def records(self, status: str = "pending") -> list[dict]:
        """The records of samples in ``status`` (one of `STATUSES`), sorted by id."""
        if status == "pending":
            names = [f"pending/{owner}/{name}" for owner, name in self._pending_records()]
        else:
            folder = f"{oxford.FEEDBACK_ACCEPTED}/feedback" if status == "accepted" else "rejected"
            names = [f"{folder}/{name}" for name in self._sub(folder).names() if name.endswith(".json")]
        records = [json.loads(self.location.read_bytes(name)) for name in names]
        return sorted(records, key=lambda record: record["id"])

    def accept(self, sample_id: str, *, reviewer: str, signing_key: str) -> dict:
        """Moves a pending sample into ``accepted/``, recording who accepted it and when, and signs that acceptance
        of its bytes and record with the reviewer's key (`petseg.data.reviews`); its record.

        The signature is written first and the image last: ingest reads a sample by its image, so it
        never finds one half accepted.

        Args:
            reviewer: who accepts (recorded as ``accepted_by``).
            signing_key: the reviewer's P-256 private key, a path or PEM text; its id is recorded as ``accepted_key``.

        Raises:
            DataError: no pending sample has that id.
            ConfigError: the key is missing or not a P-256 private key.
        """
        record, base = self._find_pending(sample_id)
        image, trimap = self.location.read_bytes(f"{base}.jpg"), self.location.read_bytes(f"{base}.png")
        record.update(status="accepted", accepted_by=reviewer, accepted_at=_now(),
                      accepted_key=keys.key_id(keys.public_pem_of(keys.private_pem(signing_key))))
        accepted = self._sub(oxford.FEEDBACK_ACCEPTED)
        accepted.write_bytes(reviews.acceptance_file(sample_id), reviews.sign(
            sample_id, image=image, trimap=trimap, record=record, signing_key=signing_key))
        accepted.write_bytes(reviews.record_file(sample_id), _json(record))
        if record.get("breed"):
            self._list(accepted, sample_id, oxford.list_line(sample_id, record["breed"]))
        accepted.write_bytes(oxford.trimap_file(sample_id), trimap)
        accepted.write_bytes(oxford.image_file(sample_id), image)
        self._drop(base)
        return record

    def reject(self, sample_id: str, *, reviewer: str) -> dict:
        """Deletes a pending sample's files and keeps its record in ``rejected/``; the record.

        Raises:
            DataError: no pending sample has that id.
        """
        record, base = self._find_pending(sample_id)
        record.update(status="rejected", rejected_by=reviewer, rejected_at=_now())
        self.location.write_bytes(f"rejected/{sample_id}.json", _json(record))
        self._drop(base)
        return record

    # -- internals ------------------------------------------------------------------------------------

    def _sub(self, folder: str) -> Location:
        return Location(self.location.url(folder), s3_endpoint_url=self._endpoint, what="feedback store")

    def _pending_records(self) -> list[tuple[str, str]]:
        """(identity, record file name) of every pending sample."""
        found = []
        for name in self._sub("pending").names():
            parts = name.split("/")
            if len(parts) == 2 and parts[1].endswith(".json"):
                found.append((parts[0], parts[1]))
        return found

    def _find_pending(self, sample_id: str) -> tuple[dict, str]:
        for owner, name in self._pending_records():
            if name == f"{sample_id}.json":
                base = f"pending/{owner}/{sample_id}"
                return json.loads(self.location.read_bytes(f"{base}.json")), base
        raise DataError(f"{self.root}: no pending feedback sample {sample_id!r} "
                        "(`petseg feedback list STORE` shows the pending ones)")

    def _drop(self, base: str) -> None:
        for suffix in (".jpg", ".png", ".json"):
            self.location.delete(base + suffix)

    @contextlib.contextmanager
    def _lock(self):
        """Serialises adds in a directory (server workers are processes); no lock on S3."""
        if self.location.is_s3:
            yield
            return
        path = Path(self.location.url(".lock"))
        with failures(str(path), "lock"):
            path.parent.mkdir(parents=True, exist_ok=True)
            lock = open(path, "a")
        with lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield

    @staticmethod
    def _list(accepted: Location, sample_id: str, line: str) -> None:
        """Adds ``line`` to accepted/annotations/list.txt unless the id is listed (reviews run one at a time)."""
        text = accepted.read_bytes(oxford.LIST_FILE).decode() if accepted.exists(oxford.LIST_FILE) \
            else oxford.LIST_HEADER
        if not any(entry.split(maxsplit=1)[:1] == [sample_id] for entry in text.splitlines()):
            accepted.write_bytes(oxford.LIST_FILE, (text + line).encode())


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _json(record: dict) -> bytes:
    return (json.dumps(record, indent=2) + "\n").encode()
