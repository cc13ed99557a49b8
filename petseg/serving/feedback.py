"""Feedback: a labelled sample read from a Seldon Feedback message.

`parse_feedback` takes the request image, the ``truth`` mask and the reward
of a Feedback message (checked like a prediction request, `petseg.serving.messages`);
`petseg.serving.quarantine` stores the sample as pending until someone reviews it.
"""

from __future__ import annotations

import dataclasses
import io
import math
from typing import Any

import numpy as np
from PIL import Image

from petseg import oxford
from petseg.serving.messages import (BadRequest, Limits, base64_bytes, check_image, describe, nested_numbers,
                                     parse_prediction, tensor_numbers)

JPEG_QUALITY = 95


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
            "BAD_MESSAGE", where="feedback", expected="a JSON object (Seldon Feedback)", got=describe(message),
        )
    for key in ("request", "truth"):
        if not isinstance(message.get(key), dict):
            raise BadRequest(
                "MISSING_DATA", where=f"feedback.{key}", expected="a SeldonMessage object",
                got=describe(message.get(key)),
            )
    reward = message.get("reward", 0.0)
    if isinstance(reward, bool) or not isinstance(reward, (int, float)) or not math.isfinite(reward):
        raise BadRequest("BAD_REWARD", where="feedback.reward", expected="a finite number", got=describe(reward))
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
    if breed not in oxford.BREEDS:
        raise BadRequest(
            "BAD_BREED", where="feedback.truth.meta.tags.breed",
            expected="an Oxford breed name such as Abyssinian or beagle", got=describe(breed),
        )
    return breed


def _truth(truth: dict, *, limits: Limits) -> np.ndarray:
    """The truth SeldonMessage as a uint8 (H, W) trimap."""
    where = "feedback.truth"
    expected = "an HxW trimap (1, 2, 3) or an HxWx3 one-hot or probability map in [0, 1]"
    for form in ("binData", "strData"):
        if form in truth:
            encoded = base64_bytes(truth[form], where=f"{where}.{form}", limits=limits)
            return _truth_png(encoded, where=f"{where}.{form}", limits=limits)
    data = truth.get("data")
    if not isinstance(data, dict) or not {"ndarray", "tensor"} & set(data):
        raise BadRequest(
            "MISSING_DATA", where=where, expected="data.ndarray, data.tensor, binData or strData", got=describe(truth),
        )
    if "ndarray" in data:
        values, _ = nested_numbers(data["ndarray"], where=f"{where}.data.ndarray")
    else:
        values, _ = tensor_numbers(data["tensor"])
    largest = min(limits.max_pixels, limits.max_list_pixels)
    if values.size == 0 or values.size // (values.shape[-1] if values.ndim == 3 else 1) > largest:
        raise BadRequest(
            "BAD_TRUTH", where=where, got=f"shape {values.shape}",
            expected=f"a non-empty mask of at most {largest} pixels as numbers (send larger masks as a PNG in binData)",
        )
    if not np.isfinite(values).all():
        raise BadRequest("BAD_TRUTH", where=where, expected="finite numbers", got="NaN or infinity")
    if values.ndim == 2:
        if not np.isin(values, oxford.TRIMAP_VALUES).all():
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
            check_image(image, where=where, limits=limits)
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
    if not np.isin(pixels, oxford.TRIMAP_VALUES).all():
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


def png(pixels: np.ndarray) -> bytes:
    """A PNG of uint8 pixels (the trimap of a stored sample)."""
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()
