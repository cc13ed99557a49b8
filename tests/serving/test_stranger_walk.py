"""Every route of both servers and of an endpoint's front, walked as a stranger and with each role's token.

The routes are the frameworks' own: the Flask apps the Seldon wrapper builds
(``seldon_core.wrapper.get_rest_microservice`` and its metrics app) and the
FastAPI apps MLServer builds (``mlserver.rest.app.create_app`` and its metrics
server), made here by the same code the server processes run, so a route a
later version adds is walked too. The servers are the session's real processes
(conftest.py); each front is a real ``petseg.entrypoints.endpoint_proxy``
process whose endpoint record points at one of them.

A stranger (no token) gets 401, 403, 404 or 405 from every route and method,
never 200 or 500, except from the open ones (health, readiness, the Open
Inference Protocol's model metadata); a refusal carries no provenance. With
the token of its role, each route petseg serves answers.
"""

import json
import subprocess
import sys
import time

import numpy as np
import pytest
import requests
from serving_support import b64, bearer, encode, random_image, record

from petseg.deploy import endpoints, local
from petseg.serving import routes

MODEL = "petseg"
FRONT = "petseg.entrypoints.endpoint_proxy"
PROBES = {"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"}
FILLS = {"{model_name}": MODEL, "{model_version}": "1", "<path:filename>": "some/file.txt"}
UNKNOWN = ["/nope", "/explain", "/api/v1.0/explain", "/api/v1.0/transform-input", "/metrics", "/v2/nope",
           f"/v2/models/{MODEL}/explain", f"/v2/models/{MODEL}/infer/", "//v2/health/live", "/health/status/"]
ROLE_IDENTITY = {routes.PREDICT: "viewer", routes.FEEDBACK: "tester", routes.OPERATOR: "ops"}


def _flask_routes(app) -> dict[str, set[str]]:
    found: dict[str, set[str]] = {}
    for rule in app.url_map.iter_rules():
        found.setdefault(rule.rule, set()).update(rule.methods)
    return found


def _starlette_routes(app) -> dict[str, set[str]]:
    return {route.path: set(getattr(route, "methods", None) or {"GET", "HEAD"}) for route in app.routes}


def registered(protocol: str) -> dict[str, dict[str, set[str]]]:
    """The routes each port of a server registers, by template, with their methods: ``rest`` and ``metrics``."""
    if protocol == "seldon":
        from seldon_core import wrapper

        return {"rest": _flask_routes(wrapper.get_rest_microservice(object(), None)),
                "metrics": _flask_routes(wrapper.get_metrics_microservice(None))}
    from mlserver.metrics.server import MetricsServer
    from mlserver.rest.app import create_app
    from mlserver.settings import Settings

    rest = _starlette_routes(create_app(Settings(), data_plane=None, model_repository_handlers=None))
    rest[routes.V2_FEEDBACK] = {"POST"}  # the edge's own route
    return {"rest": rest, "metrics": _starlette_routes(MetricsServer(Settings())._app)}


def _path(template: str) -> str:
    for variable, value in FILLS.items():
        template = template.replace(variable, value)
    return template


def _tables(protocol: str) -> dict[str, dict]:
    return {"rest": routes.SELDON if protocol == "seldon" else routes.V2, "metrics": {"/metrics": routes.METRICS_ROLE}}


def _send(method: str, url: str, **options) -> requests.Response:
    body = {"json": {"inputs": []}} if method in ("POST", "PUT", "PATCH") else {}
    return requests.request(method, url, timeout=120, **{**body, **options})


@pytest.fixture(scope="module")
def fronts(server, mlserver, manifest, tokens_file):
    """An endpoint front process in front of each server: protocol -> its url."""
    started, urls = [], {}
    try:
        for protocol, deployment in (("seldon", server), ("v2", mlserver)):
            name = f"walk-{protocol}"
            serving = {**endpoints.entry(manifest), "since": endpoints.now(), "deployment": record(deployment)}
            endpoints.switch(name, serving, front=None)
            port = local.free_ports(1)[0]
            started.append(subprocess.Popen([sys.executable, "-m", FRONT, name, str(port)],
                                            env=local.child_environment()))
            urls[protocol] = f"http://127.0.0.1:{port}"
        for url in urls.values():
            _wait_for(url + "/health/ping" if url == urls["seldon"] else url + "/v2/health/live")
        yield urls
    finally:
        for process in started:
            process.terminate()
            process.wait(timeout=30)


