"""Local deployment: run a release's model server as a process on this machine.

Two servers, the same release and the same answers:

- ``seldon`` (the default): ``seldon-core-microservice PetSegModel`` (the
  component in ``serving/``), the Seldon Core v1 protocol, gunicorn workers
  and threads sized from the cores (`gunicorn_sizing`);
- ``mlserver``: ``python -m petseg.entrypoints.mlserver_runtime serving/mlserver``, MLServer
  with the petseg runtime, the Open Inference Protocol (KServe v2) over REST and gRPC.

Both listen on 127.0.0.1 unless told another address, and both take the
bearer tokens of `petseg.tokens` (made in the configuration directory when
missing): predictions and feedback need one.

`deploy_local` starts one detached in its own session, waits until it
predicts (``/health/status``, or ``/v2/models/petseg/ready`` after the
runtime's warm-up prediction), and returns what the flow records;
`stop_local` ends that session; `serve_foreground` runs one in the terminal.
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

from petseg import layout, servers, tokens
from petseg.errors import ServingError

ROOT = Path(__file__).resolve().parents[2]
SERVING_DIR = ROOT / "serving"
COMPONENT = "PetSegModel"
MICROSERVICE = "seldon-core-microservice"
LAUNCHER_MODULE = "petseg.entrypoints.seldon_launcher"
SERVERS = servers.LOCAL
"""The servers that run here (`petseg.servers`)."""
MLSERVER_SETTINGS = SERVING_DIR / "mlserver"
"""``mlserver start`` folder: settings.json and ``petseg/model-settings.json`` (the model name and runtime)."""
RUNTIME_MODULE = "petseg.entrypoints.mlserver_runtime"
MODEL_NAME = "petseg"
HEALTH_PATHS = {"seldon": "/health/status", "mlserver": f"/v2/models/{MODEL_NAME}/ready"}


def deploy_local(
    release_dir: str | os.PathLike,
    *,
    server: str = "seldon",
    port: int | None = None,
    host: str = "127.0.0.1",
    log_path: str | os.PathLike | None = None,
    timeout: float = 180.0,
    fingerprint: str | None = None,
    feedback_uri: str | None = None,
    tokens_file: str | os.PathLike | None = None,
) -> dict:
    """Starts a model server for a release, detached, and waits until it predicts.

    Args:
        release_dir: The signed release: a local directory, or the ``s3://bucket/prefix`` holding one.
        server: ``seldon`` (Seldon Core v1 protocol) or ``mlserver`` (Open Inference Protocol).
        port: REST port; None picks a free one. gRPC and metrics ports are
            always picked free.
        host: Address the server listens on (default ``127.0.0.1``; ``0.0.0.0``: every interface).
        log_path: File for the server's output; default ``serving.log`` in the
            deployment's `petseg.layout.deployment_dir` (outside the release, which is signed).
        timeout: Seconds to wait until it predicts.
        fingerprint: Model fingerprint the server must find (MODEL_FINGERPRINT).
        feedback_uri: Feedback store (`petseg.serving.quarantine`); default
            `default_feedback_uri`, outside the release.
        tokens_file: Bearer tokens (`petseg.tokens`); default `petseg.tokens.tokens_path`,
            made with one ``local`` identity when missing.

    Returns:
        ``{"kind": "local", "server", "protocol", "url", "pid", "port", "grpc_port", "metrics_port", "log",
        "model_uri", "tokens_file"}`` (``protocol`` is ``seldon`` or ``v2``), also written as
        ``deployment.json`` in the deployment's `petseg.layout.deployment_dir`.

    Raises:
        ConfigError: ``server`` is not one of `SERVERS`.
        ServingError: The server exited or did not answer in time (the message
            quotes the telling line of its log).
    """
    _check_server(server)
    local = Path(release_dir).is_dir()
    # The server runs in serving/: a relative directory would point elsewhere there.
    model_uri = str(Path(release_dir).resolve()) if local else str(release_dir)
    free = free_ports(3)
    port, grpc_port, metrics_port = port or free[0], free[1], free[2]
    record = layout.deployment_dir(model_uri)
    log_path = Path(log_path or record / "serving.log")
    log_path.parent.mkdir(parents=True, exist_ok=True)
    tokens_file, _ = tokens.ensure_local_tokens(tokens_file)
    command, cwd, env = _server_process(server, model_uri, port=port, grpc_port=grpc_port, metrics_port=metrics_port,
                                        fingerprint=fingerprint, feedback_uri=feedback_uri, host=host,
                                        tokens_file=tokens_file)
    with open(log_path, "ab") as log:
        process = subprocess.Popen(
            command,
            cwd=cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # outlives the caller; stop_local ends the whole session
        )
    url = f"http://{client_host(host)}:{port}"
    _wait_until_healthy(url, HEALTH_PATHS[server], process, log_path=log_path, timeout=timeout)
    deployment = {
        "kind": "local",
        "server": server,
        "protocol": servers.SERVERS[server].protocol,
        "url": url,
        "pid": process.pid,
        "port": port,
        "grpc_port": grpc_port,
        "metrics_port": metrics_port,
        "log": str(log_path),
        "model_uri": model_uri,
        "tokens_file": str(tokens_file),
    }
    record.mkdir(parents=True, exist_ok=True)
    (record / "deployment.json").write_text(json.dumps(deployment, indent=2) + "\n", encoding="utf-8")
    return deployment


def stop_local(pid: int, *, timeout: float = 30.0) -> bool:
    """Stops a local deployment started by `deploy_local` (its whole process session).

    Args:
        pid: The deployment's pid.
        timeout: Seconds to wait after SIGTERM before SIGKILL.

    Returns:
        True when it was stopped, False when no such process was running.

    Raises:
        ServingError: ``pid`` runs something else than a petseg model server.
    """
    return _stop(pid, lambda command: ((MICROSERVICE in command or LAUNCHER_MODULE in command) and COMPONENT in command)
                 or RUNTIME_MODULE in command, what="a petseg deployment", timeout=timeout)


def stop_process(pid: int, module: str, *, timeout: float = 30.0) -> bool:
    """Stops a detached petseg process that runs ``python -m <module>`` (its whole session), as `stop_local`.

    Raises:
        ServingError: ``pid`` runs something else.
    """
    return _stop(pid, lambda command: f"-m {module}" in command, what=f"a {module} process", timeout=timeout)


def _stop(pid: int, ours, *, what: str, timeout: float) -> bool:
    if not _session_alive(pid):
        return False
    command = _command_line(pid)
    if command is None:
        return False
    if not ours(command):
        raise ServingError(f"process {pid} is not {what} (it runs {command[:120]!r}); not stopping it")
    _end_session(pid, timeout=timeout)
    return True


def _end_session(pid: int, *, timeout: float) -> None:
    """SIGTERM to every process of the session ``pid`` leads, SIGKILL to what is left after ``timeout``.

    The session holds the gunicorn master and workers and the gRPC and metrics
    servers (Seldon), or MLServer and any inference workers it spawned.
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
    server: str = "seldon",
    grpc_port: int | None = None,
    fingerprint: str | None = None,
    feedback_uri: str | None = None,
    host: str = "127.0.0.1",
    tokens_file: str | os.PathLike | None = None,
) -> int:
    """Runs a model server for a release in the foreground until it stops.

    The server runs in a session of its own; SIGTERM or SIGINT (Ctrl-C) to
    this process stops that whole session, workers and helpers included, and
    so does the server's own exit: no process of it outlives this call.

    Args:
        release_dir: The release (any model URI, as for `deploy_local`).
        port: REST port; the metrics port is picked free.
        server: ``seldon`` or ``mlserver``.
        grpc_port: gRPC port; None picks a free one.
        fingerprint: Model fingerprint the server must find.
        feedback_uri: Feedback store; default `default_feedback_uri`.
        host: Address the server listens on (default ``127.0.0.1``; ``0.0.0.0``: every interface).
        tokens_file: Bearer tokens, as for `deploy_local`.

    Returns:
        The server's exit status.

    Raises:
        ConfigError: ``server`` is not one of `SERVERS`.
    """
    _check_server(server)
    model_uri = str(Path(release_dir).resolve()) if Path(release_dir).is_dir() else str(release_dir)
    free_grpc, metrics_port = free_ports(2)
    tokens_file, _ = tokens.ensure_local_tokens(tokens_file)
    command, cwd, env = _server_process(server, model_uri, port=port, grpc_port=grpc_port or free_grpc,
                                        metrics_port=metrics_port, fingerprint=fingerprint, feedback_uri=feedback_uri,
                                        host=host, tokens_file=tokens_file)
    process = subprocess.Popen(command, cwd=cwd, env=env, start_new_session=True)

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


