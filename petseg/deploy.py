"""Deploy a release: a local Seldon microservice process, or a SeldonDeployment on Kubernetes.

Local: `deploy_local` starts ``seldon-core-microservice PetSegModel`` (the
component in ``serving/``) detached in its own session, waits until
``/health/status`` answers (one prediction), and returns what the flow
records; `stop_local` ends that session; `serve_foreground` runs it in the
terminal.

Kubernetes: `render_seldon_deployment` fills ``k8s/seldon-deployment.yaml``
for one release (name ``petseg-<short version>``, provenance labels and
annotations, probes on ``/health/status``); `apply_seldon_deployment`
creates or replaces it and waits until Seldon reports it Available;
`deploy_kubernetes` does both.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import os
import re
import signal
import socket
import string
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

import requests
import yaml

from petseg.errors import ConfigError, ServingError

if TYPE_CHECKING:  # imported where used: only Kubernetes deployments need it
    import kubernetes

ROOT = Path(__file__).resolve().parent.parent
SERVING_DIR = ROOT / "serving"
TEMPLATE = ROOT / "k8s" / "seldon-deployment.yaml"
COMPONENT = "PetSegModel"
MICROSERVICE = "seldon-core-microservice"
GROUP, VERSION, PLURAL = "machinelearning.seldon.io", "v1", "seldondeployments"
DEFAULT_RESOURCES = {"requests": {"cpu": "500m", "memory": "1536Mi"}, "limits": {"memory": "3Gi"}}


# -- local ------------------------------------------------------------------------------------------


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


# -- Kubernetes -------------------------------------------------------------------------------------


def deployment_name(version: str) -> str:
    """``petseg-<short version>``, a DNS-1123 label short enough for the objects Seldon derives from it.

    Args:
        version: The release version, ``petseg-<run id>``.

    Returns:
        The run id, lower-cased; ids that are long or not DNS-safe are cut and
        get 8 hex digits of their hash, so that distinct versions keep distinct names.
    """
    short = version.removeprefix("petseg-")
    safe = re.sub(r"[^a-z0-9]+", "-", short.lower()).strip("-")
    if safe != short or len(safe) > 24:
        safe = f"{safe[:15].strip('-')}-{hashlib.sha256(short.encode()).hexdigest()[:8]}".strip("-")
    return f"petseg-{safe}"


def label_value(value: str) -> str:
    """``value`` made a valid Kubernetes label value (at most 63 of ``[A-Za-z0-9._-]``, alphanumeric ends)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", str(value))[:63].strip("-_.")


