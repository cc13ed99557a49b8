"""Serving logic behind the Seldon component `serving/PetSegModel.py`.

The component only reads its environment and adapts the Seldon wrapper; the
work happens here, over plain values:

1. `load_release`: the model, calibration and manifest of a release (a local
   directory, an ``s3://`` prefix or a ``PetSegFlow/<id>`` run), with the
   model fingerprint checked.
2. `parse_prediction` / `encode_prediction`: a SeldonMessage in, images out;
   probabilities in, a SeldonMessage of the same form out.
3. `Predictor`: resize to the model input, model, calibration, resize back.
4. `parse_feedback` and `FeedbackStore`: a labelled sample from a Feedback
   message, stored in Oxford layout for `petseg.data.ingest(feedback=...)`.
5. `request_guard` and `Rejection`: every bad request becomes HTTP 400 with a
   JSON body saying what was expected and what came, never a 500.

Accepted requests (JSON, Content-Type application/json, or the form field
``json`` that SeldonClient sends):

- ``{"data": {"ndarray": [...]}}`` or ``{"data": {"tensor": {"shape", "values"}}}``:
  an HxWx3 or NxHxWx3 image, uint8 0-255 or float in [0, 1];
- ``{"binData": "<base64 JPEG or PNG>"}`` or ``{"strData": "<base64 JPEG or PNG>"}``.

Answers carry probabilities of (pet, background, border) at the size of the
input image, in the form of the request: an ndarray or tensor (values rounded
to 4 decimals), or a 3-channel PNG of probability * 255 as binData or strData.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import fcntl
import hashlib
import io
import json
import math
import os
import re
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable
from urllib.parse import urlparse

import flask
import keras
import numpy as np
import tensorflow as tf
from PIL import Image
from seldon_core.flask_utils import SeldonMicroserviceException
from seldon_core.utils import json_to_feedback
from werkzeug.exceptions import RequestEntityTooLarge

from petseg import model as models
from petseg import synth
from petseg.calibration import Calibration
from petseg.errors import ConfigError, DataError, ModelError

CHANNELS = ("pet", "background", "border")
RELEASE_FILES = ("model.keras", "calibration.json", "manifest.json")
IMAGE_FORMATS = ("JPEG", "PNG")
DECIMALS = 4  # precision of probabilities in ndarray and tensor answers
JPEG_QUALITY = 95
_RUN_PATHSPEC = re.compile(r"^PetSegFlow/[^/\s]+$")
_ARRAY = "HxWx3 or NxHxWx3 numbers, uint8 0-255 or float in [0, 1]"
_IMAGE_BYTES = "base64 of JPEG or PNG bytes"


class BadRequest(DataError):
    """A request the service cannot use; answered with HTTP 400.

    Args:
        kind: Short upper-case category, e.g. ``BAD_SHAPE``.
        where: The part of the message at fault, e.g. ``data.ndarray``.
        expected: What the service accepts there.
        got: What came (a short description, never the data itself).
    """

    def __init__(self, kind: str, *, where: str, expected: str, got: str):
        got = got if len(got) <= 200 else got[:197] + "..."
        self.reason = f"{kind}: expected {expected}; got {got}"
        super().__init__(f"{where}: expected {expected}; got {got}")


@dataclasses.dataclass(frozen=True)
class Limits:
    """Size limits on requests.

    Attributes:
        max_bytes: Largest request body and largest encoded image, in bytes.
        max_pixels: Largest number of pixels in one request (all images of a batch).
    """

    max_bytes: int = 16 * 2**20
    max_pixels: int = 4096 * 4096

    def __post_init__(self):
        for name in ("max_bytes", "max_pixels"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"serving limit {name}={value!r} is invalid: expected a positive integer")


# -- releases ---------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Release:
    """A released model, ready to serve.

    Attributes:
        model: The Keras model.
        calibration: Its `petseg.calibration.Calibration`.
        manifest: The release manifest (version, pathspec, fingerprints, code version, ...).
        uri: Where it was loaded from.
        fingerprint: sha256 of the loaded weights (`petseg.model.fingerprint`).
    """

    model: keras.Model
    calibration: Calibration
    manifest: dict
    uri: str
    fingerprint: str

    @property
    def image_size(self) -> int:
        """Height and width of the model input."""
        return int(self.manifest.get("image_size", 128))

    def tags(self) -> dict[str, str]:
        """The provenance every answer carries in ``meta.tags``."""
        return {
            "model_version": str(self.manifest.get("version", "")),
            "model_fingerprint": self.fingerprint,
            "dataset_fingerprint": str(self.manifest.get("dataset_fingerprint", "")),
            "pathspec": str(self.manifest.get("pathspec", "")),
            "code_version": str(self.manifest.get("code_version", "")),
        }


def load_release(
    uri: str, *, expected_fingerprint: str | None = None, s3_endpoint_url: str | None = None
) -> Release:
    """Loads a release and checks its model fingerprint.

    Args:
        uri: A local release directory (model.keras, calibration.json,
            manifest.json), an ``s3://bucket/prefix`` holding the same files,
            or a Metaflow run ``PetSegFlow/<id>`` whose release step holds
            ``model_keras``, ``calibration`` and ``manifest``.
        expected_fingerprint: When given, the model's fingerprint must equal it.
        s3_endpoint_url: Endpoint of a non-AWS S3 server.

    Returns:
        The release.

    Raises:
        ModelError: The release is missing, incomplete or unreadable, or its
            weights do not match ``expected_fingerprint`` or its manifest.
        ConfigError: ``uri`` is none of the accepted forms.
    """
    if not uri:
        raise ConfigError("no model to serve: expected a release directory, s3://bucket/prefix or PetSegFlow/<id>")
    if uri.startswith("s3://"):
        with tempfile.TemporaryDirectory() as tmp:
            _download_release(uri, Path(tmp), s3_endpoint_url=s3_endpoint_url)
            model, calibration, manifest = _release_in_folder(Path(tmp))
    elif Path(uri).is_dir():
        model, calibration, manifest = _release_in_folder(Path(uri))
    elif _RUN_PATHSPEC.match(uri):
        model, calibration, manifest = _release_of_run(uri)
    else:
        raise ConfigError(f"model URI {uri!r} is not a directory, s3://bucket/prefix or PetSegFlow/<id>")
    release = Release(model, calibration, manifest, str(uri), models.fingerprint(model))
    _check_fingerprint(release, expected_fingerprint)
    return release


def _release_in_folder(folder: Path) -> tuple[keras.Model, Calibration, dict]:
    missing = [name for name in RELEASE_FILES if not (folder / name).is_file()]
    if missing:
        raise ModelError(f"release directory {folder} lacks {', '.join(missing)}: expected {', '.join(RELEASE_FILES)}")
    model = models.load(folder / "model.keras")
    return model, Calibration.load(folder / "calibration.json"), _read_json(folder / "manifest.json")


def _check_fingerprint(release: Release, expected: str | None) -> None:
    recorded = release.manifest.get("model_fingerprint")
    if expected and expected != release.fingerprint:
        raise ModelError(
            f"model fingerprint mismatch for {release.uri}: MODEL_FINGERPRINT is {expected} "
            f"but the model's weights hash to {release.fingerprint}; refusing to serve another model"
        )
    if recorded and recorded != release.fingerprint:
        raise ModelError(
            f"release {release.uri} is inconsistent: its manifest records model fingerprint {recorded} "
            f"but the model's weights hash to {release.fingerprint}"
        )


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ModelError(f"release file {path} is not readable JSON: {err}") from None


def _split_s3(uri: str) -> tuple[str, str]:
    parsed = urlparse(uri)
    if not parsed.netloc:
        raise ConfigError(f"{uri!r} has no bucket: expected s3://bucket/prefix")
    return parsed.netloc, parsed.path.strip("/")


def _s3_client(s3_endpoint_url: str | None):
    import boto3

    return boto3.client("s3", endpoint_url=s3_endpoint_url)


def _download_release(uri: str, folder: Path, *, s3_endpoint_url: str | None) -> None:
    bucket, prefix = _split_s3(uri)
    client = _s3_client(s3_endpoint_url)
    for name in RELEASE_FILES:
        key = f"{prefix}/{name}" if prefix else name
        try:
            client.download_file(bucket, key, str(folder / name))
        except Exception as err:  # botocore raises several unrelated types
            raise ModelError(f"release file s3://{bucket}/{key} could not be read: {err}") from None


def _release_of_run(pathspec: str) -> tuple[keras.Model, Calibration, dict]:
    from metaflow import Run
    from metaflow.exception import MetaflowException

    try:
        # Serve a run of any user or namespace: the pathspec names it exactly.
        data = Run(pathspec, _namespace_check=False)["release"].task.data
        model_keras, calibration, manifest = data.model_keras, data.calibration, data.manifest
    except (MetaflowException, KeyError, AttributeError) as err:
        raise ModelError(
            f"run {pathspec} has no released model ({type(err).__name__}: {err}); "
            "expected a finished run whose release step passed the quality gate"
        ) from None
    if not manifest:
        raise ModelError(f"run {pathspec} did not release a model: its quality gate failed")
    return models.from_bytes(model_keras), Calibration.from_dict(calibration), manifest


# -- prediction -------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Payload:
    """Images taken from a prediction request.

    Attributes:
        images: float32 (N, H, W, 3) in [0, 1].
        form: ``ndarray``, ``tensor``, ``binData`` or ``strData``: how they came
            and how the answer goes back.
        batched: Whether an array came with a batch axis (NxHxWx3).
        encoded: The image file bytes, for binData and strData.
        encoded_format: ``JPEG`` or ``PNG`` for binData and strData.
    """

    images: np.ndarray
    form: str
    batched: bool = False
    encoded: bytes | None = None
    encoded_format: str | None = None


class Predictor:
    """Model plus calibration, for images of any size.

    Images are resized (bilinear) to the model input, the model's
    probabilities calibrated there, then resized back to the input size.

    Args:
        release: The release to serve.
    """

    def __init__(self, release: Release):
        size = release.image_size
        model = release.model

        # One graph for every input size and batch: a traced call costs a
        # fraction of an eager Keras call on small images. Antialiasing
        # scales images down as PIL's bilinear resize at ingest did for the
        # training images (petseg.data.prepare).
        @tf.function(input_signature=[tf.TensorSpec([None, None, None, 3], tf.float32)])
        def forward(images):
            return model(tf.image.resize(images, (size, size), antialias=True), training=False)

        self._forward = forward
        self._size = size
        self.calibration = release.calibration

    def predict(self, images: np.ndarray) -> np.ndarray:
        """Calibrated probabilities for a batch of images.

        Args:
            images: float32 (N, H, W, 3) in [0, 1].

        Returns:
            float32 (N, H, W, 3) probabilities of (pet, background, border).
        """
        probs = np.asarray(self.calibration.apply(self._forward(images).numpy()), dtype=np.float32)
        height, width = images.shape[1:3]
        if (height, width) != (self._size, self._size):
            probs = tf.image.resize(probs, (height, width)).numpy()
        return np.clip(probs, 0.0, 1.0)


def parse_prediction(message: Any, *, limits: Limits) -> Payload:
    """Reads the images of a prediction request.

    Args:
        message: The decoded JSON of a SeldonMessage.
        limits: Size limits.

    Returns:
        The images and the form they came in.

    Raises:
        BadRequest: Anything that is not one image or a batch of images.
    """
    if not isinstance(message, dict):
        raise BadRequest(
            "BAD_MESSAGE", where="request", expected="a JSON object (SeldonMessage)", got=_describe(message),
        )
    forms = [key for key in ("data", "binData", "strData") if key in message]
    if len(forms) != 1:
        raise BadRequest(
            "MISSING_DATA" if not forms else "AMBIGUOUS_DATA",
            where="request",
            expected="exactly one of data.ndarray, data.tensor, binData or strData",
            got=f"keys {sorted(message)[:8]}",
        )
    form = forms[0]
    if form != "data":
        encoded = _base64_bytes(message[form], where=form, limits=limits)
        image, image_format = decode_image(encoded, where=form, limits=limits)
        return Payload(image[None].astype(np.float32) / 255.0, form, False, encoded, image_format)
    data = message["data"]
    if not isinstance(data, dict) or len({"ndarray", "tensor"} & set(data)) != 1:
        raise BadRequest(
            "MISSING_DATA",
            where="data",
            expected="an object with exactly one of ndarray or tensor",
            got=f"keys {sorted(data)[:8]}" if isinstance(data, dict) else _describe(data),
        )
    if "ndarray" in data:
        values, integers = _numbers(data["ndarray"], where="data.ndarray")
        where, form = "data.ndarray", "ndarray"
    else:
        values, integers = _tensor(data["tensor"])
        where, form = "data.tensor", "tensor"
    images = _images(values, integers, where=where, limits=limits)
    return Payload(images if values.ndim == 4 else images[None], form, values.ndim == 4)


def encode_prediction(probs: np.ndarray, payload: Payload) -> dict:
    """A SeldonMessage (as JSON) answering ``payload`` with ``probs``.

    Args:
        probs: (N, H, W, 3) probabilities from `Predictor.predict`.
        payload: The parsed request.

    Returns:
        ``{"data": {"names", "ndarray" | "tensor"}}`` or ``{"binData" | "strData": base64 PNG}``.
    """
    if payload.form in ("binData", "strData"):
        return {payload.form: base64.b64encode(probability_png(probs[0])).decode("ascii")}
    values = probs if payload.batched else probs[0]
    rounded = np.round(values.astype(np.float64), DECIMALS)
    if payload.form == "ndarray":
        return {"data": {"names": list(CHANNELS), "ndarray": rounded.tolist()}}
    tensor = {"shape": list(values.shape), "values": rounded.ravel().tolist()}
    return {"data": {"names": list(CHANNELS), "tensor": tensor}}


def probability_png(probs: np.ndarray) -> bytes:
    """A 3-channel PNG of (H, W, 3) probabilities * 255 (red pet, green background, blue border)."""
    pixels = np.round(np.clip(probs, 0.0, 1.0) * 255.0).astype(np.uint8)
    buffer = io.BytesIO()
    # Level 1: a tenth of the time of the default level 6 for a file 25% larger.
    Image.fromarray(pixels).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def decode_image(encoded: bytes, *, where: str, limits: Limits) -> tuple[np.ndarray, str]:
    """Decodes JPEG or PNG bytes to uint8 (H, W, 3).

    Returns:
        The pixels and the format (``JPEG`` or ``PNG``).

    Raises:
        BadRequest: Empty, too large, another format, or undecodable.
    """
    if not encoded:
        raise BadRequest("EMPTY", where=where, expected="JPEG or PNG bytes", got="no bytes")
    if len(encoded) > limits.max_bytes:
        raise BadRequest(
            "TOO_LARGE", where=where, expected=f"at most {limits.max_bytes} bytes", got=f"{len(encoded)} bytes",
        )
    try:
        with Image.open(io.BytesIO(encoded)) as image:
            _check_image(image, where=where, limits=limits)
            return np.asarray(image.convert("RGB")), image.format
    except BadRequest:
        raise
    except Exception as err:  # Pillow raises many kinds (OSError, SyntaxError, ValueError, ...) for bad bytes.
        raise BadRequest(
            "BAD_IMAGE", where=where, expected="JPEG or PNG bytes",
            got=f"undecodable bytes ({type(err).__name__}: {err})",
        ) from None


def _check_image(image: Image.Image, *, where: str, limits: Limits) -> None:
    # Checked from the header, before any pixel is decoded.
    if image.format not in IMAGE_FORMATS:
        raise BadRequest("BAD_IMAGE", where=where, expected="a JPEG or PNG image", got=f"a {image.format} image")
    width, height = image.size
    if width * height > limits.max_pixels:
        raise BadRequest(
            "TOO_LARGE", where=where, expected=f"at most {limits.max_pixels} pixels", got=f"{width}x{height} pixels"
        )


def _base64_bytes(value: Any, *, where: str, limits: Limits) -> bytes:
    if not isinstance(value, str):
        raise BadRequest("BAD_BASE64", where=where, expected=_IMAGE_BYTES, got=_describe(value))
    if len(value) > (limits.max_bytes + 2) // 3 * 4 + 4:
        raise BadRequest(
            "TOO_LARGE", where=where, expected=f"at most {limits.max_bytes} bytes",
            got=f"{len(value)} base64 characters",
        )
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as err:
        raise BadRequest("BAD_BASE64", where=where, expected=_IMAGE_BYTES, got=f"invalid base64 ({err})") from None


def _numbers(value: Any, *, where: str) -> tuple[np.ndarray, bool]:
    """A nested list of JSON numbers as float64, and whether all were integers."""
    if not isinstance(value, list):
        raise BadRequest("BAD_DTYPE", where=where, expected=f"a nested list of {_ARRAY}", got=_describe(value))
    # An object array keeps every element's JSON type: bools and strings must
    # not pass as numbers, and a ragged list leaves lists among the elements.
    elements = np.asarray(value, dtype=object)
    types = set(map(type, elements.flat))
    if list in types:
        raise BadRequest(
            "BAD_SHAPE", where=where, expected=f"a rectangular nested list of {_ARRAY}",
            got="nested lists of unequal lengths or depths",
        )
    if not types <= {int, float}:
        names = ", ".join(sorted({"null" if t is type(None) else t.__name__ for t in types - {int, float}}))
        raise BadRequest("BAD_DTYPE", where=where, expected=_ARRAY, got=f"elements of type {names}")
    try:
        return elements.astype(np.float64), types <= {int}
    except OverflowError:
        raise BadRequest("BAD_VALUES", where=where, expected=_ARRAY, got="an integer too large for a float") from None


def _tensor(tensor: Any) -> tuple[np.ndarray, bool]:
    where = "data.tensor"
    if not isinstance(tensor, dict) or not {"shape", "values"} <= set(tensor):
        raise BadRequest(
            "BAD_TENSOR", where=where, expected='an object {"shape": [...], "values": [...]}', got=_describe(tensor),
        )
    shape = tensor["shape"]
    if not isinstance(shape, list) or not all(type(n) is int and n >= 0 for n in shape):
        raise BadRequest(
            "BAD_SHAPE", where=f"{where}.shape", expected="a list of non-negative integers", got=_describe(shape),
        )
    values, integers = _numbers(tensor["values"], where=f"{where}.values")
    if values.ndim != 1 or values.size != math.prod(shape):
        raise BadRequest(
            "BAD_SHAPE",
            where=f"{where}.values",
            expected=f"a flat list of {math.prod(shape)} numbers (the product of shape {shape})",
            got=f"shape {values.shape}",
        )
    return values.reshape(shape), integers


def _images(values: np.ndarray, integers: bool, *, where: str, limits: Limits) -> np.ndarray:
    """Validated float64 numbers -> float32 images in [0, 1], same shape."""
    if values.ndim not in (3, 4) or values.shape[-1] != 3:
        raise BadRequest("BAD_SHAPE", where=where, expected="shape HxWx3 or NxHxWx3 (RGB)", got=f"shape {values.shape}")
    if values.size == 0:
        raise BadRequest("EMPTY", where=where, expected="at least one 1x1 RGB pixel", got=f"shape {values.shape}")
    pixels = values.size // 3
    if pixels > limits.max_pixels:
        raise BadRequest(
            "TOO_LARGE", where=where, expected=f"at most {limits.max_pixels} pixels", got=f"{pixels} pixels",
        )
    if not np.isfinite(values).all():
        raise BadRequest("BAD_VALUES", where=where, expected="finite numbers", got="NaN or infinity")
    low, high = float(values.min()), float(values.max())
    # Integers are 0-255. Floats are [0, 1], except whole numbers above 1:
    # those are 0-255 too (a Seldon proto turns every number into a double).
    whole = integers or (high > 1.0 and bool((values == np.round(values)).all()))
    if whole and (low < 0 or high > 255):
        raise BadRequest(
            "BAD_VALUES", where=where, expected="uint8 values 0-255", got=f"values from {low:g} to {high:g}",
        )
    if not whole and (low < 0 or high > 1):
        raise BadRequest(
            "BAD_VALUES", where=where, expected="floats in [0, 1] or integers 0-255",
            got=f"values from {low:g} to {high:g}",
        )
    return (values / 255.0 if whole else values).astype(np.float32)


def _describe(value: Any) -> str:
    """A short description of a JSON value for error messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return f"the number {value!r}"
    if isinstance(value, str):
        return f"a string of {len(value)} characters"
    if isinstance(value, list):
        return f"a list of {len(value)} elements"
    if isinstance(value, dict):
        return f"an object with keys {sorted(value)[:8]}"
    return type(value).__name__


