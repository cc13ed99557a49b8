"""The model server: a release answering Seldon requests, and the edge where bad requests become HTTP 400.

The Seldon component `serving/PetSegModel.py` only reads its environment and
adapts the Seldon wrapper; the serving work happens here, over plain values:

- `Predictor`: resize to the model input, model, calibration, resize back
  (into uint8 a band at a time where the answer is 8-bit). Its answers are
  the probabilities the release's mask comes from (`Release.mask_source`:
  calibrated, or raw where calibration lowered the validation mIoU); the
  calibrated ones whenever asked for.
- `Service`: what one server process holds (a `petseg.release.bundle.Release`, its
  predictor, request limits, a `petseg.serving.quarantine.FeedbackStore`); answers
  predictions (`petseg.serving.messages`), feedback (stored as pending) and health checks.
- `prediction_metrics` and `metadata`: Seldon custom metrics and model metadata.
- `request_guard`, `read_message` and `Rejection`: a prediction without a
  valid bearer token (when the server has tokens, `petseg.tokens`) and any
  feedback without one answer 401 (403 for a token without the role); every
  bad request becomes HTTP 400 (413 when too large, 429 over a feedback
  quota) with a JSON body saying what was expected and what came, never a
  500. A request is JSON (Content-Type application/json), or the form field
  ``json`` that SeldonClient sends. The rest of a body refused unread (413,
  401) is read for up to `DRAIN_SECONDS` before the answer goes out, so that
  a client still sending it reads the answer, not a broken pipe.
"""

from __future__ import annotations

import io
import json
import time
from typing import Any, Callable

import flask
import numpy as np
import tensorflow as tf
from seldon_core.flask_utils import SeldonMicroserviceException
from seldon_core.utils import json_to_feedback
from werkzeug.exceptions import RequestEntityTooLarge

from petseg import oxford
from petseg.errors import ModelError
from petseg.release.bundle import Release
from petseg.serving.feedback import parse_feedback
from petseg.serving.messages import BadRequest, Limits, describe, eight_bits, encode_prediction, parse_prediction
from petseg.serving.quarantine import FeedbackStore
from petseg.tokens import AccessDenied, TokenTable

# -- prediction -------------------------------------------------------------------------------------


class Predictor:
    """Model plus calibration, for images of any size.

    Images are resized (bilinear, antialiased) to the model input and the
    model's probabilities calibrated there; only then are they brought to the
    size of the answer (`upsample`, bilinear), as float32 probabilities
    (`predict`) or, a band of rows at a time, straight into their uint8
    `petseg.serving.messages.eight_bits` (`predict_eight_bits`: what binData answers
    and masks are made of), so that a 16-megapixel answer never exists as floats.

    Args:
        release: The release to serve.
    """

    BAND_ROWS = 256

    def __init__(self, release: Release):
        size = release.image_size
        model = release.model

        # One graph for every input size and batch: a traced call costs a
        # fraction of an eager Keras call on small images. Antialiasing
        # scales images down as PIL's bilinear resize at ingest did for the
        # training images (petseg.data.warehouse.prepare).
        @tf.function(input_signature=[tf.TensorSpec([None, None, None, 3], tf.float32)])
        def forward(images):
            return model(tf.image.resize(images, (size, size), antialias=True), training=False)

        self._forward = forward
        self._size = size
        self.calibration = release.calibration
        self.mask_source = release.mask_source

    @property
    def work_side(self) -> int:
        """The longest side worth decoding an image at: four times the model's input."""
        return 4 * self._size

    def model_probabilities(self, images: np.ndarray, *, calibrated: bool = False) -> np.ndarray:
        """Probabilities at the model's resolution, float32 (N, S, S, 3): those the served mask comes from
        (the release's ``mask_source``), or with ``calibrated`` the calibrated ones."""
        probs = self._forward(images).numpy()
        if calibrated or self.mask_source == "calibrated":
            probs = self.calibration.apply(probs)
        return np.asarray(probs, dtype=np.float32)

    def predict(self, images: np.ndarray, size: tuple[int, int] | None = None, *,
                calibrated: bool = False) -> np.ndarray:
        """Probabilities for a batch of images: the served mask's, or with ``calibrated`` the calibrated ones.

        Args:
            images: float32 (N, H, W, 3) in [0, 1].
            size: (H, W) of the answer; default the images' own.
            calibrated: Answer the calibrated probabilities whatever the mask comes from.

        Returns:
            float32 (N, H, W, 3) probabilities of (pet, background, border).
        """
        probs = self.model_probabilities(images, calibrated=calibrated)
        height, width = size or images.shape[1:3]
        return np.clip(upsample(probs, height, width), 0.0, 1.0)

    def predict_eight_bits(self, images: np.ndarray, size: tuple[int, int] | None = None) -> np.ndarray:
        """`eight_bits` of `predict`, to the bit, made a band of rows at a time: uint8 (N, H, W, 3)."""
        probs = self.model_probabilities(images)
        height, width = size or images.shape[1:3]
        out = np.empty((len(probs), height, width, 3), np.uint8)
        for top in range(0, height, self.BAND_ROWS):
            rows = range(top, min(top + self.BAND_ROWS, height))
            out[:, rows.start:rows.stop] = eight_bits(np.clip(upsample(probs, height, width, rows=rows), 0.0, 1.0))
        return out