def render_seldon_deployment(
    manifest: dict,
    *,
    image: str,
    model_uri: str | None = None,
    namespace: str = "default",
    replicas: int = 1,
    feedback_uri: str | None = None,
    s3_endpoint_url: str | None = None,
    secrets: list[str] | tuple[str, ...] = (),
    resources: dict | None = None,
    template: str | os.PathLike = TEMPLATE,
) -> dict:
    """The SeldonDeployment (machinelearning.seldon.io/v1) serving one release.

    Args:
        manifest: The release manifest (version, pathspec, run_id,
            model_fingerprint, dataset_fingerprint, code_version, model_uri).
        image: Container image with petseg and ``serving/`` (see Dockerfile).
        model_uri: What the pod loads; default the manifest's ``model_uri``.
            Must be an ``s3://`` prefix or a ``PetSegFlow/<id>`` pathspec.
        namespace: Kubernetes namespace.
        replicas: Number of serving pods.
        feedback_uri: ``s3://`` prefix for feedback samples; default
            ``<model_uri>/feedback`` for an s3 release, none for a run pathspec.
        s3_endpoint_url: Endpoint of a non-AWS S3 server (AWS_ENDPOINT_URL in the pod).
        secrets: Secrets whose keys become the pod's environment (S3 credentials).
        resources: Container resources; default `DEFAULT_RESOURCES`.
        template: The YAML template.

    Returns:
        The object, ready for the Kubernetes API.

    Raises:
        ConfigError: A value Kubernetes or the pod could not use.
    """
    model_uri = model_uri or manifest.get("model_uri") or ""
    if not (model_uri.startswith("s3://") or model_uri.startswith("PetSegFlow/")):
        raise ConfigError(
            f"a pod cannot load the release from {model_uri!r}: expected an s3:// prefix or PetSegFlow/<id> "
            "(release to S3 by running with the S3 datastore, or pass model_uri)"
        )
    if not image or any(c.isspace() for c in image):
        raise ConfigError(f"image {image!r} is not an image reference: expected e.g. registry/petseg:1.0")
    if not re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", namespace) or len(namespace) > 63:
        raise ConfigError(f"namespace {namespace!r} is not a Kubernetes namespace name")
    if isinstance(replicas, bool) or not isinstance(replicas, int) or replicas < 1:
        raise ConfigError(f"replicas {replicas!r} is invalid: expected a positive integer")
    version = manifest["version"]
    name = deployment_name(version)
    provenance = {
        "version": version,
        "pathspec": manifest.get("pathspec", ""),
        "run-id": str(manifest.get("run_id", "")),
        "model-fingerprint": manifest.get("model_fingerprint", ""),
        "dataset-fingerprint": manifest.get("dataset_fingerprint", ""),
        "code-version": manifest.get("code_version", ""),
        "model-uri": model_uri,
    }
    labels = {
        "app.kubernetes.io/name": "petseg",
        "app.kubernetes.io/instance": name,
        "petseg/version": label_value(version),
        "petseg/run-id": label_value(provenance["run-id"]),
        # Fingerprints are 64 hex digits, more than a label holds: the
        # first 12 find a deployment, the annotations keep the full values.
        "petseg/model-fingerprint": label_value(provenance["model-fingerprint"][:12]),
        "petseg/dataset-fingerprint": label_value(provenance["dataset-fingerprint"][:12]),
        "petseg/code-version": label_value(provenance["code-version"]),
    }
    env = [
        {"name": "MODEL_URI", "value": model_uri},
        {"name": "MODEL_FINGERPRINT", "value": provenance["model-fingerprint"]},
    ]
    feedback_uri = feedback_uri or default_feedback_uri(model_uri)
    if feedback_uri:
        env.append({"name": "FEEDBACK_URI", "value": feedback_uri})
    if s3_endpoint_url:
        env.append({"name": "AWS_ENDPOINT_URL", "value": s3_endpoint_url})
    values = {
        "name": name,
        "namespace": namespace,
        "labels": labels,
        "annotations": {f"petseg/{key}": str(value) for key, value in provenance.items()},
        "replicas": replicas,
        "image": image,
        "env": env,
        "env_from": [{"secretRef": {"name": secret}} for secret in secrets],
        "resources": resources or DEFAULT_RESOURCES,
    }
    text = string.Template(Path(template).read_text(encoding="utf-8"))
    # JSON is YAML: every value goes in quoted and escaped, whatever it holds.
    return yaml.safe_load(text.substitute({key: json.dumps(value) for key, value in values.items()}))


