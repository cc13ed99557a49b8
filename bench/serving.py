"""What serving costs, on both servers and every path, under concurrent load: one 128x128 image per request.

Starts both local deployments of one release (`petseg.deploy.local.deploy_local`:
the Seldon microservice and MLServer with the petseg runtime) and measures, in
the same run, at concurrency 1, 4 and 16 (that many client threads, each
sending its next request when the last is answered, over a kept-alive
connection):

- in process: `Predictor.predict` on the decoded image (model and
  calibration), called from that many threads: the floor;
- Seldon v1 binData: the JPEG as base64 binData, answered with a PNG of the
  probabilities (``/api/v1.0/predictions``);
- v2 binary: the JPEG as a BYTES tensor in the binary data extension,
  answered with the UINT8 mask as raw bytes (``/v2/models/petseg/infer``);
- v2 JSON tensor: the decoded pixels as a UINT8 [1, 128, 128, 3] JSON tensor,
  answered with the mask as a JSON tensor;
- v2 gRPC: the JPEG as a BYTES tensor in ``raw_input_contents``, answered with
  the mask in ``raw_output_contents`` (MLServer's Open Inference Protocol stubs).

The image is a pet photo from the embedded data set (`petseg.data.scenes`), scaled
to 128x128 and sent as a JPEG, as Oxford-IIIT Pet photos are. Every mode at
every concurrency takes its turn in each round, so that a change in machine
load hits all of them alike.
Prints p50 and p99 latency, requests per second and errors per mode and
concurrency, the target check (issue 11) and the machine:

- at concurrency 1, the best remote path's p50 <= 1.2 x the in-process p50 + 3 ms;
- at concurrency 16, that path answers >= 1.6 x its concurrency-1 requests/s,
  with no errors and p99 <= 4 x p50.

Usage:
    python bench/serving.py [--release DIR] [--seconds 8] [--rounds 4] [--json FILE]

Without --release, a small untrained model is saved as a release in a
temporary directory (latency does not depend on the weights).
"""

import argparse
import base64
import http.client
import io
import json
import os
import struct
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SIZE = 128
CONCURRENCY = (1, 4, 16)
MODES = ("in process", "Seldon v1 binData", "v2 binary", "v2 JSON tensor", "v2 gRPC")
REMOTE = MODES[1:]
TARGET_RATIO, TARGET_SLACK_MS = 1.2, 3.0
TARGET_SCALING, TARGET_TAIL = 1.6, 4.0


def make_release(folder: Path) -> Path:
    """Saves an untrained small model with a fitted calibration as a release directory."""
    import keras

    from petseg.model import calibration
    from petseg.model import unet as models
    from petseg.release import bundle

    keras.utils.set_random_seed(0)
    small = models.build("small")
    rng = np.random.default_rng(0)
    probs = small.predict_on_batch(rng.random((2, SIZE, SIZE, 3), dtype=np.float32))[:, ::8, ::8]
    fitted = calibration.fit(probs, (rng.random(probs.shape) > 0.5).astype(np.float32))
    target = folder / "release"
    manifest = bundle.build_manifest(
        run_id="bench", flow_name="PetSegFlow", model_fingerprint=models.fingerprint(small),
        dataset_fingerprint="", code_version="bench", metrics={"raw": {}, "calibrated": {}}, settings={},
        location=str(target), image_size=small.input_shape[1])
    bundle.export(str(target), model_keras=models.to_bytes(small), calibration=fitted.to_dict(), manifest=manifest)
    return target


def pet_photo() -> bytes:
    """A 128x128 JPEG of a generated pet."""
    from PIL import Image

    from petseg.data import scenes

    photo, _ = scenes.render(np.random.default_rng(3), scenes.BREEDS[0])
    buffer = io.BytesIO()
    Image.open(io.BytesIO(photo)).convert("RGB").resize((SIZE, SIZE), Image.Resampling.BILINEAR).save(
        buffer, format="JPEG", quality=90)
    return buffer.getvalue()


class Http:
    """One client thread's kept-alive connection; reconnects when the server closes it."""

    def __init__(self, url: str):
        self.host, port = url.removeprefix("http://").split(":")
        self.port = int(port)
        self.connection = None

    def post(self, path: str, body: bytes, headers: dict) -> bytes:
        if self.connection is None:
            self.connection = http.client.HTTPConnection(self.host, self.port, timeout=120)
        try:
            self.connection.request("POST", path, body, headers)
            response = self.connection.getresponse()
            answer = response.read()
        except (OSError, http.client.HTTPException):
            self.connection.close()
            self.connection = None
            raise
        if response.will_close:
            self.connection.close()
            self.connection = None
        if response.status != 200:
            raise RuntimeError(f"{path} answered {response.status}: {answer[:200]!r}")
        return answer


