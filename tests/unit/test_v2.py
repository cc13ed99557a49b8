"""The Open Inference Protocol pieces without a server: tensors (v2_messages), the binary data extension (v2_binary).

The servers themselves are tested in tests/serving/test_mlserver.py.
"""

import base64
import io
import json
import struct

import numpy as np
import pytest
import tritonclient.http as triton
from PIL import Image

from petseg.serving import messages, v2_binary, v2_messages
from petseg.serving.messages import BadRequest, Limits

LIMITS = Limits(max_bytes=100_000, max_pixels=10_000)


def _png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def _tensor(datatype="UINT8", shape=(1, 2, 2, 3), data=...) -> v2_messages.Tensor:
    shape = list(shape) if isinstance(shape, tuple) else shape
    return v2_messages.Tensor("image", datatype, shape, list(range(12)) if data is ... else data)


# -- the mask both servers imply --------------------------------------------------------------------


def _near_ties(seed: int) -> np.ndarray:
    """Probabilities whose top classes sit within a hair of each other and of the 8-bit and 4-decimal steps."""
    rng = np.random.default_rng(seed)
    # Halfway between two 8-bit steps, give or take less than a 4-decimal step: rounding to
    # 4 decimals first can move such a value to the other 8-bit step.
    top = (rng.integers(60, 200, (64, 64)) + 0.5 + rng.uniform(-0.013, 0.013, (64, 64))) / 255.0
    second = top + rng.choice([-1 / 255, -2e-4, -3e-5, 0.0, 3e-5, 2e-4, 1 / 255], (64, 64))
    probs = np.stack([top, second, np.clip(1 - top - second, 0, 1)], axis=-1)
    return rng.permuted(probs, axis=-1).astype(np.float32)


@pytest.mark.parametrize("seed", range(5))
def test_class_mask_is_what_either_seldon_answer_implies(seed):
    probs = _near_ties(seed)
    mask = messages.class_mask(probs)
    png = np.asarray(Image.open(io.BytesIO(messages.probability_png(probs))))
    ndarray = np.asarray(json.loads(json.dumps(messages.rounded(probs).tolist())))  # as the answer travels
    assert mask.dtype == np.uint8 and set(np.unique(mask)) <= {1, 2, 3}
    np.testing.assert_array_equal(np.argmax(png, axis=-1) + 1, mask)
    np.testing.assert_array_equal(np.argmax(np.round(ndarray * 255), axis=-1) + 1, mask)


def test_ties_go_to_the_first_class():
    probs = np.array([[[0.4, 0.4, 0.2], [0.2, 0.4, 0.4], [1 / 3, 1 / 3, 1 / 3]]], np.float32)
    assert messages.class_mask(probs).tolist() == [[1, 2, 1]]


# -- reading inputs ---------------------------------------------------------------------------------


def test_uint8_pixels_flat_nested_or_base64_read_as_binData_reads_them():
    pixels = np.arange(12, dtype=np.uint8).reshape(1, 2, 2, 3) * 20
    expected = pixels.astype(np.float32) / 255.0
    for data in (pixels.ravel().tolist(), pixels.tolist(), base64.b64encode(pixels.tobytes()).decode()):
        images = v2_messages.read_images([_tensor(data=data)], limits=LIMITS)[0]
        assert images.dtype == np.float32
        np.testing.assert_array_equal(images, expected)


def test_bytes_images_as_raw_bytes_or_base64():
    pixels = np.full((5, 7, 3), 90, np.uint8)
    png = _png(pixels)
    for element in (png, base64.b64encode(png).decode()):
        images = v2_messages.read_images([_tensor("BYTES", [2], [element, element])], limits=LIMITS)[0]
        assert images.shape == (2, 5, 7, 3)


@pytest.mark.parametrize(
    "tensors, kind",
    [
        ([], "BAD_INPUTS"),
        ([_tensor(), _tensor()], "BAD_INPUTS"),
        ([_tensor("FP32")], "BAD_DTYPE"),
        ([_tensor(shape=(2, 2, 3))], "BAD_SHAPE"),
        ([_tensor(shape="1,2,2,3")], "BAD_SHAPE"),
        ([_tensor(shape=(1, 0, 2, 3), data=[])], "EMPTY"),
        ([_tensor(shape=(1, 100, 101, 3), data=[0])], "TOO_LARGE"),
        ([_tensor(data=[0] * 11)], "BAD_SHAPE"),
        ([_tensor(data=[0] * 11 + [256])], "BAD_VALUES"),
        ([_tensor(data=[0] * 11 + [True])], "BAD_DATA"),
        ([_tensor(data=[0] * 11 + [0.5])], "BAD_DATA"),
        ([_tensor(data=[[0, 0, 0]] * 3 + [[0, 0]])], "BAD_DATA"),
        ([_tensor(data=[2**70] * 12)], "BAD_DATA"),
        ([_tensor(data="***")], "BAD_BASE64"),
        ([_tensor(data=None)], "BAD_DATA"),
        ([_tensor("BYTES", [1], [b"GIF89a"])], "BAD_IMAGE"),
        ([_tensor("BYTES", [2], [b"x"])], "BAD_DATA"),
        ([_tensor("BYTES", [1], [7])], "BAD_DATA"),
        ([_tensor("BYTES", [2], [_png(np.zeros((4, 4, 3), np.uint8)), _png(np.zeros((4, 5, 3), np.uint8))])],
         "BAD_SHAPE"),
    ],
)
def test_bad_inputs_say_what_was_expected(tensors, kind):
    with pytest.raises(BadRequest) as refused:
        v2_messages.read_images(tensors, limits=LIMITS)[0]
    assert refused.value.kind == kind and "expected" in str(refused.value)
    assert refused.value.status == (413 if kind == "TOO_LARGE" else 400)


