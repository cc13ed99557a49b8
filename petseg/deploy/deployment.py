"""A release served by a plain Deployment and an endpoint's Service: a target every cluster runs, no operator.

Each release gets its own ``Deployment`` (named as `petseg.layout.deployment_name`), whose pods run the
image's server, Seldon's microservice or MLServer with petseg's runtime (`render_deployment`). The
endpoint is one ``Service`` named after it (`render_service`), whose selector picks the pods of the
release serving. `roll_out` applies a release's Deployment, waits until its pods are Ready (their
readiness probe predicts), and only then moves the Service's selector to them: clients of the
endpoint's address go on being answered by the old pods until the new ones answer. A release may
instead be staged: Ready beside the serving one, taking no traffic until `promote` (a Service
cannot split traffic by percent). `rollback` drops a staged release, or serves the previous one again.

The Service's annotations are the endpoint's record: the release serving (its provenance, from its
Deployment), ``petseg/candidate`` (a staged release), ``petseg/history`` (what served before, most
recent last) and who changed it when. The previous release's pods keep running, so a rollback
switches at once; older ones are scaled to zero, and Deployments no longer named are deleted.

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
                                      _identity, _pod_model_uri, default_api_client, label_value)
from petseg.deploy.local import default_feedback_uri
from petseg.deploy.pod import SERVERS, SERVING_SECRETS, serving_pod
from petseg.errors import ConfigError, ServingError
from petseg.layout import deployment_name

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
    # How many pods to scale back to, should a rollback bring it back from zero.
    annotations = {**annotations, "petseg/replicas": str(replicas)}
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
        raise ServingError(f"the Kubernetes API refused Deployment {namespace}/{name}: {err.status} "
                           f"{_api_reason(err)}") from None
    return wait_ready(name, namespace=namespace, api_client=api_client, timeout=timeout, poll_interval=poll_interval)


def wait_ready(name: str, *, namespace: str, api_client=None, timeout: float = 600.0,
               poll_interval: float = 2.0) -> dict:
    """Wait until every pod of the Deployment ``name`` is Ready and up to date; the Deployment, as a dict.

    Raises:
        ServingError: It was not Ready in time (naming what its pods wait for).
    """
    from kubernetes import client

    api_client = api_client or default_api_client()
    apps = client.AppsV1Api(api_client)
    deadline = time.monotonic() + timeout
    while True:
        current = apps.read_namespaced_deployment(name, namespace)
        status, wanted = current.status, current.spec.replicas
        if ((status.observed_generation or 0) >= current.metadata.generation
                and (status.updated_replicas or 0) == wanted and (status.ready_replicas or 0) == wanted
                and (status.replicas or 0) == wanted):
            return api_client.sanitize_for_serialization(current)
        if time.monotonic() >= deadline:
            raise ServingError(f"Deployment {namespace}/{name} was not Ready after {timeout:g} s: "
                               f"{_pods_state(api_client, current.spec.selector.match_labels, namespace)}")
        time.sleep(poll_interval)


def _pods_state(api_client, selector: dict, namespace: str) -> str:
    """What the Deployment's pods wait for, in a line."""
    from kubernetes import client

    labels = ",".join(f"{k}={v}" for k, v in selector.items())
    pods = client.CoreV1Api(api_client).list_namespaced_pod(namespace, label_selector=labels).items
    states = []
    for pod in pods:
        for status in pod.status.container_statuses or []:
            waiting = status.state.waiting
            what = (f"waiting ({waiting.reason})" if waiting else "running, not ready" if status.state.running
                    else "terminated")
            states.append(f"{pod.metadata.name} {what}, {status.restart_count} restarts")
    if not states:
        return ("no pod has started (a pod that cannot mount its Secrets waits here: check that the serving "
                "credential and tokens Secrets exist, k8s/base/*.template.yaml)")
    return "; ".join(states)


