"""What signing and verifying a release cost, beside what writing and loading it cost anyway.

For each model (the flow's default ``small`` U-Net at 128x128, and ``mobilenetv2``), one run measures,
alternating round by round so that a change in machine load hits all alike:

- write unsigned: the three release files (`petseg.release.bundle.release_files`) written to a directory;
- write signed: `petseg.release.bundle.signed_files` (SLSA statement, its DSSE bundle, the model signature over
  every file) and `petseg.release.bundle.write`: what the flow's release step does now;
- hash check: the manifest's sha256 of the files in memory (the old check, which a forger could satisfy);
- verify: `petseg.release.bundle.verify_files` (model signature and provenance against the trusted key, then the
  hashes);
- load: `petseg.release.bundle.load_release`, which reads, verifies and loads the model and calibration.

Prints the median of each, the signing and verification overhead as ratios and as milliseconds, and the
machine. Usage: ``python bench/signing.py [--rounds 5]``.
"""

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def _machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    return f"{cpu}, {os.cpu_count()} cores, Python {platform.python_version()}"


def _parts(arch: str) -> dict:
    import keras
    import numpy as np

    from petseg.model import calibration
    from petseg.model import unet as models
    from petseg.release import bundle

    keras.utils.set_random_seed(0)
    built = models.build(arch, image_size=128)
    rng = np.random.default_rng(0)
    probs = rng.random((4, 32, 32, 3)).astype(np.float32)
    truth = (rng.random((4, 32, 32, 3)) > 0.5).astype(np.float32)
    fitted = calibration.fit(probs / probs.sum(-1, keepdims=True), truth)
    manifest = bundle.build_manifest(
        run_id="1", flow_name="PetSegFlow", model_fingerprint=models.fingerprint(built), dataset_fingerprint="d" * 64,
        code_version="bench", metrics={}, settings={"code": {}}, location="bench", image_size=128)
    return {"model_keras": models.to_bytes(built), "calibration": fitted.to_dict(), "manifest": manifest}


def _timed(function) -> float:
    started = time.perf_counter()
    function()
    return (time.perf_counter() - started) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="petseg-bench-signing-") as work:
        os.environ["PETSEG_CONFIG_DIR"] = str(Path(work) / "config")
        from petseg import keys
        from petseg.release import bundle

        key, _ = keys.ensure_signing_key()
        print(f"machine: {_machine()}")
        for arch in ("small", "mobilenetv2"):
            parts = _parts(arch)
            plain = bundle.release_files(**parts)
            signed, _ = bundle.signed_files(**parts, signing_key=key)
            target = bundle.write(str(Path(work) / arch), signed)
            modes = {
                "write unsigned": lambda: _write_plain(plain, Path(work) / f"{arch}-plain"),
                "write signed": lambda: bundle.write(str(Path(work) / f"{arch}-signed"),
                                                     bundle.signed_files(**parts, signing_key=key)[0]),
                "hash check": lambda: bundle.check_files(parts["manifest"] | {"sha256": _sha(plain)}, plain,
                                                         uri=target),
                "verify": lambda: bundle.verify_files(bundle.release_bytes(target), uri=target),
                "load": lambda: bundle.load_release(target),
            }
            times = {mode: [] for mode in modes}
            for _ in range(args.rounds):
                for mode, function in modes.items():
                    times[mode].append(_timed(function))
            medians = {mode: statistics.median(values) for mode, values in times.items()}
            size = len(plain["model.keras"]) / 2**20
            print(f"{arch}: model.keras {size:.1f} MiB, median of {args.rounds} rounds")
            for mode, value in medians.items():
                print(f"  {mode:15} {value:8.1f} ms")
            print(f"  signing adds {medians['write signed'] - medians['write unsigned']:.1f} ms "
                  f"({medians['write signed'] / medians['write unsigned']:.1f}x the unsigned write); "
                  f"verification costs {medians['verify']:.1f} ms, "
                  f"{medians['verify'] / medians['load'] * 100:.0f} % of a verified load")


def _write_plain(files: dict, folder: Path) -> None:
    from petseg import storage

    with storage.staged_directory(folder) as staging:
        for name, data in files.items():
            (staging / name).write_bytes(data)


def _sha(files: dict) -> dict:
    import hashlib

    return {name: hashlib.sha256(data).hexdigest() for name, data in files.items()}


if __name__ == "__main__":
    main()
