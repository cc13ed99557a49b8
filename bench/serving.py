"""What serving through Seldon costs: one 128x128 image over REST against in process.

Starts the microservice (`petseg.deploy_local.deploy_local`) on a release and
measures, in the same run, one request at a time:

- in process, array: `Predictor.predict` on a decoded image (model + calibration);
- in process, binData: `Service.predict` on a binData message (base64 and PNG
  decode, model, calibration, PNG encode), what the server does per request;
- REST binData: a PNG as base64 binData, answered with a PNG mask;
- REST ndarray: the image as a JSON ndarray of uint8, answered with a JSON ndarray;
- REST ping: GET /health/ping, no model and no petseg code: the floor of
  HTTP through gunicorn on this machine.

The image is a pet photo from the embedded data set (`petseg.scenes`), scaled
to 128x128 and sent as a JPEG, as Oxford-IIIT Pet photos are. The client is
http.client from the standard library, so that little client time hides in
the figures. Modes alternate block by block, so that a change in machine load
hits all of them alike. Prints p50 and p95 latency, requests per second
(sequential, one client), the check "REST binData p50 <= 1.5 x in-process
p50 + 5 ms" (in process: model and calibration on the decoded image), and the
machine.

Usage:
    python bench/serving.py [--release DIR] [--requests 200] [--blocks 10]

Without --release, a small untrained model is saved as a release in a
temporary directory (latency does not depend on the weights).
"""

import argparse
import base64
import http.client
import io
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SIZE = 128
TARGET_RATIO, TARGET_SLACK_MS = 1.5, 5.0


def make_release(folder: Path) -> Path:
    """Saves an untrained small model with a fitted calibration as a release directory."""
    import keras

    from petseg import calibration, release
    from petseg import model as models

    keras.utils.set_random_seed(0)
    small = models.build("small")
    rng = np.random.default_rng(0)
    probs = small.predict_on_batch(rng.random((2, SIZE, SIZE, 3), dtype=np.float32))[:, ::8, ::8]
    fitted = calibration.fit(probs, (rng.random(probs.shape) > 0.5).astype(np.float32))
    target = folder / "release"
    manifest = release.build_manifest(
        run_id="bench", flow_name="PetSegFlow", model_fingerprint=models.fingerprint(small),
        dataset_fingerprint="", code_version="bench", metrics={"raw": {}, "calibrated": {}}, settings={},
        location=str(target), image_size=small.input_shape[1])
    release.export(str(target), model_keras=models.to_bytes(small), calibration=fitted.to_dict(), manifest=manifest)
    return target


def pet_photo() -> bytes:
    """A 128x128 JPEG of a generated pet."""
    from PIL import Image

    from petseg import scenes

    photo, _ = scenes.render(np.random.default_rng(3), scenes.BREEDS[0])
    buffer = io.BytesIO()
    Image.open(io.BytesIO(photo)).convert("RGB").resize((SIZE, SIZE), Image.Resampling.BILINEAR).save(
        buffer, format="JPEG", quality=90)
    return buffer.getvalue()


class Client:
    """One request at a time over http.client (the server closes each connection)."""

    def __init__(self, url: str):
        host, port = url.removeprefix("http://").split(":")
        self.connection = http.client.HTTPConnection(host, int(port), timeout=60)

    def call(self, method: str, path: str, body: str | None = None) -> bytes:
        self.connection.request(method, path, body, {"Content-Type": "application/json"} if body else {})
        response = self.connection.getresponse()
        answer = response.read()
        if response.status != 200:
            sys.exit(f"{method} {path} answered {response.status}: {answer[:300]!r}")
        return answer


def percentiles(seconds: list[float]) -> dict:
    milliseconds = np.asarray(seconds) * 1000
    return {
        "p50_ms": float(np.percentile(milliseconds, 50)),
        "p95_ms": float(np.percentile(milliseconds, 95)),
        "requests_per_s": len(seconds) / float(np.sum(seconds)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--release", help="release directory (default: a small untrained model)")
    parser.add_argument("--requests", type=int, default=200, help="timed requests per mode")
    parser.add_argument("--blocks", type=int, default=10, help="blocks the modes alternate in")
    parser.add_argument("--warmup", type=int, default=10, help="untimed requests per mode first")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()

    import tensorflow as tf
    from PIL import Image

    from petseg import deploy_local, determinism, messages, release, serving

    with tempfile.TemporaryDirectory() as tmp:
        release_dir = Path(args.release) if args.release else make_release(Path(tmp))
        jpeg = pet_photo()
        image = np.asarray(Image.open(io.BytesIO(jpeg)))
        bin_message = {"binData": base64.b64encode(jpeg).decode()}
        bin_body = json.dumps(bin_message)
        ndarray_body = json.dumps({"data": {"ndarray": image.tolist()}})

        service = serving.Service(release.load_release(str(release_dir)), limits=messages.Limits())
        array = image[None].astype(np.float32) / 255.0
        deployment = deploy_local.deploy_local(release_dir, log_path=Path(tmp) / "serving.log", timeout=600)
        rest = Client(deployment["url"])
        predictions = "/api/v1.0/predictions"
        modes = {
            "in process, array": lambda: service.predictor.predict(array),
            "in process, binData": lambda: service.predict(bin_message),
            "REST binData": lambda: rest.call("POST", predictions, bin_body),
            "REST ndarray": lambda: rest.call("POST", predictions, ndarray_body),
            "REST ping": lambda: rest.call("GET", "/health/ping"),
        }
        try:
            load_before = os.getloadavg()[0]
            for call in modes.values():
                for _ in range(args.warmup):
                    call()
            seconds = {name: [] for name in modes}
            per_block = max(1, args.requests // args.blocks)
            for _ in range(args.blocks):
                for name, call in modes.items():
                    for _ in range(per_block):
                        started = time.perf_counter()
                        call()
                        seconds[name].append(time.perf_counter() - started)
            load_after = os.getloadavg()[0]
        finally:
            deploy_local.stop_local(deployment["pid"])

    results = {name: percentiles(values) for name, values in seconds.items()}
    machine = determinism.environment_record({})
    print(f"machine: {machine['cpu']['model']}, {machine['cpu']['logical_cores']} logical cores, "
          f"{machine['platform']}, Python {machine['python']}, TensorFlow {tf.__version__}")
    print(f"load average (1 min): {load_before:.2f} before, {load_after:.2f} after")
    print(f"workload: one {SIZE}x{SIZE} pet photo per request ({len(jpeg)} bytes of JPEG), "
          f"{per_block * args.blocks} timed requests per mode "
          f"in {args.blocks} alternating blocks, one client, gunicorn with 1 worker")
    print(f"{'mode':22} {'p50 ms':>8} {'p95 ms':>8} {'req/s':>8}")
    for name, result in results.items():
        print(f"{name:22} {result['p50_ms']:8.2f} {result['p95_ms']:8.2f} {result['requests_per_s']:8.1f}")
    budget = TARGET_RATIO * results["in process, array"]["p50_ms"] + TARGET_SLACK_MS
    rest_p50 = results["REST binData"]["p50_ms"]
    verdict = "met" if rest_p50 <= budget else "NOT met"
    print(f"target REST binData p50 <= {TARGET_RATIO} x in-process p50 + {TARGET_SLACK_MS:g} ms = {budget:.2f} ms: "
          f"{rest_p50:.2f} ms, {verdict}")
    if args.json:
        record = {"results": results, "budget_ms": budget, "machine": machine["cpu"]["model"]}
        Path(args.json).write_text(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
