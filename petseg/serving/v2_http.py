"""The HTTP edge of the Open Inference Protocol server: body limits, the binary data extension, error bodies.

`OpenInferenceEdge` is an ASGI middleware in front of MLServer's REST app
(`petseg.entrypoints.mlserver_runtime.main` installs it). MLServer 1.7 leaves these things
undone that petseg's server must do:

- **Access** (`petseg.tokens`): the model repository API (``/v2/repository/...``:
  index, load, unload) answers 403 unless the request's bearer token has the
  ``operator`` role; with tokens, every other POST (inference) needs one with
  the ``predict`` role (401 without); feedback always needs one with the
  ``feedback`` role. Health and metadata stay open (probes read them).
- **Feedback**: ``POST /v2/models/<name>/feedback`` takes the body of a Seldon
  Feedback message (request, truth, reward; `petseg.serving.feedback`) and hands it,
  with the token's identity, to the ``feedback`` callback (the runtime's store).
- **Size**: a body over ``max_bytes`` answers 413 with the protocol's
  ``{"error": ...}`` body. The rest of the body is read and dropped first, for
  up to ``drain_seconds`` (a bound in time, not bytes, as nginx's lingering
  close), so that a client still sending it reads the answer rather than a
  reset connection.
- **Binary data extension** (``Inference-Header-Content-Length``): an
  inference request made of a JSON header and the raw bytes of its inputs is
  handed to MLServer as plain JSON (a BYTES input's elements become base64
  strings; another input's bytes become one base64 string, which
  `petseg.serving.v2_messages` reads as the tensor's bytes); outputs the request asks
  for as binary (``"binary_data": true`` on an output, or
  ``"binary_data_output": true`` on the request) come back as raw bytes after
  the JSON header, in little-endian order, as tritonclient expects.
- **Errors**: MLServer answers a body that is not an inference request
  (invalid JSON, a wrong field) with FastAPI's 422 ``{"detail": [...]}``;
  here it becomes 400 ``{"error": "BAD_REQUEST: ..."}``, and a model's
  refusal loses the class name MLServer's worker pool prefixes to it.

The server is petseg's own, so MLServer's gzip middleware is off
(`petseg.entrypoints.mlserver_runtime`): bodies pass this edge uncompressed.
"""

from __future__ import annotations

import asyncio
import base64
import json
import re
import struct
import time
from typing import Awaitable, Callable

import numpy as np
import orjson

from petseg.serving.messages import BadRequest, describe
from petseg.tokens import AccessDenied, TokenTable

HEADER_LENGTH = b"inference-header-content-length"
DTYPES = {"BOOL": "?", "UINT8": "u1", "UINT16": "<u2", "UINT32": "<u4", "UINT64": "<u8", "INT8": "i1",
          "INT16": "<i2", "INT32": "<i4", "INT64": "<i8", "FP16": "<f2", "FP32": "<f4", "FP64": "<f8"}
"""numpy dtypes of the protocol's datatypes, as the binary data extension lays them out."""

# MLServer's worker pool hands back a model's error as "<module>.<class>: <message>".
_WORKER_PREFIX = re.compile(r"^[\w.]+(Refusal|WorkerError): ")

Scope = dict
Receive = Callable[[], Awaitable[dict]]
Send = Callable[[dict], Awaitable[None]]


