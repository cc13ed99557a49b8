"""Memory bounded under concurrency, on real processes: many large bodies at once get 413 or 503 (with
Retry-After), every connection reads its answer, and the servers stay healthy; bodies beyond those MLServer
reads at once and connections beyond those an endpoint's front serves are answered 503; a tokens file that
others can read stops every server from starting."""

import concurrent.futures
import json
import os
import shutil
import socket
import subprocess
import sys
import time

import pytest
import requests
from serving_support import (MAX_BODIES, MAX_IMAGE_BYTES, MAX_LIST_PIXELS, b64, bearer, encode, exchange,
                             random_image, record)

from petseg.deploy import endpoints, local
from petseg.errors import ServingError

PATHS = {"seldon": "/api/v1.0/predictions", "v2": "/v2/models/petseg/infer"}
HEALTH = {"seldon": "/health/status", "v2": "/v2/models/petseg/ready"}
FRONT_CONNECTIONS = 2


def _list_body(protocol: str) -> bytes:
    """A body within the byte limit whose lists hold more numbers than MAX_LIST_PIXELS admit."""
    side = int((MAX_LIST_PIXELS * 1.2) ** 0.5)
    assert side * side * 8 < MAX_IMAGE_BYTES
    if protocol == "seldon":
        row = "[" + ",".join(["[0,0,0]"] * side) + "]"
        return ('{"data":{"ndarray":[' + ",".join([row] * side) + "]}}").encode()
    values = ",".join(["0"] * (side * side * 3))
    return ('{"inputs":[{"name":"image","datatype":"UINT8","shape":[1,%d,%d,3],"data":[%s]}]}'
            % (side, side, values)).encode()


def _small_request(protocol: str) -> dict:
    png = b64(encode(random_image(16, 16), "PNG"))
    if protocol == "seldon":
        return {"binData": png}
    return {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": [png]}]}


def _deployment(protocol, server, mlserver) -> dict:
    return server if protocol == "seldon" else mlserver


def _refused_as_expected(status: int, headers: dict, body: bytes) -> None:
    assert status in (413, 503), (status, body[:300])
    assert status == 413 or headers.get("retry-after"), headers
    error = json.loads(body)
    assert ("status" in error or "error" in error) and b"Traceback" not in body


@pytest.mark.parametrize("protocol", ["seldon", "v2"])
def test_many_large_bodies_at_once_get_413_or_503_and_the_server_stays_healthy(server, mlserver, protocol):
    deployment = _deployment(protocol, server, mlserver)
    over = b"A" * (3 * MAX_IMAGE_BYTES)
    bodies = [over, _list_body(protocol)] * 8
    headers = {**bearer(), "Content-Type": "application/json"}

    def send(body):
        return exchange(deployment["url"], PATHS[protocol], body, headers=headers)

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(send, bodies))  # a reset or a dropped connection raises here
    for status, answer_headers, body in answers:
        _refused_as_expected(status, answer_headers, body)
    assert any(b"values in lists of numbers" in body for _, _, body in answers)  # refused before decoding
    assert requests.get(deployment["url"] + HEALTH[protocol], timeout=60).status_code == 200
    assert requests.post(deployment["url"] + PATHS[protocol], json=_small_request(protocol), headers=bearer(),
                         timeout=60).status_code == 200


def _hold_body(url: str, path: str) -> socket.socket:
    """A connection that has sent a request's head and the first bytes of an admissible body, and waits."""
    host, port = url.removeprefix("http://").split(":")
    connection = socket.create_connection((host, int(port)), timeout=120)
    head = [f"POST {path} HTTP/1.1", f"Host: {host}", "Content-Type: application/json",
            f"Content-Length: {MAX_IMAGE_BYTES // 2}", f"Authorization: {bearer()['Authorization']}"]
    connection.sendall(("\r\n".join(head) + "\r\n\r\n").encode() + b'{"inputs": [')
    return connection


