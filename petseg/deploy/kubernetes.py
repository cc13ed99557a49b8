"""Kubernetes deployment: a release served as a SeldonDeployment, or on the MLServer runtime.

One release, three kinds of object, each rendered from a template in ``petseg/deploy/manifests/``
with the release's provenance in labels and annotations:

- ``SeldonDeployment`` (Seldon Core v1, `render_seldon_deployment`): the Seldon microservice;
- KServe ``InferenceService`` (`render_inference_service`): a predictor
  container running petseg's MLServer launcher (``python -m petseg.entrypoints.mlserver_runtime``),
  the Open Inference Protocol, readiness once the model is loaded;
- Seldon Core v2 ``Model`` (`render_seldon_model`) on a ``Server`` of the petseg
  image (`render_seldon_server`): MLServer loads the Model's artifact folder, a
  folder beside the release (`petseg.layout.seldon_model`) holding only the
  `model_settings` that name petseg's runtime and the release
  (`write_model_settings` puts them there when `petseg.deploy.rollout.roll_out` rolls the Model out, before
  applying it): a signed release never changes.

`apply_object` creates or replaces one and waits until its controller reports
it ready; `petseg.deploy.rollout` makes them one object per endpoint, with canaries.
"""

from __future__ import annotations

import copy
import json
import os
import re
import string
import time
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

from petseg import layout
from petseg.deploy.local import default_feedback_uri
from petseg.deploy.pod import SERVING_SECRETS, seldon_v2_server_pod, serving_pod
from petseg.errors import ConfigError, ServingError
from petseg.layout import deployment_name
from petseg.storage import Location

if TYPE_CHECKING:  # imported where used: only applying a deployment needs it
    import kubernetes

MANIFESTS = Path(__file__).resolve().parent / "manifests"
"""The templates, package data of petseg: wherever petseg is installed (a release step's pod), they are."""
TEMPLATE = MANIFESTS / "seldon-deployment.yaml"
INFERENCE_SERVICE_TEMPLATE = MANIFESTS / "kserve-inferenceservice.yaml"
SELDON_MODEL_TEMPLATE = MANIFESTS / "seldon-v2-model.yaml"
SELDON_SERVER_TEMPLATE = MANIFESTS / "seldon-v2-server.yaml"
GROUP, VERSION, PLURAL = "machinelearning.seldon.io", "v1", "seldondeployments"
RESOURCES = {
    "SeldonDeployment": (GROUP, VERSION, PLURAL),
    "InferenceService": ("serving.kserve.io", "v1beta1", "inferenceservices"),
    "Model": ("mlops.seldon.io", "v1alpha1", "models"),
    "Server": ("mlops.seldon.io", "v1alpha1", "servers"),
    "Experiment": ("mlops.seldon.io", "v1alpha1", "experiments"),
}
"""(group, version, plural) of each kind this module applies."""
RUNTIME = "petseg.entrypoints.mlserver_runtime.PetSegRuntime"
CAPABILITY = "petseg"
"""The Seldon Core v2 capability a Server of the petseg image offers and a petseg Model requires."""
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
    secrets: list[str] | tuple[str, ...] = SERVING_SECRETS,
    resources: dict | None = None,
    template: str | os.PathLike = TEMPLATE,
    tokens_secret: str | None = None,
) -> dict:
    """The SeldonDeployment (machinelearning.seldon.io/v1) serving one release.

    Args:
        manifest: The release manifest (version, pathspec, run_id,
            model_fingerprint, dataset_fingerprint, code_version, model_uri).
        image: Container image with petseg and ``serving/`` (see Dockerfile).
        model_uri: What the pod loads; default the manifest's ``model_uri``.
            Must be an ``s3://`` prefix: a signed release (a server never loads a Metaflow run).
        namespace: Kubernetes namespace.
        replicas: Number of serving pods.
        feedback_uri: ``s3://`` prefix for feedback samples; default outside the release
            (`petseg.deploy.local.default_feedback_uri`).
        s3_endpoint_url: Endpoint of a non-AWS S3 server (AWS_ENDPOINT_URL in the pod).
        secrets: The serving credential's Secret first (`SERVING_SECRETS`; key ``credentials``, an AWS
            shared-credentials file, mounted read-only): read releases, add pending feedback.
        resources: Container resources; default `petseg.deploy.pod.DEFAULT_RESOURCES`.
        template: The YAML template.
        tokens_secret: A Secret with key ``tokens.json`` (`petseg.tokens`), mounted read-only at `petseg.deploy.pod.TOKENS_MOUNT`;
            without it, predictions are open (behind the cluster's ingress) and feedback is refused.

    Returns:
        The object, ready for the Kubernetes API.

    Raises:
        ConfigError: A value Kubernetes or the pod could not use.
    """
    model_uri = _pod_model_uri(manifest, model_uri)
    values = _pod_values(manifest, server="seldon", image=image, model_uri=model_uri, namespace=namespace,
                         replicas=replicas, feedback_uri=feedback_uri or default_feedback_uri(model_uri),
                         s3_endpoint_url=s3_endpoint_url, secrets=secrets, resources=resources,
                         tokens_secret=tokens_secret)
    return _fill(template, values)