# -- feedback ---------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class FeedbackSample:
    """A labelled image taken from a Feedback message.

    Attributes:
        jpeg: The image as JPEG bytes (the request's own bytes when it sent a JPEG).
        trimap: uint8 (H, W) with 1 = pet, 2 = background, 3 = border, the image's size.
        reward: The reward the client gave the prediction.
        breed: The Oxford breed name the truth named (``truth.meta.tags.breed``), if any.
    """

    jpeg: bytes
    trimap: np.ndarray
    reward: float
    breed: str | None = None


def parse_feedback(message: Any, *, limits: Limits) -> FeedbackSample:
    """Reads the image (``request``), ``truth`` mask and ``reward`` of a Feedback message.

    The truth is an HxW trimap (values 1, 2, 3), an HxWx3 one-hot or
    probability map (pet, background, border; its argmax is kept), or a PNG
    (one channel: trimap values; three channels: probabilities * 255) as
    binData or strData. It must have the image's height and width. The
    truth may name the pet's Oxford breed in ``truth.meta.tags.breed``.

    Args:
        message: The decoded JSON of a Seldon Feedback message.
        limits: Size limits.

    Returns:
        The sample.

    Raises:
        BadRequest: A missing or malformed image, truth or reward.
    """
    if not isinstance(message, dict):
        raise BadRequest(
            "BAD_MESSAGE", where="feedback", expected="a JSON object (Seldon Feedback)", got=_describe(message),
        )
    for key in ("request", "truth"):
        if not isinstance(message.get(key), dict):
            raise BadRequest(
                "MISSING_DATA", where=f"feedback.{key}", expected="a SeldonMessage object",
                got=_describe(message.get(key)),
            )
    reward = message.get("reward", 0.0)
    if isinstance(reward, bool) or not isinstance(reward, (int, float)) or not math.isfinite(reward):
        raise BadRequest("BAD_REWARD", where="feedback.reward", expected="a finite number", got=_describe(reward))
    payload = parse_prediction(message["request"], limits=limits)
    if len(payload.images) != 1:
        raise BadRequest(
            "BAD_SHAPE", where="feedback.request", expected="one image", got=f"{len(payload.images)} images",
        )
    trimap = _truth(message["truth"], limits=limits)
    height, width = payload.images.shape[1:3]
    if trimap.shape != (height, width):
        raise BadRequest(
            "BAD_TRUTH",
            where="feedback.truth",
            expected=f"a mask of the image's size {height}x{width}",
            got=f"a {trimap.shape[0]}x{trimap.shape[1]} mask",
        )
    if payload.encoded_format == "JPEG":
        jpeg = payload.encoded
    else:
        jpeg = _jpeg(np.round(payload.images[0] * 255.0).astype(np.uint8))
    return FeedbackSample(jpeg, trimap, float(reward), _breed(message["truth"]))


