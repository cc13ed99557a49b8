"""The Seldon microservice as a real process: predictions, provenance, feedback, metrics, bad requests.

One server (``seldon-core-microservice PetSegModel``, the session's ``server``
of conftest.py) serves a small model trained for two steps on random data,
saved as a release directory in this session. A second start with a wrong
MODEL_FINGERPRINT must fail.
"""

import base64
import io
import json
import math
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import requests
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from serving_support import MAX_IMAGE_BYTES, MAX_PIXELS, bearer

from petseg import layout
from petseg.data import warehouse
from petseg.deploy import client, local
from petseg.errors import ServingError
from petseg.release import bundle
from petseg.serving import predictor

PREDICT = "/api/v1.0/predictions"
FEEDBACK = "/api/v1.0/feedback"
TAG_KEYS = {"model_version", "model_fingerprint", "dataset_fingerprint", "pathspec", "code_version"}


def _encode(pixels: np.ndarray, image_format: str, **options) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=image_format, **options)
    return buffer.getvalue()


def _b64(data_bytes: bytes) -> str:
    return base64.b64encode(data_bytes).decode()


def _image(height: int = 128, width: int = 128, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def _predict(http, server, message) -> dict:
    response = http.post(server["url"] + PREDICT, json=message, timeout=60)
    assert response.status_code == 200, response.text[:500]
    return response.json()


def _mask(answer: dict, form: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(answer[form]))))


# -- predictions ------------------------------------------------------------------------------------


def test_deployment_record(server, release_dir):
    assert server["url"] == f"http://127.0.0.1:{server['port']}"
    assert len({server["port"], server["grpc_port"], server["metrics_port"]}) == 3
    assert json.loads((layout.deployment_dir(release_dir) / "deployment.json").read_text())["pid"] == server["pid"]
    assert not (release_dir / "deployment.json").exists()  # the signed release stays as it was signed


def test_ndarray_uint8_answers_probabilities_with_provenance(http, server, tags):
    answer = _predict(http, server, {"data": {"ndarray": _image().tolist()}})
    probs = np.asarray(answer["data"]["ndarray"])
    assert probs.shape == (128, 128, 3)
    assert probs.min() >= 0 and probs.max() <= 1
    assert answer["data"]["names"] == ["pet", "background", "border"]
    assert answer["meta"]["tags"] == tags


def test_served_prediction_equals_in_process_prediction(http, server, release_dir):
    image = _image(seed=1)
    answer = _predict(http, server, {"data": {"ndarray": image.tolist()}})
    expected = predictor.Predictor(bundle.load_release(str(release_dir))).predict(image[None] / np.float32(255))[0]
    np.testing.assert_allclose(np.asarray(answer["data"]["ndarray"]), expected, atol=2e-4)


def test_ndarray_float_batch_keeps_batch_and_size(http, server):
    batch = np.random.default_rng(2).random((2, 40, 52, 3)).round(3)
    answer = _predict(http, server, {"data": {"ndarray": batch.tolist()}})
    assert np.asarray(answer["data"]["ndarray"]).shape == (2, 40, 52, 3)


def test_tensor_answers_tensor(http, server, tags):
    image = _image(30, 20)
    answer = _predict(http, server, {"data": {"tensor": {"shape": [30, 20, 3], "values": image.ravel().tolist()}}})
    tensor = answer["data"]["tensor"]
    assert tensor["shape"] == [30, 20, 3] and len(tensor["values"]) == 30 * 20 * 3
    assert answer["meta"]["tags"] == tags


def test_bindata_jpeg_answers_png_of_input_size(http, server, tags):
    answer = _predict(http, server, {"binData": _b64(_encode(_image(96, 64), "JPEG"))})
    mask = _mask(answer, "binData")
    assert mask.shape == (96, 64, 3) and mask.dtype == np.uint8
    assert answer["meta"]["tags"] == tags


def test_strdata_png_answers_strdata_png(http, server, tags):
    answer = _predict(http, server, {"strData": _b64(_encode(_image(), "PNG"))})
    assert _mask(answer, "strData").shape == (128, 128, 3)
    assert answer["meta"]["tags"] == tags