def apply_seldon_deployment(
    manifest: dict,
    *,
    namespace: str,
    api_client: kubernetes.client.ApiClient | None = None,
    timeout: float = 600.0,
    poll_interval: float = 2.0,
) -> dict:
    """Creates a SeldonDeployment, or replaces the one of that name, and waits until it is Available.

    Args:
        manifest: The object from `render_seldon_deployment`.
        namespace: Kubernetes namespace.
        api_client: A ``kubernetes.client.ApiClient``; default one from the
            kubeconfig (or the in-cluster service account).
        timeout: Seconds to wait for ``status.state == "Available"``.
        poll_interval: Seconds between status reads.

    Returns:
        The object as the API server last returned it.

    Raises:
        ServingError: The API refused it, Seldon reported it Failed, or it
            was not Available in time (naming it and its last state).
    """
    from kubernetes import client

    api = client.CustomObjectsApi(api_client or _default_api_client())
    name = manifest["metadata"]["name"]
    body = copy.deepcopy(manifest)
    body["metadata"]["namespace"] = namespace
    where = f"SeldonDeployment {namespace}/{name}"
    for _ in range(3):  # a concurrent writer can win a race; read again and retry
        existing = _get(api, namespace, name, where)
        try:
            if existing is None:
                api.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, body)
            else:
                body["metadata"]["resourceVersion"] = existing["metadata"]["resourceVersion"]
                api.replace_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name, body)
            break
        except client.ApiException as err:
            if err.status != 409:
                raise ServingError(f"the Kubernetes API refused {where}: {err.status} {_api_reason(err)}") from None
    else:
        raise ServingError(f"{where} kept changing while being replaced: try again")
    return _wait_available(api, namespace, name, where, timeout=timeout, poll_interval=poll_interval)


def deploy_kubernetes(
    manifest: dict,
    *,
    image: str = "petseg:latest",
    namespace: str = "default",
    api_client: kubernetes.client.ApiClient | None = None,
    timeout: float = 600.0,
    **render_options,
) -> dict:
    """Renders and applies the SeldonDeployment of a release and waits until it serves.

    Args:
        manifest: The release manifest.
        image: Container image (see Dockerfile).
        namespace: Kubernetes namespace.
        api_client: A ``kubernetes.client.ApiClient``; default from the kubeconfig.
        timeout: Seconds to wait until it is Available.
        **render_options: More arguments of `render_seldon_deployment`
            (model_uri, replicas, feedback_uri, s3_endpoint_url, secrets, resources).

    Returns:
        ``{"kind": "kubernetes", "name", "namespace", "state", "url"}``; the URL
        is the predictor's in-cluster service (Seldon's executor port 8000).
    """
    rendered = render_seldon_deployment(manifest, image=image, namespace=namespace, **render_options)
    applied = apply_seldon_deployment(rendered, namespace=namespace, api_client=api_client, timeout=timeout)
    name = rendered["metadata"]["name"]
    return {
        "kind": "kubernetes",
        "name": name,
        "namespace": namespace,
        "state": applied.get("status", {}).get("state"),
        "url": f"http://{name}-default.{namespace}.svc.cluster.local:8000",
    }


def _default_api_client() -> kubernetes.client.ApiClient:
    from kubernetes import config

    try:
        return config.new_client_from_config()
    except config.ConfigException:
        try:
            config.load_incluster_config()
        except config.ConfigException:
            raise ServingError(
                "no Kubernetes configuration: expected a kubeconfig (see `petseg configure kubernetes`) "
                "or a pod's service account"
            ) from None
        from kubernetes import client

        return client.ApiClient()


def _get(api, namespace: str, name: str, where: str) -> dict | None:
    from kubernetes import client

    try:
        return api.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
    except client.ApiException as err:
        if err.status == 404:
            return None
        raise ServingError(f"could not read {where}: {err.status} {_api_reason(err)}") from None


def _wait_available(api, namespace: str, name: str, where: str, *, timeout: float, poll_interval: float) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        current = _get(api, namespace, name, where) or {}
        status = current.get("status") or {}
        state = status.get("state")
        if state == "Available":
            return current
        if state == "Failed":
            raise ServingError(f"{where} failed: {status.get('description') or 'no description from Seldon'}")
        if time.monotonic() >= deadline:
            detail = f"{state} ({status['description']})" if status.get("description") else str(state)
            raise ServingError(f"{where} was not Available after {timeout:g} s; last state: {detail}")
        time.sleep(poll_interval)


def _api_reason(err) -> str:
    try:
        return json.loads(err.body).get("message") or err.reason
    except (TypeError, ValueError, AttributeError):
        return str(err.reason)
