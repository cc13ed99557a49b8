"""Reviewed feedback: a reviewer's signed acceptance of a sample, and its check before ingest reads the sample.

A model server may add pending samples to a feedback store
(`petseg.serving.quarantine`); nothing a server writes makes a sample one that
training reads. `petseg feedback accept` signs, with the reviewer's key
(`petseg.keys`), an in-toto Statement (`petseg.attestations`) whose subjects
are the accepted image and trimap with their sha256 and whose predicate is
the review record (who sent the sample, when, to which release; who accepted
it, when; its breed). The signed bundle is kept as ``feedback/<id>.sig``
beside the sample's files in the store's ``accepted/`` folder.

`stage_accepted` reads every sample of ``accepted/`` once and refuses one whose
acceptance is missing, signed by a key that is not trusted, or about other
bytes, naming the file; the bytes it checked are the bytes it stages for
ingest. A refusal stops ingest whatever ``skip_bad`` says: it is not a bad
sample but a store that someone wrote without a reviewer's key.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from petseg import attestations, keys, oxford
from petseg.errors import DataError
from petseg.storage import Location

STATEMENT_TYPE = "https://in-toto.io/Statement/v1"
PREDICATE_TYPE = "https://github.com/petseg/petseg/FeedbackAcceptance@v1"
REVIEWED_FIELDS = ("id", "identity", "received", "model_version", "content_sha256", "breed", "accepted_by",
                   "accepted_at")
"""The review record's fields that the ingest report names for each accepted sample."""


def acceptance_file(sample_id: str) -> str:
    """The signed acceptance of a sample, relative to the store's ``accepted/`` folder."""
    return f"feedback/{sample_id}.sig"


def record_file(sample_id: str) -> str:
    """The review record of an accepted sample (for people: `petseg feedback list`), relative to ``accepted/``."""
    return f"feedback/{sample_id}.json"


def statement(sample_id: str, *, image: bytes, trimap: bytes, record: dict) -> dict:
    """The in-toto Statement that a reviewer accepted these image and trimap bytes as sample ``sample_id``."""
    files = {oxford.image_file(sample_id): image, oxford.trimap_file(sample_id): trimap}
    return {
        "_type": STATEMENT_TYPE,
        "subject": [{"name": name, "digest": {"sha256": hashlib.sha256(data).hexdigest()}}
                    for name, data in files.items()],
        "predicateType": PREDICATE_TYPE,
        "predicate": {"sample": sample_id, "review": record},
    }


def sign(sample_id: str, *, image: bytes, trimap: bytes, record: dict, signing_key: str) -> bytes:
    """The signed acceptance (a Sigstore bundle) of a sample's bytes and review record.

    Args:
        signing_key: the reviewer's P-256 private key: a path or PEM text (`petseg.keys.signing_key_setting`).

    Raises:
        ConfigError: the key is missing or not a P-256 private key.
    """
    document = statement(sample_id, image=image, trimap=trimap, record=record)
    with attestations.private_key_file(keys.private_pem(signing_key)) as key_path:
        return attestations.sign(document, key_path=key_path)


def stage_accepted(store: str, dest: Path, *, s3_endpoint_url: str | None = None,
                   trusted_keys: str | None = None) -> list[dict]:
    """Stage the accepted samples of a feedback store whose acceptance verifies into ``dest`` (Oxford layout).

    Args:
        store: the feedback store (a directory or ``s3://`` prefix).
        dest: where the checked bytes go (``images/<id>.jpg``, ``annotations/trimaps/<id>.png``).
        s3_endpoint_url: endpoint of a non-AWS S3 server.
        trusted_keys: a public key file or directory; default `petseg.keys.trusted_keys_setting`.

    Returns:
        For each sample, sorted by id: the `REVIEWED_FIELDS` of its signed review record and
        ``accepted_key``, the id of the key that signed it. Empty when nothing was accepted.

    Raises:
        DataError: a sample whose acceptance is missing, does not verify against a trusted key,
            or is about other bytes (naming the file, what was found and the fix).
        StorageError: a file could not be read.
        ConfigError: a trusted key is unreadable.
    """
    accepted = Location(f"{store.rstrip('/')}/{oxford.FEEDBACK_ACCEPTED}", s3_endpoint_url=s3_endpoint_url,
                        what="feedback store")
    names = set(accepted.names())
    ids = sorted(name.removeprefix("images/").removesuffix(".jpg") for name in names
                 if name.startswith("images/") and name.endswith(".jpg") and name.count("/") == 1
                 and not name.startswith("images/._"))
    setting = trusted_keys or keys.trusted_keys_setting()
    trusted = keys.trusted_keys(setting)
    reviewed = []
    for sample_id in ids:
        files = {name: accepted.read_bytes(name) if name in names else b""
                 for name in (oxford.image_file(sample_id), oxford.trimap_file(sample_id))}
        signer, record = _verified(accepted, sample_id, files, names, trusted=trusted, setting=setting)
        for name, data in files.items():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            (dest / name).write_bytes(data)
        reviewed.append({**{key: record.get(key) for key in REVIEWED_FIELDS}, "accepted_key": signer})
    return reviewed


def _verified(accepted: Location, sample_id: str, files: dict[str, bytes], names: set[str], *,
              trusted: dict[str, Path], setting: str) -> tuple[str, dict]:
    """The signer and review record of a sample's acceptance, checked against its files' bytes."""
    image = accepted.url(oxford.image_file(sample_id))
    refusal = (f"; refusing to train on it. A sample enters {accepted.root} only through `petseg feedback accept`, "
               "which signs it with a reviewer's key: remove the sample's files from there, or trust the reviewer's "
               "key (`petseg keys trust KEY.pub`) if a reviewer accepted it")
    if acceptance_file(sample_id) not in names:
        raise DataError(f"{image}: accepted feedback sample {sample_id} has no signed acceptance "
                        f"({accepted.url(acceptance_file(sample_id))}){refusal}")
    bundle = accepted.read_bytes(acceptance_file(sample_id))
    signer = attestations.signer_of(bundle)
    if signer not in trusted:
        known = ", ".join(keys.short(kid) for kid in trusted) or "none"
        raise DataError(f"{image}: the acceptance of feedback sample {sample_id} is signed by key "
                        f"{keys.short(signer) or '(unnamed)'}, which is not trusted (trusted keys in {setting}: "
                        f"{known}){refusal}")
    try:
        document = attestations.verify(bundle, key_path=trusted[signer])
    except ValueError as err:
        raise DataError(f"{accepted.url(acceptance_file(sample_id))}: the acceptance of feedback sample {sample_id} "
                        f"does not verify against key {keys.short(signer)}: {err}{refusal}") from None
    predicate = document.get("predicate") or {}
    if document.get("predicateType") != PREDICATE_TYPE or predicate.get("sample") != sample_id:
        raise DataError(f"{accepted.url(acceptance_file(sample_id))}: signed by a trusted key, but it accepts "
                        f"{predicate.get('sample')!r} ({document.get('predicateType')}), not feedback sample "
                        f"{sample_id}{refusal}")
    signed = {subject.get("name"): (subject.get("digest") or {}).get("sha256")
              for subject in document.get("subject") or []}
    for name, data in files.items():
        found = hashlib.sha256(data).hexdigest() if name in names else "(missing)"
        if signed.get(name) != found:
            raise DataError(f"{accepted.url(name)}: hashes to {found} but the reviewer accepted "
                            f"{signed.get(name) or '(nothing)'}: it changed after review{refusal}")
    return signer, dict(predicate.get("review") or {})