def test_seldon_client_form_field_is_accepted(http, server):
    message = json.dumps({"binData": _b64(_encode(_image(), "PNG"))})
    response = http.post(server["url"] + PREDICT, data={"json": message}, timeout=60)
    assert response.status_code == 200 and "binData" in response.json()


def test_health_status_predicts_and_carries_tags(http, server, tags):
    response = http.get(server["url"] + "/health/status", timeout=60)
    assert response.status_code == 200
    assert response.json()["jsonData"]["status"] == "ok"
    assert response.json()["meta"]["tags"] == tags


def test_metadata_describes_inputs_and_outputs(http, server):
    described = http.get(server["url"] + "/api/v1.0/metadata", timeout=60).json()
    assert {item["messagetype"] for item in described["inputs"]} == {"ndarray", "tensor", "binData", "strData"}
    assert described["outputs"][0]["schema"]["names"] == ["pet", "background", "border"]


def test_custom_metrics_reach_prometheus(http, server):
    _predict(http, server, {"binData": _b64(_encode(_image(), "PNG"))})
    text = requests.get(f"http://127.0.0.1:{server['metrics_port']}/metrics", headers=bearer("ops"), timeout=60).text
    assert "# TYPE petseg_predictions_total counter" in text
    assert "# TYPE petseg_prediction_latency histogram" in text
    assert "# TYPE petseg_pet_fraction gauge" in text


def test_client_predict_writes_mask_and_side_by_side(server, tmp_path, tags):
    image_path = tmp_path / "pet.jpg"
    image_path.write_bytes(_encode(_image(80, 100), "JPEG"))
    result = client.predict(server["url"], image_path, tmp_path / "mask.png")
    assert np.asarray(Image.open(result["mask"])).shape == (80, 100, 3)
    assert Image.open(result["figure"]).width > 3 * 100
    assert result["tags"] == tags


# -- bad requests -----------------------------------------------------------------------------------


def _assert_rejected(response, *, reason: str | None = None):
    assert 400 <= response.status_code < 500, (response.status_code, response.text[:300])
    status = response.json()["status"]
    assert "expected" in status["info"] and "got" in status["info"], status
    assert "expected" in status["reason"], status
    if reason:
        assert status["reason"].startswith(reason), status


@pytest.mark.parametrize(
    "body, content_type, reason",
    [
        (b'{"binData": "!!!notbase64!!!"}', "application/json", "BAD_BASE64"),
        (b"{not json", "application/json", "BAD_JSON"),
        (b'{"binData": "AAAA"}', "text/plain", "BAD_CONTENT_TYPE"),
        (b'{"binData": "AAAA"}', None, "BAD_CONTENT_TYPE"),
        (b"[1, 2, 3]", "application/json", "BAD_MESSAGE"),
        (b"{}", "application/json", "MISSING_DATA"),
        (b'{"data": {"ndarray": [[[NaN, 0, 0]]]}}', "application/json", "BAD_VALUES"),
        (b'{"data": {"ndarray": [[[1, 2, 3]], [[4, 5]]]}}', "application/json", "BAD_SHAPE"),
        (b'{"data": {"ndarray": [[[true, 0, 0]]]}}', "application/json", "BAD_DTYPE"),
        (b'{"data": {"ndarray": [[["a", "b", "c"]]]}}', "application/json", "BAD_DTYPE"),
        (b'{"data": {"ndarray": [[[1, 2, 3, 4]]]}}', "application/json", "BAD_SHAPE"),
        (b'{"data": {"ndarray": []}}', "application/json", "BAD_SHAPE"),
        (b'{"data": {"ndarray": [[[300, 0, 0]]]}}', "application/json", "BAD_VALUES"),
        (b'{"binData": "' + base64.b64encode(b"GIF89a not really") + b'"}', "application/json", "BAD_IMAGE"),
        (b'{"binData": "' + b"A" * (MAX_IMAGE_BYTES + 10) + b'"}', "application/json", "TOO_LARGE"),
    ],
)
def test_bad_request_gets_400_saying_what_was_expected(http, server, body, content_type, reason):
    headers = {"Content-Type": content_type} if content_type else {}
    _assert_rejected(http.post(server["url"] + PREDICT, data=body, headers=headers, timeout=60), reason=reason)


