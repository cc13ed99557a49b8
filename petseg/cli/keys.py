"""``petseg keys``: the key pair that signs releases, and the public keys trusted to verify them.

    petseg keys init                 # a P-256 key pair in the configuration directory; its public key trusted
    petseg keys list                 # the signing key and every trusted key, by id
    petseg keys trust FILE.pub       # trust another signer's public key (a release step's, a colleague's)
    petseg keys rotate               # a new key pair; the old public key stays trusted until retired
    petseg keys retire KEY_ID        # stop trusting a key: releases it signed are refused from now on

``PETSEG_SIGNING_KEY`` names the private key and ``PETSEG_TRUSTED_KEYS`` the
trusted keys (a file or a directory); both default under ``petseg keys list``'s paths.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from petseg import keys
from petseg.errors import ConfigError


def register(subparsers: argparse._SubParsersAction) -> None:
    """Register ``petseg keys init|list|trust|rotate|retire``."""
    parser = subparsers.add_parser("keys", help="make, list, trust, rotate and retire release signing keys",
                                   description=__doc__.split("\n\n")[0])
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    actions.add_parser("init", help="make the signing key pair (private key mode 0600) and trust its public key")
    actions.add_parser("list", help="show the signing key and the trusted keys")
    trust = actions.add_parser("trust", help="trust a public key (PEM)")
    trust.add_argument("public_key", type=Path, help="a PEM public key file")
    actions.add_parser("rotate", help="replace the signing key with a new one; the old public key stays trusted")
    retire = actions.add_parser("retire", help="stop trusting a key (8+ hex digits of its id)")
    retire.add_argument("key_id")
    parser.set_defaults(handler=keys_command)


def keys_command(args: argparse.Namespace) -> int:
    """Run ``petseg keys ACTION``.

    Raises:
        ConfigError: the key exists (init), is not a key (trust), or names no trusted key (retire).
    """
    if args.action in ("init", "rotate"):
        path, identifier = keys.create(replace=args.action == "rotate")
        print(f"signing key {path} (mode 0600), key id {keys.short(identifier)} ({identifier}); "
              f"public key {path.with_suffix('.pub')}, trusted in {keys.trusted_keys_setting()}")
        return 0
    if args.action == "trust":
        try:
            data = args.public_key.read_bytes()
        except OSError as err:
            raise ConfigError(f"public key {args.public_key} is not readable ({err.strerror})") from None
        path = keys.trust(data)
        print(f"trusted key {keys.short(keys.key_id(data))}: {path}")
        return 0
    if args.action == "retire":
        path = keys.retire(args.key_id)
        print(f"retired key {args.key_id}: removed {path}; releases it signed are refused from now on")
        return 0
    setting = keys.signing_key_setting()
    if setting.startswith("-----BEGIN"):
        signer = keys.key_id(keys.public_pem_of(keys.private_pem(setting)))
        print(f"signing key: (PEM in {keys.SIGNING_KEY_SETTING}) {keys.short(signer)}")
    elif Path(setting).expanduser().is_file():
        signer = keys.key_id(keys.public_pem_of(keys.private_pem(setting)))
        print(f"signing key: {setting} {keys.short(signer)}")
    else:
        print(f"signing key: none at {setting} (`petseg keys init` makes one; a run makes one on first use)")
    trusted = keys.trusted_keys()
    print(f"trusted keys ({keys.trusted_keys_setting()}): {len(trusted) or 'none'}")
    for identifier, path in trusted.items():
        print(f"  {keys.short(identifier)}  {identifier}  {path}")
    return 0
