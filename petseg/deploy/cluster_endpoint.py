"""An endpoint's record on a cluster: the release its Service serves, and the releases the gate accepted for it.

On Kubernetes every pod starts with an empty state directory, so an endpoint's record
(`petseg.deploy.endpoints` on one machine) lives in the cluster, beside what serves:

- the release serving is the one the endpoint's ``Service`` selects (`petseg.deploy.deployment`),
  read from its annotations (version and release location), or for an operator's object
  (`petseg.deploy.rollout`) the release its ``petseg/serving`` annotation names;
- every release the gate accepted for the endpoint is in its ``ConfigMap`` ``petseg-endpoint-<name>``
  (key ``releases.json``, oldest first, `petseg.deploy.endpoints.entry` each).

A run's evaluate step reads the champion here (`champion`: what serves, else the latest accepted,
else None) and its release step records an accepted release (`accept`), with the service
accounts of ``k8s/base/rbac.yaml`` (a step pod may only read the two objects).
"""

from __future__ import annotations

import json

from petseg.deploy.endpoints import check_name, entry
from petseg.errors import ConfigError, ServingError

KEY = "releases.json"


def record_name(endpoint: str) -> str:
    """The name of the endpoint's ConfigMap of accepted releases."""
    return f"petseg-endpoint-{check_name(endpoint)}"


def serving(endpoint: str, *, namespace: str, api_client=None) -> dict | None:
    """The release the endpoint's Service selects (``version``, ``location``), or None when there is no Service.

    Raises:
        ServingError: the Service could not be read, or names no release.
    """
    from kubernetes import client

    from petseg.deploy import deployment
    from petseg.deploy.kubernetes import default_api_client

    core = client.CoreV1Api(api_client or default_api_client())
    service = deployment.read_service(core, check_name(endpoint), namespace)
    if service is None:
        return None
    annotations = service["metadata"].get("annotations") or {}
    if not deployment.serving_of(service) or not annotations.get("petseg/model-uri"):
        raise ServingError(f"Service {namespace}/{endpoint} names no release (annotations petseg/version and "
                           "petseg/model-uri): it was not made by petseg; delete it or choose another --endpoint")
    return {"version": deployment.serving_of(service), "location": annotations["petseg/model-uri"],
            "run": annotations.get("petseg/pathspec", ""),
            "model_fingerprint": annotations.get("petseg/model-fingerprint", "")}


def accepted(endpoint: str, *, namespace: str, api_client=None) -> list[dict]:
    """Every release accepted for the endpoint, oldest first ([] when none was).

    Raises:
        ServingError: the ConfigMap could not be read, or does not hold a list of releases.
    """
    found = _read(lambda core: core.read_namespaced_config_map(record_name(endpoint), namespace),
                  f"ConfigMap {namespace}/{record_name(endpoint)}", api_client)
    return _releases(found, namespace, endpoint) if found is not None else []


def champion(endpoint: str, *, namespace: str, kind: str = "Service", api_client=None) -> dict | None:
    """The release a candidate for the endpoint is compared with: the one serving, else the latest accepted.

    ``kind`` is the endpoint's object: its ``Service`` (a plain Deployment per release), or an operator's
    (``SeldonDeployment``, ``InferenceService``, ``Experiment``), whose serving release is looked up among
    the accepted ones.
    """
    releases = accepted(endpoint, namespace=namespace, api_client=api_client)
    if kind == "Service":
        current = serving(endpoint, namespace=namespace, api_client=api_client)
    else:
        version = _operator_serving(endpoint, kind, namespace, api_client)
        current = next((r for r in reversed(releases) if r["version"] == version), None)
    return current or (releases[-1] if releases else None)


def _operator_serving(endpoint: str, kind: str, namespace: str, api_client) -> str:
    """The release an operator's object of the endpoint serves ("" when there is no object)."""
    from kubernetes import client

    from petseg.deploy.kubernetes import RESOURCES, _api_reason, default_api_client

    group, version, plural = RESOURCES[kind]
    api = client.CustomObjectsApi(api_client or default_api_client())
    try:
        body = api.get_namespaced_custom_object(group, version, namespace, plural, check_name(endpoint))
    except client.ApiException as err:
        if err.status == 404:
            return ""
        raise ServingError(f"could not read {kind} {namespace}/{endpoint}: {err.status} {_api_reason(err)}") \
            from None
    return (body.get("metadata", {}).get("annotations") or {}).get("petseg/serving", "")


def accept(endpoint: str, manifest: dict, *, namespace: str, api_client=None) -> list[dict]:
    """Record a release the gate accepted for the endpoint in its ConfigMap; the releases recorded.

    Raises:
        ServingError: the API refused the change.
    """
    from kubernetes import client

    from petseg.deploy.kubernetes import _api_reason, default_api_client

    core = client.CoreV1Api(api_client or default_api_client())
    name = record_name(endpoint)
    for _ in range(5):  # another run may record at the same time: read again and retry
        current = _read(lambda c: c.read_namespaced_config_map(name, namespace), f"ConfigMap {namespace}/{name}",
                        api_client, core=core)
        releases = (_releases(current, namespace, endpoint) if current is not None else []) + [entry(manifest)]
        body = {"apiVersion": "v1", "kind": "ConfigMap",
                "metadata": {"name": name, "namespace": namespace,
                             "labels": {"app.kubernetes.io/name": "petseg", "petseg/endpoint": endpoint}},
                "data": {KEY: json.dumps(releases, indent=1, sort_keys=True)}}
        try:
            if current is None:
                core.create_namespaced_config_map(namespace, body)
            else:
                body["metadata"]["resourceVersion"] = current.metadata.resource_version
                core.replace_namespaced_config_map(name, namespace, body)
            return releases
        except client.ApiException as err:
            if err.status != 409:
                raise ServingError(f"the Kubernetes API refused ConfigMap {namespace}/{name}: {err.status} "
                                   f"{_api_reason(err)}") from None
    raise ServingError(f"ConfigMap {namespace}/{name} kept changing while a release was recorded: try again")


def _read(get, where: str, api_client, core=None):
    """An object, or None where the API answers 404."""
    from kubernetes import client

    from petseg.deploy.kubernetes import _api_reason, default_api_client

    try:
        return get(core or client.CoreV1Api(api_client or default_api_client()))
    except client.ApiException as err:
        if err.status == 404:
            return None
        raise ServingError(f"could not read {where}: {err.status} {_api_reason(err)}") from None


def _releases(config_map, namespace: str, endpoint: str) -> list[dict]:
    where = f"ConfigMap {namespace}/{record_name(endpoint)}"
    try:
        releases = json.loads((config_map.data or {}).get(KEY, "[]"))
    except ValueError as err:
        raise ConfigError(f"{where} key {KEY} is not JSON ({err}); delete it to start the endpoint's record "
                          "afresh") from None
    if not isinstance(releases, list) or not all(isinstance(r, dict) and r.get("version") for r in releases):
        raise ConfigError(f"{where} key {KEY} is not a list of releases with versions; delete it to start afresh")
    return releases