def test_oversized_body_gets_413_after_the_server_reads_it(http, server):
    """The client sends all of a body three times the limit and reads the answer: no broken pipe."""
    body = b'{"binData": "' + b"A" * (3 * MAX_IMAGE_BYTES) + b'"}'
    response = http.post(server["url"] + PREDICT, data=body, headers={"Content-Type": "application/json"},
                         timeout=60)
    assert response.status_code == 413
    _assert_rejected(response, reason="TOO_LARGE")
    _predict(http, server, {"binData": _b64(_encode(_image(), "PNG"))})


def test_image_over_the_pixel_limit_is_rejected(http, server):
    side = math.isqrt(MAX_PIXELS) + 1
    big = _encode(np.zeros((side, side, 3), np.uint8), "PNG")
    _assert_rejected(http.post(server["url"] + PREDICT, json={"binData": _b64(big)}, timeout=60), reason="TOO_LARGE")


# Strategies of requests that are wrong in one way each; every one must get a 4xx.
_SMALL = st.integers(1, 4)
_PIXEL = st.integers(0, 255)


@st.composite
def _wrong_rank_or_channels(draw):
    shape = draw(st.one_of(
        st.lists(_SMALL, min_size=1, max_size=2),  # rank 1 or 2
        st.tuples(_SMALL, _SMALL, st.sampled_from([1, 2, 4, 5])).map(list),  # HxWxC, C != 3
        st.tuples(_SMALL, _SMALL, _SMALL, st.sampled_from([1, 2, 4])).map(list),
        st.lists(_SMALL, min_size=5, max_size=6),  # rank 5 or 6
    ))
    values = np.full(shape, draw(_PIXEL)).tolist()
    return {"data": {"ndarray": values}}


@st.composite
def _wrong_element(draw):
    """An HxWx3 list with one element that is not a valid pixel value."""
    height, width = draw(_SMALL), draw(_SMALL)
    values = np.full((height, width, 3), draw(_PIXEL)).tolist()
    bad = draw(st.one_of(
        st.text(max_size=5), st.booleans(), st.none(), st.just({}), st.just([1, 2]),
        st.sampled_from([math.nan, math.inf, -math.inf]),
        st.integers(256, 10**6), st.integers(-(10**6), -1),
        st.floats(1.01, 254.99).filter(lambda x: x != round(x)),
        st.floats(-1e6, -0.01),
    ))
    values[draw(st.integers(0, height - 1))][draw(st.integers(0, width - 1))][draw(st.integers(0, 2))] = bad
    return {"data": {"ndarray": values}}


@st.composite
def _ragged(draw):
    rows = draw(st.lists(st.lists(st.just([0, 0, 0]), min_size=1, max_size=3), min_size=2, max_size=4))
    rows.append([[0, 0, 0]] * (max(len(r) for r in rows) + 1))
    return {"data": {"ndarray": [rows]}}


@st.composite
def _bad_tensor(draw):
    shape = draw(st.lists(_SMALL, min_size=3, max_size=3)) + [3]
    size = math.prod(shape)
    values = [0] * (size + draw(st.sampled_from([-1, 1, 5])))
    tensor = draw(st.sampled_from([
        {"shape": shape, "values": values},
        {"shape": [str(n) for n in shape], "values": [0] * size},
        {"shape": shape, "values": np.zeros(shape).tolist()},  # nested, not flat
        {"values": [0] * size},
        [0] * size,
    ]))
    return {"data": {"tensor": tensor}}


