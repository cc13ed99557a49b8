"""Open Inference Protocol (KServe v2) tensors: input tensors in, images out; probabilities in, output tensors out.

The MLServer runtime (`petseg.entrypoints.mlserver_runtime`) hands this module the
inputs and requested outputs of an inference request as plain values
(name, datatype, shape, data, parameters), the same whether the request
came as JSON, with the binary data extension or over gRPC:

- one input (named ``image`` by convention), either
  ``UINT8 [N, H, W, 3]``: RGB pixels, ``data`` a flat or nested list of
  integers 0-255, or one base64 string of the N*H*W*3 bytes;
  or ``BYTES [N]``: N JPEG or PNG files of one size, each element the file's
  bytes (gRPC, binary extension) or a base64 string of them (JSON);
- outputs ``mask`` (the default) and ``probabilities`` (on request).

Answers: ``mask``, ``UINT8 [N, H, W]``, the trimap value of each pixel's class
(1 pet, 2 background, 3 border), exactly as `petseg.serving.messages.class_mask`
derives it from the Seldon answer of the same image; ``probabilities``,
``FP32 [N, H, W, 3]``, the calibrated probabilities of (pet, background,
border). Anything else is a `petseg.serving.messages.BadRequest`.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import math
from typing import Any

import numpy as np

from petseg import oxford
from petseg.serving.messages import BadRequest, Limits, base64_bytes, class_mask, decode_image, describe

OUTPUTS = ("mask", "probabilities")
DEFAULT_OUTPUTS = ("mask",)
INPUT_NAME = "image"
_PIXELS = "UINT8 [N, H, W, 3] (RGB pixels 0-255) or BYTES [N] (JPEG or PNG files)"


@dataclasses.dataclass(frozen=True)
class Tensor:
    """One input tensor of a request, as the server decoded it.

    Attributes:
        name: The input's name.
        datatype: ``UINT8``, ``BYTES``, ...
        shape: Its shape.
        data: A list (flat or nested), a string, or None.
    """

    name: str
    datatype: str
    shape: list
    data: Any


def read_images(inputs: list[Tensor], *, limits: Limits,
                work_side: int | None = None) -> tuple[np.ndarray, tuple[int, int]]:
    """Reads the images of an inference request.

    Args:
        inputs: The request's input tensors.
        limits: Size limits.
        work_side: JPEG and PNG files larger than this are decoded reduced
            (`petseg.serving.messages.decode_image`); pixel tensors are kept as sent.

    Returns:
        float32 (N, h, w, 3) in [0, 1], as `petseg.serving.messages.parse_prediction`
        reads the same pixels, and (H, W) of the images sent (the answer's size).

    Raises:
        BadRequest: Not exactly one input, another datatype or shape, wrong
            values, undecodable images, or more than the limits allow.
    """
    if len(inputs) != 1:
        raise BadRequest("BAD_INPUTS", where="inputs", expected=f"one input tensor: {_PIXELS}",
                         got=f"{len(inputs)} inputs")
    tensor = inputs[0]
    where = f"inputs[{tensor.name!r}]"
    shape = _shape(tensor.shape, where=where)
    if tensor.datatype == "BYTES":
        pixels, size = _encoded_images(tensor.data, shape, where=where, limits=limits, work_side=work_side)
    elif tensor.datatype == "UINT8":
        pixels = _pixels(tensor.data, shape, where=where, limits=limits)
        size = tuple(pixels.shape[1:3])
    else:
        raise BadRequest("BAD_DTYPE", where=f"{where}.datatype", expected=_PIXELS, got=repr(str(tensor.datatype)))
    # As petseg.serving.messages reads binData: float32 pixels / 255, the same bits.
    return pixels.astype(np.float32) / 255.0, size


def requested_outputs(names: list[str] | None) -> tuple[str, ...]:
    """The outputs a request asks for, in its order; `DEFAULT_OUTPUTS` when it names none.

    Raises:
        BadRequest: An output that is not one of `OUTPUTS`.
    """
    if not names:
        return DEFAULT_OUTPUTS
    unknown = [name for name in names if name not in OUTPUTS]
    if unknown:
        raise BadRequest("BAD_OUTPUT", where="outputs", expected=f"outputs among {list(OUTPUTS)}",
                         got=f"{unknown[:4]}")
    return tuple(dict.fromkeys(names))


def encode_outputs(probs: np.ndarray, names: tuple[str, ...], *, mask_probs: np.ndarray | None = None) -> list[dict]:
    """The output tensors answering a request.

    Args:
        probs: (N, H, W, 3) probabilities from `petseg.serving.predictor.Predictor.predict`; when only
            the mask is asked for, their uint8 `petseg.serving.messages.eight_bits` will do.
        names: Outputs to answer, from `requested_outputs`.
        mask_probs: The probabilities the mask comes from, where they are not ``probs`` (a release
            whose mask comes from the raw probabilities answers the calibrated ones).

    Returns:
        ``{"name", "datatype", "shape", "data"}`` per output, ``data`` a flat list.
    """
    tensors = []
    for name in names:
        if name == "mask":
            mask = class_mask(probs if mask_probs is None else mask_probs)
            tensors.append({"name": name, "datatype": "UINT8", "shape": list(mask.shape),
                            "data": mask.ravel().tolist()})
        else:
            values = np.asarray(probs, dtype=np.float32)
            tensors.append({"name": name, "datatype": "FP32", "shape": list(values.shape),
                            "data": values.ravel().tolist()})
    return tensors


def metadata_tensors() -> tuple[list[dict], list[dict]]:
    """The model's inputs and outputs as the protocol's model metadata lists them."""
    inputs = [{"name": INPUT_NAME, "datatype": "UINT8", "shape": [-1, -1, -1, 3]},
              {"name": INPUT_NAME, "datatype": "BYTES", "shape": [-1]}]
    outputs = [{"name": "mask", "datatype": "UINT8", "shape": [-1, -1, -1],
                "parameters": {"content_type": "np", "classes": "1 pet, 2 background, 3 border (trimap values)"}},
               {"name": "probabilities", "datatype": "FP32", "shape": [-1, -1, -1, len(oxford.CLASSES)],
                "parameters": {"content_type": "np", "classes": ", ".join(oxford.CLASSES)}}]
    return inputs, outputs


# -- inputs -----------------------------------------------------------------------------------------


def _shape(shape: Any, *, where: str) -> list[int]:
    if not isinstance(shape, list) or not all(type(n) is int and n >= 0 for n in shape):
        raise BadRequest("BAD_SHAPE", where=f"{where}.shape", expected="a list of non-negative integers",
                         got=describe(shape))
    return shape


def _pixels(data: Any, shape: list[int], *, where: str, limits: Limits) -> np.ndarray:
    """UINT8 data of shape [N, H, W, 3] -> uint8 array."""
    if len(shape) != 4 or shape[3] != 3:
        raise BadRequest("BAD_SHAPE", where=f"{where}.shape", expected="[N, H, W, 3] for UINT8 RGB pixels",
                         got=f"{shape}")
    _check_pixels(math.prod(shape[:3]), where=where, limits=limits)
    if 0 in shape:
        raise BadRequest("EMPTY", where=f"{where}.shape", expected="at least one 1x1 RGB pixel", got=f"{shape}")
    size = math.prod(shape)
    if isinstance(data, str):  # the binary extension's bytes, or a JSON client's base64
        values = np.frombuffer(_base64(data, where=f"{where}.data", limits=limits), dtype=np.uint8)
    elif isinstance(data, list):
        if math.prod(shape[:3]) > limits.max_list_pixels:
            raise BadRequest("TOO_LARGE", where=where, got=f"{math.prod(shape[:3])} pixels as a list",
                             expected=f"at most {limits.max_list_pixels} pixels as a list of numbers "
                                      "(send base64 bytes, the binary data extension, or BYTES images)")
        values = _integers(data, where=f"{where}.data")
    else:
        raise BadRequest("BAD_DATA", where=f"{where}.data",
                         expected="a list of integers 0-255 or a base64 string of the bytes", got=describe(data))
    if values.size != size:
        raise BadRequest("BAD_SHAPE", where=f"{where}.data", expected=f"{size} values (the product of shape {shape})",
                         got=f"{values.size} values")
    return values.reshape(shape).astype(np.uint8, copy=False)


def _integers(data: list, *, where: str) -> np.ndarray:
    """A flat or nested list of JSON integers 0-255 as a flat array."""
    try:
        values = np.asarray(data)
    except (ValueError, OverflowError):  # ragged nesting; integers beyond 64 bits
        raise BadRequest("BAD_DATA", where=where, expected="a rectangular list of integers 0-255",
                         got="nested lists of unequal lengths, or integers too large") from None
    if values.dtype.kind not in "iu":
        names = {"b": "booleans", "f": "floats", "U": "strings", "O": "mixed or nested values"}
        raise BadRequest("BAD_DATA", where=where, expected="integers 0-255",
                         got=names.get(values.dtype.kind, str(values.dtype)))
    if values.size and (values.min() < 0 or values.max() > 255):
        raise BadRequest("BAD_VALUES", where=where, expected="integers 0-255",
                         got=f"values from {values.min()} to {values.max()}")
    # numpy reads a JSON true among integers as 1.
    if _has_bool(data):
        raise BadRequest("BAD_DATA", where=where, expected="integers 0-255", got="booleans among the integers")
    return values.ravel()


def _has_bool(data: list) -> bool:
    """Whether a rectangular (nested) list of numbers holds a boolean."""
    while data and isinstance(data[0], list):
        data = [item for row in data for item in row]
    return bool in set(map(type, data))


def _encoded_images(data: Any, shape: list[int], *, where: str, limits: Limits,
                    work_side: int | None) -> tuple[np.ndarray, tuple[int, int]]:
    """BYTES data of N JPEG or PNG files of one size -> uint8 (N, h, w, 3) and their (H, W)."""
    count = math.prod(shape)
    if not isinstance(data, list) or len(data) != count or count == 0:
        raise BadRequest(
            "BAD_DATA", where=f"{where}.data",
            expected=f"{count or 'at least one'} JPEG or PNG files (the product of shape {shape})",
            got=describe(data))
    images, sizes = [], []  # sizes: the first image's (size, shape), which every other must have
    for index, element in enumerate(data):
        here = f"{where}.data[{index}]"
        if isinstance(element, str):
            element = base64_bytes(element, where=here, limits=limits)
        elif not isinstance(element, bytes):
            raise BadRequest("BAD_DATA", where=here, expected="JPEG or PNG bytes, or base64 of them",
                             got=describe(element))
        image, _, size = decode_image(element, where=here, limits=limits, work_side=work_side)
        if images and (size, image.shape) != sizes[0]:
            raise BadRequest("BAD_SHAPE", where=here, expected=f"images of one size, {sizes[0][0]}",
                             got=f"an image of {size}")
        images.append(image)
        sizes = sizes if len(images) > 1 else [(size, image.shape)]
        _check_pixels(len(images) * size[0] * size[1], where=where, limits=limits)
    return np.stack(images), sizes[0][0]


def _check_pixels(pixels: int, *, where: str, limits: Limits) -> None:
    if pixels > limits.max_pixels:
        raise BadRequest("TOO_LARGE", where=where, expected=f"at most {limits.max_pixels} pixels",
                         got=f"{pixels} pixels")


def _base64(text: str, *, where: str, limits: Limits) -> bytes:
    if len(text) > (limits.max_bytes + 2) // 3 * 4 + 4:
        raise BadRequest("TOO_LARGE", where=where, expected=f"at most {limits.max_bytes} bytes",
                         got=f"{len(text)} base64 characters")
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as err:
        raise BadRequest("BAD_BASE64", where=where, expected="base64 of the tensor's bytes",
                         got=f"invalid base64 ({err})") from None