def render_inference_service(
    manifest: dict,
    *,
    image: str,
    model_uri: str | None = None,
    namespace: str = "default",
    replicas: int = 1,
    s3_endpoint_url: str | None = None,
    secrets: list[str] | tuple[str, ...] = SERVING_SECRETS,
    resources: dict | None = None,
    template: str | os.PathLike = INFERENCE_SERVICE_TEMPLATE,
    tokens_secret: str | None = None,
) -> dict:
    """The KServe InferenceService (serving.kserve.io/v1beta1) serving one release on MLServer.

    Arguments, result and errors as `render_seldon_deployment`, without a feedback store.
    """
    values = _pod_values(manifest, server="mlserver", image=image, model_uri=_pod_model_uri(manifest, model_uri),
                         namespace=namespace, replicas=replicas, feedback_uri=None, s3_endpoint_url=s3_endpoint_url,
                         secrets=secrets, resources=resources, tokens_secret=tokens_secret)
    pod_spec = values.pop("pod_spec")
    [container] = pod_spec["containers"]
    # KServe's name for a predictor's own container.
    predictor = {"minReplicas": replicas, **pod_spec, "containers": [{**container, "name": "kserve-container"}]}
    return _fill(template, {**values, "predictor": predictor})


def render_seldon_model(
    manifest: dict,
    *,
    model_uri: str | None = None,
    namespace: str = "default",
    replicas: int = 1,
    memory: str = "1536Mi",
    template: str | os.PathLike = SELDON_MODEL_TEMPLATE,
) -> dict:
    """The Seldon Core v2 Model (mlops.seldon.io/v1alpha1) of one release (ConfigError for unusable values).

    Its ``storageUri`` is the release's model folder (`petseg.layout.seldon_model`), which holds its
    `model_settings` (`write_model_settings`);
    it requires the `CAPABILITY` of a Server of the petseg image (`render_seldon_server`).
    """
    model_uri = _pod_model_uri(manifest, model_uri)
    _check_namespace(namespace)
    _check_replicas(replicas)
    name, labels, annotations = _identity(manifest, model_uri)
    values = {"name": name, "namespace": namespace, "labels": labels, "annotations": annotations,
              "replicas": replicas, "storage_uri": layout.seldon_model(model_uri) + "/", "requirements": [CAPABILITY],
              "memory": memory}
    return _fill(template, values)


def render_seldon_server(
    *,
    image: str,
    namespace: str = "default",
    name: str = "petseg-mlserver",
    replicas: int = 1,
    s3_endpoint_url: str | None = None,
    secrets: list[str] | tuple[str, ...] = SERVING_SECRETS,
    tokens_secret: str | None = None,
    resources: dict | None = None,
    template: str | os.PathLike = SELDON_SERVER_TEMPLATE,
) -> dict:
    """The Seldon Core v2 Server (mlops.seldon.io/v1alpha1) whose MLServer runs the petseg image.

    Its ``podSpec`` is what Seldon's operator merges into its mlserver ServerConfig's: the MLServer container
    and the pod's security context and volumes (`petseg.deploy.pod.seldon_v2_server_pod`). Arguments as
    `render_seldon_deployment`.

    Raises:
        ConfigError: A value Kubernetes or the pod could not use.
    """
    _check_image(image)
    _check_namespace(namespace)
    _check_replicas(replicas)
    serving = seldon_v2_server_pod(image=image, s3_endpoint_url=s3_endpoint_url,
                                   s3_secret=secrets[0] if secrets else None, tokens_secret=tokens_secret,
                                   resources=resources)
    pod_spec = {**serving["pod"], "containers": [serving["container"]]}
    values = {"name": name, "namespace": namespace, "labels": {"app.kubernetes.io/name": "petseg"},
              "replicas": replicas, "capabilities": [CAPABILITY], "pod_spec": pod_spec}
    return _fill(template, values)