_BAD_BYTES = st.one_of(
    st.binary(max_size=64),
    st.sampled_from(["GIF", "BMP", "TIFF"]).map(lambda fmt: _encode(np.zeros((8, 8, 3), np.uint8), fmt)),
    # Truncated files: the first half at most.
    st.sampled_from(["JPEG", "PNG"]).map(lambda fmt: _encode(_image(32, 32), fmt)).flatmap(
        lambda whole: st.integers(4, len(whole) // 2).map(lambda n: whole[:n])),
)
_BAD_BASE64 = st.one_of(
    st.text(max_size=40).filter(lambda s: s.strip() != "" and len(s) % 4 != 0),
    st.text(alphabet="!@#$%^&*()[]{}<>~`", min_size=1, max_size=20),
    st.one_of(st.integers(), st.none(), st.lists(st.integers(), max_size=3), st.booleans()),
)
_IMAGE_FIELD = st.sampled_from(["binData", "strData"])
_BAD_IMAGE_MESSAGE = st.one_of(
    st.tuples(_IMAGE_FIELD, _BAD_BYTES.map(_b64)).map(lambda kv: {kv[0]: kv[1]}),
    st.tuples(_IMAGE_FIELD, _BAD_BASE64).map(lambda kv: {kv[0]: kv[1]}),
)
_MISSING_DATA = st.sampled_from([
    {}, {"meta": {}}, {"data": {}}, {"data": {"names": ["a"]}}, {"data": None}, {"data": [1, 2, 3]},
    {"data": {"ndarray": None}}, {"data": {"ndarray": "abc"}}, {"data": {"ndarray": 5}},
    {"data": {"ndarray": []}}, {"data": {"ndarray": [[[]]]}}, {"data": {"tftensor": {}}},
    {"binData": "", "strData": ""}, {"jsonData": {"a": 1}},
])
_NOT_AN_OBJECT = st.one_of(st.integers(), st.text(max_size=10), st.none(), st.lists(st.integers(), max_size=3))


@st.composite
def _bad_feedback(draw):
    """A feedback message with a valid image and a wrong truth, reward or breed."""
    height, width = draw(_SMALL), draw(_SMALL)
    image = {"data": {"ndarray": np.zeros((height, width, 3), int).tolist()}}
    trimap = np.ones((height, width), int)
    truth = draw(st.one_of(
        st.just({"data": {"ndarray": np.ones((height + 1, width), int).tolist()}}),  # wrong size
        st.sampled_from([0, 4, 255, -1, 1.5]).map(
            lambda v: {"data": {"ndarray": np.full((height, width), v).tolist()}}),
        st.just({"data": {"ndarray": np.full((height, width, 3), 2.0).tolist()}}),  # not in [0, 1]
        st.just({"data": {"ndarray": np.ones((height, width, 2)).tolist()}}),
        st.just({"binData": _b64(_encode(np.zeros((height, width, 4), np.uint8), "PNG"))}),  # RGBA
        st.just({"binData": _b64(_encode(np.zeros((height + 2, width), np.uint8) + 1, "PNG"))}),
        st.just({"binData": _b64(_encode(np.zeros((height, width), np.uint8), "PNG"))}),  # value 0
        _BAD_BASE64.map(lambda value: {"binData": value}),
        st.just({"data": {"ndarray": trimap.tolist()}, "meta": {"tags": {"breed": "unicorn"}}}),
        st.just({}),
    ))
    message = draw(st.sampled_from([
        {"request": image, "truth": truth, "reward": 1.0},
        {"request": image, "truth": {"data": {"ndarray": trimap.tolist()}}, "reward": "high"},
        {"request": image, "truth": {"data": {"ndarray": trimap.tolist()}}, "reward": math.nan},
        {"request": image, "truth": {"data": {"ndarray": trimap.tolist()}}, "unknown_field": 1},
        {"request": {"binData": "!!!"}, "truth": {"data": {"ndarray": trimap.tolist()}}},
        {"truth": {"data": {"ndarray": trimap.tolist()}}},
        {"request": image},
    ]))
    return message


@st.composite
def _malformed_request(draw):
    """(path, body bytes, content type) of a request the server cannot use."""
    kind = draw(st.sampled_from(["json", "json", "json", "feedback", "bytes", "content-type"]))
    if kind == "bytes":
        return PREDICT, draw(st.binary(max_size=200)), "application/json"
    if kind == "content-type":
        good = json.dumps({"binData": _b64(_encode(_image(8, 8), "PNG"))}).encode()
        content_type = draw(st.sampled_from(["text/plain", "application/xml", "image/png", "application/octet-stream",
                                             "multipart/form-data; boundary=x", None]))
        return draw(st.sampled_from([PREDICT, FEEDBACK])), good, content_type
    if kind == "feedback":
        return FEEDBACK, json.dumps(draw(_bad_feedback())).encode(), "application/json"
    message = draw(st.one_of(_wrong_rank_or_channels(), _wrong_element(), _ragged(), _bad_tensor(),
                             _BAD_IMAGE_MESSAGE, _MISSING_DATA, _NOT_AN_OBJECT))
    return draw(st.sampled_from([PREDICT, FEEDBACK])), json.dumps(message).encode(), "application/json"


def test_malformed_requests_get_4xx_and_the_server_stays_up(http, server):
    seen = []

    @settings(max_examples=300, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(_malformed_request())
    def check(request):
        path, body, content_type = request
        headers = {"Content-Type": content_type} if content_type else {}
        response = http.post(server["url"] + path, data=body, headers=headers, timeout=60)
        _assert_rejected(response)
        seen.append(response.status_code)

    check()
    assert len(seen) >= 300
    _predict(http, server, {"binData": _b64(_encode(_image(), "PNG"))})


# -- feedback ---------------------------------------------------------------------------------------


def test_feedback_sample_is_pending_until_accepted_then_read_back_by_ingest(server, tmp_path, tags):
    image_path, truth_path = tmp_path / "pet.jpg", tmp_path / "truth.png"
    image_path.write_bytes(_encode(_image(70, 90), "JPEG"))
    trimap = np.full((70, 90), 2, np.uint8)
    trimap[20:50, 30:60], trimap[19, 30:60] = 1, 3
    truth_path.write_bytes(_encode(trimap, "PNG"))
    stored = client.feedback(server["url"], image_path, truth_path, reward=0.5, breed="beagle")
    store = server["feedback_dir"]
    sample_id = stored["sample_id"]
    assert stored["status"] == "pending"
    pending = store / "pending" / "tester"
    assert (pending / f"{sample_id}.jpg").read_bytes() == image_path.read_bytes()
    np.testing.assert_array_equal(np.asarray(Image.open(pending / f"{sample_id}.png")), trimap)
    record = json.loads((pending / f"{sample_id}.json").read_text())
    assert record["reward"] == 0.5 and record["model_version"] == tags["model_version"]
    assert record["identity"] == "tester" and record["model_fingerprint"] == tags["model_fingerprint"]
    assert client.feedback(server["url"], image_path, truth_path)["status"] == "duplicate"
    before = warehouse.ingest("synth:2", tmp_path / "before", feedback=str(store))
    assert sample_id not in [sample["id"] for sample in before["feedback_samples"]]

    review = subprocess.run([sys.executable, "-m", "petseg", "feedback", "accept", str(store), sample_id, "--by", "rev"],
                            capture_output=True, text=True, timeout=120)
    assert review.returncode == 0 and f"accepted {sample_id}" in review.stdout, review.stderr
    listing = subprocess.run([sys.executable, "-m", "petseg", "feedback", "list", str(store), "--status", "accepted"],
                             capture_output=True, text=True, timeout=120)
    assert sample_id in listing.stdout and "accepted by rev" in listing.stdout, listing.stderr
    assert f"{sample_id} 5 2 4" in (store / "accepted" / "annotations" / "list.txt").read_text()
    report = warehouse.ingest("synth:2", tmp_path / "ingested", feedback=str(store))
    assert sample_id in [sample["id"] for sample in report["feedback_samples"]]
    assert report["samples"] == 2 + len(report["feedback_samples"]) and report["skipped"] == []


def test_feedback_truth_as_one_hot_ndarray(http, server):
    image = _image(6, 5)
    truth = np.zeros((6, 5, 3))
    truth[..., 1] = 1
    truth[2:4, 1:3] = (1, 0, 0)
    message = {"request": {"data": {"ndarray": image.tolist()}}, "truth": {"data": {"ndarray": truth.tolist()}},
               "reward": 1}
    response = http.post(server["url"] + FEEDBACK, json=message, timeout=60)
    assert response.status_code == 200, response.text[:300]
    sample_id = response.json()["jsonData"]["sample_id"]
    stored = np.asarray(Image.open(server["feedback_dir"] / "pending" / "tester" / f"{sample_id}.png"))
    assert stored.tolist() == (np.argmax(truth, axis=-1) + 1).tolist()


def test_feedback_with_truth_of_another_size_is_rejected(http, server):
    message = {"request": {"binData": _b64(_encode(_image(10, 10), "PNG"))},
               "truth": {"data": {"ndarray": np.ones((10, 12), int).tolist()}}}
    _assert_rejected(http.post(server["url"] + FEEDBACK, json=message, timeout=60), reason="BAD_TRUTH")


# -- provenance check at start ----------------------------------------------------------------------


def test_fingerprint_mismatch_refuses_to_start(release_dir, manifest, tmp_path):
    wrong = "0" * 64
    with pytest.raises(ServingError) as refused:
        local.deploy_local(release_dir, log_path=tmp_path / "serving.log", timeout=300, fingerprint=wrong)
    assert wrong in str(refused.value) and manifest["model_fingerprint"] in str(refused.value)
    assert "exited with status" in str(refused.value)


# -- release and feedback locations (S3: a moto server) -------------------------------------------------


def test_release_loads_from_s3(s3, moto_endpoint, release_dir, manifest):
    s3.create_bucket(Bucket="petseg")
    for name in bundle.ALL_FILES:
        s3.upload_file(str(release_dir / name), "petseg", f"releases/v1/{name}")
    loaded = bundle.load_release("s3://petseg/releases/v1/", expected_fingerprint=manifest["model_fingerprint"],
                                 s3_endpoint_url=moto_endpoint)
    assert loaded.uri == "s3://petseg/releases/v1/" and loaded.signer
    assert loaded.tags()["model_fingerprint"] == manifest["model_fingerprint"]


# A path that answers without the model, and the fewest processes of a running server:
# the Seldon microservice has a gunicorn master and workers and gRPC and metrics servers;
# MLServer answers in one process (serving/mlserver/settings.json: no inference workers).
LIVENESS = {"seldon": ("/health/ping", 2), "mlserver": ("/v2/health/live", 1)}


@pytest.mark.parametrize("server_kind", sorted(LIVENESS))
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_petseg_serve_stops_its_whole_server_on_a_signal(release_dir, signum, server_kind):
    """`petseg serve` sent SIGTERM or SIGINT exits, and no process of the server it started survives."""
    import psutil

    path, fewest = LIVENESS[server_kind]
    port = local.free_ports(1)[0]
    serve = subprocess.Popen([sys.executable, "-m", "petseg", "serve", str(release_dir), "--port", str(port),
                              "--server", server_kind], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 300
        while True:
            assert serve.poll() is None, "petseg serve exited before the server answered"
            assert time.monotonic() < deadline, "the server did not answer within 300 s"
            try:
                if requests.get(f"http://127.0.0.1:{port}{path}", timeout=2).ok:
                    break
            except (requests.ConnectionError, requests.Timeout):  # not listening, or still loading the model
                time.sleep(0.5)
        server = psutil.Process(serve.pid).children(recursive=True)
        assert len(server) >= fewest
        serve.send_signal(signum)
        serve.wait(timeout=60)
        gone, alive = psutil.wait_procs(server, timeout=30)
        assert not alive, [process.cmdline() for process in alive]
        with pytest.raises(requests.ConnectionError):
            requests.get(f"http://127.0.0.1:{port}{path}", timeout=2)
    finally:
        if serve.poll() is None:
            serve.kill()


@pytest.mark.parametrize("server_kind", sorted(LIVENESS))
def test_petseg_stop_leaves_no_process_of_a_detached_server(release_dir, tmp_path, server_kind):
    import psutil

    deployment = local.deploy_local(release_dir, server=server_kind, log_path=tmp_path / "serving.log",
                                    timeout=300)
    leader = psutil.Process(deployment["pid"])
    processes = [leader, *leader.children(recursive=True)]
    assert len(processes) >= LIVENESS[server_kind][1]
    assert local.stop_local(deployment["pid"]) is True
    gone, alive = psutil.wait_procs(processes, timeout=30)
    assert not alive, [process.cmdline() for process in alive]
