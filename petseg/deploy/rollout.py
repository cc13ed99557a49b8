"""One Kubernetes object per endpoint: a release rolled out beside the one serving (a canary), then promoted or
rolled back, each change signed in the object's annotations (who, when, what).

The object is named after the endpoint, not the release, so clients keep one address:

- ``SeldonDeployment``: one predictor per release (named after it, `petseg.deploy.kubernetes.deployment_name`)
  with ``traffic`` weights; a canary is a second predictor taking ``canary`` percent, and the
  serving one keeps the rest.
- KServe ``InferenceService``: the candidate's predictor with ``canaryTrafficPercent`` (KServe keeps the
  previous revision serving the rest); without a canary, the new predictor takes all traffic.
- Seldon Core v2 ``Experiment``: routes between the releases' own ``Model`` objects (one per release,
  `petseg.deploy.kubernetes.render_seldon_model`, named as `deployment_name`, whose model settings `roll_out`
  writes into the folder its ``storageUri`` names before applying it): its ``candidates`` are the
  serving release's Model and, during a canary, the candidate's with ``weight`` = ``canary``. Clients call
  the Experiment itself (header ``seldon-model: <endpoint>.experiment``); it sets no ``default``, which
  would split the traffic of one release's Model name and leave that name routed to the release once a
  promote or rollback moved on.

`rollout` (after the gate), `promote` (all traffic to the candidate, the old release retired) and
`rollback` (a canary dropped, or the previous release restored) are pure: they take the object as it
is and return it as it should be. What a release replaced goes onto the ``petseg/history``
annotation (the last `HISTORY` predictors), so that consecutive rollbacks walk back one release
each, and no stale predictor or traffic split is left behind. `apply` reads, changes and applies
the object (`petseg.deploy.kubernetes.apply_object`).
"""

from __future__ import annotations

import copy
import datetime
import json

from petseg import servers
from petseg.deploy.endpoints import check_name
from petseg.deploy.kubernetes import (RESOURCES, apply_object, default_api_client, deployment_name,
                                      render_inference_service, render_seldon_deployment, render_seldon_model,
                                      write_model_settings)
from petseg.errors import ConfigError, ServingError

HISTORY = 5
"""How many replaced releases an object remembers for rollbacks."""
KINDS = servers.KINDS
SERVERS = {name: server.kind for name, server in servers.SERVERS.items()}
"""``server`` of `roll_out` -> the kind of the endpoint's object (`petseg.servers`)."""
MODEL_OPTIONS = ("model_uri", "replicas", "memory")
"""What a Seldon Core v2 Model of a release takes (`petseg.deploy.kubernetes.render_seldon_model`): it has no pod of
its own, so what a pod takes is its Server's (`petseg.deploy.kubernetes.render_seldon_server`)."""


def rollout(current: dict | None, candidate: dict, *, endpoint: str, canary: int = 0, who: str,
            when: str | None = None) -> dict:
    """The endpoint's object once ``candidate`` (one release's object, from `petseg.deploy.kubernetes`'s
    ``render_*``; a ``Model`` for an ``Experiment``) is rolled out: with ``canary`` percent of the traffic
    (1-99), or all of it (0).

    Raises:
        ConfigError: a bad endpoint name or canary, another kind than the endpoint's, or a canary in progress.
    """
    check_name(endpoint)
    if isinstance(canary, bool) or not isinstance(canary, int) or not 0 <= canary < 100:
        raise ConfigError(f"canary {canary!r} is not a share of traffic: expected a percentage from 0 (straight "
                          "replacement) to 99")
    kind = "Experiment" if candidate["kind"] == "Model" else candidate["kind"]
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
    elif kind == "Experiment":
        new = candidate["metadata"]["name"]
        if current is not None and canary:
            body["spec"]["candidates"] = [{"name": deployment_name(serving_of(current)), "weight": 100 - canary},
                                          {"name": new, "weight": canary}]
        else:
            history += _serving_models(current)
            body["spec"]["candidates"] = [{"name": new, "weight": 100}]
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
    elif body["kind"] == "Experiment":
        history += _serving_models(current)
        body["spec"]["candidates"] = [{"name": deployment_name(version), "weight": 100}]
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
    seldon, experiment = body["kind"] == "SeldonDeployment", body["kind"] == "Experiment"
    if canary:
        if seldon:
            body["spec"]["predictors"] = [{**p, "traffic": 100} for p in body["spec"]["predictors"]
                                          if p["name"] != deployment_name(canary)]
        elif experiment:
            body["spec"]["candidates"] = [{"name": deployment_name(serving), "weight": 100}]
        else:
            body["spec"]["predictor"] = history.pop()
        target = serving
    elif history:
        previous = history.pop()
        if seldon:
            body["spec"]["predictors"] = [{**previous, "traffic": 100}]
        elif experiment:
            body["spec"]["candidates"] = [{"name": previous["model"], "weight": 100}]
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
    if body["kind"] == "Experiment":
        versions = {deployment_name(v): v for v in (serving_of(body), candidate_of(body)) if v}
        return {versions[c["name"]]: int(c["weight"]) for c in body["spec"]["candidates"]}
    canary = body["spec"]["predictor"].get("canaryTrafficPercent")
    if canary is None:
        return {serving_of(body): 100}
    return {serving_of(body): 100 - canary, candidate_of(body): canary}


