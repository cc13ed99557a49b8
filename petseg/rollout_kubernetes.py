"""One Kubernetes object per endpoint: a release rolled out beside the one serving (a canary), then promoted or
rolled back, each change signed in the object's annotations (who, when, what).

The object is named after the endpoint, not the release, so clients keep one address:

- ``SeldonDeployment``: one predictor per release (named after it, `petseg.deploy_kubernetes.deployment_name`)
  with ``traffic`` weights; a canary is a second predictor taking ``canary`` percent, and the
  serving one keeps the rest.
- KServe ``InferenceService``: the candidate's predictor with ``canaryTrafficPercent`` (KServe keeps the
  previous revision serving the rest); without a canary, the new predictor takes all traffic.

`rollout` (after the gate), `promote` (all traffic to the candidate, the old release retired) and
`rollback` (a canary dropped, or the previous release restored) are pure: they take the object as it
is and return it as it should be. What a release replaced goes onto the ``petseg/history``
annotation (the last `HISTORY` predictors), so that consecutive rollbacks walk back one release
each, and no stale predictor or traffic split is left behind. `apply` reads, changes and applies
the object (`petseg.deploy_kubernetes.apply_object`).
"""

from __future__ import annotations

import copy
import datetime
import json

from petseg.deploy_kubernetes import (RESOURCES, apply_object, default_api_client, deployment_name,
                                      render_inference_service, render_seldon_deployment)
from petseg.endpoints import check_name
from petseg.errors import ConfigError, ServingError

HISTORY = 5
"""How many replaced releases an object remembers for rollbacks."""
KINDS = ("SeldonDeployment", "InferenceService")


def rollout(current: dict | None, candidate: dict, *, endpoint: str, canary: int = 0, who: str,
            when: str | None = None) -> dict:
    """The endpoint's object once ``candidate`` (one release's object, from `petseg.deploy_kubernetes`'s
    ``render_*``) is rolled out: with ``canary`` percent of the traffic (1-99), or all of it (0).

    Raises:
        ConfigError: a bad endpoint name or canary, another kind than the endpoint's, or a canary in progress.
    """
    check_name(endpoint)
    if isinstance(canary, bool) or not isinstance(canary, int) or not 0 <= canary < 100:
        raise ConfigError(f"canary {canary!r} is not a share of traffic: expected a percentage from 0 (straight "
                          "replacement) to 99")
    kind = candidate["kind"]
    if current is not None and current["kind"] != kind:
        raise ConfigError(f"endpoint {endpoint} is a {current['kind']}; a {kind} cannot take its place")
    if current is not None and candidate_of(current):
        raise ConfigError(f"endpoint {endpoint} has a canary of {candidate_of(current)} in progress: "
                          f"`petseg promote {endpoint}` or `petseg rollback {endpoint} --kubernetes` first")
    version = candidate["metadata"]["annotations"]["petseg/version"]
    body = _shell(current, candidate, endpoint)
    history = _history(current)
    if kind == "SeldonDeployment":
        new = {**copy.deepcopy(candidate["spec"]["predictors"][0]), "name": deployment_name(version)}
        old = [p for p in (current or {}).get("spec", {}).get("predictors", []) if p.get("traffic", 100)]
        if current is not None and canary:
            body["spec"]["predictors"] = [{**old[0], "traffic": 100 - canary}, {**new, "traffic": canary}]
        else:
            history += old
            body["spec"]["predictors"] = [{**new, "traffic": 100}]
    else:
        if current is not None:
            history.append(current["spec"]["predictor"])
        if current is not None and canary:
            body["spec"]["predictor"]["canaryTrafficPercent"] = canary
    serving = serving_of(current) if current is not None and canary else version
    return _sign(body, history, serving=serving, candidate=version if current is not None and canary else "",
                 change=f"rollout of {version}" + (f", {canary} % canary" if current is not None and canary else ""),
                 who=who, when=when)


