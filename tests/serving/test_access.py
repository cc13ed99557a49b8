"""Both servers as real processes, tried as a stranger would: tokens, the closed repository API, feedback
quotas, bodies far over the limit, and many worst-case requests at once."""

import concurrent.futures
import json
import math
import socket
import subprocess
import sys

import grpc
import numpy as np
import pytest
import requests
from mlserver.grpc import dataplane_pb2 as pb
from mlserver.grpc import model_repository_pb2 as repository_pb
from mlserver.grpc import model_repository_pb2_grpc as repository_grpc
from serving_support import (FEEDBACK_QUOTA, MAX_IMAGE_BYTES, MAX_LIST_PIXELS, MAX_PIXELS, b64, bearer, encode,
                             grpc_infer, random_image)

MODEL = "petseg"
SELDON = {"predict": "/api/v1.0/predictions", "feedback": "/api/v1.0/feedback"}
V2 = {"predict": f"/v2/models/{MODEL}/infer", "feedback": f"/v2/models/{MODEL}/feedback"}
WRONG = {"Authorization": "Bearer " + "x" * 47}


def _feedback_message(seed: int, size: int = 16) -> dict:
    trimap = np.full((size, size), 2, np.uint8)
    trimap[4:12, 4:12] = 1
    return {"request": {"binData": b64(encode(random_image(size, size, seed), "PNG"))},
            "truth": {"binData": b64(encode(trimap, "PNG"))}, "reward": 1.0}