def _version_of(predictor: dict) -> str:
    """The release of a predictor, or of an Experiment's history entry (`_serving_models`)."""
    return predictor.get("version") or (predictor.get("annotations") or {}).get("petseg/version", "")


def _serving_models(current: dict | None) -> list[dict]:
    """An Experiment's serving release as its history keeps it: a candidate names only a Model, so the entry
    also names the release, which a rollback restores and reports."""
    if current is None:
        return []
    return [{"model": deployment_name(serving_of(current)), "version": serving_of(current)}]


def _shell(current: dict | None, candidate: dict, endpoint: str) -> dict:
    """The object to change: the current one, or the candidate's named after the endpoint (for a Model, a new
    Experiment); an InferenceService gets the candidate's predictor, which carries its release's identity
    (so that a rollback can name it)."""
    if current is not None:
        body = copy.deepcopy(current)
    elif candidate["kind"] == "Model":
        body = {"apiVersion": candidate["apiVersion"], "kind": "Experiment",
                "metadata": _endpoint_metadata(candidate, endpoint), "spec": {"candidates": []}}
    else:
        body = copy.deepcopy(candidate)
        body["metadata"] = _endpoint_metadata(candidate, endpoint)
    if body["kind"] == "SeldonDeployment":
        body["spec"]["name"] = endpoint
    elif body["kind"] == "InferenceService":
        body["spec"]["predictor"] = {**copy.deepcopy(candidate["spec"]["predictor"]),
                                     "annotations": dict(candidate["metadata"]["annotations"])}
    return body


def _endpoint_metadata(candidate: dict, endpoint: str) -> dict:
    return {"name": endpoint, "namespace": candidate["metadata"]["namespace"],
            "labels": {"app.kubernetes.io/name": "petseg", "petseg/endpoint": endpoint}, "annotations": {}}


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
        server: ``seldon`` (a SeldonDeployment), ``mlserver`` (a KServe InferenceService) or ``seldon-v2`` (the
            release's Seldon Core v2 Model, its model settings written where its ``storageUri`` points, applied
            and ready first, then the endpoint's Experiment; the Server of the petseg image,
            `petseg.deploy.kubernetes.render_seldon_server`, is already there).
        image: Container image (see Dockerfile); a Seldon Core v2 Model runs on its Server's.
        namespace: Kubernetes namespace.
        **render_options: More arguments of `petseg.deploy.kubernetes.render_seldon_deployment`,
            ``render_inference_service`` (model_uri, replicas, s3_endpoint_url, secrets, ...) or, for
            ``seldon-v2``, `MODEL_OPTIONS` and ``s3_endpoint_url`` (where the model settings are written);
            ``secrets`` are then the Server's, which holds the serving credential, and go unused.

    Raises:
        ConfigError: A value the object cannot use (for ``seldon-v2``, an option only a pod takes).
        StorageError: The model settings could not be written.
        ServingError: The API refused the object, or it was not ready in time.

    Returns:
        ``{"kind": "kubernetes", "server", "endpoint", "name", "namespace", "traffic", "url"}``: ``traffic``
        maps release versions to percent; ``url`` is KServe's address, Seldon's route through the ingress, or
        for Seldon Core v2 the Open Inference Protocol path, which requests pair with the header in ``headers``.
    """
    servers.get(server)
    if server == "seldon-v2":
        candidate = _seldon_model(manifest, namespace=namespace, **render_options)
        # The Experiment is refused by Seldon until its candidates exist: the release's Model loads first.
        apply_object(candidate, namespace=namespace, api_client=api_client, timeout=timeout)
    else:
        render = render_seldon_deployment if server == "seldon" else render_inference_service
        candidate = render(manifest, image=image, namespace=namespace, **render_options)
    applied = apply(endpoint, lambda current: rollout(current, candidate, endpoint=endpoint, canary=canary, who=who),
                    namespace=namespace, kind=SERVERS[server], api_client=api_client, timeout=timeout)
    result = {"kind": "kubernetes", "server": server, "endpoint": endpoint, "name": endpoint, "namespace": namespace,
              "traffic": traffic(applied)}
    if server == "seldon-v2":
        return {**result, "url": f"/v2/models/{endpoint}/infer", "headers": {"seldon-model": f"{endpoint}.experiment"}}
    url = ((applied.get("status") or {}).get("address") or {}).get("url") if server == "mlserver" else None
    return {**result, "url": url or f"/seldon/{namespace}/{endpoint}/api/v1.0/predictions"}


def _seldon_model(manifest: dict, *, namespace: str, s3_endpoint_url: str | None = None,
                  secrets: list[str] | tuple[str, ...] = (), **options) -> dict:
    """The release's Model, once the model settings its ``storageUri`` names are written (its Server's agent copies
    them before MLServer loads it); ``secrets``, which the flow passes for every server, are the Server's."""
    unusable = sorted(set(options) - set(MODEL_OPTIONS))
    if unusable:
        raise ConfigError(f"a Seldon Core v2 Model cannot take {', '.join(unusable)}: it runs in its Server's pod, "
                          "so set that on the Server (petseg.deploy.kubernetes.render_seldon_server) and give the "
                          f"Model only {', '.join(MODEL_OPTIONS)}")
    candidate = render_seldon_model(manifest, namespace=namespace, **options)
    write_model_settings(manifest, model_uri=options.get("model_uri"), s3_endpoint_url=s3_endpoint_url)
    return candidate
