"""Client of a served model: send an image for prediction, or a labelled sample as feedback.

`predict` sends an image, writes the mask PNG and a side-by-side picture
(input | predicted | thresholded) as the original notebook displayed it,
from either server: the Seldon Core v1 protocol (the image as binData, the
answer a PNG of probabilities) or the Open Inference Protocol (the image as
a BYTES tensor and the calibrated probabilities back as FP32, both in the
binary data extension; the PNG is made as the Seldon server makes it).
`feedback` sends an image with its true trimap as a new labelled sample
(Seldon's ``/api/v1.0/feedback``, or ``/v2/models/petseg/feedback`` of the
Open Inference Protocol server; the server holds it for review). Both send
``Authorization: Bearer`` with the token of `petseg.tokens` (the first of
the tokens file) unless given another. The ``petseg predict`` and
``petseg feedback send`` commands (petseg.cli.serving) call them.
"""

from __future__ import annotations

import base64
import io
import json
import struct
from pathlib import Path

import numpy as np
import requests
from PIL import Image

from petseg import servers, tokens
from petseg.errors import DataError, ServingError
from petseg.serving.messages import probability_png

PREDICT_PATH = "/api/v1.0/predictions"
FEEDBACK_PATH = "/api/v1.0/feedback"
INFER_PATH = "/v2/models/petseg/infer"
V2_FEEDBACK_PATH = "/v2/models/petseg/feedback"
PROTOCOLS = servers.PROTOCOLS
TITLES = ("Input Image", "Predicted Mask", "Thresholded Mask")


def predict(
    url: str,
    image_path: str | Path,
    out_path: str | Path,
    *,
    figure_path: str | Path | None = None,
    protocol: str = "seldon",
    timeout: float = 60.0,
    token: str | None = None,
) -> dict:
    """Segments one image with a served model.

    Args:
        url: The server, e.g. ``http://127.0.0.1:9000``.
        image_path: A JPEG or PNG image.
        out_path: Where the mask goes: an RGB PNG of the probabilities of
            pet (red), background (green) and border (blue) * 255.
        figure_path: Where the side-by-side picture goes; default
            ``<out stem>.side_by_side.png`` beside the mask.
        protocol: ``seldon`` (Seldon Core v1) or ``v2`` (Open Inference Protocol).
        timeout: Seconds to wait for the answer.
        token: Bearer token; default the first of the tokens file (none when there is no file).

    Returns:
        ``{"mask", "figure", "tags"}``: the files written and the model's provenance tags.

    Raises:
        DataError: The image cannot be read.
        ServingError: The server cannot be reached or refused the request.
    """
    if protocol not in PROTOCOLS:
        raise ServingError(f"protocol {protocol!r} is unknown: expected one of {', '.join(PROTOCOLS)}")
    image_bytes = _read(image_path, "image")
    auth = _authorization(token)
    if protocol == "v2":
        probs, tags = _infer_v2(url, image_bytes, timeout=timeout, auth=auth)
        mask_png = probability_png(probs)  # the PNG the Seldon server answers
        probs = np.asarray(Image.open(io.BytesIO(mask_png)), dtype=np.float32) / 255.0
    else:
        answer = _post(url, PREDICT_PATH, {"binData": _b64(image_bytes)}, timeout=timeout, auth=auth)
        tags = answer.get("meta", {}).get("tags", {})
        try:
            mask_png = base64.b64decode(answer["binData"], validate=True)
            probs = np.asarray(Image.open(io.BytesIO(mask_png)).convert("RGB"), dtype=np.float32) / 255.0
        except Exception as err:  # a server that is not petseg can answer anything
            raise ServingError(f"{url} answered without a PNG mask in binData ({type(err).__name__}: {err})") from None
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_bytes(mask_png)
    figure_path = Path(figure_path) if figure_path else out_path.with_name(f"{out_path.stem}.side_by_side.png")
    image = np.asarray(Image.open(io.BytesIO(image_bytes)).convert("RGB"))
    side_by_side(image, probs, figure_path)
    return {"mask": str(out_path), "figure": str(figure_path), "tags": tags}


def feedback(
    url: str,
    image_path: str | Path,
    truth_png: str | Path,
    reward: float = 1.0,
    *,
    breed: str | None = None,
    timeout: float = 60.0,
    protocol: str = "seldon",
    token: str | None = None,
) -> dict:
    """Sends an image and its true trimap to the server's feedback store, where it waits for review.

    Args:
        url: The server.
        image_path: The JPEG or PNG image.
        truth_png: Its trimap: a single-channel PNG of 1 (pet), 2
            (background), 3 (border) of the image's size, as Oxford ships them.
        reward: How good the served prediction was.
        breed: The pet's Oxford breed name, if known (lists the sample in annotations/list.txt).
        timeout: Seconds to wait for the answer.
        protocol: ``seldon`` or ``v2``.
        token: Bearer token; default the first of the tokens file.

    Returns:
        ``{"sample_id", "status", "store"}``; ``status`` is ``pending`` or ``duplicate``.

    Raises:
        DataError: A file cannot be read.
        ServingError: The server cannot be reached or refused the sample.
    """
    truth = {"binData": _b64(_read(truth_png, "truth"))}
    if breed:
        truth["meta"] = {"tags": {"breed": breed}}
    message = {"request": {"binData": _b64(_read(image_path, "image"))}, "truth": truth, "reward": reward}
    if protocol == "v2":
        return _post(url, V2_FEEDBACK_PATH, message, timeout=timeout, auth=_authorization(token))
    return _post(url, FEEDBACK_PATH, message, timeout=timeout, auth=_authorization(token)).get("jsonData", {})