def _predict_body(protocol: str) -> dict:
    png = encode(random_image(32, 32), "PNG")
    if protocol == "seldon":
        return {"binData": b64(png)}
    return {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": [b64(png)]}]}


def _servers(server, mlserver):
    return {"seldon": (server, SELDON), "v2": (mlserver, V2)}


def _error_text(response: requests.Response) -> str:
    body = response.json()
    return body["status"]["info"] if "status" in body else body["error"]


# -- tokens -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("protocol", ["seldon", "v2"])
@pytest.mark.parametrize("headers", [{}, WRONG, {"Authorization": "Basic dGVzdGVyOnRlc3Rlcg=="}],
                         ids=["none", "wrong", "basic"])
def test_predict_and_feedback_without_a_valid_token_get_401(server, mlserver, protocol, headers):
    deployment, paths = _servers(server, mlserver)[protocol]
    for call, body in (("predict", _predict_body(protocol)), ("feedback", _feedback_message(0))):
        response = requests.post(deployment["url"] + paths[call], json=body, headers=headers, timeout=60)
        assert response.status_code == 401, (call, response.text[:300])
        assert "bearer token" in _error_text(response)
    assert requests.post(deployment["url"] + paths["predict"], json=_predict_body(protocol), headers=bearer(),
                         timeout=60).status_code == 200


@pytest.mark.parametrize("protocol", ["seldon", "v2"])
def test_a_token_without_the_feedback_role_gets_403(server, mlserver, protocol):
    deployment, paths = _servers(server, mlserver)[protocol]
    response = requests.post(deployment["url"] + paths["feedback"], json=_feedback_message(1),
                             headers=bearer("viewer"), timeout=60)
    assert response.status_code == 403 and "'viewer' has no role 'feedback'" in _error_text(response)


def test_grpc_inference_needs_a_token(mlserver):
    request = pb.ModelInferRequest(
        model_name=MODEL, inputs=[pb.ModelInferRequest.InferInputTensor(name="image", datatype="UINT8",
                                                                        shape=[1, 8, 8, 3])],
        raw_input_contents=[random_image(8, 8).tobytes()])
    with pytest.raises(grpc.RpcError) as refused:
        grpc_infer(mlserver["grpc_port"], request, identity=None)
    assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert grpc_infer(mlserver["grpc_port"], request).outputs[0].name == "mask"


def test_both_servers_listen_on_loopback_only(server, mlserver):
    import psutil

    for deployment in (server, mlserver):
        ports = {deployment["port"], deployment["grpc_port"], deployment["metrics_port"]}
        listening = [c.laddr for c in psutil.net_connections("tcp") if c.status == "LISTEN" and c.laddr.port in ports]
        assert len({address.port for address in listening}) >= 2, listening
        assert all(address.ip in ("127.0.0.1", "::ffff:127.0.0.1") for address in listening), listening


# -- the model repository API -----------------------------------------------------------------------


@pytest.mark.parametrize("identity", [None, "tester"])
@pytest.mark.parametrize("path", [f"/v2/repository/models/{MODEL}/unload", f"/v2/repository/models/{MODEL}/load",
                                  "/v2/repository/index", f"//v2/repository/models/{MODEL}/unload"])
def test_the_repository_api_is_closed_without_an_operator_token(mlserver, identity, path):
    headers = bearer(identity) if identity else {}
    response = requests.post(mlserver["url"] + path, json={}, headers=headers, timeout=30)
    assert response.status_code in ((401, 404) if identity is None else (403, 404)), response.text[:300]
    assert requests.get(mlserver["url"] + f"/v2/models/{MODEL}/ready", timeout=10).status_code == 200


def test_the_repository_api_is_closed_on_the_grpc_port(mlserver):
    with grpc.insecure_channel(f"127.0.0.1:{mlserver['grpc_port']}") as channel:
        stub = repository_grpc.ModelRepositoryServiceStub(channel)
        for call, request in ((stub.RepositoryModelUnload, repository_pb.RepositoryModelUnloadRequest(
                model_name=MODEL)), (stub.RepositoryIndex, repository_pb.RepositoryIndexRequest())):
            with pytest.raises(grpc.RpcError) as refused:
                call(request, timeout=30, metadata=[("authorization", bearer("ops")["Authorization"])])
            assert refused.value.code() != grpc.StatusCode.OK and "FORBIDDEN" in refused.value.details()
    assert requests.get(mlserver["url"] + f"/v2/models/{MODEL}/ready", timeout=10).status_code == 200


# -- feedback: pending, duplicates, quota, review ---------------------------------------------------


def _answer(response: requests.Response, protocol: str) -> dict:
    body = response.json()
    return body["jsonData"] if protocol == "seldon" else body


@pytest.mark.parametrize("protocol", ["seldon", "v2"])
def test_feedback_is_pending_with_its_sender_and_duplicates_are_dropped(server, mlserver, protocol):
    deployment, paths = _servers(server, mlserver)[protocol]
    message = _feedback_message(100 + len(protocol))
    first = requests.post(deployment["url"] + paths["feedback"], json=message, headers=bearer(), timeout=60)
    assert first.status_code == 200, first.text[:300]
    stored = _answer(first, protocol)
    assert stored["status"] == "pending"
    record = json.loads((deployment["feedback_dir"] / "pending" / "tester" / f"{stored['sample_id']}.json")
                        .read_text())
    assert record["identity"] == "tester" and record["content_sha256"].startswith(stored["sample_id"][9:])
    again = requests.post(deployment["url"] + paths["feedback"], json=message, headers=bearer(), timeout=60)
    assert _answer(again, protocol) == {**stored, "status": "duplicate"}
    assert not (deployment["feedback_dir"] / "accepted").exists()


@pytest.mark.parametrize("protocol", ["seldon", "v2"])
def test_a_sender_over_its_quota_gets_429_until_a_review(server, mlserver, protocol):
    deployment, paths = _servers(server, mlserver)[protocol]
    answers = [requests.post(deployment["url"] + paths["feedback"], json=_feedback_message(1000 + n),
                             headers=bearer("quota"), timeout=60) for n in range(FEEDBACK_QUOTA + 1)]
    assert [a.status_code for a in answers] == [200] * FEEDBACK_QUOTA + [429]
    assert "at most 40 samples awaiting review" in _error_text(answers[-1])
    store = str(deployment["feedback_dir"])
    sample_id = _answer(answers[0], protocol)["sample_id"]
    review = subprocess.run([sys.executable, "-m", "petseg", "feedback", "reject", store, sample_id],
                            capture_output=True, text=True, timeout=120)
    assert review.returncode == 0, review.stderr
    retry = requests.post(deployment["url"] + paths["feedback"], json=_feedback_message(999),
                          headers=bearer("quota"), timeout=60)
    assert retry.status_code == 200, retry.text[:300]
    listing = subprocess.run([sys.executable, "-m", "petseg", "feedback", "list", store, "--status", "rejected"],
                             capture_output=True, text=True, timeout=120)
    assert sample_id in listing.stdout and "from quota" in listing.stdout


# -- bodies far over the limit ----------------------------------------------------------------------


def _raw_post(url: str, path: str, body_size: int, *, chunked: bool) -> tuple[int, bytes]:
    """Sends a JSON body of ``body_size`` bytes over a plain socket, all of it, then reads the answer."""
    host, port = url.removeprefix("http://").split(":")
    head = [f"POST {path} HTTP/1.1", f"Host: {host}", "Content-Type: application/json",
            f"Authorization: {bearer()['Authorization']}"]
    head.append("Transfer-Encoding: chunked" if chunked else f"Content-Length: {body_size}")
    chunk = b"A" * 2**20
    with socket.create_connection((host, int(port)), timeout=60) as connection:
        connection.sendall(("\r\n".join(head) + "\r\n\r\n").encode())
        sent = 0
        while sent < body_size:
            piece = chunk[:body_size - sent]
            connection.sendall(b"%x\r\n%s\r\n" % (len(piece), piece) if chunked else piece)
            sent += len(piece)
        if chunked:
            connection.sendall(b"0\r\n\r\n")
        answer = b""
        while b"\r\n\r\n" not in answer or len(answer.split(b"\r\n\r\n", 1)[1]) < 20:
            data = connection.recv(65536)
            if not data:
                break
            answer += data
    status = int(answer.split(b" ", 2)[1])
    return status, answer.split(b"\r\n\r\n", 1)[1]


@pytest.mark.parametrize("protocol", ["seldon", "v2"])
@pytest.mark.parametrize("size_mb, chunked", [(71, False), (80, False), (80, True)])
def test_a_body_of_80_mb_gets_a_413_the_client_reads(server, mlserver, protocol, size_mb, chunked):
    """A body 71-80 times the limit, sent whole (with a length, or chunked without one): a 413, no broken pipe."""
    deployment, paths = _servers(server, mlserver)[protocol]
    status, body = _raw_post(deployment["url"], paths["predict"], size_mb * 2**20, chunked=chunked)
    assert status == 413 and b"TOO_LARGE" in body, body[:400]
    assert requests.post(deployment["url"] + paths["predict"], json=_predict_body(protocol), headers=bearer(),
                         timeout=60).status_code == 200


# -- many worst-case requests at once ---------------------------------------------------------------


def _worst_case(protocol: str) -> dict:
    """The largest image the limits admit, as a PNG (few bytes, the most pixels)."""
    side = math.isqrt(MAX_PIXELS)
    pixels = np.zeros((side, side, 3), np.uint8)
    pixels[side // 4:side // 2, side // 3:side // 2] = (200, 120, 40)
    png = encode(pixels, "PNG")
    assert len(png) <= MAX_IMAGE_BYTES
    if protocol == "seldon":
        return {"binData": b64(png)}
    return {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": [b64(png)]}],
            "outputs": [{"name": "mask"}]}


@pytest.mark.parametrize("protocol", ["seldon", "v2"])
def test_concurrent_worst_case_requests_all_get_answers(server, mlserver, protocol):
    deployment, paths = _servers(server, mlserver)[protocol]
    body = json.dumps(_worst_case(protocol))

    def send(_):
        answer = requests.post(deployment["url"] + paths["predict"], data=body,
                               headers={**bearer(), "Content-Type": "application/json"}, timeout=300)
        return answer.status_code, answer.headers.get("Retry-After")

    with concurrent.futures.ThreadPoolExecutor(12) as pool:
        answers = list(pool.map(send, range(24)))
    # MLServer reads MAX_BODIES bodies at once; a request that waits too long for one gets a 503 to retry.
    assert all(status == 200 or (protocol == "v2" and status == 503 and retry) for status, retry in answers), answers
    assert any(status == 200 for status, _ in answers)
    health = "/health/status" if protocol == "seldon" else f"/v2/models/{MODEL}/ready"
    assert requests.get(deployment["url"] + health, timeout=60).status_code == 200


def test_probabilities_of_more_pixels_than_their_limit_get_413_and_the_mask_does_not(mlserver):
    side = math.isqrt(MAX_LIST_PIXELS) + 1
    png = encode(np.zeros((side, side, 3), np.uint8), "PNG")
    tensor = {"name": "image", "datatype": "BYTES", "shape": [1], "data": [b64(png)]}
    for output, status in (("probabilities", 413), ("mask", 200)):
        response = requests.post(mlserver["url"] + V2["predict"], json={"inputs": [tensor], "outputs": [
            {"name": output}]}, headers=bearer(), timeout=120)
        assert response.status_code == status, response.text[:300]
        assert status == 200 or "ask for the mask" in _error_text(response)
