"""Prediction messages: SeldonMessage in, images out; probabilities in, SeldonMessage out.

Accepted requests (the decoded JSON of a SeldonMessage):

- ``{"data": {"ndarray": [...]}}`` or ``{"data": {"tensor": {"shape", "values"}}}``:
  an HxWx3 or NxHxWx3 image, uint8 0-255 or float in [0, 1];
- ``{"binData": "<base64 JPEG or PNG>"}`` or ``{"strData": "<base64 JPEG or PNG>"}``.

Answers carry probabilities of (pet, background, border) at the size of the
input image, in the form of the request: an ndarray or tensor (values rounded
to 4 decimals), or a 3-channel PNG of probability * 255 as binData or strData.

The 3-class mask of an answer (`class_mask`, what the Open Inference Protocol
server of `petseg.serving.v2_messages` answers) is, per pixel, the trimap value (1 pet,
2 background, 3 border) of the class with the highest 8-bit probability, the
first class on ties. Both answer forms carry those 8 bits exactly: they are the
binData PNG's channels, and round(value * 255) of the 4-decimal ndarray values
(the PNG is made from the rounded values, so the two never disagree).

Anything else is a `BadRequest` saying what was expected and what came. The
checks here (`describe`, `base64_bytes`, `check_image`, `nested_numbers`,
`tensor_numbers`) also read the truth of feedback messages (`petseg.serving.feedback`).
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import io
import math
import os
from typing import Any

import numpy as np
from PIL import Image

from petseg import oxford
from petseg.errors import ConfigError, DataError

IMAGE_FORMATS = ("JPEG", "PNG")
DECIMALS = 4  # precision of probabilities in ndarray and tensor answers
_ARRAY = "HxWx3 or NxHxWx3 numbers, uint8 0-255 or float in [0, 1]"
_IMAGE_BYTES = "base64 of JPEG or PNG bytes"


class BadRequest(DataError):
    """A request the service cannot use; answered with HTTP 400, 413 when it is too large, 429 over a quota.

    Args:
        kind: Short upper-case category, e.g. ``BAD_SHAPE``.
        where: The part of the message at fault, e.g. ``data.ndarray``.
        expected: What the service accepts there.
        got: What came (a short description, never the data itself).
    """

    def __init__(self, kind: str, *, where: str, expected: str, got: str):
        got = got if len(got) <= 200 else got[:197] + "..."
        self.kind = kind
        self.reason = f"{kind}: expected {expected}; got {got}"
        super().__init__(f"{where}: expected {expected}; got {got}")

    @property
    def status(self) -> int:
        """The HTTP status that answers it: 413 for ``TOO_LARGE``, 429 for ``TOO_MANY`` (a quota), else 400."""
        return {"TOO_LARGE": 413, "TOO_MANY": 429}.get(self.kind, 400)


@dataclasses.dataclass(frozen=True)
class Limits:
    """Size limits on requests.

    Attributes:
        max_bytes: Largest request body and largest encoded image, in bytes.
        max_pixels: Largest number of pixels in one request (all images of a batch).
        max_list_pixels: Largest number of pixels sent or answered as JSON
            lists of numbers: Seldon ``data.ndarray`` and ``data.tensor``
            requests (and so their answers) and feedback truths, v2 UINT8 tensors sent as lists, and
            the v2 ``probabilities`` output (a list on its way out of the
            runtime). A number in a Python list costs tens of bytes, so these
            forms cost about 400-500 bytes a pixel, measured in
            docs/PERFORMANCE.md; images (binData, BYTES) and masks have no such limit.
    """

    max_bytes: int = 16 * 2**20
    max_pixels: int = 4096 * 4096
    max_list_pixels: int = 512 * 512

    def __post_init__(self):
        for name in ("max_bytes", "max_pixels", "max_list_pixels"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"serving limit {name}={value!r} is invalid: expected a positive integer")


def limits_from_environment() -> Limits:
    """Request limits from MAX_IMAGE_BYTES, MAX_PIXELS and MAX_LIST_PIXELS, else the defaults."""
    defaults = Limits()
    return Limits(max_bytes=int_setting("MAX_IMAGE_BYTES", defaults.max_bytes),
                  max_pixels=int_setting("MAX_PIXELS", defaults.max_pixels),
                  max_list_pixels=int_setting("MAX_LIST_PIXELS", defaults.max_list_pixels))


LIST_SLACK = 4096
"""Commas a message may hold besides its lists of numbers (keys, names, tags, a batch of base64 strings)."""


def check_list_size(text: bytes | str, *, limits: Limits, lists: int = 1, where: str = "request body") -> None:
    """Refuses a JSON message with more numbers than ``lists`` lists of `Limits.max_list_pixels` RGB pixels
    hold, before it is decoded.

    Decoding JSON makes every number a Python object of tens of bytes: a
    16 MiB body of small integers costs about 0.3 GB before its size can be
    checked. In a JSON list every number but the first follows a comma, and
    base64 has none, so the commas (one scan of the bytes) bound the numbers
    a message can hold; a URL-encoded form carries them as ``%2C``.

    Raises:
        BadRequest: ``TOO_LARGE`` (413).
    """
    commas = sum(text.count(mark if isinstance(text, str) else mark.encode()) for mark in (",", "%2C", "%2c"))
    allowed = lists * 3 * limits.max_list_pixels + LIST_SLACK
    if commas > allowed:
        raise BadRequest(
            "TOO_LARGE", where=where, got=f"about {commas} values ({commas} commas)",
            expected=f"at most {allowed} values in lists of numbers ({limits.max_list_pixels} RGB pixels a list; "
                     "send larger images as binData or as bytes)",
        )


def int_setting(name: str, default: int) -> int:
    """A server's integer setting from the environment variable ``name``; unset or empty, ``default``."""
    value = os.environ.get(name, "")
    if not value:
        return default
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"{name}={value!r} is not an integer: expected a positive number") from None