def promote(current: dict, *, who: str, when: str | None = None) -> dict:
    """All traffic to the canary; the release it was tried against is retired (onto the history).

    Raises:
        ConfigError: no canary is in progress.
    """
    name, version = current["metadata"]["name"], candidate_of(current)
    if not version:
        raise ConfigError(f"endpoint {name} has no canary to promote (serving: {serving_of(current)})")
    body, history = copy.deepcopy(current), _history(current)
    if body["kind"] == "SeldonDeployment":
        keep = deployment_name(version)
        history += [p for p in body["spec"]["predictors"] if p["name"] != keep]
        body["spec"]["predictors"] = [{**p, "traffic": 100} for p in body["spec"]["predictors"] if p["name"] == keep]
    else:
        body["spec"]["predictor"].pop("canaryTrafficPercent", None)
    return _sign(body, history, serving=version, candidate="", change=f"promote {version}", who=who, when=when,
                 action="promoted")


def rollback(current: dict, *, who: str, when: str | None = None) -> dict:
    """The canary dropped (its release never takes traffic again), or without one the previous release restored.

    Raises:
        ConfigError: nothing to go back to.
    """
    name, body, history = current["metadata"]["name"], copy.deepcopy(current), _history(current)
    canary, serving = candidate_of(current), serving_of(current)
    seldon = body["kind"] == "SeldonDeployment"
    if canary:
        if seldon:
            body["spec"]["predictors"] = [{**p, "traffic": 100} for p in body["spec"]["predictors"]
                                          if p["name"] != deployment_name(canary)]
        else:
            body["spec"]["predictor"] = history.pop()
        target = serving
    elif history:
        previous = history.pop()
        if seldon:
            body["spec"]["predictors"] = [{**previous, "traffic": 100}]
        else:
            body["spec"]["predictor"] = previous
        target = _version_of(previous)
    else:
        raise ConfigError(f"endpoint {name} has no earlier release to roll back to (serving: {serving})")
    return _sign(body, history, serving=target, candidate="", change=f"rollback to {target}", who=who, when=when,
                 action="rolled-back")


def serving_of(body: dict) -> str:
    """The release taking the bulk of the endpoint's traffic."""
    return body["metadata"]["annotations"].get("petseg/serving", "")


def candidate_of(body: dict) -> str:
    """The release of a canary in progress, or ""."""
    return body["metadata"]["annotations"].get("petseg/candidate", "")


def traffic(body: dict) -> dict[str, int]:
    """Release version -> percent of the traffic, as the object asks for it."""
    if body["kind"] == "SeldonDeployment":
        return {_version_of(p): int(p.get("traffic", 100)) for p in body["spec"]["predictors"]}
    canary = body["spec"]["predictor"].get("canaryTrafficPercent")
    if canary is None:
        return {serving_of(body): 100}
    return {serving_of(body): 100 - canary, candidate_of(body): canary}


def _version_of(predictor: dict) -> str:
    return (predictor.get("annotations") or {}).get("petseg/version", "")


def _shell(current: dict | None, candidate: dict, endpoint: str) -> dict:
    """The object to change: the current one, or the candidate's named after the endpoint; an InferenceService
    gets the candidate's predictor, which carries its release's identity (so that a rollback can name it)."""
    if current is not None:
        body = copy.deepcopy(current)
    else:
        body = copy.deepcopy(candidate)
        body["metadata"] = {"name": endpoint, "namespace": candidate["metadata"]["namespace"],
                            "labels": {"app.kubernetes.io/name": "petseg", "petseg/endpoint": endpoint},
                            "annotations": {}}
    if body["kind"] == "SeldonDeployment":
        body["spec"]["name"] = endpoint
    else:
        body["spec"]["predictor"] = {**copy.deepcopy(candidate["spec"]["predictor"]),
                                     "annotations": dict(candidate["metadata"]["annotations"])}
    return body


def _history(body: dict | None) -> list[dict]:
    if body is None:
        return []
    return json.loads(body["metadata"]["annotations"].get("petseg/history") or "[]")