def _breed(truth: dict) -> str | None:
    meta = truth.get("meta")
    tags = meta.get("tags") if isinstance(meta, dict) else None
    breed = tags.get("breed") if isinstance(tags, dict) else None
    if breed is None:
        return None
    names = [b.name for b in synth.BREEDS]
    if breed not in names:
        raise BadRequest(
            "BAD_BREED", where="feedback.truth.meta.tags.breed",
            expected="an Oxford breed name such as Abyssinian or beagle", got=_describe(breed),
        )
    return breed


def _truth(truth: dict, *, limits: Limits) -> np.ndarray:
    """The truth SeldonMessage as a uint8 (H, W) trimap."""
    where = "feedback.truth"
    expected = "an HxW trimap (1, 2, 3) or an HxWx3 one-hot or probability map in [0, 1]"
    for form in ("binData", "strData"):
        if form in truth:
            encoded = _base64_bytes(truth[form], where=f"{where}.{form}", limits=limits)
            return _truth_png(encoded, where=f"{where}.{form}", limits=limits)
    data = truth.get("data")
    if not isinstance(data, dict) or not {"ndarray", "tensor"} & set(data):
        raise BadRequest(
            "MISSING_DATA", where=where, expected="data.ndarray, data.tensor, binData or strData", got=_describe(truth),
        )
    if "ndarray" in data:
        values, _ = _numbers(data["ndarray"], where=f"{where}.data.ndarray")
    else:
        values, _ = _tensor(data["tensor"])
    if values.size == 0 or values.size // (values.shape[-1] if values.ndim == 3 else 1) > limits.max_pixels:
        raise BadRequest(
            "BAD_TRUTH", where=where, expected=f"a non-empty mask of at most {limits.max_pixels} pixels",
            got=f"shape {values.shape}",
        )
    if not np.isfinite(values).all():
        raise BadRequest("BAD_TRUTH", where=where, expected="finite numbers", got="NaN or infinity")
    if values.ndim == 2:
        if not np.isin(values, (1, 2, 3)).all():
            raise BadRequest(
                "BAD_TRUTH", where=where, expected="trimap values 1, 2 and 3 only",
                got=f"values {_some_values(values)}",
            )
        return values.astype(np.uint8)
    if values.ndim == 3 and values.shape[-1] == 3:
        if values.min() < 0 or values.max() > 1:
            raise BadRequest(
                "BAD_TRUTH", where=where, expected="one-hot or probabilities in [0, 1]",
                got=f"values from {values.min():g} to {values.max():g}",
            )
        return (np.argmax(values, axis=-1) + 1).astype(np.uint8)
    raise BadRequest("BAD_TRUTH", where=where, expected=expected, got=f"shape {values.shape}")