def request_makers(jpeg: bytes, seldon: dict, mlserver: dict, predictor) -> dict:
    """Per mode, a function that makes one client's call (one per thread: connections are not shared)."""
    from PIL import Image

    pixels = np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB"))
    array = pixels[None].astype(np.float32) / 255.0
    bin_body = json.dumps({"binData": base64.b64encode(jpeg).decode()}).encode()
    header = json.dumps({"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1],
                                     "parameters": {"binary_data_size": 4 + len(jpeg)}}],
                         "outputs": [{"name": "mask", "parameters": {"binary_data": True}}]}).encode()
    binary_body = header + struct.pack("<I", len(jpeg)) + jpeg
    from petseg import tokens

    auth = {"Authorization": f"Bearer {tokens.client_token()}"}  # the servers' tokens (deploy_local makes them)
    binary_headers = {"Content-Type": "application/octet-stream", "Inference-Header-Content-Length": str(len(header)),
                      **auth}
    json_body = json.dumps({"inputs": [{"name": "image", "datatype": "UINT8", "shape": [1, SIZE, SIZE, 3],
                                        "data": pixels.ravel().tolist()}]}).encode()
    json_headers = {"Content-Type": "application/json", **auth}
    infer = "/v2/models/petseg/infer"

    def grpc_call():
        import grpc
        from mlserver.grpc import dataplane_pb2 as pb
        from mlserver.grpc import dataplane_pb2_grpc

        channel = grpc.insecure_channel(f"127.0.0.1:{mlserver['grpc_port']}")
        stub = dataplane_pb2_grpc.GRPCInferenceServiceStub(channel)
        request = pb.ModelInferRequest(
            model_name="petseg", inputs=[pb.ModelInferRequest.InferInputTensor(name="image", datatype="BYTES",
                                                                               shape=[1])],
            raw_input_contents=[struct.pack("<I", len(jpeg)) + jpeg])
        return lambda: stub.ModelInfer(request, timeout=120, metadata=[("authorization", auth["Authorization"])])

    def http_call(url, path, body, headers):
        client = Http(url)
        return lambda: client.post(path, body, headers)

    return {
        "in process": lambda: (lambda: predictor.predict(array)),
        "Seldon v1 binData": lambda: http_call(seldon["url"], "/api/v1.0/predictions", bin_body, json_headers),
        "v2 binary": lambda: http_call(mlserver["url"], infer, binary_body, binary_headers),
        "v2 JSON tensor": lambda: http_call(mlserver["url"], infer, json_body, json_headers),
        "v2 gRPC": grpc_call,
    }


def run(make_call, concurrency: int, seconds: float) -> tuple[list[float], int, float]:
    """``concurrency`` threads calling for ``seconds``: (latencies in s, errors, wall time)."""
    latencies, errors, lock = [], [0], threading.Lock()
    calls = [make_call() for _ in range(concurrency)]
    start = threading.Barrier(concurrency + 1)
    deadline = [0.0]

    def client(call):
        start.wait()
        mine, failed = [], 0
        while time.perf_counter() < deadline[0]:
            began = time.perf_counter()
            try:
                call()
            except Exception:  # counted: any refusal, reset or timeout is an error of the run
                failed += 1
            mine.append(time.perf_counter() - began)
        with lock:
            latencies.extend(mine)
            errors[0] += failed

    threads = [threading.Thread(target=client, args=(call,)) for call in calls]
    for thread in threads:
        thread.start()
    deadline[0] = time.perf_counter() + seconds
    began = time.perf_counter()
    start.wait()
    for thread in threads:
        thread.join()
    return latencies, errors[0], time.perf_counter() - began


def summary(latencies: list[float], errors: int, wall: float) -> dict:
    milliseconds = np.asarray(latencies) * 1000
    return {"requests": len(latencies), "errors": errors, "requests_per_s": len(latencies) / wall,
            "p50_ms": float(np.percentile(milliseconds, 50)), "p99_ms": float(np.percentile(milliseconds, 99))}