@dataclasses.dataclass(frozen=True)
class Payload:
    """Images taken from a prediction request.

    Attributes:
        images: float32 (N, H, W, 3) in [0, 1].
        form: ``ndarray``, ``tensor``, ``binData`` or ``strData``: how they came
            and how the answer goes back.
        size: (H, W) of the image sent when ``images`` holds it reduced; None when not reduced.
        batched: Whether an array came with a batch axis (NxHxWx3).
        encoded: The image file bytes, for binData and strData.
        encoded_format: ``JPEG`` or ``PNG`` for binData and strData.
    """

    images: np.ndarray
    form: str
    batched: bool = False
    encoded: bytes | None = None
    encoded_format: str | None = None
    size: tuple[int, int] | None = None

    @property
    def answer_size(self) -> tuple[int, int]:
        """(H, W) of the answer: the request's image, which ``images`` may hold reduced (`decode_image`)."""
        return self.size or tuple(self.images.shape[1:3])


def parse_prediction(message: Any, *, limits: Limits, work_side: int | None = None) -> Payload:
    """Reads the images of a prediction request.

    Args:
        message: The decoded JSON of a SeldonMessage.
        limits: Size limits.
        work_side: Decode a JPEG or PNG larger than this (longer side) reduced
            to it (`decode_image`); None keeps every pixel (feedback does).

    Returns:
        The images and the form they came in.

    Raises:
        BadRequest: Anything that is not one image or a batch of images.
    """
    if not isinstance(message, dict):
        raise BadRequest(
            "BAD_MESSAGE", where="request", expected="a JSON object (SeldonMessage)", got=describe(message),
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
        encoded = base64_bytes(message[form], where=form, limits=limits)
        image, image_format, size = decode_image(encoded, where=form, limits=limits, work_side=work_side)
        reduced = size if size != image.shape[:2] else None
        return Payload(image[None].astype(np.float32) / 255.0, form, False, encoded, image_format, reduced)
    data = message["data"]
    if not isinstance(data, dict) or len({"ndarray", "tensor"} & set(data)) != 1:
        raise BadRequest(
            "MISSING_DATA",
            where="data",
            expected="an object with exactly one of ndarray or tensor",
            got=f"keys {sorted(data)[:8]}" if isinstance(data, dict) else describe(data),
        )
    if "ndarray" in data:
        values, integers = nested_numbers(data["ndarray"], where="data.ndarray")
        where, form = "data.ndarray", "ndarray"
    else:
        values, integers = tensor_numbers(data["tensor"])
        where, form = "data.tensor", "tensor"
    images = _images(values, integers, where=where, limits=limits)
    return Payload(images if values.ndim == 4 else images[None], form, values.ndim == 4)


def encode_prediction(probs: np.ndarray, payload: Payload) -> dict:
    """A SeldonMessage (as JSON) answering ``payload`` with ``probs``.

    Args:
        probs: (N, H, W, 3) probabilities (`Predictor.predict`), or for binData
            and strData their `eight_bits` as uint8 (`Predictor.predict_eight_bits`).
        payload: The parsed request.

    Returns:
        ``{"data": {"names", "ndarray" | "tensor"}}`` or ``{"binData" | "strData": base64 PNG}``.
    """
    if payload.form in ("binData", "strData"):
        return {payload.form: base64.b64encode(probability_png(probs[0])).decode("ascii")}
    values = rounded(probs if payload.batched else probs[0])
    if payload.form == "ndarray":
        return {"data": {"names": list(oxford.CLASSES), "ndarray": values.tolist()}}
    tensor = {"shape": list(values.shape), "values": values.ravel().tolist()}
    return {"data": {"names": list(oxford.CLASSES), "tensor": tensor}}


def rounded(probs: np.ndarray) -> np.ndarray:
    """Probabilities as answers carry them: float64, clipped to [0, 1], rounded to `DECIMALS` decimals."""
    return np.round(np.clip(probs.astype(np.float64), 0.0, 1.0), DECIMALS)


def eight_bits(probs: np.ndarray) -> np.ndarray:
    """Probabilities as uint8 0-255: ``round(rounded(probs) * 255)``, the values of a binData PNG."""
    return np.round(rounded(probs) * 255.0).astype(np.uint8)


def class_mask(probs: np.ndarray) -> np.ndarray:
    """The 3-class mask of (..., 3) probabilities (or their uint8 `eight_bits`): uint8 trimap values.

    Each pixel gets the class (1 pet, 2 background, 3 border) of highest 8-bit
    probability (`eight_bits`), the first of (pet, background, border) on
    ties: what a binData answer's PNG or an ndarray answer (``round(value * 255)``)
    implies, to the bit.
    """
    bits = probs if probs.dtype == np.uint8 else eight_bits(probs)
    return (np.argmax(bits, axis=-1) + oxford.TRIMAP_VALUES[0]).astype(np.uint8)


def probability_png(probs: np.ndarray) -> bytes:
    """A 3-channel PNG of (H, W, 3) probabilities * 255 (red pet, green background, blue border), see `eight_bits`.

    ``probs`` may be the uint8 `eight_bits` already.
    """
    pixels = probs if probs.dtype == np.uint8 else eight_bits(probs)
    buffer = io.BytesIO()
    # Level 1: a tenth of the time of the default level 6 for a file 25% larger.
    Image.fromarray(pixels).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def decode_image(encoded: bytes, *, where: str, limits: Limits,
                 work_side: int | None = None) -> tuple[np.ndarray, str, tuple[int, int]]:
    """Decodes JPEG or PNG bytes to uint8 (h, w, 3), reduced when larger than ``work_side``.

    A JPEG is decoded at the smallest DCT scale (1/2, 1/4, 1/8) that keeps
    its longer side at least ``work_side`` (Pillow's draft mode: the full
    image never exists), a PNG in full; either is then resized (bilinear,
    antialiased) so that its longer side is ``work_side``. The model sees a
    few times fewer pixels still, so nothing it could use is lost, and a
    16-megapixel image costs megabytes, not a gigabyte of floats.

    Returns:
        The pixels, the format (``JPEG`` or ``PNG``) and the image's own (H, W).

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
            check_image(image, where=where, limits=limits)
            width, height = image.size
            image_format = image.format
            scale = work_side / max(width, height) if work_side else 1.0
            if scale >= 1.0:
                return np.asarray(image.convert("RGB")), image_format, (height, width)
            target = (max(1, round(width * scale)), max(1, round(height * scale)))
            if image_format == "JPEG":
                image.draft("RGB", target)
            reduced = image.convert("RGB").resize(target, Image.Resampling.BILINEAR, reducing_gap=2.0)
            return np.asarray(reduced), image_format, (height, width)
    except BadRequest:
        raise
    except Exception as err:  # Pillow raises many kinds (OSError, SyntaxError, ValueError, ...) for bad bytes.
        raise BadRequest(
            "BAD_IMAGE", where=where, expected="JPEG or PNG bytes",
            got=f"undecodable bytes ({type(err).__name__}: {err})",
        ) from None


def check_image(image: Image.Image, *, where: str, limits: Limits) -> None:
    """Refuses an opened image of another format than JPEG or PNG, or of too many pixels.

    Checked from the header, before any pixel is decoded.
    """
    if image.format not in IMAGE_FORMATS:
        raise BadRequest("BAD_IMAGE", where=where, expected="a JPEG or PNG image", got=f"a {image.format} image")
    width, height = image.size
    if width * height > limits.max_pixels:
        raise BadRequest(
            "TOO_LARGE", where=where, expected=f"at most {limits.max_pixels} pixels", got=f"{width}x{height} pixels"
        )


def base64_bytes(value: Any, *, where: str, limits: Limits) -> bytes:
    """The bytes of a base64 string of at most ``limits.max_bytes`` decoded bytes."""
    if not isinstance(value, str):
        raise BadRequest("BAD_BASE64", where=where, expected=_IMAGE_BYTES, got=describe(value))
    if len(value) > (limits.max_bytes + 2) // 3 * 4 + 4:
        raise BadRequest(
            "TOO_LARGE", where=where, expected=f"at most {limits.max_bytes} bytes",
            got=f"{len(value)} base64 characters",
        )
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as err:
        raise BadRequest("BAD_BASE64", where=where, expected=_IMAGE_BYTES, got=f"invalid base64 ({err})") from None


def nested_numbers(value: Any, *, where: str) -> tuple[np.ndarray, bool]:
    """A nested list of JSON numbers as float64, and whether all were integers."""
    if not isinstance(value, list):
        raise BadRequest("BAD_DTYPE", where=where, expected=f"a nested list of {_ARRAY}", got=describe(value))
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


def tensor_numbers(tensor: Any) -> tuple[np.ndarray, bool]:
    """A ``{"shape", "values"}`` tensor as float64 of its shape, and whether all were integers."""
    where = "data.tensor"
    if not isinstance(tensor, dict) or not {"shape", "values"} <= set(tensor):
        raise BadRequest(
            "BAD_TENSOR", where=where, expected='an object {"shape": [...], "values": [...]}', got=describe(tensor),
        )
    shape = tensor["shape"]
    if not isinstance(shape, list) or not all(type(n) is int and n >= 0 for n in shape):
        raise BadRequest(
            "BAD_SHAPE", where=f"{where}.shape", expected="a list of non-negative integers", got=describe(shape),
        )
    values, integers = nested_numbers(tensor["values"], where=f"{where}.values")
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
    if pixels > min(limits.max_pixels, limits.max_list_pixels):
        raise BadRequest(
            "TOO_LARGE", where=where, got=f"{pixels} pixels",
            expected=f"at most {min(limits.max_pixels, limits.max_list_pixels)} pixels as numbers "
                     "(send larger images as binData)",
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


def describe(value: Any) -> str:
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