def upsample(probs: np.ndarray, height: int, width: int, *, rows: range | None = None) -> np.ndarray:
    """Bilinear resize of (N, h, w, C) to (N, height, width, C) with half-pixel centres (as tf.image.resize).

    Two taps per axis, element by element, so that any band of ``rows``
    comes out bit for bit as the same rows of the whole.
    """
    if (height, width) == probs.shape[1:3] and rows is None:
        return probs
    y0, y1, wy = _taps(probs.shape[1], height, rows or range(height))
    x0, x1, wx = _taps(probs.shape[2], width, range(width))
    wy, wx = wy[None, :, None, None], wx[None, None, :, None]
    vertical = probs[:, y0] * (1 - wy) + probs[:, y1] * wy
    return vertical[:, :, x0] * (1 - wx) + vertical[:, :, x1] * wx


def _taps(source: int, target: int, positions: range) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    centres = (np.arange(positions.start, positions.stop, dtype=np.float64) + 0.5) * (source / target) - 0.5
    centres = np.clip(centres, 0, source - 1)
    low = np.floor(centres).astype(np.int64)
    return low, np.minimum(low + 1, source - 1), (centres - low).astype(np.float32)


# -- the service ------------------------------------------------------------------------------------


class Service:
    """What one serving process holds: a release, its predictor, limits and feedback store.

    Args:
        release: The release to serve.
        limits: Size limits on requests.
        feedback: Where feedback samples go; None answers feedback with 400.
    """

    def __init__(self, release: Release, *, limits: Limits, feedback: FeedbackStore | None = None):
        self.release = release
        self.limits = limits
        self.feedback_store = feedback
        self.predictor = Predictor(release)

    def predict(self, message: Any) -> tuple[dict, np.ndarray]:
        """Answers a prediction request.

        Returns:
            The answer (a SeldonMessage as JSON, without meta) and the probabilities
            (their uint8 `eight_bits` for binData and strData).

        Raises:
            BadRequest: The request is malformed.
        """
        payload = parse_prediction(message, limits=self.limits, work_side=self.predictor.work_side)
        if payload.form in ("binData", "strData"):  # an 8-bit PNG answers: no full-size floats
            probs = self.predictor.predict_eight_bits(payload.images, payload.answer_size)
        else:
            probs = self.predictor.predict(payload.images, payload.answer_size)
        return encode_prediction(probs, payload), probs

    def feedback(self, message: Any, *, identity: str) -> dict:
        """Stores the labelled image of a Feedback message as pending review.

        Args:
            message: The decoded JSON of a Seldon Feedback message.
            identity: Who sent it (the identity of the request's token).

        Returns:
            ``{"sample_id", "status", "store"}``; ``status`` is ``pending`` or ``duplicate``.

        Raises:
            BadRequest: The message is malformed, no feedback store is set,
                or the sender or the store is over its quota (``TOO_MANY``).
        """
        if self.feedback_store is None:
            raise BadRequest(
                "FEEDBACK_DISABLED", where="feedback", expected="a server started with a feedback store (FEEDBACK_URI)",
                got="a server without one",
            )
        sample = parse_feedback(message, limits=self.limits)
        stored = self.feedback_store.add(sample, identity=identity, model_version=self.release.tags()["model_version"],
                                         model_fingerprint=self.release.fingerprint)
        return {**stored, "store": self.feedback_store.root}

    def health(self) -> dict:
        """Runs one prediction on a blank image; raises if the model cannot answer."""
        size = self.release.image_size
        probs = self.predictor.predict(np.zeros((1, size, size, 3), np.float32))
        if probs.shape != (1, size, size, 3) or not np.isfinite(probs).all():
            raise ModelError(f"health check: the model answered shape {probs.shape} with non-finite values")
        return {"status": "ok", "model_version": self.release.tags()["model_version"]}


