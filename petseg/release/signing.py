"""Sign a release directory, and verify one, in the OpenSSF model signing format (the `model_signing` library).

A signed release holds two Sigstore bundles, each a DSSE envelope over an
in-toto Statement signed offline with one P-256 key (no transparency log):

- ``provenance.sigstore.json``: the SLSA v1 provenance statement
  (`petseg.release.provenance`), whose subjects are the release files;
- ``model.sig``: model signing's own statement, listing every file of the
  directory (the provenance bundle included) with its sha256. It is made last,
  so ``python -m model_signing verify key DIR --signature DIR/model.sig
  --public_key KEY.pub`` checks the whole release.

`verify_directory` checks both against the trusted keys, naming what failed:
no signature, a key that is not trusted, a file that changed, a provenance
statement for other files. A release never changes once signed: every file
in its folder is signed, and one more is "not signed". The bundles are made
and checked by `petseg.attestations`.
"""

from __future__ import annotations

import base64
import hashlib
import json
from pathlib import Path

from petseg import attestations, keys
from petseg.attestations import one_line, signer_of
from petseg.errors import ModelError

SIGNATURE = "model.sig"
PROVENANCE = "provenance.sigstore.json"


def sign_directory(folder: Path, *, private_pem: bytes, provenance: dict) -> str:
    """Sign the release in ``folder``: write the provenance bundle, then the model signature over every file.

    Args:
        folder: a release directory (its files written, no signature yet).
        private_pem: the P-256 private key in PEM.
        provenance: the in-toto Statement to sign (`petseg.release.provenance.statement`).

    Returns:
        The id of the key that signed (`petseg.keys.key_id`).
    """
    from model_signing import hashing, signing

    with attestations.private_key_file(private_pem) as key_path:
        (folder / PROVENANCE).write_bytes(attestations.sign(provenance, key_path=key_path))
        config = signing.Config().use_elliptic_key_signer(private_key=key_path)
        config.set_hashing_config(hashing.Config().set_ignored_paths(
            paths=[folder / SIGNATURE], ignore_git_paths=False))
        config.sign(folder, folder / SIGNATURE)
    return keys.key_id(keys.public_pem_of(private_pem))


def verify_directory(folder: Path, *, trusted: dict[str, Path], where: str, setting: str) -> tuple[str, dict]:
    """Verify a signed release directory against the trusted keys.

    Args:
        folder: the release files (on local disk, as they will be loaded).
        trusted: the trusted public keys by id (`petseg.keys.trusted_keys`).
        where: the release as the user named it, for messages.
        setting: where the trusted keys came from, for messages.

    Returns:
        (the signer's key id, the verified provenance statement).

    Raises:
        ModelError: unsigned, signed by a key not trusted, a signature that does
            not verify, or a file that differs from what was signed (naming it).
    """
    from model_signing import verifying

    for name in (SIGNATURE, PROVENANCE):
        if not (folder / name).is_file():
            raise ModelError(f"release {where} is not signed: it has no {name} (expected a release signed by "
                             "a trusted key; export it again, or sign it as README.md says)")
    signer = signer_of((folder / SIGNATURE).read_bytes())
    if signer not in trusted:
        known = ", ".join(keys.short(kid) for kid in trusted) or "none"
        raise ModelError(f"release {where} is signed by key {keys.short(signer) or '(unnamed)'}, which is not "
                         f"trusted (trusted keys in {setting}: {known}); refusing it")
    key_path = trusted[signer]
    try:
        verifying.Config().use_elliptic_key_verifier(public_key=key_path).set_ignore_unsigned_files(False).verify(
            folder, folder / SIGNATURE)
    except (ValueError, KeyError, TypeError) as err:
        raise ModelError(f"release {where} does not verify against key {keys.short(signer)}: "
                         f"{_difference(folder) or one_line(err)}; refusing it") from None
    provenance = _verified_statement(folder / PROVENANCE, key_path, where=where)
    return signer, provenance


def _verified_statement(path: Path, key_path: Path, *, where: str) -> dict:
    """The in-toto Statement of a bundle whose DSSE signature verifies with the key."""
    try:
        return attestations.verify(path.read_bytes(), key_path=key_path)
    except ValueError as err:
        raise ModelError(f"release {where}: its provenance statement {PROVENANCE} does not verify against "
                         f"key {keys.short(keys.key_id(key_path.read_bytes()))}: {err}") from None


def _difference(folder: Path) -> str:
    """What differs from what ``model.sig`` lists (read without trusting it: for the message only)."""
    try:
        signed = {item["name"]: item["digest"] for item in decode_envelope((folder / SIGNATURE).read_bytes())
                  ["predicate"]["resources"]}
    except (ValueError, KeyError, TypeError):
        return ""
    present = {path.name for path in folder.iterdir()} - {SIGNATURE}
    found = []
    for name in sorted(present | set(signed)):
        if name not in signed:
            found.append(f"{name} is not signed")
        elif name not in present:
            found.append(f"{name} is signed but missing")
        else:
            digest = hashlib.sha256((folder / name).read_bytes()).hexdigest()
            if digest != signed[name]:
                found.append(f"{name} hashes to {digest} but was signed as {signed[name]}")
    return ", ".join(found) or "the signature itself does not verify"


def decode_envelope(bundle_json: bytes) -> dict:
    """The statement inside a bundle, not verified (for showing what a release claims)."""
    envelope = json.loads(bundle_json)["dsseEnvelope"]
    return json.loads(base64.b64decode(envelope["payload"]))
