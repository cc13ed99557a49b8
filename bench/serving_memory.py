"""Peak resident memory of the worst admissible request on both servers, alone, at full concurrency and beyond.

For each checkout given (default: this one; ``--before DIR`` adds another,
e.g. an older commit's worktree, measured in the same run), a worker process
imports that checkout's petseg, starts both local deployments of one release
(`petseg.deploy.local.deploy_local` with the default limits: MAX_IMAGE_BYTES,
MAX_PIXELS, MAX_LIST_PIXELS) and measures, from ``/proc/PID/status`` of every
process of each server's session:

- idle: resident memory (VmRSS) after one small warm-up request;
- one worst case: the peak (VmHWM, reset through ``/proc/PID/clear_refs``
  before the request) of the process that answered one request with the
  largest image MAX_PIXELS admits: a PNG of flat colour (a few tens of KB of
  file for 16.7 million pixels), as Seldon binData answered with a PNG and as
  a v2 BYTES tensor answered with the UINT8 mask; the largest ndarray the body
  and MAX_LIST_PIXELS admit (zeros, answered with an ndarray of
  probabilities); and the largest image answered with the v2 FP32
  probabilities (MAX_LIST_PIXELS where the checkout has that limit, else MAX_PIXELS);
  and two bodies refused for their lists (a 16 MiB Seldon ndarray, a 16 MiB v2
  UINT8 JSON list: 413), which cost what decoding them costs where the size is
  checked only after the JSON is decoded;
- full concurrency: the summed peaks of all the server's processes while as
  many of those requests are in flight as the server reads at once (gunicorn
  workers x threads; the runtime's MAX_BODIES, default twice its threads), the
  pod's worst case;
- beyond: the same with three times as many clients at once, and what they
  were answered (the Seldon server's further connections wait in gunicorn's
  queue; MLServer's wait for a body slot, then get 503).

Prints one line per checkout, server and mode (MiB), the ratios after/before,
and the machine. Usage:

    python bench/serving_memory.py [--before /path/to/older/checkout] [--json FILE]
"""

import argparse
import base64
import concurrent.futures
import io
import json
import os
import platform
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODES = ("Seldon binData", "Seldon ndarray", "Seldon ndarray refused", "v2 mask", "v2 probabilities",
         "v2 list refused")
BEYOND = 3
"""Clients at once beyond full concurrency, as a multiple of it."""