def prediction_metrics(probs: np.ndarray, *, elapsed_ms: float) -> list[dict]:
    """Seldon custom metrics for one answered request.

    Args:
        probs: The (N, H, W, 3) probabilities returned (or their uint8 eight bits).
        elapsed_ms: Time spent answering, in milliseconds.

    Returns:
        A COUNTER of images predicted, a TIMER of latency (ms) and a GAUGE of
        the share of pixels predicted pet (probability >= 0.5).
    """
    return [
        {"type": "COUNTER", "key": "petseg_predictions", "value": int(len(probs))},
        {"type": "TIMER", "key": "petseg_prediction_latency", "value": float(elapsed_ms)},
        {"type": "GAUGE", "key": "petseg_pet_fraction", "value": _pet_fraction(probs)},
    ]


def _pet_fraction(probs: np.ndarray) -> float:
    """Share of pixels whose pet probability is at least 0.5 (128 of 255 in eight bits)."""
    pet = probs[..., 0]
    return float(np.mean(pet >= (128 if probs.dtype == np.uint8 else 0.5)))


def metadata() -> dict:
    """Seldon model metadata: the accepted inputs and the outputs."""
    image = {"messagetype": "ndarray", "schema": {"names": ["red", "green", "blue"], "shape": [-1, -1, 3]}}
    mask = {"messagetype": "ndarray", "schema": {"names": list(oxford.CLASSES), "shape": [-1, -1, 3]}}
    return {
        "name": "petseg",
        "platform": "tensorflow",
        "inputs": [image, {**image, "messagetype": "tensor"}, {"messagetype": "binData"}, {"messagetype": "strData"}],
        "outputs": [mask, {**mask, "messagetype": "tensor"}, {"messagetype": "binData"}, {"messagetype": "strData"}],
        "custom": {
            "input": "HxWx3 or NxHxWx3 image, uint8 0-255 or float [0, 1]; or base64 JPEG/PNG as binData or strData",
            "output": "probabilities of pet, background, border at the input size, in the request's form; "
                      "binData and strData answers are RGB PNGs of probability * 255",
        },
    }


# -- the Seldon wrapper's edge ----------------------------------------------------------------------

# View names of the Seldon wrapper's REST routes (seldon_core.wrapper).
PREDICT_VIEW = "Predict"
FEEDBACK_VIEW = "SendFeedback"

DRAIN_SECONDS = 10.0
"""How long the rest of a refused body is read and dropped before the answer goes out (nginx's lingering close)."""

PREDICT_ROLE, FEEDBACK_ROLE = "predict", "feedback"