def _wait_for(url: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if requests.get(url, timeout=5).status_code == 200:
                return
        except requests.RequestException:
            pass
        assert time.monotonic() < deadline, f"{url} did not answer"
        time.sleep(0.2)


def _targets(protocol, server, mlserver, fronts) -> dict[str, str]:
    deployment = server if protocol == "seldon" else mlserver
    return {"rest": deployment["url"], "metrics": f"http://127.0.0.1:{deployment['metrics_port']}",
            "front": fronts[protocol]}


# -- as a stranger ----------------------------------------------------------------------------------


@pytest.mark.parametrize("protocol", ["seldon", "v2"])
def test_a_stranger_gets_401_403_404_or_405_from_every_route_but_the_open_ones(server, mlserver, fronts, protocol,
                                                                               manifest):
    targets, tables, found = _targets(protocol, server, mlserver, fronts), _tables(protocol), registered(protocol)
    # Every route petseg serves is one its framework registers: the tables name no route that is not there.
    assert set(tables["rest"]) <= set(found["rest"]) and set(tables["metrics"]) <= set(found["metrics"])
    walks = [("rest", "rest"), ("metrics", "metrics"), ("front", "rest")]
    answers = []
    for target, port in walks:
        for template, methods in sorted(found[port].items()):
            served = methods - {"OPTIONS"}
            for method in sorted(PROBES | methods):
                response = _send(method, targets[target] + _path(template))
                is_open = tables[port].get(template, "closed") is routes.OPEN and method in served
                answers.append((target, method, template, response.status_code))
                if is_open:
                    # 404: a model version that is not there (MLServer's own answer)
                    assert response.status_code in (200, 404), (target, method, template, response.text[:300])
                    continue
                assert response.status_code in (401, 403, 404, 405), (target, method, template, response.text[:300])
                _refusal_says_nothing_more(response, manifest, method)
        # http.server folds a path's leading slashes into one: through the front "//v2/health/live" is health.
        for path in (path for path in UNKNOWN if path not in tables[port] and not (target == "front" and
                                                                                  path.startswith("//"))):
            for method in ("GET", "POST"):
                response = _send(method, targets[target] + path)
                assert response.status_code in ((401, 404) if target == "front" else (404,)), (target, method, path)
                _refusal_says_nothing_more(response, manifest, method)
    # Not vacuous: every kind of refusal was met, and the routes the wrapper added that petseg does not serve
    # answer 404 whoever asks.
    assert {status for *_, status in answers} >= {200, 401, 404, 405}
    unserved = [(t, m, p, s) for t, m, p, s in answers if t == "rest" and p not in tables["rest"]]
    assert unserved and all(status == 404 for *_, status in unserved), unserved


def _refusal_says_nothing_more(response: requests.Response, manifest: dict, method: str) -> None:
    """A refusal is a JSON error without provenance; a 405 names the methods the route takes."""
    assert manifest["model_fingerprint"] not in response.text and manifest["version"] not in response.text
    assert "tags" not in response.text and "Traceback" not in response.text
    if response.status_code == 405:
        assert response.headers.get("Allow"), response.headers
    if method != "HEAD":
        assert isinstance(response.json(), dict)
        assert response.status_code != 401 or "bearer token" in response.text


@pytest.mark.parametrize("protocol", ["seldon", "v2"])
def test_the_endpoint_status_needs_a_predict_token(fronts, protocol):
    url = fronts[protocol] + endpoints.STATUS_PATH
    assert requests.get(url, timeout=30).status_code == 401
    assert requests.get(url, headers=bearer("quota"), timeout=30).status_code == 403
    answer = requests.get(url, headers=bearer("viewer"), timeout=30)
    assert answer.status_code == 200 and answer.json()["name"] == f"walk-{protocol}"


# -- with a token -----------------------------------------------------------------------------------


def _feedback_message(seed: int) -> dict:
    trimap = np.full((8, 8), 2, np.uint8)
    trimap[2:6, 2:6] = 1
    return {"request": {"binData": b64(encode(random_image(8, 8, seed), "PNG"))},
            "truth": {"binData": b64(encode(trimap, "PNG"))}, "reward": 1.0}


def _request(protocol: str, template: str, method: str, seed: int) -> dict:
    """What a client of the route sends (the ``requests`` options), for routes that take a body or query."""
    role = (routes.SELDON if protocol == "seldon" else routes.V2)[template]
    if protocol == "seldon" and role in (routes.PREDICT, routes.FEEDBACK) and "metadata" not in template:
        message = ({"data": {"ndarray": random_image(4, 4, seed).tolist()}} if role == routes.PREDICT
                   else _feedback_message(seed))
        return {"params": {"json": json.dumps(message)}} if method == "GET" else {"json": message}
    if template.endswith("/infer"):
        return {"json": {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1],
                                     "data": [b64(encode(random_image(8, 8, seed), "PNG"))]}]}}
    if template == routes.V2_FEEDBACK:
        return {"json": _feedback_message(seed)}
    return {"json": {}} if method == "POST" else {}


