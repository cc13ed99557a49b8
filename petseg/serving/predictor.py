"""The model server: a release answering Seldon requests (predictions, feedback, health, metrics, metadata).

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

The Seldon wrapper's HTTP edge (routes, tokens, bad requests as 4xx) is
`petseg.serving.seldon_http`.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import tensorflow as tf

from petseg import oxford
from petseg.errors import ModelError
from petseg.release.bundle import Release
from petseg.serving.feedback import parse_feedback
from petseg.serving.messages import BadRequest, Limits, eight_bits, encode_prediction, parse_prediction
from petseg.serving.quarantine import FeedbackStore

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
