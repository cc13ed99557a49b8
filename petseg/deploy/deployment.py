"""A release served by a plain Deployment and an endpoint's Service: a target every cluster runs, no operator.

Each release gets its own ``Deployment`` (named as `petseg.layout.deployment_name`), whose pods run the
image's server, Seldon's microservice or MLServer with petseg's runtime (`render_deployment`). The
endpoint is one ``Service`` named after it (`render_service`), whose selector picks the pods of the
release serving. `roll_out` applies a release's Deployment, waits until its pods are Ready (their
readiness probe predicts), and only then moves the Service's selector to them: clients of the
endpoint's address go on being answered by the old pods until the new ones answer.

The pods (`petseg.deploy.pod.serving_pod`, which the operator objects describe too) hold the least they
need: no service-account token, the image's non-root user, a read-only root file system, the serving
credential as a file (``AWS_SHARED_CREDENTIALS_FILE``), the trusted public keys and the bearer tokens as
read-only mounts.
"""

from __future__ import annotations

import copy
import datetime
import json
import time

from petseg.deploy.endpoints import check_name
from petseg.deploy.kubernetes import (MANIFESTS, _api_reason, _check_image, _check_namespace, _check_replicas, _fill,
                                      _identity, _pod_model_uri, default_api_client)
from petseg.deploy.local import default_feedback_uri
from petseg.deploy.pod import SERVERS, SERVING_SECRETS, serving_pod
from petseg.errors import ConfigError, ServingError

DEPLOYMENT_TEMPLATE = MANIFESTS / "deployment.yaml"
SERVICE_TEMPLATE = MANIFESTS / "service.yaml"
HISTORY = 5


def render_deployment(manifest: dict, *, server: str, endpoint: str, image: str, namespace: str = "default",
                      replicas: int = 1, model_uri: str | None = None, s3_endpoint_url: str | None = None,
                      s3_secret: str = SERVING_SECRETS[0], tokens_secret: str | None = None,
                      resources: dict | None = None) -> dict:
    """The Deployment (apps/v1) serving one release on ``server`` (``seldon`` or ``mlserver``) for ``endpoint``.

    Args:
        manifest: The release manifest.
        server: Which server the pods run.
        endpoint: The endpoint whose Service may select these pods.
        image: Container image with petseg and ``serving/`` (see Dockerfile).
        namespace: Kubernetes namespace.
        replicas: Number of serving pods.
        model_uri: The release's ``s3://`` prefix; default the manifest's.
        s3_endpoint_url: Endpoint of a non-AWS S3 server.
        s3_secret: The serving credential's Secret (key ``credentials``, an AWS shared-credentials file).
        tokens_secret: A Secret with key ``tokens.json`` (`petseg.tokens`); without it predictions are open and
            feedback is refused.
        resources: Container resources; default `petseg.deploy.pod.DEFAULT_RESOURCES`.

    Raises:
        ConfigError: A value Kubernetes or the pod could not use.
    """
    if server not in SERVERS:
        raise ConfigError(f"server {server!r} has no plain Deployment: expected one of {', '.join(SERVERS)}")
    check_name(endpoint)
    model_uri = _pod_model_uri(manifest, model_uri)
    _check_image(image)
    _check_namespace(namespace)
    _check_replicas(replicas)
    name, labels, annotations = _identity(manifest, model_uri)
    selector = {"app.kubernetes.io/name": "petseg", "petseg/endpoint": endpoint,
                "petseg/version": labels["petseg/version"]}
    serving = serving_pod(server, image=image, model_uri=model_uri,
                          model_fingerprint=manifest.get("model_fingerprint", ""),
                          feedback_uri=default_feedback_uri(model_uri) if server == "seldon" else None,
                          s3_endpoint_url=s3_endpoint_url, s3_secret=s3_secret, tokens_secret=tokens_secret,
                          resources=resources)
    values = {"name": name, "namespace": namespace, "labels": {**labels, **selector}, "annotations": annotations,
              "replicas": replicas, "selector": selector,
              "pod_spec": {**serving["pod"], "containers": [serving["container"]]}}
    return _fill(DEPLOYMENT_TEMPLATE, values)


def render_service(deployment: dict, *, endpoint: str, namespace: str = "default") -> dict:
    """The endpoint's Service, selecting the pods of ``deployment`` (from `render_deployment`)."""
    check_name(endpoint)
    selector = deployment["spec"]["selector"]["matchLabels"]
    labels = {"app.kubernetes.io/name": "petseg", "petseg/endpoint": endpoint}
    annotations = {key: value for key, value in deployment["metadata"]["annotations"].items()}
    [port] = deployment["spec"]["template"]["spec"]["containers"][0]["ports"]
    return _fill(SERVICE_TEMPLATE, {"name": endpoint, "namespace": namespace, "labels": labels,
                                    "annotations": annotations, "selector": selector, "target_port": port["name"]})


