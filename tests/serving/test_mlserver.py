"""MLServer with the petseg runtime as a real process: the Open Inference Protocol over REST and gRPC.

The session's ``mlserver`` (conftest.py) serves the same release as the Seldon
microservice ``server``. Clients are the real ones: ``tritonclient.http`` (JSON tensors and the binary data
extension) and, for gRPC, the Open Inference Protocol stubs that MLServer
ships (``mlserver.grpc.dataplane_pb2``) over grpcio, because tritonclient's
gRPC client needs protobuf 6 and TensorFlow 2.18 pins protobuf 5.29.
"""

import base64
import io
import json
import math
import struct

import grpc
import numpy as np
import pytest
import requests
import tritonclient.http as triton
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mlserver.grpc import dataplane_pb2 as pb
from PIL import Image
from serving_support import MAX_IMAGE_BYTES, MAX_PIXELS, b64, bearer, encode, grpc_infer, random_image

from petseg.deploy import client, local
from petseg.errors import ServingError
from petseg.release import bundle
from petseg.serving import messages, predictor

MODEL = "petseg"
INFER = f"/v2/models/{MODEL}/infer"


def _photo(seed: int = 3, size: tuple[int, int] = (96, 128)) -> bytes:
    """A JPEG with shapes and noise, so that the classes differ across the image."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 60, (*size, 3), dtype=np.uint8)
    pixels[20:70, 30:100] += np.array([180, 120, 60], np.uint8)
    return encode(pixels, "JPEG", quality=90)


def _bytes_input(jpeg: bytes) -> dict:
    return {"name": "image", "datatype": "BYTES", "shape": [1], "data": [b64(jpeg)]}


def _uint8_input(pixels: np.ndarray) -> dict:
    return {"name": "image", "datatype": "UINT8", "shape": [1, *pixels.shape], "data": pixels.ravel().tolist()}


def _infer(http, mlserver, body: dict) -> dict:
    response = http.post(mlserver["url"] + INFER, json=body, timeout=60)
    assert response.status_code == 200, response.text[:500]
    return response.json()


def _output(answer: dict, name: str) -> np.ndarray:
    (output,) = [o for o in answer["outputs"] if o["name"] == name]
    dtype = {"UINT8": np.uint8, "FP32": np.float32}[output["datatype"]]
    return np.asarray(output["data"], dtype=dtype).reshape(output["shape"])


def _assert_refused(response, *, status: int | None = None, reason: str | None = None):
    """A 4xx with the protocol's error body that says what was expected and what came."""
    assert 400 <= response.status_code < 500, (response.status_code, response.text[:300])
    if status:
        assert response.status_code == status, response.text[:300]
    error = response.json()["error"]
    assert isinstance(error, str) and "expected" in error, error
    if reason:
        assert error.startswith(reason), error


# -- the server -------------------------------------------------------------------------------------


def test_deployment_record_and_health(http, mlserver):
    assert (mlserver["server"], mlserver["protocol"]) == ("mlserver", "v2")
    for path in ("/v2/health/live", "/v2/health/ready", f"/v2/models/{MODEL}/ready"):
        assert http.get(mlserver["url"] + path, timeout=10).status_code == 200, path
    described = http.get(f"{mlserver['url']}/v2/models/{MODEL}", timeout=10).json()
    assert {(t["name"], t["datatype"]) for t in described["inputs"]} == {("image", "UINT8"), ("image", "BYTES")}
    assert [t["name"] for t in described["outputs"]] == ["mask", "probabilities"]


def test_mask_by_default_with_provenance(http, mlserver, tags):
    pixels = random_image(40, 52)
    answer = _infer(http, mlserver, {"inputs": [_uint8_input(pixels)]})
    assert [o["name"] for o in answer["outputs"]] == ["mask"]
    mask = _output(answer, "mask")
    assert mask.shape == (1, 40, 52) and set(np.unique(mask)) <= {1, 2, 3}
    assert {key: answer["parameters"][key] for key in tags} == tags
    assert answer["model_name"] == MODEL


