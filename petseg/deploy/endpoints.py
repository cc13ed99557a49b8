"""What serves under each endpoint name on this machine, and what served before: one record per name.

An endpoint is a stable name for clients (default ``petseg``). Its record,
``<state directory>/endpoints/<name>.json`` (`petseg.userdirs`), holds:

- ``releases``: every release the gate accepted for the name, oldest first;
- ``serving``: the release serving now (with ``since`` and its ``deployment``), or None;
- ``history``: what served before, most recent last (``petseg rollback`` goes back to it);
- ``front``: the endpoint's proxy on its stable port (`petseg.entrypoints.endpoint_proxy`), or None.

A release step reads the champion here (`champion`: what serves, else the
latest accepted release) and records an accepted release (`accept`); the local
deployment records a switch (`switch`). Every change is a read-modify-write
under a lock, written atomically.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import json
import re
from collections.abc import Iterator
from pathlib import Path

from petseg.errors import ConfigError
from petseg.storage import write_atomic
from petseg.userdirs import state_dir

DEFAULT_NAME = "petseg"
STATUS_PATH = "/petseg/endpoint"
"""Where an endpoint's front answers what serves behind it (`petseg.entrypoints.endpoint_proxy`)."""
_NAME = re.compile(r"^[a-z0-9]([-a-z0-9]{0,38}[a-z0-9])?$")


def check_name(name: str) -> str:
    """An endpoint name as given, once it is one: lower-case letters, digits and inner hyphens, at most 40
    characters (it names Kubernetes objects too).

    Raises:
        ConfigError: naming the value and what is accepted.
    """
    if not isinstance(name, str) or not _NAME.match(name):
        raise ConfigError(f"endpoint name {name!r} is not accepted: expected 1-40 lower-case letters, digits and "
                          "inner hyphens (e.g. petseg or pets-eu)")
    return name


def path(name: str) -> Path:
    """The record file of an endpoint."""
    return state_dir() / "endpoints" / f"{check_name(name)}.json"


def entry(manifest: dict) -> dict:
    """What a record keeps of a release, from its manifest (version, location, run, model and data set
    fingerprints, the probabilities its mask comes from), and when it was recorded."""
    found = {"version": manifest.get("version"), "location": manifest.get("location"),
             "run": manifest.get("pathspec"), "model_fingerprint": manifest.get("model_fingerprint"),
             "dataset_fingerprint": manifest.get("dataset_fingerprint"),
             "mask_source": manifest.get("mask_source", "calibrated")}
    return {**found, "recorded": now()}


def now() -> str:
    """The time as records write it: UTC, RFC 3339, to the second."""
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def read(name: str) -> dict:
    """An endpoint's record; an empty one (nothing accepted, nothing serving) when there is none.

    Raises:
        ConfigError: the name is not accepted, or the record file is not a readable record.
    """
    file = path(name)
    if not file.is_file():
        return {"name": name, "releases": [], "serving": None, "history": [], "front": None}
    try:
        record = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise ConfigError(f"endpoint record {file} is not readable JSON ({err}); "
                          "move it away to start afresh") from None
    if not isinstance(record, dict) or not isinstance(record.get("releases"), list) \
            or not isinstance(record.get("history"), list):
        raise ConfigError(f"endpoint record {file} lacks the lists 'releases' and 'history'; "
                          "move it away to start afresh")
    return record


def names() -> list[str]:
    """Every endpoint with a record, by name."""
    folder = state_dir() / "endpoints"
    return sorted(file.stem for file in folder.glob("*.json") if _NAME.match(file.stem)) if folder.is_dir() else []


@contextlib.contextmanager
def changing(name: str) -> Iterator[dict]:
    """Read an endpoint's record under its lock, let the caller change it, and write it back atomically."""
    file = path(name)
    file.parent.mkdir(parents=True, exist_ok=True)
    with open(file.with_suffix(".lock"), "a+b") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        record = read(name)
        yield record
        write_atomic(file, (json.dumps(record, indent=2, sort_keys=True) + "\n").encode())


def champion(name: str) -> dict | None:
    """The release a candidate for ``name`` is compared with: the one serving, else the latest accepted, else None."""
    record = read(name)
    return record["serving"] or (record["releases"][-1] if record["releases"] else None)


def accept(name: str, manifest: dict) -> dict:
    """Record a release the gate accepted for ``name``; the record."""
    with changing(name) as record:
        record["releases"].append(entry(manifest))
    return record


def switch(name: str, serving: dict | None, *, front: dict | None, rollback: bool = False) -> dict:
    """Record that ``serving`` (an `entry` with ``since`` and ``deployment``; None: nothing) serves ``name`` now,
    behind ``front`` (the endpoint's proxy: pid, port, url). What served before goes onto the history; for a
    ``rollback`` the release rolled back to comes off it instead. The record."""
    with changing(name) as record:
        if rollback:
            record["history"].pop()
        elif record["serving"]:
            record["history"].append(record["serving"])
        record["serving"] = serving
        record["front"] = front
    return record