def default_feedback_uri(model_uri: str) -> str:
    """Feedback of a release directory or ``s3://`` prefix, outside it (a signed release never changes):
    `petseg.layout.feedback`."""
    return layout.feedback(model_uri)


def microservice_command(*, port: int, grpc_port: int, metrics_port: int,
                         cores: int | None = None) -> list[str]:
    """The command line that serves ``serving/PetSegModel.py`` on the given ports (on ``PETSEG_HOST``).

    Args:
        port: REST port.
        grpc_port: gRPC port.
        metrics_port: Prometheus metrics port.
        cores: Cores to size gunicorn for (`gunicorn_sizing`); default this machine's.
    """
    if not (SERVING_DIR / f"{COMPONENT}.py").is_file():
        raise ServingError(
            f"{SERVING_DIR / COMPONENT}.py not found: serve from a source checkout of petseg (pip install -e .)"
        )
    executable = Path(sys.executable).with_name(MICROSERVICE)
    if not executable.exists():
        raise ServingError(f"{executable} not found: install seldon-core in the Python environment running petseg")
    workers, threads = gunicorn_sizing(cores or available_cores())
    return [
        sys.executable, "-m", LAUNCHER_MODULE, COMPONENT, "--service-type", "MODEL",
        "--http-port", str(port), "--grpc-port", str(grpc_port), "--metrics-port", str(metrics_port),
        "--workers", str(workers), "--threads", str(threads),
    ]