def test_probabilities_on_request_equal_the_in_process_prediction(http, mlserver, release_dir):
    pixels = random_image(64, 64, seed=1)
    answer = _infer(http, mlserver, {"inputs": [_uint8_input(pixels)],
                                     "outputs": [{"name": "mask"}, {"name": "probabilities"}]})
    probs = _output(answer, "probabilities")
    expected = predictor.Predictor(bundle.load_release(str(release_dir))).predict(pixels[None] / np.float32(255))
    assert probs.shape == (1, 64, 64, 3) and probs.dtype == np.float32
    np.testing.assert_allclose(probs, expected, atol=1e-5)
    np.testing.assert_array_equal(_output(answer, "mask"), messages.class_mask(probs))


def test_a_batch_of_images_of_one_size(http, mlserver):
    jpegs = [_photo(seed) for seed in (1, 2, 3)]
    answer = _infer(http, mlserver, {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [3],
                                                 "data": [b64(jpeg) for jpeg in jpegs]}]})
    assert _output(answer, "mask").shape == (3, 96, 128)


def test_the_same_mask_from_both_servers_and_every_client(server, mlserver):
    """One JPEG through Seldon v1 (binData, ndarray) and v2 (JSON, binary extension, gRPC): one mask, to the byte."""
    jpeg = _photo()
    pixels = np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB"))
    masks = {}

    # SeldonClient sends no Authorization header: the messages it sends, with one.
    answer = requests.post(server["url"] + "/api/v1.0/predictions", json={"binData": b64(jpeg)}, headers=bearer(),
                           timeout=60).json()
    png = np.asarray(Image.open(io.BytesIO(base64.b64decode(answer["binData"]))))
    masks["seldon binData"] = np.argmax(png, axis=-1) + 1  # the PNG holds probability * 255
    answer = requests.post(server["url"] + "/api/v1.0/predictions", json={"data": {"ndarray": pixels.tolist()}},
                           headers=bearer(), timeout=60).json()
    values = np.asarray(answer["data"]["ndarray"])
    masks["seldon ndarray"] = np.argmax(np.round(values * 255), axis=-1) + 1

    v2 = triton.InferenceServerClient(mlserver["url"].removeprefix("http://"))
    tensor = triton.InferInput("image", [1, *pixels.shape], "UINT8")
    tensor.set_data_from_numpy(pixels[None], binary_data=False)
    result = v2.infer(MODEL, [tensor], outputs=[triton.InferRequestedOutput("mask", binary_data=False)],
                      headers=bearer())
    masks["v2 JSON tensor"] = result.as_numpy("mask")[0]
    tensor = triton.InferInput("image", [1], "BYTES")
    tensor.set_data_from_numpy(np.array([jpeg], dtype=np.object_), binary_data=True)
    result = v2.infer(MODEL, [tensor], outputs=[triton.InferRequestedOutput("mask", binary_data=True)],
                      headers=bearer())
    masks["v2 binary extension, JPEG"] = result.as_numpy("mask")[0]
    tensor = triton.InferInput("image", [1, *pixels.shape], "UINT8")
    tensor.set_data_from_numpy(pixels[None], binary_data=True)
    result = v2.infer(MODEL, [tensor], outputs=[triton.InferRequestedOutput("mask", binary_data=True)],
                      headers=bearer())
    masks["v2 binary extension, UINT8"] = result.as_numpy("mask")[0]

    for name, request in {
        "v2 gRPC, JPEG": pb.ModelInferRequest(
            model_name=MODEL, inputs=[pb.ModelInferRequest.InferInputTensor(name="image", datatype="BYTES", shape=[1])],
            raw_input_contents=[struct.pack("<I", len(jpeg)) + jpeg]),
        "v2 gRPC, UINT8": pb.ModelInferRequest(
            model_name=MODEL, inputs=[pb.ModelInferRequest.InferInputTensor(
                name="image", datatype="UINT8", shape=[1, *pixels.shape])],
            raw_input_contents=[pixels.tobytes()]),
    }.items():
        response = grpc_infer(mlserver["grpc_port"], request)
        (output,) = response.outputs
        assert (output.name, output.datatype) == ("mask", "UINT8")
        masks[name] = np.frombuffer(response.raw_output_contents[0], np.uint8).reshape(output.shape)[0]

    reference = masks["seldon binData"].astype(np.uint8)
    assert reference.shape == pixels.shape[:2] and len(np.unique(reference)) > 1
    for name, mask in masks.items():
        assert mask.dtype == np.uint8 or name.startswith("seldon"), name
        assert mask.astype(np.uint8).tobytes() == reference.tobytes(), name


