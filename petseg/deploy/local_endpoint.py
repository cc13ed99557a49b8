"""One stable local endpoint per name: its front on a fixed port, and a release switched in without downtime.

`roll_out` serves a release under an endpoint name: it starts the release's
server (`petseg.deploy.local`) on a port of its own and waits until it
predicts, makes sure the endpoint's front (`petseg.entrypoints.endpoint_proxy`) listens on
the endpoint's port, records the switch (`petseg.deploy.endpoints.switch`; the front
sends new requests to the new server from then on), waits until the old
server has finished the requests it had, and only then stops it. `rollback`
does the same with the release that served before. `status` says what serves
under each name; `stop` ends an endpoint (front and server).
"""

from __future__ import annotations

import subprocess
import sys
import time

import requests

from petseg import tokens
from petseg.deploy import endpoints, local
from petseg.deploy.endpoints import STATUS_PATH
from petseg.errors import ConfigError, ServingError

FRONT_MODULE = "petseg.entrypoints.endpoint_proxy"
DRAIN_TIMEOUT = 120.0
"""Seconds the old server gets to finish its requests after a switch."""


def roll_out(name: str, release: dict, *, server: str = "seldon", port: int | None = None, host: str = "127.0.0.1",
             rollback: bool = False, timeout: float = 180.0) -> dict:
    """Serve ``release`` under endpoint ``name`` without downtime; what the flow records of the deployment.

    Args:
        name: The endpoint (`petseg.deploy.endpoints.check_name`).
        release: Its record entry (`petseg.deploy.endpoints.entry`): ``location``, ``version``, ``model_fingerprint``, ...
        server: ``seldon`` or ``mlserver``; an endpoint keeps the protocol it started with.
        port: The endpoint's port when its front is not running yet; None keeps the front's, or picks a free one.
        host: The address the front listens on.
        rollback: The release is the one that served before (taken off the history, not pushed onto it).
        timeout: Seconds the new server gets to answer.

    Returns:
        ``{"kind": "local", "endpoint", "url", "server", "protocol", "release", "replaced", "backend",
        "tokens_file"}``: ``url`` is the endpoint's stable address, ``backend`` the server's own deployment.

    Raises:
        ConfigError: a bad name, or a server of another protocol than the endpoint's.
        ServingError: the new server or the front did not start (nothing changed then).
    """
    record = endpoints.read(endpoints.check_name(name))
    old = record["serving"]
    if old and old["deployment"]["server"] != server:
        raise ConfigError(f"endpoint {name} serves with {old['deployment']['server']}; a release for it cannot use "
                          f"{server} (clients would change protocol): use another endpoint name")
    backend = local.deploy_local(release["location"], server=server, timeout=timeout,
                                 fingerprint=release.get("model_fingerprint"))
    try:
        front = _ensure_front(name, record.get("front"), port=port, host=host)
    except BaseException:
        local.stop_local(backend["pid"])
        raise
    endpoints.switch(name, {**release, "since": endpoints.now(), "deployment": backend}, rollback=rollback,
                     front=front)
    # The front reads the record before each request: this waits until it has.
    _wait_for(front["url"], lambda status: status["backend"] == backend["url"], what="switch to the new server")
    if old:
        _drain(front["url"], old["deployment"]["url"])
        local.stop_local(old["deployment"]["pid"])
    return {"kind": "local", "endpoint": name, "url": front["url"], "server": server, "protocol": backend["protocol"],
            "release": release["version"], "replaced": old["version"] if old else None, "backend": backend,
            "tokens_file": backend["tokens_file"]}


def rollback(name: str, *, timeout: float = 180.0) -> dict:
    """Serve the release that served ``name`` before the current one, the same way (`roll_out`).

    Raises:
        ConfigError: nothing served before (the message says what serves).
    """
    record = endpoints.read(endpoints.check_name(name))
    if not record["history"]:
        serving = record["serving"]
        raise ConfigError(f"endpoint {name} has no earlier release to roll back to "
                          f"(serving: {serving['version'] if serving else 'nothing'})")
    previous = record["history"][-1]
    return roll_out(name, previous, server=previous["deployment"]["server"], rollback=True, timeout=timeout)


def status(name: str | None = None) -> list[dict]:
    """What serves under each endpoint (or ``name``): its record, and whether its front and server are up."""
    rows = []
    for each in [endpoints.check_name(name)] if name else endpoints.names():
        record = endpoints.read(each)
        front, serving = record.get("front"), record["serving"]
        rows.append({"name": each, "url": front["url"] if front else None,
                     "up": bool(front and serving and _status(front["url"])), "serving": serving,
                     "history": [entry["version"] for entry in record["history"]],
                     "accepted": len(record["releases"])})
    return rows


def stop(name: str) -> bool:
    """Stop an endpoint's front and server; its record keeps what served (``serving`` becomes None, onto the
    history). False when it had neither running."""
    record = endpoints.read(endpoints.check_name(name))
    stopped = False
    if record["serving"]:
        stopped = local.stop_local(record["serving"]["deployment"]["pid"])
    if record.get("front"):
        stopped = local.stop_process(record["front"]["pid"], FRONT_MODULE) or stopped
    endpoints.switch(name, None, front=None)
    return stopped


def _ensure_front(name: str, front: dict | None, *, port: int | None, host: str) -> dict:
    """The endpoint's front, started when it does not answer (on its recorded port, else ``port``, else a free one)."""
    if front and _status(front["url"]) is not None:
        if port and port != front["port"]:
            raise ConfigError(f"endpoint {name} listens on port {front['port']}, not {port}: its address stays "
                              f"(stop it first with `petseg stop {name}` to move it)")
        return front
    port = port or (front or {}).get("port") or local.free_ports(1)[0]
    log = endpoints.path(name).with_suffix(".log")
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as output:
        process = subprocess.Popen([sys.executable, "-m", FRONT_MODULE, name, str(port), host],
                                   env=local.child_environment(), stdin=subprocess.DEVNULL, stdout=output,
                                   stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://{local.client_host(host)}:{port}"
    try:
        _wait_for(url, lambda status: True, what="start the endpoint's front", process=process)
    except ServingError:
        process.kill()
        raise ServingError(f"the front of endpoint {name} did not start on port {port} (log: {log})") from None
    return {"pid": process.pid, "port": port, "host": host, "url": url}


def _status(url: str) -> dict | None:
    """What the front at ``url`` says serves behind it (asked with the tokens file's first token), or None."""
    token = tokens.client_token()
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        answer = requests.get(url + STATUS_PATH, headers=headers, timeout=5)
    except requests.RequestException:
        return None
    return answer.json() if answer.status_code == 200 else None


def _wait_for(url: str, condition, *, what: str, timeout: float = 30.0, process: subprocess.Popen | None = None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = _status(url)
        if found is not None and condition(found):
            return found
        if process is not None and process.poll() is not None:
            break
        time.sleep(0.1)
    raise ServingError(f"could not {what} at {url} within {timeout:g} s")


def _drain(front_url: str, backend_url: str) -> None:
    """Wait until the front has no request in flight at ``backend_url`` (at most `DRAIN_TIMEOUT`)."""
    try:
        _wait_for(front_url, lambda status: not status["in_flight"].get(backend_url), what="drain the old server",
                  timeout=DRAIN_TIMEOUT)
    except ServingError:
        pass  # a request longer than that is cut: the old server stops anyway
