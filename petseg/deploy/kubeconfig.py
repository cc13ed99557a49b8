"""Metaflow configuration for runs on Kubernetes: the settings, and the profile file they go in.

`python flows/seg_flow.py run --with kubernetes` needs an S3 datastore, a
namespace, a container image and a way for pods to reach S3. This module
makes those settings and writes them as a Metaflow profile
(``config_<profile>.json`` in ``$METAFLOW_HOME``, default
``~/.metaflowconfig``), to be selected with ``METAFLOW_PROFILE=<profile>``;
``petseg configure kubernetes`` is its command.

Credentials are never written here: pods get them from the Kubernetes secrets
named with ``--secret`` (Metaflow adds them to each pod as ``envFrom``), and
the machine that launches the run uses its usual AWS configuration.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from petseg.errors import ConfigError

# Kubernetes names: a namespace is a DNS-1123 label, a secret or service
# account name a DNS-1123 subdomain.
_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")

# Lets compute steps that ask for GPUs be placed on GPU nodes, which are
# usually tainted so that other pods stay off them.
GPU_TOLERATIONS = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]


def metaflow_config(
    *,
    s3_root: str,
    namespace: str,
    image: str,
    endpoint_url: str | None = None,
    secrets: list[str] | tuple[str, ...] = (),
    service_account: str | None = None,
    gpu: int = 0,
) -> dict[str, str]:
    """Return the Metaflow settings for runs on Kubernetes.

    Args:
        s3_root: Datastore root, ``s3://bucket/prefix``.
        namespace: Kubernetes namespace of the step pods.
        image: Container image of the step pods (see the Dockerfile).
        endpoint_url: S3 endpoint for a non-AWS S3 server, e.g. ``http://minio:9000``.
        secrets: Kubernetes secrets whose keys become the pods' environment
            (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, ...).
        service_account: Service account the step pods run as.
        gpu: GPUs per node for compute steps; above 0, step pods tolerate
            the ``nvidia.com/gpu`` taint of GPU nodes.

    Returns:
        ``METAFLOW_*`` keys and string values, as Metaflow reads them.

    Raises:
        ConfigError: A value is malformed.
    """
    if not re.match(r"^s3://[^/]+", s3_root or ""):
        raise ConfigError(f"--s3-root {s3_root!r} is not an S3 location: expected s3://bucket/prefix")
    if not _LABEL.match(namespace or "") or len(namespace) > 63:
        raise ConfigError(f"--namespace {namespace!r} is not a Kubernetes namespace name: use lower-case letters, "
                          "digits and '-'")
    if not image or any(c.isspace() for c in image):
        raise ConfigError(f"--image {image!r} is not an image reference: expected e.g. registry/petseg:1.0")
    if endpoint_url is not None and not re.match(r"^https?://[^/]+", endpoint_url):
        raise ConfigError(f"--endpoint-url {endpoint_url!r} is not a URL: expected http(s)://host:port")
    for name in list(secrets) + ([service_account] if service_account is not None else []):
        if not _SUBDOMAIN.match(name or "") or len(name) > 253:
            raise ConfigError(f"{name!r} is not a Kubernetes object name: use lower-case letters, digits, '-' and '.'")
    if gpu < 0:
        raise ConfigError(f"--gpu {gpu} is negative: give the number of GPUs, or 0 for CPU nodes")

    root = s3_root.rstrip("/")
    settings = {
        "METAFLOW_DEFAULT_DATASTORE": "s3",
        "METAFLOW_DATASTORE_SYSROOT_S3": root,
        "METAFLOW_DATATOOLS_S3ROOT": f"{root}/data",
        "METAFLOW_DEFAULT_METADATA": "local",
        "METAFLOW_KUBERNETES_NAMESPACE": namespace,
        "METAFLOW_KUBERNETES_CONTAINER_IMAGE": image,
    }
    if endpoint_url:
        settings["METAFLOW_S3_ENDPOINT_URL"] = endpoint_url
    if secrets:
        settings["METAFLOW_KUBERNETES_SECRETS"] = ",".join(secrets)
    if service_account:
        settings["METAFLOW_KUBERNETES_SERVICE_ACCOUNT"] = service_account
    if gpu:
        settings["METAFLOW_KUBERNETES_GPU_VENDOR"] = "nvidia"
        settings["METAFLOW_KUBERNETES_TOLERATIONS"] = json.dumps(GPU_TOLERATIONS)
    return settings


def config_path(*, profile: str | None = None, home: Path | None = None) -> Path:
    """Return where Metaflow looks for a profile's configuration.

    Args:
        profile: Profile name (``METAFLOW_PROFILE``); None for the default profile.
        home: Metaflow's configuration directory (``METAFLOW_HOME``); default ``~/.metaflowconfig``.

    Returns:
        ``home/config_<profile>.json``, or ``home/config.json`` without a profile.
    """
    home = Path(home) if home else Path("~/.metaflowconfig").expanduser()
    return home / (f"config_{profile}.json" if profile else "config.json")


def write_config(settings: dict[str, str], path: Path) -> Path:
    """Write settings as a Metaflow configuration file, keeping its other keys.

    Args:
        settings: ``METAFLOW_*`` keys and values.
        path: The configuration file; created with its directory if missing.

    Returns:
        The path written.

    Raises:
        ConfigError: An existing file there is not a JSON object.
    """
    path = Path(path)
    current: dict = {}
    if path.exists():
        try:
            current = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path} is not valid JSON ({exc}): fix or remove it, or pass --out") from exc
        if not isinstance(current, dict):
            raise ConfigError(f"{path} does not hold a JSON object: fix or remove it, or pass --out")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({**current, **settings}, indent=2, sort_keys=True) + "\n")
    return path