def test_grpc_answers_provenance_and_refuses_bad_input(mlserver, tags):
    jpeg = _photo()
    request = pb.ModelInferRequest(
        model_name=MODEL, inputs=[pb.ModelInferRequest.InferInputTensor(name="image", datatype="BYTES", shape=[1])],
        raw_input_contents=[struct.pack("<I", len(jpeg)) + jpeg])
    response = grpc_infer(mlserver["grpc_port"], request)
    assert {key: response.parameters[key].string_param for key in tags} == tags
    bad = pb.ModelInferRequest(
        model_name=MODEL, inputs=[pb.ModelInferRequest.InferInputTensor(
            name="image", datatype="BYTES", shape=[1], contents=pb.InferTensorContents(bytes_contents=[b"GIF89a"]))])
    with pytest.raises(grpc.RpcError) as refused:
        grpc_infer(mlserver["grpc_port"], bad)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "BAD_IMAGE" in refused.value.details()
    huge = pb.ModelInferRequest(
        model_name=MODEL, inputs=[pb.ModelInferRequest.InferInputTensor(name="image", datatype="BYTES", shape=[1])],
        raw_input_contents=[b"\0" * (2 * MAX_IMAGE_BYTES)])
    with pytest.raises(grpc.RpcError) as refused:
        grpc_infer(mlserver["grpc_port"], huge)
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_client_predict_v2_writes_the_mask_the_seldon_server_answers(server, mlserver, tmp_path, tags):
    image_path = tmp_path / "pet.jpg"
    image_path.write_bytes(_photo(size=(80, 100)))
    v1 = client.predict(server["url"], image_path, tmp_path / "v1.png")
    v2 = client.predict(mlserver["url"], image_path, tmp_path / "v2.png", protocol="v2")
    assert (tmp_path / "v2.png").read_bytes() == (tmp_path / "v1.png").read_bytes()
    assert v2["tags"] == v1["tags"] and {key: v2["tags"][key] for key in tags} == tags
    assert Image.open(v2["figure"]).width > 3 * 100


def test_client_predict_v2_names_the_refusal(mlserver, tmp_path):
    image_path = tmp_path / "not.jpg"
    image_path.write_bytes(b"GIF89a not an image")
    with pytest.raises(ServingError, match="HTTP 400: BAD_IMAGE"):
        client.predict(mlserver["url"], image_path, tmp_path / "mask.png", protocol="v2")


# -- bad requests -----------------------------------------------------------------------------------


def _binary(header: dict, blob: bytes, *, length: int | None = None) -> tuple[bytes, dict]:
    head = json.dumps(header).encode()
    return head + blob, {"Inference-Header-Content-Length": str(len(head) if length is None else length),
                         "Content-Type": "application/octet-stream"}


def _tensor(datatype="UINT8", shape=(1, 2, 2, 3), data=None, **extra) -> bytes:
    data = [0] * math.prod(shape) if data is None else data
    return json.dumps({"inputs": [{"name": "image", "datatype": datatype, "shape": list(shape), "data": data}],
                       **extra}).encode()