class Rejection(SeldonMicroserviceException):
    """A `BadRequest` or `AccessDenied` as the Seldon wrapper answers it: its HTTP status with a JSON body.

    The body is ``{"status": {"code": 400, "reason", "info", "status": "FAILURE"}, "meta": {"tags"}}``.

    Args:
        error: The bad request, or the missing or wrong token.
        tags: Provenance tags of the served release.
    """

    def __init__(self, error: BadRequest | AccessDenied, tags: dict[str, str]):
        super().__init__(str(error), status_code=error.status, reason=error.reason)
        self.tags = tags

    def __str__(self) -> str:
        # What a gRPC client sees as the error's details.
        return self.message

    def to_dict(self) -> dict:
        """The JSON body of the answer."""
        return {
            "status": {"code": self.status_code, "reason": self.reason, "info": self.message, "status": "FAILURE"},
            "meta": {"tags": self.tags},
        }


def request_guard(*, limits: Limits, tags: Callable[[], dict[str, str]],
                  tokens: TokenTable | None = None) -> flask.Blueprint:
    """A Flask blueprint that vets prediction and feedback requests before the wrapper reads them.

    First the token: feedback always needs one with the ``feedback`` role (no
    tokens, no feedback), a prediction one with the ``predict`` role when the
    server has tokens; the identity goes to ``flask.g.petseg_identity``.

    The Seldon wrapper parses a request before the model sees it and answers
    some bad ones with HTTP 500: a wrong Content-Type, JSON it cannot decode
    in a form field, a Feedback message the protobuf parser rejects (invalid
    base64 binData, unknown fields). The wrapper registers a model's
    ``model_error_handler`` blueprint on its app; this one checks the body,
    the Content-Type and the JSON first (and all of a feedback message), and
    answers what it cannot use with a `Rejection`.

    Args:
        limits: Size limits; the body may hold at most ``limits.max_bytes``.
        tags: Returns the provenance tags for error answers.
        tokens: The bearer tokens the server accepts; None: predictions are open, feedback is refused.

    Returns:
        The blueprint.
    """
    guard = flask.Blueprint("petseg_request_guard", __name__)

    @guard.before_app_request
    def vet_request():
        request = flask.request
        if request.endpoint not in (PREDICT_VIEW, FEEDBACK_VIEW):
            return
        try:
            flask.g.petseg_identity = authorize(tokens, request.headers.get("Authorization"),
                                                feedback=request.endpoint == FEEDBACK_VIEW)
            message = read_message(request, max_bytes=limits.max_bytes)
            if request.endpoint == FEEDBACK_VIEW:
                parse_feedback(message, limits=limits)
                try:
                    json_to_feedback(message)
                except Exception as err:  # the protobuf parser's errors, as the wrapper would meet them
                    raise BadRequest(
                        "BAD_FEEDBACK", where="feedback",
                        expected="a Seldon Feedback message (request, response, reward, truth)",
                        got=str(getattr(err, "message", err)),
                    ) from None
        except (BadRequest, AccessDenied) as err:
            drain(request, seconds=DRAIN_SECONDS)  # returns at once when the body was read
            raise Rejection(err, tags()) from None

    return guard


def authorize(tokens: TokenTable | None, authorization: str | None, *, feedback: bool) -> str | None:
    """The identity behind a request's ``Authorization`` header, or None for an open prediction.

    Raises:
        AccessDenied: 401 or 403 (feedback on a server without tokens: 401).
    """
    if tokens is None:
        if feedback:
            raise AccessDenied(401, "feedback needs a bearer token, and this server has none "
                                    "(start it with PETSEG_TOKENS_FILE; petseg serve makes one)")
        return None
    return tokens.check(authorization, FEEDBACK_ROLE if feedback else PREDICT_ROLE).identity


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


def read_message(request: flask.Request, *, max_bytes: int) -> dict:
    """The JSON object of a REST request, read the way the Seldon wrapper reads it.

    The message is the form or query field ``json`` when there is one (as
    SeldonClient sends), else the body, which must be application/json.

    Args:
        request: The Flask request.
        max_bytes: Largest accepted body.

    Returns:
        The decoded object (cached by Flask, so the wrapper does not decode the body again).

    Raises:
        BadRequest: Too large, another content type, invalid JSON or not an object.
    """
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
