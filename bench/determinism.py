"""What bitwise reproducibility costs: portable against native strict mode, strict against fast, one thread.

Trains the small model on generated data in four settings of
`petseg.model.determinism.configure`:

- portable: seeds, op determinism, 2 intra/inter-op threads, CPU kernels pinned
  to the AVX2 + FMA baseline (`--portable true`: the same kernel code on any CPU
  at or above it; bench/device_check.sh compares the bits on another machine);
- native: the same without the CPU pins (the default strict mode; the bits
  hold on this CPU type only);
- fast: seeds only, threads chosen by TensorFlow;
- single-thread: the original project's recipe, op determinism and 1 thread
  (portable).

Thread counts can be set once per process, so every run is its own
subprocess. Variants alternate round by round so that a change in machine
load hits all of them alike. Prints the median training time of each variant
(epochs after the first; the first one also traces the graph), the ratios
portable/native, portable/fast, native/fast and single-thread/fast, whether
the runs of each strict variant produced identical weight fingerprints, and
the machine.

Usage:
    python bench/determinism.py [--rounds 3] [--epochs 3] [--images 96]
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = {
    "portable": {"strict": True, "threads": 2, "portable": True},
    "native": {"strict": True, "threads": 2, "portable": False},
    "fast": {"strict": False},
    "single-thread": {"strict": True, "threads": 1, "portable": True},
}
SEED = 7
BATCH_SIZE = 16


def worker(variant: str, epochs: int, images: int) -> dict:
    """Trains once in this process and returns its timings and fingerprint."""
    # Imported here: the parent process only starts workers and needs no TensorFlow. numpy reads its CPU
    # pins when it loads, so a portable worker sets them first.
    from petseg.model import determinism

    if VARIANTS[variant].get("portable"):
        determinism.pin_numpy(os.environ)
    settings = determinism.configure(seed=SEED, **VARIANTS[variant])  # before TensorFlow loads
    import keras
    import numpy as np
    import tensorflow as tf

    from petseg.model import train, unet

    rng = np.random.default_rng(0)
    pixels = rng.random((images, 128, 128, 3), dtype=np.float32)
    pet = pixels[..., 0] > 0.5
    masks = np.stack([pet, ~pet, np.zeros_like(pet)], axis=-1).astype(np.float32)
    data = tf.data.Dataset.from_tensor_slices((pixels, masks)).batch(BATCH_SIZE)

    class EpochTimer(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            self.start = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            seconds.append(time.perf_counter() - self.start)

    seconds: list[float] = []
    fitted, _ = train.fit(
        train=data,
        validation=data.take(1),
        arch="small",
        epochs=epochs,
        learning_rate=1e-3,
        callbacks=[EpochTimer()],
        echo=None,
    )
    record = determinism.environment_record(settings)
    return {
        "variant": variant,
        "settings": settings,
        "epoch_seconds": seconds,
        "seconds": sum(seconds[1:]),
        "fingerprint": unet.fingerprint(fitted),
        "cpu": record["cpu"]["model"],
        "cores": record["cpu"]["logical_cores"],
        "tensorflow": tf.__version__,
    }


def run_variant(variant: str, epochs: int, images: int) -> dict:
    """Runs `worker` in a fresh Python process, without the pins in its environment (native runs this CPU's kernels)."""
    from petseg.model.determinism import PORTABLE_PINS

    completed = subprocess.run(
        [sys.executable, __file__, "--worker", variant, "--epochs", str(epochs), "--images", str(images)],
        cwd=ROOT,
        env={**{k: v for k, v in os.environ.items() if k not in PORTABLE_PINS}, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        check=False,
    )
    if completed.returncode != 0:
        sys.exit(f"{variant} run failed:\n{completed.stderr[-3000:]}")
    return json.loads(completed.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3, help="runs of each variant")
    parser.add_argument("--epochs", type=int, default=3, help="epochs per run (at least 2)")
    parser.add_argument("--images", type=int, default=96, help="generated 128x128 training images")
    parser.add_argument("--worker", choices=VARIANTS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.epochs, args.images)))
        return
    if args.epochs < 2:
        parser.error("--epochs must be at least 2: the first epoch is not timed")

    runs: dict[str, list[dict]] = {variant: [] for variant in VARIANTS}
    load_before = os.getloadavg()[0]
    for round_number in range(1, args.rounds + 1):
        for variant in VARIANTS:
            result = run_variant(variant, args.epochs, args.images)
            runs[variant].append(result)
            print(f"round {round_number} {variant:13} {result['seconds']:7.2f} s  {result['fingerprint'][:12]}", flush=True)

    medians = {variant: statistics.median(r["seconds"] for r in results) for variant, results in runs.items()}
    first = runs["portable"][0]
    print()
    print(f"machine: {first['cpu']}, {first['cores']} logical cores, TensorFlow {first['tensorflow']}")
    print(f"load average (1 min): {load_before:.2f} before, {os.getloadavg()[0]:.2f} after")
    print(
        f"workload: small U-Net, {args.images} images 128x128, batch {BATCH_SIZE}, "
        f"epochs 2-{args.epochs} timed, {args.rounds} rounds"
    )
    for variant, results in runs.items():
        threads = results[0]["settings"]["intra_op_threads"]
        print(f"{variant:13} median {medians[variant]:7.2f} s  (intra/inter-op threads: {threads or 'machine default'})")
    for top, bottom in (("portable", "native"), ("portable", "fast"), ("native", "fast"), ("single-thread", "fast")):
        print(f"{top}/{bottom:8} {medians[top] / medians[bottom]:.3f}")
    prints = {variant: {r["fingerprint"] for r in runs[variant]} for variant in ("portable", "native", "single-thread")}
    for variant, found in prints.items():
        print(f"{variant} runs identical: {len(found) == 1} ({len(runs[variant])} runs)")
    print(f"portable and native weights equal: {prints['portable'] == prints['native']}")


if __name__ == "__main__":
    main()