@pytest.mark.parametrize(
    "body, reason",
    [
        (b"{not json", "BAD_REQUEST"),
        (b"[1, 2, 3]", "BAD_REQUEST"),
        (b"{}", "BAD_REQUEST"),
        (b'{"inputs": [{"name": "image", "datatype": "FOO", "shape": [1], "data": [1]}]}', "BAD_REQUEST"),
        (json.dumps({"inputs": []}).encode(), "BAD_INPUTS"),
        (_tensor(datatype="FP32"), "BAD_DTYPE"),
        (_tensor(shape=(2, 2, 3)), "BAD_SHAPE"),
        (_tensor(shape=(1, 2, 2, 4)), "BAD_SHAPE"),
        (_tensor(shape=(1, 0, 2, 3)), "EMPTY"),
        (_tensor(data=[0] * 11), "BAD_SHAPE"),
        (_tensor(data=[256] + [0] * 11), "BAD_VALUES"),
        (_tensor(data=[-1] + [0] * 11), "BAD_VALUES"),
        (_tensor(data=[0.5] + [0] * 11), "BAD_DATA"),
        (_tensor(data=[True] + [0] * 11), "BAD_DATA"),
        (_tensor(data=["a"] * 12), "BAD_DATA"),
        (_tensor(data=[[0, 0, 0]] * 3 + [[0, 0]]), "BAD_DATA"),
        (_tensor(data="!!notbase64!!"), "BAD_BASE64"),
        (_tensor(shape=(1, 2000, 2000, 3), data=[0]), "TOO_LARGE"),
        (_tensor(datatype="BYTES", shape=(1,), data=["!!!"]), "BAD_BASE64"),
        (_tensor(datatype="BYTES", shape=(1,), data=[b64(b"GIF89a not really")]), "BAD_IMAGE"),
        (_tensor(datatype="BYTES", shape=(2,), data=[b64(b"x")]), "BAD_DATA"),
        (_tensor(datatype="BYTES", shape=(1,), data=[5]), "BAD_DATA"),
        (_tensor(outputs=[{"name": "segmentation"}]), "BAD_OUTPUT"),
    ],
)
def test_bad_json_request_gets_400_saying_what_was_expected(http, mlserver, body, reason):
    response = http.post(mlserver["url"] + INFER, data=body, headers={"Content-Type": "application/json"}, timeout=60)
    _assert_refused(response, status=413 if reason == "TOO_LARGE" else 400, reason=reason)


def test_images_of_two_sizes_and_too_many_pixels_are_refused(http, mlserver):
    two = {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [2],
                       "data": [b64(_photo(size=(10, 10))), b64(_photo(size=(12, 10)))]}]}
    _assert_refused(http.post(mlserver["url"] + INFER, json=two, timeout=60), status=400, reason="BAD_SHAPE")
    side = math.isqrt(MAX_PIXELS) + 1
    big = encode(np.zeros((side, side, 3), np.uint8), "PNG")
    response = http.post(mlserver["url"] + INFER, json={"inputs": [_bytes_input(big)]}, timeout=60)
    _assert_refused(response, status=413, reason="TOO_LARGE")


@pytest.mark.parametrize("case", ["header too long", "header not a number", "sizes beyond the body", "bytes left over",
                                  "truncated BYTES element", "header not JSON"])
def test_bad_binary_request_gets_400(http, mlserver, case):
    jpeg = _photo()
    element = struct.pack("<I", len(jpeg)) + jpeg
    header = {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1],
                          "parameters": {"binary_data_size": len(element)}}]}
    body, headers = _binary(header, element)
    if case == "header too long":
        headers["Inference-Header-Content-Length"] = str(len(body) + 1)
    elif case == "header not a number":
        headers["Inference-Header-Content-Length"] = "twelve"
    elif case == "sizes beyond the body":
        header["inputs"][0]["parameters"]["binary_data_size"] = len(element) + 1
        body, headers = _binary(header, element)
    elif case == "bytes left over":
        body, headers = _binary(header, element + b"xx")
    elif case == "truncated BYTES element":
        header["inputs"][0]["parameters"]["binary_data_size"] = 10
        body, headers = _binary(header, struct.pack("<I", 100) + b"abcdef")
    else:
        body, headers = _binary(header, element, length=3)
    _assert_refused(http.post(mlserver["url"] + INFER, data=body, headers=headers, timeout=60), status=400)


def test_oversized_body_gets_413_after_the_server_reads_it(http, mlserver):
    """The client sends all of a body three times the limit and reads the answer: no broken pipe."""
    body = _tensor(datatype="BYTES", shape=(1,), data=["A" * (3 * MAX_IMAGE_BYTES)])
    response = http.post(mlserver["url"] + INFER, data=body, headers={"Content-Type": "application/json"}, timeout=60)
    _assert_refused(response, status=413, reason="TOO_LARGE")
    _infer(http, mlserver, {"inputs": [_bytes_input(_photo())]})