def _sign(body: dict, history: list[dict], *, serving: str, candidate: str, change: str, who: str,
          when: str | None, action: str = "rolled-out") -> dict:
    """Record the change in the object's annotations: what serves, the canary, the history, who and when."""
    when = when or datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    body["metadata"]["annotations"].update({
        "petseg/serving": serving, "petseg/candidate": candidate,
        "petseg/history": json.dumps(history[-HISTORY:], sort_keys=True, separators=(",", ":")),
        "petseg/change": change, "petseg/changed-by": who, "petseg/changed-at": when,
        f"petseg/{action}-by": who, f"petseg/{action}-at": when})
    body["metadata"].pop("resourceVersion", None)
    return body


def apply(endpoint: str, change, *, namespace: str, kind: str = "SeldonDeployment", api_client=None,
          timeout: float = 600.0, poll_interval: float = 2.0) -> dict:
    """Read the endpoint's object, ``change`` it (a function of the object, or None when there is none), apply
    the result and wait until it is ready; the object as the API server returned it.

    Raises:
        ConfigError: a bad name or kind, or what ``change`` refuses.
        ServingError: the API refused it, or it was not ready in time.
    """
    from kubernetes import client

    check_name(endpoint)
    if kind not in KINDS:
        raise ConfigError(f"kind {kind!r} has no canary here: expected one of {', '.join(KINDS)}")
    api_client = api_client or default_api_client()
    group, version, plural = RESOURCES[kind]
    try:
        current = client.CustomObjectsApi(api_client).get_namespaced_custom_object(group, version, namespace, plural,
                                                                                  endpoint)
    except client.ApiException as err:
        if err.status != 404:
            raise ServingError(f"could not read {kind} {namespace}/{endpoint}: {err.status} {err.reason}") from None
        current = None
    return apply_object(change(current), namespace=namespace, api_client=api_client, timeout=timeout,
                        poll_interval=poll_interval)


def roll_out(manifest: dict, *, endpoint: str, who: str, canary: int = 0, server: str = "seldon",
             image: str = "petseg:latest", namespace: str = "default", api_client=None, timeout: float = 600.0,
             **render_options) -> dict:
    """Roll a release out to the endpoint's object (`rollout`) and wait until it serves; what the flow records.

    Args:
        manifest: The release manifest.
        endpoint: The endpoint: the object's name.
        who: Who rolls it out (the annotations record it).
        canary: Percent of the traffic the release takes beside the serving one (0: all of it).
        server: ``seldon`` (a SeldonDeployment) or ``mlserver`` (a KServe InferenceService).
        image: Container image (see Dockerfile).
        namespace: Kubernetes namespace.
        **render_options: More arguments of `petseg.deploy_kubernetes.render_seldon_deployment` or
            ``render_inference_service`` (model_uri, replicas, s3_endpoint_url, secrets, ...).

    Returns:
        ``{"kind": "kubernetes", "server", "endpoint", "name", "namespace", "traffic", "url"}``: ``traffic``
        maps release versions to percent; ``url`` is KServe's address, or Seldon's route through the ingress.
    """
    if server not in ("seldon", "mlserver"):
        raise ConfigError(f"server {server!r} is unknown: expected seldon or mlserver")
    render = render_seldon_deployment if server == "seldon" else render_inference_service
    candidate = render(manifest, image=image, namespace=namespace, **render_options)
    applied = apply(endpoint, lambda current: rollout(current, candidate, endpoint=endpoint, canary=canary, who=who),
                    namespace=namespace, kind=candidate["kind"], api_client=api_client, timeout=timeout)
    url = ((applied.get("status") or {}).get("address") or {}).get("url") if server == "mlserver" else None
    return {"kind": "kubernetes", "server": server, "endpoint": endpoint, "name": endpoint, "namespace": namespace,
            "traffic": traffic(applied), "url": url or f"/seldon/{namespace}/{endpoint}/api/v1.0/predictions"}