def test_a_request_beyond_the_bodies_mlserver_reads_at_once_waits_then_gets_503(mlserver):
    held = [_hold_body(mlserver["url"], PATHS["v2"]) for _ in range(MAX_BODIES)]
    try:
        time.sleep(1.0)  # the held bodies reach the edge
        started = time.monotonic()
        answer = requests.post(mlserver["url"] + PATHS["v2"], json=_small_request("v2"), headers=bearer(), timeout=120)
        waited = time.monotonic() - started
        assert answer.status_code == 503 and answer.headers["Retry-After"], answer.text[:300]
        assert "BUSY" in answer.json()["error"] and waited >= 5, waited
        # Health and metadata read no body: they are answered meanwhile.
        assert requests.get(mlserver["url"] + HEALTH["v2"], timeout=30).status_code == 200
    finally:
        for connection in held:
            connection.sendall(b"x" * (MAX_IMAGE_BYTES // 2 - len(b'{"inputs": [')))  # the rest: not JSON
            status = connection.recv(65536).split(b" ", 2)[1]
            assert status == b"400", status
            connection.close()
    assert requests.post(mlserver["url"] + PATHS["v2"], json=_small_request("v2"), headers=bearer(),
                         timeout=60).status_code == 200


@pytest.fixture
def crowded_front(server, manifest, tokens_file):
    """An endpoint front process, in front of the Seldon server, that serves `FRONT_CONNECTIONS` connections."""
    name = "crowded"
    serving = {**endpoints.entry(manifest), "since": endpoints.now(), "deployment": record(server)}
    endpoints.switch(name, serving, front=None)
    port = local.free_ports(1)[0]
    process = subprocess.Popen([sys.executable, "-m", "petseg.entrypoints.endpoint_proxy", name, str(port)],
                               env={**local.child_environment(), "MAX_CONNECTIONS": str(FRONT_CONNECTIONS)})
    url = f"http://127.0.0.1:{port}"
    try:
        _wait(lambda: requests.get(url + "/health/ping", timeout=5).status_code == 200)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=30)


def _wait(condition, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if condition():
                return
        except requests.RequestException:
            pass
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.2)


def test_connections_beyond_those_the_front_serves_get_503_and_their_answer(crowded_front):
    host, port = crowded_front.removeprefix("http://").split(":")
    idle = [socket.create_connection((host, int(port)), timeout=30) for _ in range(FRONT_CONNECTIONS)]
    try:
        time.sleep(0.5)
        status, headers, body = exchange(crowded_front, PATHS["seldon"], b"A" * (2 * MAX_IMAGE_BYTES),
                                         headers={**bearer(), "Content-Type": "application/json"})
        assert status == 503 and headers.get("retry-after"), (status, body[:300])
        assert json.loads(body)["status"]["reason"] == "BUSY"
        answer = requests.get(crowded_front + "/health/ping", timeout=30)
        assert answer.status_code == 503 and answer.headers["Retry-After"]
    finally:
        for connection in idle:
            connection.close()
    _wait(lambda: requests.get(crowded_front + "/health/ping", timeout=5).status_code == 200)
    answer = requests.post(crowded_front + PATHS["seldon"], json=_small_request("seldon"), headers=bearer(), timeout=60)
    assert answer.status_code == 200, answer.text[:300]


@pytest.fixture
def open_tokens_file(tokens_file, tmp_path):
    """A copy of the session's tokens file that group and others can read."""
    path = tmp_path / "tokens.json"
    shutil.copy(tokens_file, path)
    path.chmod(0o644)
    return path


def _says_the_fix(text: str, path) -> None:
    assert f"tokens file {path} has mode 0644" in text and f"chmod 600 {path}" in text, text[-2000:]


@pytest.mark.parametrize("server_kind", ["seldon", "mlserver"])
def test_a_server_does_not_start_on_a_tokens_file_others_can_read(release_dir, manifest, open_tokens_file,
                                                                   server_kind, tmp_path):
    log = tmp_path / "serving.log"
    copy = shutil.copytree(release_dir, tmp_path / "release" / release_dir.name)
    with pytest.raises(ServingError, match="exited with status 2"):
        local.deploy_local(copy, server=server_kind, log_path=log, timeout=300,
                           fingerprint=manifest["model_fingerprint"], tokens_file=open_tokens_file)
    _says_the_fix(log.read_text(), open_tokens_file)


def test_the_front_does_not_start_on_a_tokens_file_others_can_read(open_tokens_file):
    started = subprocess.run([sys.executable, "-m", "petseg.entrypoints.endpoint_proxy", "refused", "1"],
                             env={**local.child_environment(), "PETSEG_TOKENS_FILE": str(open_tokens_file)},
                             capture_output=True, text=True, timeout=120)
    assert started.returncode == 2
    _says_the_fix(started.stderr, open_tokens_file)
    assert os.stat(open_tokens_file).st_mode & 0o777 == 0o644  # refused, not changed
