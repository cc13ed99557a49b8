"""The HTTP edge of the Seldon server: every route decided before the wrapper sees it, and bad requests as 4xx.

The Seldon Core 1.19 wrapper builds a Flask app with more routes than petseg
serves (``/transform-input``, ``/route``, ``/aggregate``, ``/seldon.json``, a
catch-all static route) and answers every error it meets, a wrong method or
path included, with HTTP 500. `request_guard` is a blueprint the wrapper
registers on its app (a model's ``model_error_handler``); its check runs
before any view and decides every request from the app's own route table
(``url_map``) and `petseg.serving.routes.SELDON`:

- a path that is not a served route answers 404, a served route asked with a
  method its rule does not take 405 (with ``Allow``), whoever asks;
- a served route needs a bearer token with its role (`petseg.tokens`): 401
  without a valid one, 403 without the role, and the answer says only that
  (no provenance tags). A server without tokens answers ``predict`` routes
  to anyone and refuses the others;
- a prediction or feedback request is read here, within the limits, and
  anything the wrapper would answer with a 500 (a wrong Content-Type, JSON it
  cannot decode, a Feedback message its protobuf parser rejects) becomes a
  `Rejection`: HTTP 400 (413 when too large, 429 over a feedback quota) with
  a JSON body saying what was expected and what came.

A request is JSON (Content-Type application/json), or the form field ``json``
that SeldonClient sends. The rest of a body refused unread is read for up to
`DRAIN_SECONDS` before the answer goes out, so that a client still sending
it reads the answer, not a broken pipe. `metrics_guard` closes the wrapper's
metrics app the same way (`petseg.entrypoints.seldon_launcher` installs it).

Bodies read at once: gunicorn's threads read one request each (workers x
threads per server, `petseg.deploy.local.gunicorn_sizing`); further
connections wait unread in gunicorn's queue, costing their socket buffers only.
"""

from __future__ import annotations

import io
import json
import time
from typing import Callable

import flask
from seldon_core.flask_utils import SeldonMicroserviceException
from seldon_core.utils import json_to_feedback
from werkzeug.exceptions import RequestEntityTooLarge

from petseg.serving import routes
from petseg.serving.feedback import parse_feedback
from petseg.serving.messages import BadRequest, Limits, check_list_size, describe
from petseg.tokens import AccessDenied, TokenTable

# View names of the Seldon wrapper's REST routes whose bodies the guard reads (seldon_core.wrapper).
PREDICT_VIEW = "Predict"
FEEDBACK_VIEW = "SendFeedback"

DRAIN_SECONDS = 10.0
"""How long the rest of a refused body is read and dropped before the answer goes out (nginx's lingering close)."""


class Rejection(SeldonMicroserviceException):
    """A `BadRequest` or `AccessDenied` as the Seldon wrapper answers it: its HTTP status with a JSON body.

    The body is ``{"status": {"code", "reason", "info", "status": "FAILURE"}, "meta": {"tags"}}``;
    a refused token's answer carries no tags.

    Args:
        error: The bad request, or the missing or wrong token.
        tags: Provenance tags of the served release.
    """

    def __init__(self, error: BadRequest | AccessDenied, tags: dict[str, str]):
        super().__init__(str(error), status_code=error.status, reason=error.reason)
        self.tags = {} if isinstance(error, AccessDenied) else tags

    def __str__(self) -> str:
        # What a gRPC client sees as the error's details.
        return self.message

    def to_dict(self) -> dict:
        """The JSON body of the answer."""
        body = {"status": {"code": self.status_code, "reason": self.reason, "info": self.message,
                           "status": "FAILURE"}}
        return {**body, "meta": {"tags": self.tags}} if self.tags else body


def request_guard(*, limits: Limits, tags: Callable[[], dict[str, str]],
                  tokens: TokenTable | None = None) -> flask.Blueprint:
    """A Flask blueprint that decides every request of the wrapper's app before a view runs.

    Args:
        limits: Size limits; the body may hold at most ``limits.max_bytes``.
        tags: Returns the provenance tags for error answers.
        tokens: The bearer tokens the server accepts; None: ``predict`` routes are open, the others refused.

    Returns:
        The blueprint; the identity of a request's token goes to ``flask.g.petseg_identity``.
    """
    guard = flask.Blueprint("petseg_request_guard", __name__)

    @guard.before_app_request
    def vet_request():
        request = flask.request
        try:
            role = routes.SELDON[served_route(flask.current_app, request, routes.SELDON)]
        except routes.NotServed as err:
            return _not_served(request, err)
        try:
            flask.g.petseg_identity = routes.authorize(tokens, request.headers.get("Authorization"), role=role)
            if request.endpoint == PREDICT_VIEW:
                read_message(request, limits=limits)
            elif request.endpoint == FEEDBACK_VIEW:
                _check_feedback(read_message(request, limits=limits, lists=2), limits=limits)
        except (BadRequest, AccessDenied) as err:
            drain(request, seconds=DRAIN_SECONDS)  # returns at once when the body was read
            raise Rejection(err, tags()) from None
        return None

    return guard