def _truth_png(encoded: bytes, *, where: str, limits: Limits) -> np.ndarray:
    if len(encoded) > limits.max_bytes:
        raise BadRequest(
            "TOO_LARGE", where=where, expected=f"at most {limits.max_bytes} bytes", got=f"{len(encoded)} bytes",
        )
    expected = "a PNG: one channel of trimap values 1-3, or RGB probabilities * 255"
    try:
        with Image.open(io.BytesIO(encoded)) as image:
            _check_image(image, where=where, limits=limits)
            if image.format != "PNG" or image.mode not in ("L", "P", "RGB"):
                raise BadRequest(
                    "BAD_TRUTH", where=where, expected=expected, got=f"a {image.format} image in mode {image.mode}",
                )
            pixels = np.asarray(image)
    except BadRequest:
        raise
    except Exception as err:  # Pillow raises many kinds for bad bytes.
        raise BadRequest(
            "BAD_IMAGE", where=where, expected=expected, got=f"undecodable bytes ({type(err).__name__}: {err})",
        ) from None
    if pixels.ndim == 3:
        return (np.argmax(pixels, axis=-1) + 1).astype(np.uint8)
    if not np.isin(pixels, (1, 2, 3)).all():
        raise BadRequest(
            "BAD_TRUTH", where=where, expected="trimap values 1, 2 and 3 only", got=f"values {_some_values(pixels)}",
        )
    return pixels.astype(np.uint8)