def _session(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.getsid(int(entry)) == pid:
                    found.append(int(entry))
            except OSError:
                pass
    return found


def _status(pid: int, field: str) -> int:
    """A /proc/PID/status field in bytes (0 when the process is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _reset_peaks(pids: list[int]) -> None:
    for pid in pids:
        try:
            Path(f"/proc/{pid}/clear_refs").write_text("5")  # resets VmHWM to the current RSS
        except OSError:
            pass


def _worst_png(max_pixels: int) -> bytes:
    import numpy as np
    from PIL import Image

    side = int(max_pixels ** 0.5)
    pixels = np.zeros((side, side, 3), np.uint8)
    pixels[:, :, 1] = 90
    pixels[side // 4:side // 2, side // 3:side // 2] = (200, 120, 40)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def _request(mode: str, png: bytes, seldon: dict, mlserver: dict, auth: dict, limits):
    import requests

    if mode == "Seldon binData":
        url, body = seldon["url"] + "/api/v1.0/predictions", json.dumps({"binData": base64.b64encode(png).decode()})
        headers = {"Content-Type": "application/json", **auth}
    elif mode.startswith("Seldon ndarray"):
        side = int((limits.max_bytes / 8.01) ** 0.5)  # "[0,0,0]," a pixel: the largest the body admits
        if mode == "Seldon ndarray":
            side = min(side, int(getattr(limits, "max_list_pixels", side * side) ** 0.5))
        row = "[" + ",".join(["[0,0,0]"] * side) + "]"
        url = seldon["url"] + "/api/v1.0/predictions"
        body = '{"data":{"ndarray":[' + ",".join([row] * side) + "]}}"
        headers = {"Content-Type": "application/json", **auth}
    elif mode == "v2 list refused":
        side = int((limits.max_bytes / 6.05) ** 0.5)  # "0," a number, three a pixel
        url = mlserver["url"] + "/v2/models/petseg/infer"
        body = ('{"inputs":[{"name":"image","datatype":"UINT8","shape":[1,%d,%d,3],"data":[%s]}]}'
                % (side, side, ",".join(["0"] * (side * side * 3))))
        headers = {"Content-Type": "application/json", **auth}
    else:
        output = "mask" if mode == "v2 mask" else "probabilities"
        header = json.dumps({"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1],
                                         "parameters": {"binary_data_size": 4 + len(png)}}],
                             "outputs": [{"name": output, "parameters": {"binary_data": True}}]}).encode()
        url, body = mlserver["url"] + "/v2/models/petseg/infer", header + struct.pack("<I", len(png)) + png
        headers = {"Content-Type": "application/octet-stream", "Inference-Header-Content-Length": str(len(header)),
                   **auth}

    def send():
        try:
            return requests.post(url, data=body, headers=headers, timeout=600).status_code
        except requests.RequestException as err:
            return type(err).__name__

    return send


def _count(codes: list) -> str:
    """Answers as counts: ``[200, 200, 503]`` as ``2x200 1x503``."""
    return " ".join(f"{codes.count(code)}x{code}" for code in sorted(set(codes), key=str))


def worker(checkout: str) -> dict:
    """Measures one checkout (its petseg imported from ``checkout``); the figures in MiB."""
    sys.path.insert(0, checkout)
    import importlib

    import petseg  # the checkout's, before the sibling below puts this one on the path

    assert petseg.__file__.startswith(checkout), f"petseg imported from {petseg.__file__}, not {checkout}"
    sys.path.insert(1, str(ROOT / "bench"))
    from petseg.deploy import local
    from petseg.serving.messages import Limits
    from serving import make_release  # this benchmark's sibling: a small untrained release

    try:
        tokens = importlib.import_module("petseg.tokens")
        token = tokens.ensure_local_tokens()[0] and tokens.client_token()
        auth = {"Authorization": f"Bearer {token}"}
    except ImportError:  # a checkout whose servers take no tokens
        auth = {}
    limits = Limits()
    png = _worst_png(limits.max_pixels)
    probability_png = _worst_png(getattr(limits, "max_list_pixels", limits.max_pixels))
    results = {"checkout": checkout, "png_bytes": len(png), "max_pixels": limits.max_pixels}
    with tempfile.TemporaryDirectory() as tmp:
        release_dir = make_release(Path(tmp))
        seldon = local.deploy_local(release_dir, log_path=Path(tmp) / "seldon.log", timeout=600)
        try:
            mlserver = local.deploy_local(release_dir, server="mlserver", log_path=Path(tmp) / "mlserver.log",
                                          timeout=600)
            try:
                workers, threads = local.gunicorn_sizing(local.available_cores())
                try:  # what the runtime reads at once; a checkout without that limit answered a thread's worth
                    from petseg.entrypoints.mlserver_runtime import max_bodies
                    at_once = max_bodies()
                except ImportError:
                    at_once = local.available_cores()
                concurrency = {mode: workers * threads if mode.startswith("Seldon") else at_once for mode in MODES}
                for mode in MODES:
                    deployment = seldon if mode.startswith("Seldon") else mlserver
                    pids = _session(deployment["pid"])
                    send = _request(mode, probability_png if mode == "v2 probabilities" else png, seldon, mlserver,
                                    auth, limits)
                    idle = sum(_status(pid, "VmRSS") for pid in pids)
                    _reset_peaks(pids)
                    one = send()
                    single = max(_status(pid, "VmHWM") for pid in pids)
                    peaks, codes = [], []
                    for clients in (concurrency[mode], BEYOND * concurrency[mode]):
                        _reset_peaks(_session(deployment["pid"]))
                        with concurrent.futures.ThreadPoolExecutor(clients) as pool:
                            codes.append(list(pool.map(lambda _: send(), range(clients))))
                        peaks.append(sum(_status(pid, "VmHWM") for pid in _session(deployment["pid"])))
                    full, beyond = peaks
                    results[mode] = {"idle_mib": idle / 2**20, "one_peak_mib": single / 2**20,
                                     "concurrency": concurrency[mode], "full_peak_mib": full / 2**20,
                                     "beyond_peak_mib": beyond / 2**20, "answers": [one] + codes[0],
                                     "beyond_answers": codes[1]}
                    print(f"{checkout}  {mode:22s} idle {idle / 2**20:6.0f}  one worst case {single / 2**20:6.0f}  "
                          f"{concurrency[mode]} at once {full / 2**20:6.0f}  {BEYOND * concurrency[mode]} at once "
                          f"{beyond / 2**20:6.0f} MiB  answers {sorted(set(map(str, [one] + codes[0])))}, "
                          f"beyond {_count(codes[1])}", flush=True)
            finally:
                local.stop_local(mlserver["pid"])
        finally:
            local.stop_local(seldon["pid"])
    return results


def machine() -> str:
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor())
    memory = _status(os.getpid(), "VmRSS")  # touch /proc; total from meminfo below
    total = next(int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines()
                 if line.startswith("MemTotal")) / 2**20
    del memory
    return f"{model}, {len(os.sched_getaffinity(0))} cores, {total:.1f} GiB, Python {platform.python_version()}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--before", help="another checkout to measure in the same run (the figures before)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()
    if args.worker:
        print("RESULT " + json.dumps(worker(args.worker)), flush=True)
        return
    checkouts = ([args.before] if args.before else []) + [str(ROOT)]
    results = []
    for checkout in checkouts:
        env = {**os.environ, "PYTHONPATH": checkout}
        process = subprocess.run([sys.executable, __file__, "--worker", checkout], env=env, text=True,
                                 stdout=subprocess.PIPE, check=True)
        lines = process.stdout.splitlines()
        print("\n".join(line for line in lines if not line.startswith("RESULT ")))
        results.append(json.loads(next(line for line in lines if line.startswith("RESULT "))[7:]))
    if len(results) == 2:
        before, after = results
        for mode in MODES:
            print(f"{mode:22s} after/before: one worst case "
                  f"{after[mode]['one_peak_mib'] / before[mode]['one_peak_mib']:.2f}, at full concurrency "
                  f"{after[mode]['full_peak_mib'] / before[mode]['full_peak_mib']:.2f}, beyond "
                  f"{after[mode]['beyond_peak_mib'] / before[mode]['beyond_peak_mib']:.2f}")
    print(f"machine: {machine()}; worst case: {results[-1]['max_pixels']} pixels in a "
          f"{results[-1]['png_bytes']} byte PNG; {time.strftime('%Y-%m-%d')}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
