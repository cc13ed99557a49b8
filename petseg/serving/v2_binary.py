"""The binary data extension of the Open Inference Protocol's REST API, over bytes.

An inference request may be a JSON header followed by the raw bytes of its
inputs (``Inference-Header-Content-Length`` says where the header ends);
`translate_request` makes it plain JSON for MLServer (a BYTES input's
elements become base64 strings; another input's bytes become one base64
string, which `petseg.serving.v2_messages` reads as the tensor's bytes).
Outputs the request asks for as binary (``"binary_data": true`` on an output,
or ``"binary_data_output": true`` on the request) come back from
`encode_binary_response` as raw bytes after the JSON header, in little-endian
order, as tritonclient expects. `petseg.serving.v2_http` calls both.
"""

from __future__ import annotations

import base64
import struct

import numpy as np
import orjson

from petseg.serving.messages import BadRequest, Limits, check_list_size, describe

HEADER_LENGTH = b"inference-header-content-length"
DTYPES = {"BOOL": "?", "UINT8": "u1", "UINT16": "<u2", "UINT32": "<u4", "UINT64": "<u8", "INT8": "i1",
          "INT16": "<i2", "INT32": "<i4", "INT64": "<i8", "FP16": "<f2", "FP32": "<f4", "FP64": "<f8"}
"""numpy dtypes of the protocol's datatypes, as the binary data extension lays them out."""


def translate_request(body: bytes, header_length: bytes | None, *,
                      limits: Limits) -> tuple[bytes, set[str] | bool]:
    """An inference request body as plain JSON, and the outputs it asks for as binary.

    Args:
        body: The request body.
        header_length: The ``Inference-Header-Content-Length`` header, if any.
        limits: The numbers the JSON may hold in lists (`petseg.serving.messages.check_list_size`),
            checked before it is decoded, here or by MLServer.

    Returns:
        The JSON body for MLServer, and the names of the outputs to answer as
        binary (True: every output; an empty set: none).

    Raises:
        BadRequest: A binary request whose header or sizes do not fit its body.
    """
    if header_length is None:
        check_list_size(body, limits=limits)
        if b"binary_data" not in body:  # the common case: no JSON to read twice
            return body, set()
        try:
            request = orjson.loads(body)
        except orjson.JSONDecodeError:
            return body, set()  # MLServer refuses it (400 after `_Captured`)
        return body, _binary_outputs(request) if isinstance(request, dict) else set()
    try:
        length = int(header_length)
        if not 0 <= length <= len(body):
            raise ValueError
    except ValueError:
        raise BadRequest("BAD_BINARY", where="Inference-Header-Content-Length",
                         expected=f"the length of the JSON header, 0 to {len(body)}",
                         got=repr(header_length.decode("latin-1")[:40])) from None
    check_list_size(body[:length], limits=limits, where="request header")
    try:
        request = orjson.loads(body[:length])
    except orjson.JSONDecodeError as err:
        raise BadRequest("BAD_JSON", where="request header", expected="a JSON inference request",
                         got=f"invalid JSON ({err})") from None
    if not isinstance(request, dict) or not isinstance(request.get("inputs"), list):
        raise BadRequest("BAD_REQUEST", where="request header", expected='a JSON object with "inputs": [...]',
                         got=describe(request))
    _inline_binary_inputs(request["inputs"], memoryview(body)[length:])
    return orjson.dumps(request), _binary_outputs(request)


def _inline_binary_inputs(inputs: list, binary: memoryview) -> None:
    """Replaces the binary data of inputs (``parameters.binary_data_size``) with base64 data, in order."""
    offset = 0
    for index, tensor in enumerate(inputs):
        parameters = tensor.get("parameters") if isinstance(tensor, dict) else None
        if not isinstance(parameters, dict) or "binary_data_size" not in parameters:
            continue
        where = f"inputs[{index}].parameters.binary_data_size"
        size = parameters.pop("binary_data_size")
        if type(size) is not int or size < 0 or offset + size > len(binary):
            raise BadRequest("BAD_BINARY", where=where,
                             expected=f"a size within the {len(binary) - offset} binary bytes left",
                             got=describe(size))
        raw = bytes(binary[offset:offset + size])
        offset += size
        if tensor.get("datatype") == "BYTES":
            tensor["data"] = [base64.b64encode(element).decode("ascii") for element in _unpack_bytes(raw, where)]
        else:
            tensor["data"] = base64.b64encode(raw).decode("ascii")
    if offset != len(binary):
        raise BadRequest("BAD_BINARY", where="request body",
                         expected=f"{offset} binary bytes (the sum of binary_data_size)",
                         got=f"{len(binary)} bytes after the JSON header")


def _unpack_bytes(raw: bytes, where: str) -> list[bytes]:
    """The elements of a BYTES tensor in the binary layout: each a 4-byte little-endian length, then the bytes."""
    elements, offset = [], 0
    while offset < len(raw):
        if offset + 4 > len(raw):
            raise BadRequest("BAD_BINARY", where=where, expected="BYTES elements, each a 4-byte length then bytes",
                             got="a truncated length")
        (size,) = struct.unpack_from("<I", raw, offset)
        offset += 4
        if offset + size > len(raw):
            raise BadRequest("BAD_BINARY", where=where, expected="BYTES elements, each a 4-byte length then bytes",
                             got=f"an element of {size} bytes with {len(raw) - offset} left")
        elements.append(raw[offset:offset + size])
        offset += size
    return elements


def _binary_outputs(request: dict) -> set[str] | bool:
    parameters = request.get("parameters")
    if isinstance(parameters, dict) and parameters.get("binary_data_output") is True:
        return True
    outputs = request.get("outputs")
    if not isinstance(outputs, list):
        return set()
    return {output.get("name") for output in outputs if isinstance(output, dict)
            and isinstance(output.get("parameters"), dict) and output["parameters"].get("binary_data") is True}


def encode_binary_response(body: bytes, binary_outputs: set[str] | bool) -> tuple[bytes, int] | None:
    """A JSON inference response in the binary data extension: (body, JSON header length).

    None when no output goes binary.
    """
    response = orjson.loads(body)
    blobs = []
    for output in response.get("outputs", []):
        if binary_outputs is not True and output.get("name") not in binary_outputs:
            continue
        dtype = DTYPES.get(output.get("datatype"))
        if dtype is None:  # BYTES outputs stay JSON; petseg answers none
            continue
        raw = np.asarray(output.pop("data"), dtype=dtype).tobytes()
        output.setdefault("parameters", {})["binary_data_size"] = len(raw)
        blobs.append(raw)
    if not blobs:
        return None
    header = orjson.dumps(response)
    return header + b"".join(blobs), len(header)