class OpenInferenceEdge:
    """ASGI middleware: tokens, feedback, body limit, binary data extension and 400 error bodies.

    Args:
        app: The ASGI app behind it (MLServer's FastAPI app).
        max_bytes: Largest request body.
        tokens: The bearer tokens the server accepts; None: inference is open, feedback refused.
        feedback: ``async (message, identity) -> dict`` storing a feedback
            message; None answers feedback with 404.
        drain_seconds: How long the rest of a refused body is read before the answer.
    """

    def __init__(self, app, *, max_bytes: int, tokens: TokenTable | None = None,
                 feedback: Callable[[dict, str], Awaitable[dict]] | None = None, drain_seconds: float = 10.0):
        self.app = app
        self.max_bytes = max_bytes
        self.tokens = tokens
        self.feedback = feedback
        self.drain_seconds = drain_seconds

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        parts = [part for part in scope["path"].split("/") if part]
        headers = dict(scope["headers"])
        authorization = headers.get(b"authorization", b"").decode("latin-1")
        try:
            identity = self._authorize(parts, scope["method"], authorization)
        except AccessDenied as err:
            await _drain(receive, seconds=self.drain_seconds)
            await _send_json(send, err.status, _error_body(f"{err.reason}: {err}"))
            return
        if scope["method"] not in ("POST", "PUT", "PATCH"):
            await self.app(scope, receive, send)
            return
        try:
            body = await self._read(headers, receive)
        except BadRequest as err:
            await _answer(send, err.status, err)
            return
        if parts[-1:] == ["feedback"] and parts[:2] == ["v2", "models"]:
            await self._feedback(body, identity, send)
            return
        if not scope["path"].endswith("/infer"):
            await self.app(_with_body_headers(scope, len(body)), _replay(body, receive), send)
            return
        try:
            body, binary_outputs = translate_request(body, headers.get(HEADER_LENGTH))
        except BadRequest as err:
            await _answer(send, err.status, err)
            return
        response = _Captured()
        await self.app(_with_body_headers(scope, len(body), json_body=True), _replay(body, receive), response.send)
        await response.forward(send, binary_outputs)

    def _authorize(self, parts: list[str], method: str, authorization: str) -> str | None:
        """The identity a request needs and has (None where none is needed).

        Raises:
            AccessDenied: 403 for the repository API without an operator token, 401 or 403 otherwise.
        """
        if "repository" in parts:
            token = self.tokens.identify(authorization) if self.tokens else None
            if token is None or "operator" not in token.roles:
                raise AccessDenied(403, "the model repository API (index, load, unload) needs a bearer token "
                                        "with role 'operator'")
            return token.identity
        if parts[-1:] == ["feedback"]:
            if self.tokens is None:
                raise AccessDenied(401, "feedback needs a bearer token, and this server has none "
                                        "(start it with PETSEG_TOKENS_FILE; petseg serve makes one)")
            return self.tokens.check(authorization, "feedback").identity
        if method in ("POST", "PUT", "PATCH") and self.tokens is not None:
            return self.tokens.check(authorization, "predict").identity
        return None

    async def _feedback(self, body: bytes, identity: str, send: Send) -> None:
        if self.feedback is None:
            await _send_json(send, 404, _error_body("NOT_FOUND: this server stores no feedback (FEEDBACK_URI)"))
            return
        try:
            try:
                message = orjson.loads(body)
            except orjson.JSONDecodeError as err:
                raise BadRequest("BAD_JSON", where="request body", expected="a JSON Feedback message",
                                 got=f"invalid JSON ({err})") from None
            stored = await self.feedback(message, identity)
        except BadRequest as err:
            await _answer(send, err.status, err)
            return
        await _send_json(send, 200, orjson.dumps(stored))

    async def _read(self, headers: dict, receive: Receive) -> bytes:
        """The whole body; `BadRequest` ``TOO_LARGE`` after draining one over the limit."""
        declared = headers.get(b"content-length")
        try:
            declared = int(declared) if declared is not None else None
        except ValueError:
            raise BadRequest("BAD_REQUEST", where="Content-Length", expected="a number of bytes",
                             got=repr(declared.decode("latin-1")[:40])) from None
        if declared is not None and declared > self.max_bytes:
            await _drain(receive, seconds=self.drain_seconds)
            raise _too_large(self.max_bytes, f"{declared} bytes")
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                break
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                await _drain(receive, seconds=self.drain_seconds)
                raise _too_large(self.max_bytes, f"more than {self.max_bytes} bytes")
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        return b"".join(chunks)


