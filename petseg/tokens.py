"""Bearer tokens of the model servers and the identities they stand for, read from one file.

The file (``$PETSEG_TOKENS_FILE``, else ``serving-tokens.json`` in `petseg.userdirs.config_dir`;
on Kubernetes a Secret mounted as that file) is JSON::

    {"tokens": [{"identity": "alice", "token": "<at least 32 characters>",
                 "roles": ["predict", "feedback"]}]}

Roles: ``predict`` (prediction and inference requests, the Seldon server's
model metadata, a local endpoint's status), ``feedback`` (send labelled
samples), ``operator`` (MLServer's model repository API: load, unload, index;
both servers' Prometheus metrics). Which route needs which role is
`petseg.serving.routes`. A server holds a `TokenTable`; it asks `TokenTable.check`
for the identity behind an ``Authorization: Bearer ...`` header, which
compares the token with every known one by `hmac.compare_digest`. The
command line sends the first token of the same file (`client_token`).
`ensure_local_tokens` makes the file with one ``local`` identity
(predict and feedback, no operator) when it is missing, readable by its owner
only; `load` refuses a file that group or others may read or write (but a
Kubernetes Secret mounted for the pod's group: root's file, mode 0440, the
server's own group).
"""

from __future__ import annotations

import dataclasses
import hmac
import json
import os
import re
import secrets
import stat
from pathlib import Path

from petseg.errors import ConfigError, PetsegError
from petseg.userdirs import config_dir

TOKENS_ENV = "PETSEG_TOKENS_FILE"
DEFAULT_FILE = "serving-tokens.json"
ROLES = ("predict", "feedback", "operator")
LOCAL_IDENTITY = "local"
MIN_TOKEN_LENGTH = 32
_IDENTITY = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class AccessDenied(PetsegError):
    """A request without a valid token (401) or whose token lacks the role it needs (403).

    Args:
        status: 401 or 403.
        message: What was missing and how to get it.
    """

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.reason = "UNAUTHORIZED" if status == 401 else "FORBIDDEN"


@dataclasses.dataclass(frozen=True)
class Token:
    """One token of the file.

    Attributes:
        identity: Who holds it (recorded with every feedback sample they send).
        secret: The bearer token itself.
        roles: What it may do, a subset of `ROLES`.
    """

    identity: str
    secret: str = dataclasses.field(repr=False)
    roles: frozenset[str]


class TokenTable:
    """The tokens a server accepts.

    Args:
        tokens: The tokens; identities must be distinct.
        source: Where they came from, for messages.
    """

    def __init__(self, tokens: list[Token], *, source: str):
        self.tokens = tokens
        self.source = source

    def identify(self, authorization: str | None) -> Token | None:
        """The token an ``Authorization`` header carries, or None when it carries none that is known.

        Every known token is compared (in constant time each), so the time
        taken does not tell which one came closest.
        """
        scheme, _, presented = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not presented.strip():
            return None
        presented_bytes = presented.strip().encode()
        found = None
        for token in self.tokens:
            if hmac.compare_digest(presented_bytes, token.secret.encode()):
                found = token
        return found

    def check(self, authorization: str | None, role: str) -> Token:
        """The token of a request that needs ``role``.

        Raises:
            AccessDenied: 401 without a known token, 403 when its identity lacks ``role``.
        """
        token = self.identify(authorization)
        if token is None:
            raise AccessDenied(401, f"this request needs a bearer token with role {role!r} "
                                    "(Authorization: Bearer TOKEN; petseg sends the one in $PETSEG_TOKENS_FILE)")
        if role not in token.roles:
            raise AccessDenied(403, f"identity {token.identity!r} has no role {role!r}")
        return token


def tokens_path() -> Path:
    """The tokens file: ``$PETSEG_TOKENS_FILE``, else ``serving-tokens.json`` in the configuration directory."""
    value = os.environ.get(TOKENS_ENV)
    return Path(value).expanduser() if value else config_dir() / DEFAULT_FILE