# Requests that are wrong in one way each; every one must get a 4xx with {"error": ...}.
_SMALL = st.integers(1, 4)
_DATATYPES = st.sampled_from(["BOOL", "UINT16", "INT8", "INT64", "FP16", "FP32", "FP64", "uint8", "", "TENSOR"])


_NOT_A_PIXEL = st.one_of(st.integers(256, 10**6), st.integers(-(10**6), -1), st.floats(0.1, 0.9), st.booleans(),
                         st.none(), st.text(max_size=3), st.just([0]))


@st.composite
def _wrong_uint8_tensor(draw):
    """A UINT8 tensor with a wrong shape, or the right shape [1, 2, 2, 3] and wrong data."""
    if draw(st.booleans()):
        shape = draw(st.one_of(
            st.lists(_SMALL, min_size=1, max_size=3),  # rank 1 to 3
            st.tuples(_SMALL, _SMALL, _SMALL, st.sampled_from([1, 2, 4])).map(list),  # not RGB
            st.lists(_SMALL, min_size=5, max_size=6),
            st.tuples(st.just(1), _SMALL, st.just(0), st.just(3)).map(list),  # empty
            st.lists(st.integers(-3, -1), min_size=4, max_size=4),
        ))
        data = [0] * max(1, math.prod(shape)) if all(n > 0 for n in shape) else [0]
    else:
        shape = [1, 2, 2, 3]
        data = draw(st.one_of(
            st.lists(st.integers(0, 255), max_size=20).filter(lambda values: len(values) != 12),
            st.tuples(st.integers(0, 11), _NOT_A_PIXEL).map(lambda bad: [0] * bad[0] + [bad[1]] + [0] * (11 - bad[0])),
            st.just([[0, 0, 0]] * 3 + [[0, 0]]),  # ragged
            st.text(alphabet="!@#$%^&*", min_size=1, max_size=10),  # not base64
            st.just(base64.b64encode(bytes(11)).decode()),  # base64 of 11 bytes, not 12
            st.one_of(st.none(), st.integers(), st.dictionaries(st.text(max_size=3), st.integers(), max_size=2)),
        ))
    return {"inputs": [{"name": "image", "datatype": "UINT8", "shape": shape, "data": data}]}


_BAD_IMAGE_BYTES = st.one_of(
    st.binary(max_size=64),
    st.sampled_from(["GIF", "BMP", "TIFF"]).map(lambda fmt: encode(np.zeros((8, 8, 3), np.uint8), fmt)),
    st.sampled_from(["JPEG", "PNG"]).map(lambda fmt: encode(random_image(32, 32), fmt)).flatmap(
        lambda whole: st.integers(4, len(whole) // 2).map(lambda n: whole[:n])),  # truncated files
)


@st.composite
def _wrong_bytes_tensor(draw):
    element = draw(st.one_of(
        _BAD_IMAGE_BYTES.map(b64),
        st.text(max_size=40).filter(lambda s: s.strip() != "" and len(s) % 4 != 0),
        st.one_of(st.integers(), st.none(), st.booleans(), st.lists(st.integers(), max_size=3)),
    ))
    count = draw(st.sampled_from([1, 1, 2]))
    return {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [count], "data": [element] * count}]}


@st.composite
def _wrong_request(draw):
    good = _uint8_input(np.zeros((2, 2, 3), np.uint8))
    return draw(st.one_of(
        st.just({"inputs": []}),
        st.just({"inputs": [good, good]}),
        _DATATYPES.map(lambda datatype: {"inputs": [{**good, "datatype": datatype}]}),
        st.sampled_from([{"inputs": [good], "outputs": [{"name": name}]} for name in ("seg", "", "MASK")]),
        st.sampled_from([{"inputs": None}, {"inputs": good}, {"inputs": [{"name": "image"}]}, {"outputs": []},
                         {"inputs": [{**good, "shape": "1,2,2,3"}]}, {"inputs": [good], "parameters": 5}]),
        st.one_of(st.integers(), st.text(max_size=10), st.none(), st.lists(st.integers(), max_size=3)),
    ))