def translate_request(body: bytes, header_length: bytes | None) -> tuple[bytes, set[str] | bool]:
    """An inference request body as plain JSON, and the outputs it asks for as binary.

    Args:
        body: The request body.
        header_length: The ``Inference-Header-Content-Length`` header, if any.

    Returns:
        The JSON body for MLServer, and the names of the outputs to answer as
        binary (True: every output; an empty set: none).

    Raises:
        BadRequest: A binary request whose header or sizes do not fit its body.
    """
    if header_length is None:
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


# -- ASGI plumbing ----------------------------------------------------------------------------------


class _Captured:
    """Holds the app's response, so that it can be rewritten before it goes out."""

    def __init__(self):
        self.start: dict = {}
        self.chunks: list[bytes] = []

    async def send(self, message: dict) -> None:
        if message["type"] == "http.response.start":
            self.start = message
        elif message["type"] == "http.response.body":
            self.chunks.append(message.get("body", b""))

    async def forward(self, send: Send, binary_outputs: set[str] | bool) -> None:
        status, body = self.start["status"], b"".join(self.chunks)
        headers = [(k, v) for k, v in self.start.get("headers", []) if k.lower() != b"content-length"]
        if status == 422:
            status, body = 400, _error_body(f"BAD_REQUEST: expected an Open Inference Protocol inference "
                                            f"request; got {_validation_detail(body)}")
        elif status >= 400:
            body = _clean_error(body)
        elif status == 200 and binary_outputs:
            encoded = encode_binary_response(body, binary_outputs)
            if encoded is not None:
                body, header_length = encoded
                headers = [(k, v) for k, v in headers if k.lower() != b"content-type"]
                headers += [(b"content-type", b"application/octet-stream"),
                            (HEADER_LENGTH, str(header_length).encode())]
        headers.append((b"content-length", str(len(body)).encode()))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})


def _validation_detail(body: bytes) -> str:
    """FastAPI's validation errors, in one line."""
    try:
        errors = json.loads(body)["detail"]
        parts = [f"{'.'.join(str(p) for p in error.get('loc', [])[1:]) or 'body'}: {error.get('msg')}"
                 for error in errors[:3]]
        return "; ".join(parts)[:300] or "an invalid request"
    except (ValueError, KeyError, TypeError, AttributeError):
        return "an invalid request"


def _clean_error(body: bytes) -> bytes:
    try:
        error = json.loads(body)["error"]
    except (ValueError, KeyError, TypeError):
        return body
    return _error_body(_WORKER_PREFIX.sub("", str(error)))


def _error_body(text: str) -> bytes:
    return json.dumps({"error": text}).encode()


def _too_large(max_bytes: int, got: str) -> BadRequest:
    return BadRequest("TOO_LARGE", where="request body", expected=f"at most {max_bytes} bytes", got=got)


async def _answer(send: Send, status: int, error: BadRequest) -> None:
    await _send_json(send, status, _error_body(f"{error.kind}: {error}"))


async def _send_json(send: Send, status: int, body: bytes) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


async def _drain(receive: Receive, *, seconds: float) -> None:
    """Reads and drops the rest of a request body for at most ``seconds``."""
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        try:
            message = await asyncio.wait_for(receive(), timeout=left)
        except asyncio.TimeoutError:
            return
        if message["type"] != "http.request" or not message.get("more_body", False):
            return


def _replay(body: bytes, receive: Receive) -> Receive:
    """A receive channel that yields ``body`` once, then the client's next message (a disconnect)."""
    sent = False

    async def replay() -> dict:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


def _with_body_headers(scope: Scope, length: int, *, json_body: bool = False) -> Scope:
    """The scope with Content-Length set to ``length`` (and JSON content when translated)."""
    drop = {b"content-length", b"transfer-encoding", HEADER_LENGTH} | ({b"content-type"} if json_body else set())
    headers = [(k, v) for k, v in scope["headers"] if k.lower() not in drop]
    headers.append((b"content-length", str(length).encode()))
    if json_body:
        headers.append((b"content-type", b"application/json"))
    return {**scope, "headers": headers}

