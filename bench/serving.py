"""What serving through Seldon costs: one 128x128 image over REST against in process.

Starts the microservice (`petseg.deploy.deploy_local`) on a release and
measures, in the same run, one request at a time:

- in process, array: `Predictor.predict` on a decoded image (model + calibration);
- in process, binData: `Service.predict` on a binData message (base64 and PNG
  decode, model, calibration, PNG encode), what the server does per request;
- REST binData: a PNG as base64 binData, answered with a PNG mask;
- REST ndarray: the image as a JSON ndarray of uint8, answered with a JSON ndarray;
- REST ping: GET /health/ping, no model and no petseg code: the floor of
  HTTP through gunicorn on this machine.

Modes alternate block by block, so that a change in machine load hits all of
them alike. Prints p50 and p95 latency, requests per second (sequential, one
client), the check "REST binData p50 <= 1.5 x in-process p50 + 5 ms", and the
machine.

Usage:
    python bench/serving.py [--release DIR] [--requests 200] [--blocks 10]

Without --release, a small untrained model is saved as a release in a
temporary directory (latency does not depend on the weights).
"""

import argparse
import base64
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
        location=str(target))
    release.export(str(target), model_keras=models.to_bytes(small), calibration=fitted.to_dict(), manifest=manifest)
    return target


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

    import requests
    import tensorflow as tf
    from PIL import Image

    from petseg import deploy, determinism, serving

    with tempfile.TemporaryDirectory() as tmp:
        release_dir = Path(args.release) if args.release else make_release(Path(tmp))
        image = np.random.default_rng(1).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="PNG")
        bin_message = {"binData": base64.b64encode(buffer.getvalue()).decode()}
        ndarray_body = json.dumps({"data": {"ndarray": image.tolist()}})

        service = serving.Service(serving.load_release(str(release_dir)), limits=serving.Limits())
        array = image[None].astype(np.float32) / 255.0
        deployment = deploy.deploy_local(release_dir, log_path=Path(tmp) / "serving.log", timeout=600)
        url = deployment["url"] + "/api/v1.0/predictions"
        session = requests.Session()

        def rest(body: str):
            response = session.post(url, data=body, headers={"Content-Type": "application/json"}, timeout=60)
            response.raise_for_status()

        bin_body = json.dumps(bin_message)
        modes = {
            "in process, array": lambda: service.predictor.predict(array),
            "in process, binData": lambda: service.predict(bin_message),
            "REST binData": lambda: rest(bin_body),
            "REST ndarray": lambda: rest(ndarray_body),
            "REST ping": lambda: session.get(deployment["url"] + "/health/ping", timeout=60).raise_for_status(),
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
            deploy.stop_local(deployment["pid"])

    results = {name: percentiles(values) for name, values in seconds.items()}
    machine = determinism.environment_record({})
    print(f"machine: {machine['cpu']['model']}, {machine['cpu']['logical_cores']} logical cores, "
          f"{machine['platform']}, Python {machine['python']}, TensorFlow {tf.__version__}")
    print(f"load average (1 min): {load_before:.2f} before, {load_after:.2f} after")
    print(f"workload: one {SIZE}x{SIZE} RGB image per request, {per_block * args.blocks} timed requests per mode "
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
        Path(args.json).write_text(json.dumps({"results": results, "budget_ms": budget, "machine": machine["cpu"]["model"]}, indent=2))


if __name__ == "__main__":
    main()
