"""The HTTP edge of the Open Inference Protocol server: routes, tokens, body limits, error bodies.

`OpenInferenceEdge` is an ASGI middleware in front of MLServer's REST app
(`petseg.entrypoints.mlserver_runtime.main` installs it). MLServer 1.7 leaves these things
undone that petseg's server must do:

- **Routes** (`petseg.serving.routes`): every request is decided from the
  app's own route table and `petseg.serving.routes.V2` before MLServer sees
  it: a path that no served route matches answers 404 (MLServer's streaming,
  ``generate`` and documentation routes included), a served route asked with
  another method 405.
- **Access** (`petseg.tokens`): each served route needs a bearer token with
  its role: inference and server metadata ``predict``, feedback ``feedback``,
  the model repository API (index, load, unload) ``operator``; 401 without a
  valid token, 403 without the role, and the answer says only that. Health,
  readiness and model metadata stay open (probes and clients read them). A
  server without tokens answers ``predict`` routes to anyone and refuses the others.
- **Feedback**: ``POST /v2/models/<name>/feedback`` takes the body of a Seldon
  Feedback message (request, truth, reward; `petseg.serving.feedback`) and hands it,
  with the token's identity, to the ``feedback`` callback (the runtime's store).
- **Size**: a body over the limit answers 413 with the protocol's
  ``{"error": ...}`` body, and one whose lists hold more numbers than
  ``MAX_LIST_PIXELS`` admit is refused before its JSON is decoded
  (`petseg.serving.messages.check_list_size`). The rest of a refused body is
  read and dropped first, for up to ``drain_seconds`` (a bound in time, not
  bytes, as nginx's lingering close), so that a client still sending it reads
  the answer rather than a reset connection.
- **Bodies at once**: at most ``max_bodies`` requests with a body are read
  and answered at once; another waits up to ``slot_wait_seconds`` for one of
  them, then answers 503 with ``Retry-After`` (its body dropped, not held).
  A waiting connection costs its socket buffers (uvicorn stops reading a
  body the app has not asked for), not its body.
- **Binary data extension** (``Inference-Header-Content-Length``,
  `petseg.serving.v2_binary`): requests become plain JSON for MLServer, and
  outputs asked for as binary go back as raw bytes.
- **Errors**: MLServer answers a body that is not an inference request
  (invalid JSON, a wrong field) with FastAPI's 422 ``{"detail": [...]}``;
  here it becomes 400 ``{"error": "BAD_REQUEST: ..."}``, and a model's
  refusal loses the class name MLServer's worker pool prefixes to it.

`MetricsGate` closes MLServer's metrics app the same way. The server is
petseg's own, so MLServer's gzip middleware is off
(`petseg.entrypoints.mlserver_runtime`): bodies pass this edge uncompressed.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from typing import Awaitable, Callable

import orjson

from petseg.errors import ServingError
from petseg.serving import routes
from petseg.serving.messages import BadRequest, Limits, check_list_size
from petseg.serving.v2_binary import HEADER_LENGTH, encode_binary_response, translate_request
from petseg.tokens import AccessDenied, TokenTable

SLOT_WAIT_SECONDS = 10.0
"""How long a request waits for one of the bodies read at once before its 503."""
RETRY_AFTER_SECONDS = 1
"""What a 503 tells the client to wait (``Retry-After``)."""

# MLServer's worker pool hands back a model's error as "<module>.<class>: <message>".
_WORKER_PREFIX = re.compile(r"^[\w.]+(Refusal|WorkerError): ")

Scope = dict
Receive = Callable[[], Awaitable[dict]]
Send = Callable[[dict], Awaitable[None]]


class Busy(ServingError):
    """As many request bodies in the server as it reads at once, for longer than a request waits: 503.

    Args:
        waited: Seconds the request waited.
    """

    status, reason = 503, "BUSY"

    def __init__(self, waited: float):
        super().__init__(f"the server holds as many request bodies as it reads at once and none came free "
                         f"within {waited:g} s; send the request again after Retry-After seconds")


class OpenInferenceEdge:
    """ASGI middleware: routes, tokens, feedback, body limits, binary data extension and 400 error bodies.

    Args:
        app: The ASGI app behind it (MLServer's FastAPI app).
        limits: Request limits: the largest body, the numbers its lists may hold.
        registered: The app's routes (its live route list: Starlette routes with ``path`` and ``methods``).
        tokens: The bearer tokens the server accepts; None: inference is open, feedback refused.
        feedback: ``async (message, identity) -> dict`` storing a feedback
            message; None answers feedback with 404.
        max_bodies: Request bodies read or answered at once.
        slot_wait_seconds: How long a request waits for one of them before its 503.
        drain_seconds: How long the rest of a refused body is read before the answer.
    """

    def __init__(self, app, *, limits: Limits, registered: list, tokens: TokenTable | None = None,
                 feedback: Callable[[dict, str], Awaitable[dict]] | None = None, max_bodies: int,
                 slot_wait_seconds: float = SLOT_WAIT_SECONDS, drain_seconds: float = 10.0):
        self.app = app
        self.limits = limits
        self.registered = registered
        self.tokens = tokens
        self.feedback = feedback
        self.slot_wait_seconds = slot_wait_seconds
        self.drain_seconds = drain_seconds
        self._slots = asyncio.Semaphore(max_bodies)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        try:
            template = routes.decide(scope["path"], scope["method"], routes.V2, self._registered())
            identity = routes.authorize(self.tokens, headers.get(b"authorization", b"").decode("latin-1"),
                                        role=routes.V2[template])
        except (routes.NotServed, AccessDenied) as err:
            await _refuse(receive, send, err, seconds=self.drain_seconds)
            return
        if scope["method"] not in ("POST", "PUT", "PATCH"):
            await self.app(scope, receive, send)
            return
        try:
            self._check_length(headers)
        except BadRequest as err:
            await _refuse(receive, send, err, seconds=self.drain_seconds)
            return
        try:
            await asyncio.wait_for(self._slots.acquire(), timeout=self.slot_wait_seconds)
        except asyncio.TimeoutError:
            await _refuse(receive, send, Busy(self.slot_wait_seconds), seconds=self.drain_seconds)
            return
        try:
            await self._answer_body(scope, template, headers, identity, receive, send)
        finally:
            self._slots.release()

    def _registered(self) -> dict[str, set[str]]:
        """The app's routes (`registered_routes`) and the edge's own feedback route."""
        return {**registered_routes(self.registered), routes.V2_FEEDBACK: {"POST"}}

    async def _answer_body(self, scope: Scope, template: str, headers: dict, identity: str | None,
                           receive: Receive, send: Send) -> None:
        """Reads a request's body (holding one of the slots) and answers it."""
        try:
            body = await self._read(receive)
        except BadRequest as err:
            await _refuse(receive, send, err, seconds=self.drain_seconds)
            return
        if template == routes.V2_FEEDBACK:
            await self._feedback(body, identity, send)
            return
        if not template.endswith("/infer"):
            await self.app(_with_body_headers(scope, len(body)), _replay(body, receive), send)
            return
        try:
            body, binary_outputs = translate_request(body, headers.get(HEADER_LENGTH), limits=self.limits)
        except BadRequest as err:
            await _answer(send, err.status, err)
            return
        response = _Captured()
        await self.app(_with_body_headers(scope, len(body), json_body=True), _replay(body, receive), response.send)
        await response.forward(send, binary_outputs)

    async def _feedback(self, body: bytes, identity: str, send: Send) -> None:
        if self.feedback is None:
            await _send_json(send, 404, _error_body("NOT_FOUND: this server stores no feedback (FEEDBACK_URI)"))
            return
        try:
            check_list_size(body, limits=self.limits, lists=2)
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

    def _check_length(self, headers: dict) -> None:
        """Refuses a declared Content-Length that is not a number (400) or over the limit (413)."""
        declared = headers.get(b"content-length")
        try:
            declared = int(declared) if declared is not None else None
        except ValueError:
            raise BadRequest("BAD_REQUEST", where="Content-Length", expected="a number of bytes",
                             got=repr(declared.decode("latin-1")[:40])) from None
        if declared is not None and declared > self.limits.max_bytes:
            raise _too_large(self.limits.max_bytes, f"{declared} bytes")

    async def _read(self, receive: Receive) -> bytes:
        """The whole body; `BadRequest` ``TOO_LARGE`` as soon as it passes the limit (the rest unread)."""
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                break
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.limits.max_bytes:
                raise _too_large(self.limits.max_bytes, f"more than {self.limits.max_bytes} bytes")
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        return b"".join(chunks)


class MetricsGate:
    """ASGI middleware of MLServer's metrics app: its metrics path needs a token with
    `petseg.serving.routes.METRICS_ROLE`; any other path answers 404, another method 405.

    Args:
        app: The metrics app (FastAPI).
        path: Its metrics path (``metrics_endpoint`` of MLServer's settings).
        registered: The app's routes (its live route list).
        tokens: The bearer tokens the server accepts; None: metrics are refused.
        drain_seconds: How long the rest of a refused body is read before the answer.
    """

    def __init__(self, app, *, path: str, registered: list, tokens: TokenTable | None, drain_seconds: float = 10.0):
        self.app = app
        self.table = {path: routes.METRICS_ROLE}
        self.registered = registered
        self.tokens = tokens
        self.drain_seconds = drain_seconds

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            try:
                template = routes.decide(scope["path"], scope["method"], self.table,
                                         registered_routes(self.registered))
                routes.authorize(self.tokens, dict(scope["headers"]).get(b"authorization", b"").decode("latin-1"),
                                 role=self.table[template])
            except (routes.NotServed, AccessDenied) as err:
                await _refuse(receive, send, err, seconds=self.drain_seconds)
                return
        await self.app(scope, receive, send)


def registered_routes(route_list: list) -> dict[str, set[str]]:
    """A Starlette app's routes by path, with their methods (GET and HEAD for a route registered without)."""
    found: dict[str, set[str]] = {}
    for route in route_list:
        if isinstance(getattr(route, "path", None), str):
            found.setdefault(route.path, set()).update(getattr(route, "methods", None) or {"GET", "HEAD"})
    return found


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


async def _refuse(receive: Receive, send: Send, error: BadRequest | AccessDenied | routes.NotServed | Busy, *,
                  seconds: float) -> None:
    """Drops the rest of the request body (for at most ``seconds``), then answers ``error`` with its status:
    ``Allow`` on a 405, ``Retry-After`` on a 503."""
    await _drain(receive, seconds=seconds)
    headers = []
    if isinstance(error, routes.NotServed) and error.allowed:
        headers.append((b"allow", error.allowed.encode()))
    if isinstance(error, Busy):
        headers.append((b"retry-after", str(RETRY_AFTER_SECONDS).encode()))
    kind = error.kind if isinstance(error, BadRequest) else error.reason
    await _send_json(send, error.status, _error_body(f"{kind}: {error}"), headers=headers)


async def _answer(send: Send, status: int, error: BadRequest) -> None:
    await _send_json(send, status, _error_body(f"{error.kind}: {error}"))


async def _send_json(send: Send, status: int, body: bytes, *, headers: list | None = None) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            *(headers or [])]})
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