def roll_out(manifest: dict, *, endpoint: str, who: str, server: str = "seldon", image: str = "petseg:latest",
             namespace: str = "default", stage: bool = False, api_client=None, timeout: float = 600.0,
             **render_options) -> dict:
    """Serve a release at the endpoint: its Deployment Ready first, then the endpoint's Service selects it; or,
    with ``stage`` and a release already serving, it waits Ready beside it for `promote`.

    Returns:
        ``{"kind": "kubernetes", "server", "endpoint", "name", "namespace", "traffic", "candidate", "url"}``:
        ``traffic`` maps release versions to percent; ``candidate`` is a staged release, or "".
    """
    from kubernetes import client

    api_client = api_client or default_api_client()
    deployment = render_deployment(manifest, server=server, endpoint=endpoint, image=image, namespace=namespace,
                                   **render_options)
    apply_deployment(deployment, namespace=namespace, api_client=api_client, timeout=timeout)
    core = client.CoreV1Api(api_client)
    current = read_service(core, endpoint, namespace)
    version = manifest["version"]
    if stage and current is not None and serving_of(current) != version:
        service = _annotated(current, who=who, change="staged", candidate=version)
    else:
        service = switch(current, deployment, endpoint=endpoint, who=who, change="rolled-out")
    applied = _write_service(core, current, service, endpoint, namespace)
    _retire(api_client, applied, endpoint, namespace)
    return _result(applied, server=server, namespace=namespace)


def promote(endpoint: str, *, who: str, namespace: str = "default", api_client=None, timeout: float = 600.0) -> dict:
    """Move the endpoint to its staged release (Ready first); the release before stays Ready for a rollback.

    Raises:
        ConfigError: no Service for the endpoint, or nothing staged.
    """
    api_client = api_client or default_api_client()
    core, current = _endpoint(api_client, endpoint, namespace)
    candidate = candidate_of(current)
    if not candidate:
        raise ConfigError(f"endpoint {endpoint} has no staged release to promote (serving: {serving_of(current)})")
    deployment = _serve(api_client, candidate, namespace, timeout)
    service = switch(current, deployment, endpoint=endpoint, who=who, change="promoted")
    applied = _write_service(core, current, service, endpoint, namespace)
    _retire(api_client, applied, endpoint, namespace)
    return _result(applied, server="", namespace=namespace)


def rollback(endpoint: str, *, who: str, namespace: str = "default", api_client=None,
             timeout: float = 600.0) -> dict:
    """Drop the endpoint's staged release, or without one serve the release before (Ready first) again.

    Raises:
        ConfigError: no Service for the endpoint, or nothing to go back to.
    """
    api_client = api_client or default_api_client()
    core, current = _endpoint(api_client, endpoint, namespace)
    if candidate_of(current):
        service = _annotated(current, who=who, change="rolled-back", candidate="")
    else:
        history = history_of(current)
        if not history:
            raise ConfigError(f"endpoint {endpoint} has no earlier release to roll back to "
                              f"(serving: {serving_of(current)})")
        deployment = _serve(api_client, history[-1], namespace, timeout)
        service = switch(current, deployment, endpoint=endpoint, who=who, change="rolled-back", rollback=True)
    applied = _write_service(core, current, service, endpoint, namespace)
    _retire(api_client, applied, endpoint, namespace)
    return _result(applied, server="", namespace=namespace)


def switch(current: dict | None, deployment: dict, *, endpoint: str, who: str, change: str,
           rollback: bool = False) -> dict:
    """The endpoint's Service once it selects ``deployment``'s pods: the release it served goes onto its history
    (for a ``rollback``, the release rolled back to comes off it instead), and nothing is staged."""
    namespace = deployment["metadata"]["namespace"]
    service = render_service(deployment, endpoint=endpoint, namespace=namespace)
    history = history_of(current) if current is not None else []
    if rollback:
        history = history[:-1]
    elif current is not None and serving_of(current) not in ("", deployment["metadata"]["annotations"][
            "petseg/version"]):
        history = (history + [serving_of(current)])[-HISTORY:]
    service["metadata"]["annotations"]["petseg/history"] = json.dumps(history)
    return _annotated(service, who=who, change=change, candidate="")


def serving_of(service: dict) -> str:
    """The release an endpoint's Service selects."""
    return _annotations(service).get("petseg/version", "")


def candidate_of(service: dict) -> str:
    """The release staged at an endpoint, or ""."""
    return _annotations(service).get("petseg/candidate", "")


def history_of(service: dict) -> list[str]:
    """The releases that served an endpoint before, most recent last."""
    return json.loads(_annotations(service).get("petseg/history") or "[]")


def _annotations(service: dict) -> dict:
    return service.get("metadata", {}).get("annotations") or {}