@st.composite
def _wrong_binary(draw):
    """A binary-extension request whose header or sizes do not fit its body."""
    element = struct.pack("<I", 4) + b"abcd"
    size = draw(st.one_of(st.integers(-5, 20), st.text(max_size=3), st.none()))
    header = {"inputs": [{"name": "image", "datatype": draw(st.sampled_from(["BYTES", "UINT8"])),
                          "shape": [1, 1, 1, 3] if draw(st.booleans()) else [1],
                          "parameters": {"binary_data_size": size}}]}
    head = json.dumps(header).encode()
    length = draw(st.one_of(st.just(len(head)), st.integers(-2, len(head) + 30).map(str),
                            st.text(alphabet="abcxyz-+.", max_size=4)))
    return head + element + draw(st.binary(max_size=8)), str(length)


@st.composite
def _malformed_request(draw):
    """(body, headers) of an inference request the server cannot use."""
    kind = draw(st.sampled_from(["uint8", "uint8", "bytes", "bytes", "request", "raw", "binary"]))
    if kind == "raw":
        return draw(st.binary(max_size=200)), {"Content-Type": "application/json"}
    if kind == "binary":
        body, length = draw(_wrong_binary())
        return body, {"Inference-Header-Content-Length": length, "Content-Type": "application/octet-stream"}
    message = draw({"uint8": _wrong_uint8_tensor(), "bytes": _wrong_bytes_tensor(), "request": _wrong_request()}[kind])
    return json.dumps(message).encode(), {"Content-Type": "application/json"}


def test_malformed_requests_get_4xx_and_the_server_stays_up(http, mlserver):
    seen = []

    @settings(max_examples=300, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(_malformed_request())
    def check(request):
        body, headers = request
        response = http.post(mlserver["url"] + INFER, data=body, headers=headers, timeout=60)
        assert 400 <= response.status_code < 500, (response.status_code, response.text[:300], body[:200])
        assert isinstance(response.json()["error"], str)
        seen.append(response.status_code)

    check()
    assert len(seen) >= 300
    assert http.get(mlserver["url"] + f"/v2/models/{MODEL}/ready", timeout=10).status_code == 200
    _infer(http, mlserver, {"inputs": [_bytes_input(_photo())]})


# -- provenance check at start ----------------------------------------------------------------------


def test_fingerprint_mismatch_refuses_to_start(release_dir, manifest, tmp_path):
    wrong = "0" * 64
    with pytest.raises(ServingError) as refused:
        local.deploy_local(release_dir, server="mlserver", log_path=tmp_path / "serving.log", timeout=300,
                           fingerprint=wrong)
    assert wrong in str(refused.value) and manifest["model_fingerprint"] in str(refused.value)
    assert "exited with status" in str(refused.value)


def test_unknown_server_is_a_config_error(release_dir):
    from petseg.errors import ConfigError

    with pytest.raises(ConfigError, match="seldon, mlserver"):
        local.deploy_local(release_dir, server="triton")


def test_base64_uint8_data_is_the_tensor_bytes(http, mlserver):
    """A JSON client may send UINT8 data as one base64 string of its bytes, as the binary extension carries them."""
    pixels = random_image(20, 30, seed=5)
    as_list = _infer(http, mlserver, {"inputs": [_uint8_input(pixels)]})
    as_text = _infer(http, mlserver, {"inputs": [{**_uint8_input(pixels), "data": base64.b64encode(
        pixels.tobytes()).decode()}]})
    np.testing.assert_array_equal(_output(as_list, "mask"), _output(as_text, "mask"))


def test_requests_that_are_not_inference_pass_through(http, mlserver):
    response = requests.post(mlserver["url"] + "/v2/repository/index", json={}, headers=bearer("ops"), timeout=10)
    assert response.status_code == 200 and any(m["name"] == MODEL for m in response.json())
    assert http.get(mlserver["url"] + "/v2/models/nope", timeout=10).status_code == 404
    response = http.post(mlserver["url"] + "/v2/models/nope/infer", json={"inputs": []}, timeout=10)
    assert response.status_code == 404 and "nope" in response.json()["error"]