def metrics_guard(app: flask.Flask, *, path: str, tokens: TokenTable | None) -> flask.Flask:
    """Closes the wrapper's metrics app: ``path`` needs a token with `routes.METRICS_ROLE`, any other path is 404.

    Returns:
        The same app.
    """
    table = {path: routes.METRICS_ROLE}

    @app.before_request
    def vet_metrics_request():
        request = flask.request
        try:
            role = table[served_route(app, request, table)]
            routes.authorize(tokens, request.headers.get("Authorization"), role=role)
        except routes.NotServed as err:
            return _not_served(request, err)
        except AccessDenied as err:
            drain(request, seconds=DRAIN_SECONDS)
            return _answer(err.status, err.reason, str(err))
        return None

    return app


def served_route(app: flask.Flask, request: flask.Request, table: dict[str, str | None]) -> str:
    """The route of ``table`` that takes a request, from the app's own ``url_map`` (`petseg.serving.routes.decide`).

    Raises:
        petseg.serving.routes.NotServed: 404 or 405.
    """
    registered: dict[str, set[str]] = {}
    for rule in app.url_map.iter_rules():
        registered.setdefault(rule.rule, set()).update(rule.methods or ())
    return routes.decide(request.path, request.method, table, registered)


def _not_served(request: flask.Request, error: routes.NotServed) -> flask.Response:
    drain(request, seconds=DRAIN_SECONDS)
    return _answer(error.status, error.reason, str(error), headers={"Allow": error.allowed} if error.allowed else None)


def _answer(status: int, reason: str, info: str, *, headers: dict[str, str] | None = None) -> flask.Response:
    response = flask.jsonify({"status": {"code": status, "reason": reason, "info": info, "status": "FAILURE"}})
    response.status_code = status
    response.headers.update(headers or {})
    return response


def _check_feedback(message: dict, *, limits: Limits) -> None:
    """All of a Feedback message, as petseg and the wrapper's protobuf parser will read it."""
    parse_feedback(message, limits=limits)
    try:
        json_to_feedback(message)
    except Exception as err:  # the protobuf parser's errors, as the wrapper would meet them
        raise BadRequest(
            "BAD_FEEDBACK", where="feedback", expected="a Seldon Feedback message (request, response, reward, truth)",
            got=str(getattr(err, "message", err)),
        ) from None


def drain(request: flask.Request, *, seconds: float) -> None:
    """Reads and drops what is left of a request body for at most ``seconds``.

    The server closes the connection after an error answer; closing a socket
    with unread bytes makes the kernel reset it, and a client still sending
    the body sees a broken pipe instead of the answer. Reading the body first
    lets it read the status and the JSON body. The bound is time, not bytes
    (as nginx's lingering close): a fast client of any size reads its answer,
    a slow one costs the worker at most ``seconds``.
    """
    stream = request.environ.get("wsgi.input")
    if stream is None:
        return
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        chunk = stream.read(2**16)
        if not chunk:
            return


def read_message(request: flask.Request, *, limits: Limits, lists: int = 1) -> dict:
    """The JSON object of a REST request, read the way the Seldon wrapper reads it.

    The message is the form or query field ``json`` when there is one (as
    SeldonClient sends), else the body, which must be application/json.

    Args:
        request: The Flask request.
        limits: The body may hold ``limits.max_bytes``, and ``lists`` lists of numbers
            (`petseg.serving.messages.check_list_size`, checked before the JSON is decoded).
        lists: Lists of numbers the message may carry: 1 for a prediction, 2 for feedback.

    Returns:
        The decoded object (cached by Flask, so the wrapper does not decode the body again).

    Raises:
        BadRequest: Too large, another content type, invalid JSON or not an object.
    """
    max_bytes = limits.max_bytes
    size = request.content_length
    too_large = BadRequest("TOO_LARGE", where="request body", expected=f"at most {max_bytes} bytes",
                           got=f"{size} bytes" if size is not None else f"more than {max_bytes} bytes")
    if size is not None and size > max_bytes:
        raise too_large
    if size is None and request.method == "POST":
        # A body without a length (chunked): read at most one byte over the limit here, then
        # hand werkzeug the bytes read (it does not bound a chunked body by max_content_length).
        body = request.environ["wsgi.input"].read(max_bytes + 1)
        if len(body) > max_bytes:
            raise too_large
        request.environ["wsgi.input"], request.environ["CONTENT_LENGTH"] = io.BytesIO(body), str(len(body))
    request.max_content_length = max_bytes
    if request.mimetype == "multipart/form-data":
        raise BadRequest(
            "BAD_CONTENT_TYPE", where="Content-Type", expected="application/json", got="multipart/form-data",
        )
    try:
        text = request.form.get("json") or request.args.get("json")
        if not text and not request.is_json:
            raise BadRequest("BAD_CONTENT_TYPE", where="Content-Type", expected="application/json",
                             got=repr(request.content_type) if request.content_type else "no Content-Type")
        check_list_size(text or request.get_data(cache=True), limits=limits, lists=lists)
        message = json.loads(text) if text else request.get_json()
    except RequestEntityTooLarge:
        raise too_large from None
    except BadRequest:
        raise
    except Exception as err:  # ValueError, RecursionError, werkzeug's BadRequest: all mean undecodable JSON
        detail = getattr(err, "description", None) or str(err)
        raise BadRequest(
            "BAD_JSON", where="request body", expected="a JSON object", got=f"invalid JSON ({detail})",
        ) from None
    if not isinstance(message, dict):
        raise BadRequest("BAD_MESSAGE", where="request body", expected="a JSON object", got=describe(message))
    return message