def model_settings(manifest: dict, *, model_uri: str | None = None) -> dict:
    """The model-settings.json that makes a Seldon Core v2 Model of petseg's runtime serve a release.

    ``parameters.uri`` names the release (MLServer would otherwise take the settings' own folder): the
    runtime loads it from there and checks its weights against the fingerprint.
    """
    return {"name": deployment_name(manifest["version"]), "implementation": RUNTIME,
            "parameters": {"uri": model_uri or manifest["model_uri"],
                           "extra": {"model_fingerprint": manifest.get("model_fingerprint", "")}}}


def write_model_settings(manifest: dict, *, model_uri: str | None = None, s3_endpoint_url: str | None = None) -> str:
    """Writes `model_settings` into the release's model folder beside it (`petseg.layout.seldon_model`), never
    into the release; the written file's location.

    Raises:
        StorageError: It could not be written.
    """
    release = model_uri or manifest["model_uri"]
    location = Location(layout.seldon_model(release), s3_endpoint_url=s3_endpoint_url, what="Seldon model folder")
    return location.write_bytes("model-settings.json",
                                json.dumps(model_settings(manifest, model_uri=release), indent=2).encode())


def apply_object(
    body: dict,
    *,
    namespace: str,
    api_client: kubernetes.client.ApiClient | None = None,
    timeout: float = 600.0,
    poll_interval: float = 2.0,
) -> dict:
    """Creates a custom object of one of the `RESOURCES` kinds, or replaces the one of its name, and waits.

    It waits until its controller reports it ready: a SeldonDeployment's
    ``status.state`` is ``Available``; another kind's ``Ready`` condition is ``True``.

    Args:
        body: The object, from one of the ``render_*`` functions.
        namespace: Kubernetes namespace.
        api_client: A ``kubernetes.client.ApiClient``; default one from the
            kubeconfig (or the in-cluster service account).
        timeout: Seconds to wait until it is ready.
        poll_interval: Seconds between status reads.

    Returns:
        The object as the API server last returned it.

    Raises:
        ServingError: The API refused it, its controller reported it failed,
            or it was not ready in time (naming it and its last state).
    """
    from kubernetes import client

    api = client.CustomObjectsApi(api_client or default_api_client())
    kind, name = body["kind"], body["metadata"]["name"]
    resource = RESOURCES[kind]
    body = copy.deepcopy(body)
    body["metadata"]["namespace"] = namespace
    where = f"{kind} {namespace}/{name}"
    for _ in range(3):  # a concurrent writer can win a race; read again and retry
        existing = _get(api, resource, namespace, name, where)
        try:
            if existing is None:
                api.create_namespaced_custom_object(*resource[:2], namespace, resource[2], body)
            else:
                body["metadata"]["resourceVersion"] = existing["metadata"]["resourceVersion"]
                api.replace_namespaced_custom_object(*resource[:2], namespace, resource[2], name, body)
            break
        except client.ApiException as err:
            if err.status != 409:
                raise ServingError(f"the Kubernetes API refused {where}: {err.status} {_api_reason(err)}") from None
    else:
        raise ServingError(f"{where} kept changing while being replaced: try again")
    return _wait_ready(api, resource, namespace, name, where, timeout=timeout, poll_interval=poll_interval)


# -- rendering --------------------------------------------------------------------------------------


def _pod_model_uri(manifest: dict, model_uri: str | None) -> str:
    model_uri = model_uri or manifest.get("model_uri") or ""
    if not model_uri.startswith("s3://"):
        raise ConfigError(
            f"a pod cannot load the release from {model_uri!r}: expected the s3:// prefix of a signed release "
            "(release to S3 by running with the S3 datastore, or pass model_uri)"
        )
    return model_uri


