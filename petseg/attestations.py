"""Signed statements: an in-toto Statement in a DSSE envelope (a Sigstore bundle), signed and checked with a P-256 key.

The OpenSSF model signing library (`model_signing`) makes and checks the
bundles offline, with no transparency log. Two kinds of statement are signed
this way: a release's SLSA provenance (`petseg.release.signing`) and a
reviewer's acceptance of a feedback sample (`petseg.data.reviews`). A bundle
names the key that signed it (its verification material's hint, the key's id
`petseg.keys.key_id`), so the verifier picks that key among the trusted ones.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

PAYLOAD_TYPE = "application/vnd.in-toto+json"


@contextlib.contextmanager
def private_key_file(pem: bytes) -> Iterator[Path]:
    """The private key in a file only this process can read, for the library's signers (which take a path)."""
    with tempfile.TemporaryDirectory(prefix="petseg-key-") as tmp:
        path = Path(tmp) / "signing.key"
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(descriptor, "wb") as handle:
            handle.write(pem)
        yield path


def sign(statement: dict, *, key_path: Path) -> bytes:
    """The Sigstore bundle (JSON) of a DSSE envelope over ``statement``, signed with the private key at ``key_path``."""
    from model_signing._signing import sign_ec_key

    bundle = sign_ec_key.Signer(key_path).sign(_StatementPayload(statement))
    return bundle.bundle.to_json().encode("utf-8")


def signer_of(bundle_json: bytes) -> str:
    """The key id a bundle says signed it (its verification material's hint), unverified; '' when none."""
    try:
        material = json.loads(bundle_json)["verificationMaterial"]
        return str((material.get("publicKey") or {}).get("hint") or "")
    except (ValueError, KeyError, TypeError, AttributeError):
        return ""


def verify(bundle_json: bytes, *, key_path: Path) -> dict:
    """The in-toto Statement of a bundle whose DSSE signature verifies with the public key at ``key_path``.

    Raises:
        ValueError: the bundle is unreadable, its signature does not verify with the key, or it carries
            another payload type than an in-toto statement (the message says which, on one line).
    """
    from model_signing._signing import sign_ec_key, sign_sigstore_pb

    with tempfile.TemporaryDirectory(prefix="petseg-bundle-") as tmp:
        path = Path(tmp) / "bundle.json"
        path.write_bytes(bundle_json)
        try:
            signature = sign_sigstore_pb.Signature.read(path)
            # The library's own check of a key-signed bundle, without its model predicate's parsing.
            payload_type, payload = sign_ec_key.Verifier(key_path)._verify_signed_content(signature)
        except Exception as err:  # the library raises what the bundle's parsing and cryptography raise
            raise ValueError(one_line(err)) from None
    if payload_type != PAYLOAD_TYPE:
        raise ValueError(f"payload type {payload_type}, expected {PAYLOAD_TYPE}")
    try:
        return json.loads(payload)
    except ValueError as err:
        raise ValueError(f"its statement is not JSON: {one_line(err)}") from None


def one_line(err: Exception) -> str:
    """An exception's message on one line, at most 600 characters (its type when it has none)."""
    return " ".join(str(err).split())[:600] or type(err).__name__


class _StatementPayload:
    """A statement as the library's signers take it (``payload.statement.pb``)."""

    def __init__(self, document: dict):
        from google.protobuf import json_format
        from in_toto_attestation.v1 import statement_pb2

        self.statement = self
        self.pb = json_format.ParseDict(document, statement_pb2.Statement())