def _some_values(values: np.ndarray) -> str:
    unique = np.unique(values)
    shown = ", ".join(f"{v:g}" for v in unique[:6])
    return shown + (", ..." if unique.size > 6 else "")


def _jpeg(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=JPEG_QUALITY)
    return buffer.getvalue()


def _png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


class FeedbackStore:
    """Feedback samples in the Oxford layout that `petseg.data.ingest(feedback=...)` reads.

    Under ``root`` (a directory or an ``s3://bucket/prefix``):

    - ``images/<id>.jpg``: the request image;
    - ``annotations/trimaps/<id>.png``: the truth, single-channel, values 1-3, same size;
    - ``annotations/list.txt``: an Oxford line ``<id> CLASS-ID SPECIES BREED-ID``
      for each sample whose truth named its breed (ingest counts the others
      as unlisted);
    - ``feedback/<id>.json``: reward, model version and fingerprint, breed, time.

    Ids are ``feedback_<16 hex digits of the sha256 of image and trimap bytes>``:
    never an Oxford id, and the same sample sent twice is stored once. On S3,
    list.txt is read, extended and written back, so two replicas adding at
    the same instant can lose a line (the sample's files stay).

    Args:
        root: Directory or ``s3://bucket/prefix``.
        s3_endpoint_url: Endpoint of a non-AWS S3 server.
    """

    def __init__(self, root: str, *, s3_endpoint_url: str | None = None):
        if not root:
            raise ConfigError("feedback store root is empty: expected a directory or s3://bucket/prefix")
        self.root = root.rstrip("/")
        self._s3 = None
        if self.root.startswith("s3://"):
            self._bucket, self._prefix = _split_s3(self.root)
            self._s3 = _s3_client(s3_endpoint_url)

    def add(self, sample: FeedbackSample, *, model_version: str, model_fingerprint: str) -> str:
        """Stores one sample and returns its id."""
        trimap_png = _png(sample.trimap)
        sample_id = "feedback_" + hashlib.sha256(sample.jpeg + trimap_png).hexdigest()[:16]
        record = {
            "id": sample_id,
            "reward": sample.reward,
            "breed": sample.breed,
            "model_version": model_version,
            "model_fingerprint": model_fingerprint,
            "received": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        self._write(f"images/{sample_id}.jpg", sample.jpeg)
        self._write(f"annotations/trimaps/{sample_id}.png", trimap_png)
        self._write(f"feedback/{sample_id}.json", (json.dumps(record, indent=2) + "\n").encode())
        if sample.breed is not None:
            breed = next(b for b in synth.BREEDS if b.name == sample.breed)
            self._list(sample_id, synth.list_line(sample_id, breed))
        return sample_id

    def _write(self, name: str, data: bytes) -> None:
        if self._s3 is not None:
            self._s3.put_object(Bucket=self._bucket, Key=self._key(name), Body=data)
            return
        path = Path(self.root, name)
        path.parent.mkdir(parents=True, exist_ok=True)
        # Write beside, then rename: a reader never sees half a file.
        with tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", delete=False) as tmp:
            tmp.write(data)
        os.replace(tmp.name, path)

    def _list(self, sample_id: str, line: str) -> None:
        """Appends ``line`` to annotations/list.txt unless the id is listed already."""
        if self._s3 is not None:
            try:
                listing = self._s3.get_object(Bucket=self._bucket, Key=self._key("annotations/list.txt"))
                text = listing["Body"].read().decode()
            except self._s3.exceptions.NoSuchKey:
                text = synth.LIST_HEADER
            if not _listed(text, sample_id):
                self._write("annotations/list.txt", (text + line).encode())
            return
        path = Path(self.root, "annotations", "list.txt")
        with open(path, "a+", encoding="utf-8") as listing:
            fcntl.flock(listing, fcntl.LOCK_EX)  # server workers append one at a time
            listing.seek(0)
            text = listing.read()
            if not text:
                listing.write(synth.LIST_HEADER)
            if not _listed(text, sample_id):
                listing.write(line)

    def _key(self, name: str) -> str:
        return f"{self._prefix}/{name}" if self._prefix else name


def _listed(text: str, sample_id: str) -> bool:
    return any(line.split(maxsplit=1)[:1] == [sample_id] for line in text.splitlines())


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
            The answer (a SeldonMessage as JSON, without meta) and the probabilities.

        Raises:
            BadRequest: The request is malformed.
        """
        payload = parse_prediction(message, limits=self.limits)
        probs = self.predictor.predict(payload.images)
        return encode_prediction(probs, payload), probs

    def feedback(self, message: Any) -> dict:
        """Stores the labelled image of a Feedback message.

        Returns:
            ``{"sample_id", "store"}``.

        Raises:
            BadRequest: The message is malformed, or no feedback store is set.
        """
        if self.feedback_store is None:
            raise BadRequest(
                "FEEDBACK_DISABLED", where="feedback", expected="a server started with a feedback store (FEEDBACK_URI)",
                got="a server without one",
            )
        sample = parse_feedback(message, limits=self.limits)
        sample_id = self.feedback_store.add(sample, model_version=self.release.tags()["model_version"],
                                            model_fingerprint=self.release.fingerprint)
        return {"sample_id": sample_id, "store": self.feedback_store.root}

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
        probs: The (N, H, W, 3) probabilities returned.
        elapsed_ms: Time spent answering, in milliseconds.

    Returns:
        A COUNTER of images predicted, a TIMER of latency (ms) and a GAUGE of
        the share of pixels predicted pet (probability >= 0.5).
    """
    return [
        {"type": "COUNTER", "key": "petseg_predictions", "value": int(len(probs))},
        {"type": "TIMER", "key": "petseg_prediction_latency", "value": float(elapsed_ms)},
        {"type": "GAUGE", "key": "petseg_pet_fraction", "value": float(np.mean(probs[..., 0] >= 0.5))},
    ]


def metadata() -> dict:
    """Seldon model metadata: the accepted inputs and the outputs."""
    image = {"messagetype": "ndarray", "schema": {"names": ["red", "green", "blue"], "shape": [-1, -1, 3]}}
    mask = {"messagetype": "ndarray", "schema": {"names": list(CHANNELS), "shape": [-1, -1, 3]}}
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


class Rejection(SeldonMicroserviceException):
    """A `BadRequest` as the Seldon wrapper answers it: HTTP 400 with a JSON body.

    The body is ``{"status": {"code": 400, "reason", "info", "status": "FAILURE"}, "meta": {"tags"}}``.

    Args:
        error: The bad request.
        tags: Provenance tags of the served release.
    """

    def __init__(self, error: BadRequest, tags: dict[str, str]):
        super().__init__(str(error), status_code=400, reason=error.reason)
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


def request_guard(*, limits: Limits, tags: Callable[[], dict[str, str]]) -> flask.Blueprint:
    """A Flask blueprint that vets prediction and feedback requests before the wrapper reads them.

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
        except BadRequest as err:
            raise Rejection(err, tags()) from None

    return guard


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
    request.max_content_length = max_bytes  # also bounds bodies sent without a length
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
        raise BadRequest("BAD_MESSAGE", where="request body", expected="a JSON object", got=_describe(message))
    return message