def load(path: str | os.PathLike) -> TokenTable:
    """Reads and checks a tokens file.

    Raises:
        ConfigError: The file is missing, open to group or others (any permission bit beyond
            the owner's: 0600 and 0400 pass), not JSON, or a token is malformed.
    """
    path = Path(path)
    try:
        with open(path, encoding="utf-8") as handle:
            _check_private(path, os.fstat(handle.fileno()))
            document = json.loads(handle.read())
    except OSError as err:
        raise ConfigError(f"tokens file {path}: cannot read it ({err.strerror}); set {TOKENS_ENV} "
                          "to a file made by `petseg serve` or a mounted Secret") from None
    except ValueError as err:
        raise ConfigError(f"tokens file {path}: not JSON ({err})") from None
    entries = document.get("tokens") if isinstance(document, dict) else None
    if not isinstance(entries, list) or not entries:
        raise ConfigError(f'tokens file {path}: expected {{"tokens": [{{"identity", "token", "roles"}}, ...]}}')
    tokens, seen = [], set()
    for index, entry in enumerate(entries):
        where = f"tokens file {path}, tokens[{index}]"
        if not isinstance(entry, dict):
            raise ConfigError(f"{where}: expected an object with identity, token and roles")
        identity, secret, roles = entry.get("identity"), entry.get("token"), entry.get("roles")
        if not isinstance(identity, str) or not _IDENTITY.match(identity):
            raise ConfigError(f"{where}: identity {identity!r} is invalid: expected 1-64 letters, digits, '_', '.', '-'")
        if identity in seen:
            raise ConfigError(f"{where}: identity {identity!r} appears twice")
        if not isinstance(secret, str) or len(secret) < MIN_TOKEN_LENGTH or not secret.isprintable() or " " in secret:
            raise ConfigError(f"{where}: token of {identity!r} is invalid: expected at least {MIN_TOKEN_LENGTH} "
                              "printable characters without spaces")
        if not isinstance(roles, list) or not roles or not set(roles) <= set(ROLES):
            raise ConfigError(f"{where}: roles {roles!r} are invalid: expected a list of {', '.join(ROLES)}")
        seen.add(identity)
        tokens.append(Token(identity, secret, frozenset(roles)))
    return TokenTable(tokens, source=str(path))


def _check_private(path: Path, status: os.stat_result) -> None:
    """Refuses a tokens file that group or others may read or write: whoever can read it can use every token.

    One exception, the shape of a Kubernetes Secret mounted for a pod's group: a file of root's that only
    its group may also read, where that group is this (non-root) process's own (the pod's ``fsGroup``).
    """
    mode = stat.S_IMODE(status.st_mode)
    pod_secret = (mode & 0o077) == 0o040 and status.st_uid == 0 and os.geteuid() != 0 \
        and status.st_gid == os.getegid()
    if mode & 0o077 and not pod_secret:
        raise ConfigError(f"tokens file {path} has mode {mode:04o}: group or others can read or write "
                          f"its secrets; make it private with `chmod 600 {path}`")


def ensure_local_tokens(path: str | os.PathLike | None = None) -> tuple[Path, bool]:
    """Makes the tokens file with one ``local`` identity (predict, feedback) unless it exists.

    Args:
        path: The file; default `tokens_path`.

    Returns:
        The file, and whether it was made now. It is readable by its owner only.
    """
    path = Path(path) if path is not None else tokens_path()
    if path.exists():
        return path, False
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    document = {"tokens": [{"identity": LOCAL_IDENTITY, "token": secrets.token_urlsafe(32),
                            "roles": ["predict", "feedback"]}]}
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "w", encoding="utf-8") as out:
        out.write(json.dumps(document, indent=2) + "\n")
    return path, True


def client_token(path: str | os.PathLike | None = None) -> str | None:
    """The token a client sends: the first one of the tokens file, or None when there is no file.

    Raises:
        ConfigError: The file exists but is malformed or open to group or others.
    """
    path = Path(path) if path is not None else tokens_path()
    if not path.exists():
        return None
    return load(path).tokens[0].secret