def target_check(results: dict) -> tuple[str, bool, list[str]]:
    """The best remote path at concurrency 1, whether it meets the targets, and one line per target."""
    floor = results["in process"][1]["p50_ms"]
    best = min(REMOTE, key=lambda mode: results[mode][1]["p50_ms"])
    one, many = results[best][1], results[best][16]
    budget = TARGET_RATIO * floor + TARGET_SLACK_MS
    checks = [
        (f"concurrency 1: p50 {one['p50_ms']:.1f} ms <= {TARGET_RATIO} x in-process p50 {floor:.1f} ms "
         f"+ {TARGET_SLACK_MS:g} ms = {budget:.1f} ms", one["p50_ms"] <= budget),
        (f"concurrency 16: {many['requests_per_s']:.1f} requests/s >= {TARGET_SCALING} x "
         f"{one['requests_per_s']:.1f} = {TARGET_SCALING * one['requests_per_s']:.1f}",
         many["requests_per_s"] >= TARGET_SCALING * one["requests_per_s"]),
        (f"concurrency 16: {many['errors']} errors", many["errors"] == 0),
        (f"concurrency 16: p99 {many['p99_ms']:.1f} ms <= {TARGET_TAIL:g} x p50 {many['p50_ms']:.1f} ms "
         f"= {TARGET_TAIL * many['p50_ms']:.1f} ms", many["p99_ms"] <= TARGET_TAIL * many["p50_ms"]),
    ]
    return best, all(ok for _, ok in checks), [f"  {'met' if ok else 'NOT met'}: {text}" for text, ok in checks]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--release", help="release directory (default: a small untrained model)")
    parser.add_argument("--seconds", type=float, default=8.0, help="timed seconds per mode and concurrency")
    parser.add_argument("--rounds", type=int, default=4,
                        help="rounds of every mode at every concurrency, in turn")
    parser.add_argument("--warmup", type=float, default=2.0, help="untimed seconds per mode first")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()

    import tensorflow as tf

    from petseg.deploy import local
    from petseg.model import determinism
    from petseg.release import bundle
    from petseg.serving import predictor as serving

    with tempfile.TemporaryDirectory() as tmp:
        release_dir = Path(args.release) if args.release else make_release(Path(tmp))
        jpeg = pet_photo()
        predictor = serving.Predictor(bundle.load_release(str(release_dir)))
        seldon = local.deploy_local(release_dir, log_path=Path(tmp) / "seldon.log", timeout=600)
        try:
            mlserver = local.deploy_local(release_dir, server="mlserver", log_path=Path(tmp) / "mlserver.log",
                                          timeout=600)
        except BaseException:
            local.stop_local(seldon["pid"])
            raise
        makers = request_makers(jpeg, seldon, mlserver, predictor)
        raw = {mode: {c: ([], 0, 0.0) for c in CONCURRENCY} for mode in MODES}
        try:
            load_before = os.getloadavg()[0]
            for mode in MODES:
                run(makers[mode], 4, args.warmup)
            for _ in range(args.rounds):
                for concurrency in CONCURRENCY:
                    for mode in MODES:
                        latencies, errors, wall = run(makers[mode], concurrency, args.seconds / args.rounds)
                        before = raw[mode][concurrency]
                        raw[mode][concurrency] = (before[0] + latencies, before[1] + errors, before[2] + wall)
            load_after = os.getloadavg()[0]
        finally:
            local.stop_local(seldon["pid"])
            local.stop_local(mlserver["pid"])

    results = {mode: {c: summary(*raw[mode][c]) for c in CONCURRENCY} for mode in MODES}
    machine = determinism.environment_record({})
    cores = local.available_cores()
    workers, threads = local.gunicorn_sizing(cores)
    print(f"machine: {machine['cpu']['model']}, {machine['cpu']['logical_cores']} logical cores, "
          f"{machine['platform']}, Python {machine['python']}, TensorFlow {tf.__version__}")
    print(f"load average (1 min): {load_before:.2f} before, {load_after:.2f} after")
    print(f"workload: one {SIZE}x{SIZE} pet photo per request ({len(jpeg)} bytes of JPEG), "
          f"{args.seconds:g} s per mode and concurrency in {args.rounds} rounds; clients are threads of this "
          f"process on the same cores; Seldon: gunicorn {workers} worker(s) x {threads} threads; "
          f"MLServer: one process, {cores} runtime threads")
    print(f"{'mode':20} {'conc':>4} {'p50 ms':>8} {'p99 ms':>8} {'req/s':>8} {'errors':>7}")
    for mode in MODES:
        for concurrency, result in results[mode].items():
            print(f"{mode:20} {concurrency:4d} {result['p50_ms']:8.1f} {result['p99_ms']:8.1f} "
                  f"{result['requests_per_s']:8.1f} {result['errors']:7d}")
    best, met, lines = target_check(results)
    print(f"target check, best remote path at concurrency 1: {best}: {'met' if met else 'NOT met'}")
    print("\n".join(lines))
    if args.json:
        record = {"results": results, "best": best, "met": met, "machine": machine["cpu"]["model"],
                  "load": [load_before, load_after]}
        Path(args.json).write_text(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
