"""Which route is served to whom (petseg.serving.routes), and bodies refused before their JSON is decoded."""

import json

import flask
import numpy as np
import pytest

from petseg.serving import messages, routes, seldon_http, v2_binary
from petseg.serving.messages import BadRequest, Limits
from petseg.tokens import AccessDenied, Token, TokenTable

LIMITS = Limits(max_bytes=2**24, max_list_pixels=64 * 64)
TABLE = TokenTable([Token("ana", "a" * 40, frozenset({"predict"}))], source="test")


def test_a_served_route_is_found_by_its_template_and_others_are_404_or_405():
    registered = {"/v2/models/{model_name}/infer": {"POST", "OPTIONS"}, "/v2/models/{model_name}/generate": {"POST"},
                  "/v2/health/live": {"GET"}}
    assert routes.decide("/v2/models/petseg/infer", "POST", routes.V2, registered) == "/v2/models/{model_name}/infer"
    cases = [("/v2/models/petseg/infer", "GET", 405, "POST"), ("/v2/models/petseg/infer", "OPTIONS", 405, "POST"),
             ("/v2/models/petseg/generate", "POST", 404, ""),  # registered, not served
             ("/v2/models/a/b/infer", "POST", 404, ""), ("/v2/models/petseg/infer/", "POST", 404, ""),
             ("/v2/models/petseg/feedback", "POST", 404, "")]  # served, not registered
    for path, method, status, allowed in cases:
        with pytest.raises(routes.NotServed) as refused:
            routes.decide(path, method, routes.V2, registered)
        assert (refused.value.status, refused.value.allowed) == (status, allowed), (path, method)


def test_open_routes_are_health_readiness_and_model_metadata_only():
    for path in ("/health/ping", "/health/status", "/v2/health/ready", "/v2/models/petseg", "/v2/models/petseg/ready"):
        assert routes.is_open(path), path
    for path in ("/api/v1.0/predictions", "/metadata", "/v2", "/v2/models/petseg/infer", "/v2/repository/index",
                 "/petseg/endpoint", "//health/ping", "/health/ping/x"):
        assert not routes.is_open(path), path


def test_a_server_without_tokens_serves_predictions_only():
    assert routes.authorize(None, None, role=routes.PREDICT) is None
    assert routes.authorize(TABLE, None, role=routes.OPEN) is None
    for role in (routes.FEEDBACK, routes.OPERATOR):
        with pytest.raises(AccessDenied, match="this server has none") as denied:
            routes.authorize(None, "Bearer " + "a" * 40, role=role)
        assert denied.value.status == 401
    assert routes.authorize(TABLE, "Bearer " + "a" * 40, role=routes.PREDICT) == "ana"
    with pytest.raises(AccessDenied) as denied:
        routes.authorize(TABLE, "Bearer " + "a" * 40, role=routes.OPERATOR)
    assert denied.value.status == 403


def _ndarray(side: int) -> bytes:
    return json.dumps({"data": {"ndarray": np.zeros((side, side, 3), int).tolist()}}).encode()


def test_a_body_of_more_numbers_than_the_list_limit_is_refused_from_its_bytes():
    messages.check_list_size(_ndarray(64), limits=LIMITS)  # the largest list admitted
    messages.check_list_size(json.dumps({"binData": "A" * 2**20}), limits=LIMITS)  # base64 has no commas
    for body in (_ndarray(90), "json=" + "0%2C" * 20_000):
        with pytest.raises(BadRequest) as refused:
            messages.check_list_size(body, limits=LIMITS)
        assert refused.value.status == 413 and "binData" in str(refused.value)
    messages.check_list_size(_ndarray(90), limits=LIMITS, lists=2)  # feedback: image and truth


def test_the_seldon_edge_refuses_a_large_ndarray_before_decoding_it(monkeypatch):
    def no_decoding(*args, **kwargs):
        raise AssertionError("the JSON was decoded")

    monkeypatch.setattr(flask.Request, "get_json", no_decoding)
    monkeypatch.setattr(seldon_http.json, "loads", no_decoding)
    app = flask.Flask("test")
    for options in ({"data": _ndarray(200), "content_type": "application/json"},
                    {"data": {"json": _ndarray(200).decode()}}):
        with app.test_request_context("/api/v1.0/predictions", method="POST", **options):
            with pytest.raises(BadRequest, match="values in lists of numbers") as refused:
                seldon_http.read_message(flask.request, limits=LIMITS)
            assert refused.value.status == 413


def test_the_v2_edge_refuses_a_large_list_before_decoding_it():
    values = b"[" + b",".join([b"0"] * (3 * 64 * 64 + 5000)) + b"]"
    body = b'{"inputs": [{"name": "image", "datatype": "UINT8", "shape": [1, 64, 64, 3], "data": ' + values + b"}]}"
    for header_length, where in ((None, "request body"), (str(len(body)).encode(), "request header")):
        with pytest.raises(BadRequest, match=f"{where}: expected at most") as refused:
            v2_binary.translate_request(body, header_length, limits=LIMITS)
        assert refused.value.status == 413


def test_a_refused_token_carries_no_provenance_and_a_bad_request_does():
    tags = {"model_version": "v1", "model_fingerprint": "f" * 64}
    denied = seldon_http.Rejection(AccessDenied(401, "this request needs a bearer token"), tags).to_dict()
    assert "meta" not in denied and denied["status"]["code"] == 401
    bad = seldon_http.Rejection(BadRequest("BAD_JSON", where="body", expected="JSON", got="x"), tags).to_dict()
    assert bad["meta"]["tags"] == tags
