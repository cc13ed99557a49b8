"""Local deployment: run a release's Seldon microservice as a process on this machine.

`deploy_local` starts ``seldon-core-microservice PetSegModel`` (the
component in ``serving/``) detached in its own session, waits until
``/health/status`` answers (one prediction), and returns what the flow
records; `stop_local` ends that session; `serve_foreground` runs it in the
terminal.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import requests

from petseg.errors import ServingError

ROOT = Path(__file__).resolve().parent.parent
SERVING_DIR = ROOT / "serving"
COMPONENT = "PetSegModel"
MICROSERVICE = "seldon-core-microservice"

def deploy_local(
    release_dir: str | os.PathLike,
    *,
    port: int | None = None,
    host: str = "127.0.0.1",
    log_path: str | os.PathLike | None = None,
    timeout: float = 180.0,
    fingerprint: str | None = None,
    feedback_uri: str | None = None,
) -> dict:
    """Starts the Seldon microservice for a release, detached, and waits until it predicts.

    Args:
        release_dir: The release: a local directory, or any other model URI
            the component loads (``s3://bucket/prefix``, ``PetSegFlow/<id>``).
        port: REST port; None picks a free one. gRPC and metrics ports are
            always picked free.
        host: Host name the returned URL uses (the server listens on all interfaces).
        log_path: File for the server's output; default ``serving.log`` in a
            local release directory, else a file in the temp directory.
        timeout: Seconds to wait for ``/health/status``.
        fingerprint: Model fingerprint the server must find (MODEL_FINGERPRINT).
        feedback_uri: Feedback store; default ``<release>/feedback`` (none for a run pathspec).

    Returns:
        ``{"kind": "local", "url", "pid", "port", "grpc_port", "metrics_port", "log", "model_uri"}``;
        a local release directory also gets it as ``deployment.json``.

    Raises:
        ServingError: The server exited or did not answer in time (the message
            quotes the telling line of its log).
    """
    local = Path(release_dir).is_dir()
    # The server runs in serving/: a relative directory would point elsewhere there.
    model_uri = str(Path(release_dir).resolve()) if local else str(release_dir)
    free = _free_ports(3)
    port, grpc_port, metrics_port = port or free[0], free[1], free[2]
    if log_path is None and local:
        log_path = Path(model_uri, "serving.log")
    elif log_path is None:
        log_path = Path(tempfile.gettempdir(), f"petseg-serving-{port}.log")
    log_path = Path(log_path)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        process = subprocess.Popen(
            microservice_command(port=port, grpc_port=grpc_port, metrics_port=metrics_port),
            cwd=SERVING_DIR,
            env=_environment(model_uri, fingerprint=fingerprint, feedback_uri=feedback_uri),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # outlives the caller; stop_local ends the whole session
        )
    url = f"http://{host}:{port}"
    _wait_until_healthy(url, process, log_path=log_path, timeout=timeout)
    deployment = {
        "kind": "local",
        "url": url,
        "pid": process.pid,
        "port": port,
        "grpc_port": grpc_port,
        "metrics_port": metrics_port,
        "log": str(log_path),
        "model_uri": model_uri,
    }
    if local:
        (Path(model_uri) / "deployment.json").write_text(json.dumps(deployment, indent=2) + "\n", encoding="utf-8")
    return deployment


def stop_local(pid: int, *, timeout: float = 30.0) -> bool:
    """Stops a local deployment started by `deploy_local` (its whole process session).

    Args:
        pid: The deployment's pid.
        timeout: Seconds to wait after SIGTERM before SIGKILL.

    Returns:
        True when it was stopped, False when no such process was running.

    Raises:
        ServingError: ``pid`` runs something else than a petseg microservice.
    """
    if not _session_alive(pid):
        return False
    command = _command_line(pid)
    if command is None:
        return False
    if MICROSERVICE not in command or COMPONENT not in command:
        raise ServingError(f"process {pid} is not a petseg deployment (it runs {command[:120]!r}); not stopping it")
    _end_session(pid, timeout=timeout)
    return True


def _end_session(pid: int, *, timeout: float) -> None:
    """SIGTERM to every process of the session ``pid`` leads, SIGKILL to what is left after ``timeout``.

    The session holds the gunicorn master and workers and the gRPC and metrics servers.
    """
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while _session_alive(pid):
        if time.monotonic() > deadline:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
            deadline = time.monotonic() + 5.0
        time.sleep(0.2)


def serve_foreground(
    release_dir: str | os.PathLike,
    port: int = 9000,
    *,
    fingerprint: str | None = None,
    feedback_uri: str | None = None,
) -> int:
    """Runs the Seldon microservice for a release in the foreground until it stops.

    The server runs in a session of its own; SIGTERM or SIGINT (Ctrl-C) to
    this process stops that whole session, workers and helpers included, and
    so does the server's own exit: no process of it outlives this call.

    Args:
        release_dir: The release (any model URI, as for `deploy_local`).
        port: REST port; gRPC and metrics ports are picked free.
        fingerprint: Model fingerprint the server must find.
        feedback_uri: Feedback store; default ``<release>/feedback`` (none for a run pathspec).

    Returns:
        The server's exit status.
    """
    model_uri = str(Path(release_dir).resolve()) if Path(release_dir).is_dir() else str(release_dir)
    grpc_port, metrics_port = _free_ports(2)
    command = microservice_command(port=port, grpc_port=grpc_port, metrics_port=metrics_port)
    env = _environment(model_uri, fingerprint=fingerprint, feedback_uri=feedback_uri)
    process = subprocess.Popen(command, cwd=SERVING_DIR, env=env, start_new_session=True)

    def stop(signum, frame):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)

    previous = {signum: signal.signal(signum, stop) for signum in (signal.SIGTERM, signal.SIGINT)}
    try:
        return process.wait()
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        _end_session(process.pid, timeout=10.0)


def default_feedback_uri(model_uri: str) -> str | None:
    """``<release>/feedback`` for a release directory or ``s3://`` prefix; None for a run pathspec."""
    if model_uri.startswith("PetSegFlow/"):
        return None
    return model_uri.rstrip("/") + "/feedback"


def microservice_command(*, port: int, grpc_port: int, metrics_port: int) -> list[str]:
    """The command line that serves ``serving/PetSegModel.py`` on the given ports."""
    if not (SERVING_DIR / f"{COMPONENT}.py").is_file():
        raise ServingError(
            f"{SERVING_DIR / COMPONENT}.py not found: serve from a source checkout of petseg (pip install -e .)"
        )
    executable = Path(sys.executable).with_name(MICROSERVICE)
    if not executable.exists():
        raise ServingError(f"{executable} not found: install seldon-core in the Python environment running petseg")
    return [
        str(executable), COMPONENT, "--service-type", "MODEL",
        "--http-port", str(port), "--grpc-port", str(grpc_port), "--metrics-port", str(metrics_port),
    ]


def _environment(model_uri: str, *, fingerprint: str | None, feedback_uri: str | None) -> dict[str, str]:
    """The server's environment: this process's, plus the component's settings."""
    env = dict(os.environ)
    # The component imports this copy of petseg, installed or not.
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    env["MODEL_URI"] = model_uri
    feedback_uri = feedback_uri or default_feedback_uri(model_uri)
    for name, value in (("MODEL_FINGERPRINT", fingerprint), ("FEEDBACK_URI", feedback_uri)):
        if value:
            env[name] = value
        else:
            env.pop(name, None)
    return env


def _free_ports(count: int) -> list[int]:
    """Distinct ports free now (all probes stay bound until every port is picked)."""
    probes = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(count)]
    try:
        for probe in probes:
            probe.bind(("", 0))
        return [probe.getsockname()[1] for probe in probes]
    finally:
        for probe in probes:
            probe.close()


