"""Release signing keys: the P-256 key pair that signs releases and the public keys trusted to verify them.

Two settings, each a path, read here and nowhere else:

- ``PETSEG_SIGNING_KEY``: the private key (PEM) that signs releases; default
  ``<config_dir>/keys/signing.key``. On Kubernetes a Secret hands the release
  step's pod the PEM itself in this variable; PEM text is accepted in place of a path.
- ``PETSEG_TRUSTED_KEYS``: a public key file (PEM) or a directory of them
  (``*.pub``); default ``<config_dir>/keys/trusted/``.

A key's id is the sha256 of its public key in PEM (SubjectPublicKeyInfo): the
hint the OpenSSF model signing format records in every signature bundle, so a
bundle names the key that signed it. Rotating keys is `create` with
``replace=True`` (the new public key is trusted beside the old one) and, once
no release signed by the old key should be served, `retire` of its id.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

from petseg.errors import ConfigError
from petseg.userdirs import config_dir

SIGNING_KEY_SETTING = "PETSEG_SIGNING_KEY"
TRUSTED_KEYS_SETTING = "PETSEG_TRUSTED_KEYS"
SHORT_ID = 16
"""Hex digits of a key id shown to people (the full id is matched)."""


def keys_dir() -> Path:
    """``<config_dir>/keys``: the default home of the signing key and of the trusted keys."""
    return config_dir() / "keys"


def signing_key_setting() -> str:
    """The signing key: ``$PETSEG_SIGNING_KEY`` (a path or PEM text), else ``<config_dir>/keys/signing.key``."""
    return os.environ.get(SIGNING_KEY_SETTING) or str(keys_dir() / "signing.key")


def trusted_keys_setting() -> str:
    """The trusted public keys: ``$PETSEG_TRUSTED_KEYS`` (a file or directory), else ``<config_dir>/keys/trusted``."""
    return os.environ.get(TRUSTED_KEYS_SETTING) or str(keys_dir() / "trusted")


def key_id(public_pem: bytes) -> str:
    """The id of a public key: sha256 of its PEM SubjectPublicKeyInfo, as model signing bundles record it."""
    from cryptography.hazmat.primitives import serialization

    key = _public_key(public_pem, "the public key")
    canonical = key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(canonical).hexdigest()


def short(identifier: str) -> str:
    """A key id as people read it: its first `SHORT_ID` hex digits."""
    return identifier[:SHORT_ID]


def create(*, private: str | os.PathLike | None = None, trusted: str | os.PathLike | None = None,
           replace: bool = False) -> tuple[Path, str]:
    """Make a P-256 key pair: the private key (mode 0600) and its public key, trusted.

    Args:
        private: where the private key goes (default `signing_key_setting`); the
            public key goes beside it as ``.pub``.
        trusted: the trusted keys directory to add the public key to (default
            `trusted_keys_setting`; a single trusted file is left alone).
        replace: replace an existing private key (rotation); the old public key stays trusted.

    Returns:
        (the private key's path, the new key's id).

    Raises:
        ConfigError: the key exists and ``replace`` is false, or the setting holds PEM text.
    """
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    path = Path(private or signing_key_setting()).expanduser()
    if str(path).startswith("-----BEGIN"):
        raise ConfigError(f"{SIGNING_KEY_SETTING} holds a key, not a path: unset it to make a new key")
    if path.exists() and not replace:
        raise ConfigError(f"signing key {path} exists: keep it, or rotate it with `petseg keys rotate`")
    key = ec.generate_private_key(ec.SECP256R1())
    private_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
    public_pem = key.public_key().public_bytes(serialization.Encoding.PEM,
                                               serialization.PublicFormat.SubjectPublicKeyInfo)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    _write_private(path, private_pem)
    path.with_suffix(".pub").write_bytes(public_pem)
    identifier = key_id(public_pem)
    trusted_dir = Path(trusted or trusted_keys_setting()).expanduser()
    if not trusted_dir.is_file():
        trust(public_pem, trusted=trusted_dir)
    return path, identifier


def ensure_signing_key() -> tuple[str, bool]:
    """The signing key setting, made (and trusted) first when it is the default path and no key is there.

    Returns:
        (the setting: a path or PEM text, whether a key was made now).
    """
    setting = signing_key_setting()
    if setting.startswith("-----BEGIN") or Path(setting).expanduser().exists():
        return setting, False
    if os.environ.get(SIGNING_KEY_SETTING):
        raise ConfigError(f"{SIGNING_KEY_SETTING}={setting} does not exist: expected a P-256 private key "
                          "in PEM (make one with `petseg keys init`)")
    path, _ = create()
    return str(path), True


def private_pem(setting: str) -> bytes:
    """The PEM bytes of a signing key setting (a path or PEM text).

    Raises:
        ConfigError: no such file, or not a P-256 private key.
    """
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    if setting.startswith("-----BEGIN"):
        data, what = setting.encode(), f"the key in {SIGNING_KEY_SETTING}"
    else:
        path = Path(setting).expanduser()
        try:
            data, what = path.read_bytes(), f"signing key {path}"
        except OSError as err:
            raise ConfigError(f"signing key {path} is not readable ({err.strerror}): make one with "
                              "`petseg keys init`") from None
    try:
        key = serialization.load_pem_private_key(data, None)
    except (ValueError, TypeError) as err:
        raise ConfigError(f"{what} is not an unencrypted PEM private key: {err}") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.curve.name != "secp256r1":
        raise ConfigError(f"{what} is not a P-256 (prime256v1) EC key")
    return data


def public_pem_of(private: bytes) -> bytes:
    """The public key (PEM SubjectPublicKeyInfo) of a private key in PEM."""
    from cryptography.hazmat.primitives import serialization

    key = serialization.load_pem_private_key(private, None)
    return key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def trusted_keys(setting: str | os.PathLike | None = None) -> dict[str, Path]:
    """The trusted public keys by id, from a file or a directory of ``*.pub`` files.

    Args:
        setting: the file or directory (default `trusted_keys_setting`).

    Raises:
        ConfigError: a file there is not a public key.
    """
    where = Path(setting or trusted_keys_setting()).expanduser()
    files = sorted(where.glob("*.pub")) if where.is_dir() else [where] if where.is_file() else []
    return {key_id(_read(path)): path for path in files}


def trust(public_pem: bytes, *, trusted: str | os.PathLike | None = None) -> Path:
    """Add a public key to the trusted keys directory as ``<key id>.pub``; its path.

    Raises:
        ConfigError: not a public key, or the trusted keys setting names a file.
    """
    identifier = key_id(public_pem)
    where = Path(trusted or trusted_keys_setting()).expanduser()
    if where.is_file():
        raise ConfigError(f"the trusted keys {where} are one file: add the key to it by hand, or point "
                          f"{TRUSTED_KEYS_SETTING} at a directory")
    where.mkdir(parents=True, exist_ok=True, mode=0o700)
    path = where / f"{short(identifier)}.pub"
    path.write_bytes(public_pem)
    return path


def retire(identifier: str, *, trusted: str | os.PathLike | None = None) -> Path:
    """Stop trusting the key whose id starts with ``identifier`` (8+ hex digits); the file removed.

    Raises:
        ConfigError: the prefix is too short, or names no trusted key or more than one.
    """
    if len(identifier) < 8:
        raise ConfigError(f"key id {identifier!r} is too short: give at least 8 hex digits (see `petseg keys list`)")
    found = {kid: path for kid, path in trusted_keys(trusted).items() if kid.startswith(identifier.lower())}
    if len(found) != 1:
        raise ConfigError(f"key id {identifier} names {len(found)} trusted keys: expected one "
                          "(see `petseg keys list`)")
    (path,) = found.values()
    if path == Path(trusted or trusted_keys_setting()).expanduser():
        raise ConfigError(f"the trusted keys are the one file {path}: point {TRUSTED_KEYS_SETTING} elsewhere")
    path.unlink()
    return path


def _write_private(path: Path, data: bytes) -> None:
    """Write a private key with mode 0600 from its first byte, replacing the file at once."""
    handle, staged = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.fchmod(handle, 0o600)
        os.write(handle, data)
        os.fsync(handle)
    finally:
        os.close(handle)
    os.replace(staged, path)


def _read(path: Path) -> bytes:
    try:
        data = path.read_bytes()
    except OSError as err:
        raise ConfigError(f"trusted key {path} is not readable ({err.strerror})") from None
    _public_key(data, f"trusted key {path}")
    return data


def _public_key(data: bytes, what: str):
    from cryptography.hazmat.primitives import serialization

    try:
        return serialization.load_pem_public_key(data)
    except (ValueError, TypeError) as err:
        raise ConfigError(f"{what} is not a PEM public key: {err}") from None
