"""Kubernetes deployment: a release served as a SeldonDeployment.

`render_seldon_deployment` fills ``k8s/seldon-deployment.yaml`` for one
release (name ``petseg-<short version>``, provenance labels and annotations,
probes on ``/health/status``); `apply_seldon_deployment` creates or replaces
it and waits until Seldon reports it Available; `deploy_kubernetes` does both.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import re
import string
import time
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

from petseg.deploy_local import default_feedback_uri
from petseg.errors import ConfigError, ServingError

if TYPE_CHECKING:  # imported where used: only applying a deployment needs it
    import kubernetes

TEMPLATE = Path(__file__).resolve().parent.parent / "k8s" / "seldon-deployment.yaml"
GROUP, VERSION, PLURAL = "machinelearning.seldon.io", "v1", "seldondeployments"
DEFAULT_RESOURCES = {"requests": {"cpu": "500m", "memory": "1536Mi"}, "limits": {"memory": "3Gi"}}


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