def test_outputs_default_to_the_mask_and_refuse_unknown_names():
    assert v2_messages.requested_outputs(None) == ("mask",)
    assert v2_messages.requested_outputs(["probabilities", "mask", "mask"]) == ("probabilities", "mask")
    with pytest.raises(BadRequest, match="outputs among"):
        v2_messages.requested_outputs(["segmentation"])


def test_encoded_outputs():
    probs = _near_ties(0)[None]
    mask, values = v2_messages.encode_outputs(probs, ("mask", "probabilities"))
    assert (mask["datatype"], mask["shape"]) == ("UINT8", [1, 64, 64])
    assert mask["data"] == messages.class_mask(probs).ravel().tolist()
    assert (values["datatype"], values["shape"]) == ("FP32", [1, 64, 64, 3])
    assert np.array_equal(np.asarray(values["data"], np.float32), probs.ravel())


# -- the binary data extension ----------------------------------------------------------------------


def test_a_binary_request_becomes_json_with_base64_data():
    png = _png(np.zeros((3, 3, 3), np.uint8))
    pixels = bytes(range(12))
    header = json.dumps({"inputs": [
        {"name": "a", "datatype": "BYTES", "shape": [1], "parameters": {"binary_data_size": 4 + len(png)}},
        {"name": "b", "datatype": "UINT8", "shape": [1, 2, 2, 3], "parameters": {"binary_data_size": 12}},
    ], "outputs": [{"name": "mask", "parameters": {"binary_data": True}}, {"name": "probabilities"}]}).encode()
    body = header + struct.pack("<I", len(png)) + png + pixels
    translated, binary = v2_binary.translate_request(body, str(len(header)).encode(), limits=LIMITS)
    request = json.loads(translated)
    assert request["inputs"][0]["data"] == [base64.b64encode(png).decode()]
    assert base64.b64decode(request["inputs"][1]["data"]) == pixels
    assert "binary_data_size" not in request["inputs"][0]["parameters"]
    assert binary == {"mask"}


def test_a_json_request_passes_untouched_and_names_its_binary_outputs():
    body = json.dumps({"inputs": [], "parameters": {"binary_data_output": True}}).encode()
    assert v2_binary.translate_request(body, None, limits=LIMITS) == (body, True)
    assert v2_binary.translate_request(b'{"inputs": []}', None, limits=LIMITS) == (b'{"inputs": []}', set())


@pytest.mark.parametrize("length, blob", [(b"x", b""), (b"-1", b""), (b"9999", b""), (None, b"")])
def test_a_broken_binary_header_is_refused(length, blob):
    header = json.dumps({"inputs": [{"name": "a", "datatype": "BYTES", "shape": [1],
                                     "parameters": {"binary_data_size": 10}}]}).encode()
    with pytest.raises(BadRequest, match="BAD_BINARY|expected"):
        v2_binary.translate_request(header + blob, length if length is not None else str(len(header)).encode(),
                                    limits=LIMITS)


def test_a_binary_response_is_what_tritonclient_reads():
    mask = np.arange(6, dtype=np.uint8).reshape(1, 2, 3)
    probs = np.linspace(0, 1, 18, dtype=np.float32).reshape(1, 2, 3, 3)
    response = json.dumps({"model_name": "petseg", "parameters": {"model_version": "v"}, "outputs": [
        {"name": "mask", "datatype": "UINT8", "shape": [1, 2, 3], "data": mask.ravel().tolist()},
        {"name": "probabilities", "datatype": "FP32", "shape": [1, 2, 3, 3], "data": probs.ravel().tolist()},
    ]}).encode()
    body, header_length = v2_binary.encode_binary_response(response, {"mask"})
    result = triton.InferResult.from_response_body(body, header_length=header_length)
    np.testing.assert_array_equal(result.as_numpy("mask"), mask)
    np.testing.assert_array_equal(result.as_numpy("probabilities"), probs)  # stayed JSON
    assert result.get_response()["parameters"] == {"model_version": "v"}
    body, header_length = v2_binary.encode_binary_response(response, True)
    np.testing.assert_array_equal(triton.InferResult.from_response_body(body, header_length=header_length)
                                  .as_numpy("probabilities"), probs)