def apply_deployment(body: dict, *, namespace: str, api_client=None, timeout: float = 600.0,
                     poll_interval: float = 2.0) -> dict:
    """Create or replace a Deployment and wait until all its pods are Ready and up to date.

    Raises:
        ServingError: The API refused it, or it was not Ready in time (naming what its pods wait for).
    """
    from kubernetes import client

    apps = client.AppsV1Api(api_client or default_api_client())
    name = body["metadata"]["name"]
    where = f"Deployment {namespace}/{name}"
    try:
        try:
            existing = apps.read_namespaced_deployment(name, namespace)
            body = copy.deepcopy(body)
            body["metadata"]["resourceVersion"] = existing.metadata.resource_version
            apps.replace_namespaced_deployment(name, namespace, body)
        except client.ApiException as err:
            if err.status != 404:
                raise
            apps.create_namespaced_deployment(namespace, body)
    except client.ApiException as err:
        raise ServingError(f"the Kubernetes API refused {where}: {err.status} {_api_reason(err)}") from None
    deadline = time.monotonic() + timeout
    while True:
        current = apps.read_namespaced_deployment(name, namespace)
        status, wanted = current.status, current.spec.replicas
        if ((status.observed_generation or 0) >= current.metadata.generation
                and (status.updated_replicas or 0) == wanted and (status.ready_replicas or 0) == wanted
                and (status.replicas or 0) == wanted):
            return current.to_dict()
        if time.monotonic() >= deadline:
            raise ServingError(f"{where} was not Ready after {timeout:g} s: {_pods_state(api_client, body)}")
        time.sleep(poll_interval)


def _pods_state(api_client, body: dict) -> str:
    """What the Deployment's pods wait for, in a line."""
    from kubernetes import client

    selector = ",".join(f"{k}={v}" for k, v in body["spec"]["selector"]["matchLabels"].items())
    pods = client.CoreV1Api(api_client or default_api_client()).list_namespaced_pod(
        body["metadata"]["namespace"], label_selector=selector).items
    states = []
    for pod in pods:
        for status in pod.status.container_statuses or []:
            waiting = status.state.waiting
            what = (f"waiting ({waiting.reason})" if waiting else "running, not ready" if status.state.running
                    else "terminated")
            states.append(f"{pod.metadata.name} {what}, {status.restart_count} restarts")
    return "; ".join(states) or "no pods yet"


def roll_out(manifest: dict, *, endpoint: str, who: str, server: str = "seldon", image: str = "petseg:latest",
             namespace: str = "default", api_client=None, timeout: float = 600.0, **render_options) -> dict:
    """Serve a release at the endpoint: its Deployment Ready first, then the endpoint's Service selects it.

    Returns:
        ``{"kind": "kubernetes", "server", "endpoint", "name", "namespace", "traffic", "url"}``.
    """
    from kubernetes import client

    api_client = api_client or default_api_client()
    deployment = render_deployment(manifest, server=server, endpoint=endpoint, image=image, namespace=namespace,
                                   **render_options)
    apply_deployment(deployment, namespace=namespace, api_client=api_client, timeout=timeout)
    core = client.CoreV1Api(api_client)
    try:
        current = core.read_namespaced_service(endpoint, namespace).to_dict()
    except client.ApiException as err:
        if err.status != 404:
            raise ServingError(f"could not read Service {namespace}/{endpoint}: {err.status} {_api_reason(err)}") \
                from None
        current = None
    service = switch(current, deployment, endpoint=endpoint, namespace=namespace, who=who, change="rolled-out")
    try:
        if current is None:
            core.create_namespaced_service(namespace, service)
        else:
            core.patch_namespaced_service(endpoint, namespace, service)
    except client.ApiException as err:
        raise ServingError(f"the Kubernetes API refused Service {namespace}/{endpoint}: {err.status} "
                           f"{_api_reason(err)}") from None
    version = manifest["version"]
    return {"kind": "kubernetes", "server": server, "endpoint": endpoint, "name": endpoint, "namespace": namespace,
            "traffic": {version: 100}, "url": f"http://{endpoint}.{namespace}.svc/"}


def switch(current: dict | None, deployment: dict, *, endpoint: str, namespace: str, who: str, change: str) -> dict:
    """The endpoint's Service once it selects ``deployment``'s pods: the release it served goes to its history."""
    service = render_service(deployment, endpoint=endpoint, namespace=namespace)
    annotations = (current or {}).get("metadata", {}).get("annotations") or {}
    history = json.loads(annotations.get("petseg/history", "[]"))
    if annotations.get("petseg/version") and annotations["petseg/version"] != deployment["metadata"]["annotations"][
            "petseg/version"]:
        history = (history + [annotations["petseg/version"]])[-HISTORY:]
    when = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    service["metadata"]["annotations"].update({"petseg/history": json.dumps(history), "petseg/changed-by": who,
                                               "petseg/changed-at": when, f"petseg/{change}-by": who,
                                               f"petseg/{change}-at": when})
    return service