def _annotated(service: dict, *, who: str, change: str, candidate: str) -> dict:
    """The Service with the change signed in its annotations (who, when) and ``candidate`` staged."""
    service = copy.deepcopy(service)
    when = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    service["metadata"].setdefault("annotations", {}).update({
        "petseg/candidate": candidate, "petseg/changed-by": who, "petseg/changed-at": when,
        f"petseg/{change}-by": who, f"petseg/{change}-at": when})
    return service


def _result(service: dict, *, server: str, namespace: str) -> dict:
    endpoint = service["metadata"]["name"]
    return {"kind": "kubernetes", "server": server, "endpoint": endpoint, "name": endpoint, "namespace": namespace,
            "traffic": {serving_of(service): 100}, "candidate": candidate_of(service),
            "url": f"http://{endpoint}.{namespace}.svc/"}


def read_service(core, endpoint: str, namespace: str) -> dict | None:
    """The endpoint's Service as a dict (the API's field names), or None when there is none."""
    from kubernetes import client

    try:
        return core.api_client.sanitize_for_serialization(core.read_namespaced_service(endpoint, namespace))
    except client.ApiException as err:
        if err.status == 404:
            return None
        raise ServingError(f"could not read Service {namespace}/{endpoint}: {err.status} {_api_reason(err)}") \
            from None


def _endpoint(api_client, endpoint: str, namespace: str):
    from kubernetes import client

    core = client.CoreV1Api(api_client)
    current = read_service(core, check_name(endpoint), namespace)
    if current is None:
        raise ConfigError(f"no Service {namespace}/{endpoint}: nothing serves under that endpoint on this cluster "
                          "(check --namespace)")
    return core, current


def _serve(api_client, version: str, namespace: str, timeout: float) -> dict:
    """The Deployment of ``version``, scaled up if it was scaled to zero, once Ready."""
    from kubernetes import client

    apps = client.AppsV1Api(api_client)
    name = deployment_name(version)
    try:
        found = apps.read_namespaced_deployment(name, namespace)
    except client.ApiException as err:
        if err.status == 404:
            raise ConfigError(f"release {version} has no Deployment {namespace}/{name} any more: roll it out "
                              "again") from None
        raise ServingError(f"could not read Deployment {namespace}/{name}: {err.status} {_api_reason(err)}") \
            from None
    replicas = int((found.metadata.annotations or {}).get("petseg/replicas") or 1)
    if not found.spec.replicas:
        apps.patch_namespaced_deployment_scale(name, namespace, {"spec": {"replicas": replicas}})
    return wait_ready(name, namespace=namespace, api_client=api_client, timeout=timeout)


def _write_service(core, current: dict | None, service: dict, endpoint: str, namespace: str) -> dict:
    from kubernetes import client

    try:
        if current is None:
            written = core.create_namespaced_service(namespace, service)
        else:  # what a change sets, against the version read (a concurrent change is refused, not lost)
            metadata = service["metadata"]
            written = core.patch_namespaced_service(endpoint, namespace, {
                "metadata": {"annotations": metadata["annotations"], "labels": metadata.get("labels") or {},
                             "resourceVersion": current["metadata"]["resourceVersion"]},
                "spec": {"selector": service["spec"]["selector"]}})
    except client.ApiException as err:
        raise ServingError(f"the Kubernetes API refused Service {namespace}/{endpoint}: {err.status} "
                           f"{_api_reason(err)}") from None
    return core.api_client.sanitize_for_serialization(written)


def _retire(api_client, service: dict, endpoint: str, namespace: str) -> None:
    """Keep the endpoint's Deployments a rollback may need: the serving, staged and previous releases' running, older
    ones in the history scaled to zero; delete the rest."""
    from kubernetes import client

    apps = client.AppsV1Api(api_client)
    history = history_of(service)
    running = {label_value(v) for v in (serving_of(service), candidate_of(service), *history[-1:]) if v}
    kept = {label_value(v) for v in history}
    for found in apps.list_namespaced_deployment(namespace, label_selector=f"petseg/endpoint={endpoint}").items:
        version = (found.metadata.labels or {}).get("petseg/version", "")
        if version in running:
            continue
        if version in kept:
            if found.spec.replicas:
                apps.patch_namespaced_deployment_scale(found.metadata.name, namespace, {"spec": {"replicas": 0}})
        else:
            apps.delete_namespaced_deployment(found.metadata.name, namespace)