def side_by_side(image: np.ndarray, probs: np.ndarray, path: str | Path) -> Path:
    """Writes input | predicted probabilities | thresholded (>= 0.5) mask as one PNG.

    Args:
        image: uint8 (H, W, 3).
        probs: (H, W, 3) probabilities of pet, background, border.
        path: The PNG to write.

    Returns:
        The path written.
    """
    # The object-oriented API leaves matplotlib's global state (backend, figures) alone.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(12, 4), dpi=100)
    FigureCanvasAgg(figure)
    for axes, title, picture in zip(figure.subplots(1, 3), TITLES, (image, probs, (probs >= 0.5).astype(np.float32))):
        axes.imshow(picture)
        axes.set_title(title)
        axes.axis("off")
    figure.tight_layout()
    path = Path(path)
    figure.savefig(path)
    return path


def _read(path: str | Path, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as err:
        raise DataError(f"cannot read the {what} {path}: {err.strerror}") from None


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _authorization(token: str | None) -> dict:
    token = token or tokens.client_token()
    return {"Authorization": f"Bearer {token}"} if token else {}


def _infer_v2(url: str, image_bytes: bytes, *, timeout: float, auth: dict) -> tuple[np.ndarray, dict]:
    """Calibrated probabilities (H, W, 3) of one image from an Open Inference Protocol server, and its provenance.

    The request and the answer use the binary data extension: the image's
    bytes and the FP32 probabilities travel as they are, after a JSON header.
    """
    header = json.dumps({
        "inputs": [{"name": "image", "datatype": "BYTES", "shape": [1],
                    "parameters": {"binary_data_size": 4 + len(image_bytes)}}],
        "outputs": [{"name": "probabilities", "parameters": {"binary_data": True}}],
    }).encode()
    body = header + struct.pack("<I", len(image_bytes)) + image_bytes
    headers = {"Inference-Header-Content-Length": str(len(header)), "Content-Type": "application/octet-stream", **auth}
    response = _send(url, INFER_PATH, timeout=timeout, data=body, headers=headers)
    endpoint = url.rstrip("/") + INFER_PATH
    if response.status_code != 200:
        try:
            detail = response.json()["error"]
        except (ValueError, KeyError, TypeError):
            detail = response.text[:200] or response.reason
        raise ServingError(f"{endpoint} answered HTTP {response.status_code}: {detail}")
    try:
        length = int(response.headers.get("Inference-Header-Content-Length", len(response.content)))
        answer = json.loads(response.content[:length])
        (output,) = [o for o in answer["outputs"] if o["name"] == "probabilities"]
        if "data" in output:
            values = np.asarray(output["data"], dtype=np.float32)
        else:
            values = np.frombuffer(response.content[length:length + output["parameters"]["binary_data_size"]], "<f4")
        probs = values.reshape(output["shape"])[0]
    except Exception as err:  # a server that is not petseg can answer anything
        raise ServingError(f"{endpoint} answered without FP32 probabilities ({type(err).__name__}: {err})") from None
    return probs, {key: value for key, value in answer.get("parameters", {}).items() if isinstance(value, str)}


def _post(url: str, path: str, message: dict, *, timeout: float, auth: dict) -> dict:
    endpoint = url.rstrip("/") + path
    response = _send(url, path, timeout=timeout, json=message, headers=auth)
    try:
        body = response.json()
    except ValueError:
        body = {}
    if response.status_code != 200:
        status = body.get("status", {}) if isinstance(body, dict) else {}
        detail = (status.get("info") if isinstance(status, dict) else None) \
            or (body.get("error") if isinstance(body, dict) else None) or response.text[:200] or response.reason
        raise ServingError(f"{endpoint} answered HTTP {response.status_code}: {detail}")
    if not isinstance(body, dict):
        raise ServingError(f"{endpoint} answered with something else than a JSON object")
    return body


def _send(url: str, path: str, *, timeout: float, **request) -> requests.Response:
    endpoint = url.rstrip("/") + path
    try:
        return requests.post(endpoint, timeout=timeout, **request)
    except requests.ConnectionError:
        raise ServingError(
            f"cannot connect to {url}: is the server running? (start one with `petseg serve RUN`)"
        ) from None
    except requests.Timeout:
        raise ServingError(f"{endpoint} did not answer within {timeout:g} s") from None
    except requests.RequestException as err:
        raise ServingError(
            f"cannot send a request to {url!r}: {err} (expected a URL like http://127.0.0.1:9000)"
        ) from None