def gunicorn_sizing(cores: int) -> tuple[int, int]:
    """Gunicorn workers and threads per worker for the Seldon server on ``cores`` cores.

    One worker process per two cores (each holds the model once) with four
    threads each: TensorFlow, Pillow and numpy release the GIL while they
    compute, so one worker's threads keep two cores busy. On 2 cores this
    answered 110 requests/s at concurrency 16, against 79 for the wrapper's
    default of one worker with one thread and 108 for two workers of two
    threads (docs/PERFORMANCE.md).
    """
    return max(1, cores // 2), 4


def mlserver_command() -> list[str]:
    """The command line that serves the petseg runtime with MLServer (`petseg.entrypoints.mlserver_runtime`).

    Ports and the rest come from the environment (`_server_process`).
    """
    if not (MLSERVER_SETTINGS / MODEL_NAME / "model-settings.json").is_file():
        raise ServingError(f"{MLSERVER_SETTINGS / MODEL_NAME}/model-settings.json not found: "
                           "serve from a source checkout of petseg (pip install -e .)")
    return [sys.executable, "-m", RUNTIME_MODULE, str(MLSERVER_SETTINGS)]


def available_cores() -> int:
    """Cores this process may run on (its CPU affinity, which a container's cpuset narrows)."""
    return len(os.sched_getaffinity(0))


def _check_server(server: str) -> None:
    servers.get(server, among=SERVERS)


def _server_process(server: str, model_uri: str, *, port: int, grpc_port: int, metrics_port: int,
                    fingerprint: str | None, feedback_uri: str | None, host: str = "127.0.0.1",
                    tokens_file: str | os.PathLike | None = None) -> tuple[list[str], Path, dict[str, str]]:
    """Command, working directory and environment of a server process."""
    env = _environment(model_uri, fingerprint=fingerprint, feedback_uri=feedback_uri)
    env.update({"PETSEG_HOST": host, "MLSERVER_HOST": host})
    if tokens_file:
        env[tokens.TOKENS_ENV] = str(tokens_file)
    if server == "seldon":
        return microservice_command(port=port, grpc_port=grpc_port, metrics_port=metrics_port), SERVING_DIR, env
    env.update({"MLSERVER_HTTP_PORT": str(port), "MLSERVER_GRPC_PORT": str(grpc_port),
                "MLSERVER_METRICS_PORT": str(metrics_port)})
    # MLServer keeps metrics and environments under its working directory: a scratch one, not serving/.
    return mlserver_command(), Path(tempfile.mkdtemp(prefix="petseg-mlserver-")), env


def child_environment() -> dict[str, str]:
    """This process's environment, for a petseg process it starts: that process imports this copy of petseg,
    installed or not."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    return env


def _environment(model_uri: str, *, fingerprint: str | None, feedback_uri: str | None,
                 with_feedback: bool = True) -> dict[str, str]:
    """The server's environment: this process's, plus the server's settings."""
    env = child_environment()
    env["MODEL_URI"] = model_uri
    if with_feedback:
        feedback_uri = feedback_uri or default_feedback_uri(model_uri)
    for name, value in (("MODEL_FINGERPRINT", fingerprint), ("FEEDBACK_URI", feedback_uri)):
        if value:
            env[name] = value
        else:
            env.pop(name, None)
    return env


def client_host(host: str) -> str:
    """The address a client on this machine reaches a server listening on ``host`` by."""
    return "127.0.0.1" if host in ("0.0.0.0", "", "::") else host


def free_ports(count: int) -> list[int]:
    """Distinct ports free now (all probes stay bound until every port is picked)."""
    probes = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(count)]
    try:
        for probe in probes:
            probe.bind(("", 0))
        return [probe.getsockname()[1] for probe in probes]
    finally:
        for probe in probes:
            probe.close()


def _wait_until_healthy(url: str, path: str, process: subprocess.Popen, *, log_path: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        code = process.poll()
        if code is not None:
            raise ServingError(
                f"the server for {url} exited with status {code} before answering: {_log_tail(log_path)}"
            )
        try:
            if requests.get(url + path, timeout=10).status_code == 200:
                return
        except requests.RequestException:
            pass  # not listening yet
        time.sleep(0.5)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    raise ServingError(
        f"the server for {url} did not answer {path} within {timeout:g} s: "
        f"{_log_tail(log_path)}"
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