def _pod_values(manifest: dict, *, server: str, image: str, model_uri: str, namespace: str, replicas: int,
                feedback_uri: str | None, s3_endpoint_url: str | None, secrets, resources: dict | None,
                tokens_secret: str | None = None) -> dict:
    """The checked values of a serving object's template: identity, and the serving pod of ``server``
    (`petseg.deploy.pod.serving_pod`, the plain Deployment's)."""
    _check_image(image)
    _check_namespace(namespace)
    _check_replicas(replicas)
    name, labels, annotations = _identity(manifest, model_uri)
    serving = serving_pod(server, image=image, model_uri=model_uri,
                          model_fingerprint=manifest.get("model_fingerprint", ""), feedback_uri=feedback_uri,
                          s3_endpoint_url=s3_endpoint_url, s3_secret=secrets[0] if secrets else None,
                          tokens_secret=tokens_secret, resources=resources)
    return {"name": name, "namespace": namespace, "labels": labels, "annotations": annotations,
            "replicas": replicas, "pod_spec": {**serving["pod"], "containers": [serving["container"]]}}


def _check_image(image: str) -> None:
    if not image or any(c.isspace() for c in image):
        raise ConfigError(f"image {image!r} is not an image reference: expected e.g. registry/petseg:1.0")


def _check_namespace(namespace: str) -> None:
    if not re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", namespace) or len(namespace) > 63:
        raise ConfigError(f"namespace {namespace!r} is not a Kubernetes namespace name")


def _check_replicas(replicas: int) -> None:
    if isinstance(replicas, bool) or not isinstance(replicas, int) or replicas < 1:
        raise ConfigError(f"replicas {replicas!r} is invalid: expected a positive integer")


def _identity(manifest: dict, model_uri: str) -> tuple[str, dict, dict]:
    """The object's name, its labels and its annotations: the release's provenance."""
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
    return name, labels, {f"petseg/{key}": str(value) for key, value in provenance.items()}


def _fill(template: str | os.PathLike, values: dict) -> dict:
    text = string.Template(Path(template).read_text(encoding="utf-8"))
    # JSON is YAML: every value goes in quoted and escaped, whatever it holds.
    return yaml.safe_load(text.substitute({key: json.dumps(value) for key, value in values.items()}))


# -- applying ---------------------------------------------------------------------------------------


def default_api_client() -> kubernetes.client.ApiClient:
    """A client from the kubeconfig, else the pod's service account (ServingError when there is neither)."""
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


def _get(api, resource: tuple[str, str, str], namespace: str, name: str, where: str) -> dict | None:
    from kubernetes import client

    group, version, plural = resource
    try:
        return api.get_namespaced_custom_object(group, version, namespace, plural, name)
    except client.ApiException as err:
        if err.status == 404:
            return None
        raise ServingError(f"could not read {where}: {err.status} {_api_reason(err)}") from None


def _readiness(kind_plural: str, status: dict) -> tuple[str, str]:
    """(``ready``, ``failed`` or ``pending``, a description) of an object's status."""
    if kind_plural == PLURAL:  # Seldon Core v1 reports a state
        state = status.get("state")
        description = f"{state} ({status['description']})" if status.get("description") else str(state)
        return {"Available": "ready", "Failed": "failed"}.get(state, "pending"), description
    ready = [c for c in status.get("conditions") or [] if c.get("type") == "Ready"]
    if not ready:
        return "pending", "no Ready condition yet"
    condition = ready[0]
    description = f"Ready={condition.get('status')} {condition.get('reason') or ''} {condition.get('message') or ''}"
    return ("ready" if condition.get("status") == "True" else "pending"), description.strip()


def _wait_ready(api, resource: tuple[str, str, str], namespace: str, name: str, where: str, *, timeout: float,
                poll_interval: float) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        current = _get(api, resource, namespace, name, where) or {}
        status = current.get("status") or {}
        readiness, description = _readiness(resource[2], status)
        # Right after a replace the status is still the previous spec's: where the controller says which
        # generation it has seen, only a status of this generation counts.
        generation = (current.get("metadata") or {}).get("generation")
        if readiness == "ready" and generation is not None and status.get("observedGeneration", generation) < generation:
            readiness, description = "waiting", f"status of generation {status['observedGeneration']}, not {generation}"
        if readiness == "ready":
            return current
        if readiness == "failed":
            raise ServingError(f"{where} failed: {status.get('description') or 'no description from Seldon'}")
        if time.monotonic() >= deadline:
            wanted = "Available" if resource[2] == PLURAL else "Ready"
            raise ServingError(f"{where} was not {wanted} after {timeout:g} s; last state: {description}")
        time.sleep(poll_interval)


def _api_reason(err) -> str:
    try:
        return json.loads(err.body).get("message") or err.reason
    except (TypeError, ValueError, AttributeError):
        return str(err.reason)