def _wait_until_healthy(url: str, process: subprocess.Popen, *, log_path: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        code = process.poll()
        if code is not None:
            raise ServingError(
                f"the server for {url} exited with status {code} before answering: {_log_tail(log_path)}"
            )
        try:
            if requests.get(f"{url}/health/status", timeout=10).status_code == 200:
                return
        except requests.RequestException:
            pass  # not listening yet
        time.sleep(0.5)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    raise ServingError(
        f"the server for {url} did not answer /health/status within {timeout:g} s: {_log_tail(log_path)}"
    )


def _log_tail(log_path: Path) -> str:
    """The most telling line of a server log, and where the log is.

    That is the last petseg error (a bad release, a fingerprint mismatch),
    else the last line naming an error, else the last line.
    """
    text = log_path.read_text(encoding="utf-8", errors="replace")
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    ours = [line.split(": ", 1)[-1] for line in lines if line.startswith("petseg.errors.")]
    errors = [line for line in lines if "Error" in line]
    last = (ours or errors or lines or ["(empty log)"])[-1]
    return f"{last[-400:]} (log: {log_path})"


def _command_line(pid: int) -> str | None:
    result = subprocess.run(["ps", "-ww", "-o", "args=", "-p", str(pid)], capture_output=True, text=True)
    if result.returncode != 0:
        return None
    return result.stdout.strip() or None


def _session_alive(pid: int) -> bool:
    try:
        os.waitpid(pid, os.WNOHANG)  # reap it when it is our child
    except ChildProcessError:
        pass
    try:
        os.killpg(pid, 0)
    except ProcessLookupError:
        return False
    return True