@pytest.mark.parametrize("through", ["server", "front"])
@pytest.mark.parametrize("protocol", ["seldon", "v2"])
def test_with_the_token_of_its_role_every_served_route_answers(server, mlserver, fronts, protocol, through):
    targets, table = _targets(protocol, server, mlserver, fronts), _tables(protocol)["rest"]
    url = targets["front" if through == "front" else "rest"]
    found = registered(protocol)["rest"]
    seed = 5000 + 100 * (protocol == "v2") + 50 * (through == "front")
    for template, role in sorted(table.items(), key=lambda item: item[0]):
        if template.endswith(("/load", "/unload")):
            continue  # below, on the server itself: it takes the model away and back
        for method in sorted(found[template] - {"OPTIONS", "HEAD"}):
            seed += 1
            headers = bearer(ROLE_IDENTITY[role]) if role else {}
            response = requests.request(method, url + _path(template), headers=headers, timeout=120,
                                        **_request(protocol, template, method, seed))
            # A version route names version 1, which the release's model settings do not have: MLServer's 404.
            expected = 404 if "{model_version}" in template else 200
            assert response.status_code == expected, (through, method, template, response.text[:300])
            if role and role != routes.PREDICT:  # the predict token alone is not enough
                other = requests.request(method, url + _path(template), headers=bearer("viewer"), timeout=120,
                                         **_request(protocol, template, method, seed))
                assert other.status_code == 403, (through, method, template, other.text[:300])
    metrics = requests.get(targets["metrics"] + "/metrics", headers=bearer("ops"), timeout=60)
    assert metrics.status_code == 200 and "# TYPE" in metrics.text
    assert requests.get(targets["metrics"] + "/metrics", headers=bearer("viewer"), timeout=60).status_code == 403


def test_an_operator_unloads_and_loads_the_model_and_the_server_serves_again(mlserver):
    for step in ("unload", "load"):
        response = requests.post(f"{mlserver['url']}/v2/repository/models/{MODEL}/{step}", headers=bearer("ops"),
                                 timeout=300)
        assert response.status_code == 200, (step, response.text[:300])
    assert requests.get(f"{mlserver['url']}/v2/models/{MODEL}/ready", timeout=30).status_code == 200
    answer = requests.post(f"{mlserver['url']}/v2/models/{MODEL}/infer", headers=bearer(), timeout=120,
                           **_request("v2", "/v2/models/{model_name}/infer", "POST", 1))
    assert answer.status_code == 200, answer.text[:300]
