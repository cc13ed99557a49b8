"""Seeds, op determinism and thread settings, and a record of the machine.

A training process calls `configure` once, first, before TensorFlow runs any
op. Bitwise identical weights need three things: the same seeds, TensorFlow's
deterministic kernels, and the same thread counts. The last one is easy to
miss: the same seed trained with 1 and with 2 intra-op threads gives different
weight bytes (float sums are reduced in a different order). So strict mode
fixes the thread counts to a value that is part of the run's settings instead
of taking whatever the machine offers.

The original project patched TensorFlow with the `tensorflow-determinism`
package (`tfdeterminism.patch()`); since TensorFlow 2.8 the same work is built
in (`tf.config.experimental.enable_op_determinism`) and that package is empty.
"""

import importlib.metadata
import os
import platform
from pathlib import Path

import keras
import tensorflow as tf

from petseg.errors import ConfigError

PACKAGES = (
    "tensorflow",
    "tensorflow-cpu",
    "keras",
    "numpy",
    "protobuf",
    "metaflow",
    "seldon-core",
    "pillow",
    "petseg",
)
"""Distributions recorded by `environment_record`.

TensorFlow is published both as `tensorflow` and as `tensorflow-cpu`; only one
of them is installed, the other is recorded as null.
"""


def configure(*, seed: int, strict: bool = True, threads: int = 2) -> dict:
    """Seeds every random generator and, when strict, makes TensorFlow deterministic.

    Strict mode: seeds for Python `random`, NumPy, TensorFlow and Keras, op
    determinism, and `threads` intra-op and inter-op threads. Fast mode: seeds
    only; TensorFlow picks the thread counts (recorded as 0, the machine
    default), so the weight bytes depend on the machine's core count and on
    kernels that are not guaranteed deterministic.

    Call this before TensorFlow executes any op: thread counts cannot change
    once its runtime has started. Calling it again with the same settings is
    harmless.

    Args:
        seed: Seed for every generator.
        strict: Bitwise reproducible (True) or seeds only (False).
        threads: Intra-op and inter-op thread count in strict mode.

    Returns:
        The settings to record with the run: seed, mode ("strict" or "fast"),
        intra_op_threads and inter_op_threads.

    Raises:
        ConfigError: `threads` is not a positive integer, or TensorFlow has
            already started with other thread counts.
    """
    if strict:
        if not isinstance(threads, int) or threads < 1:
            raise ConfigError(f"threads must be a positive integer, got {threads!r}")
        try:
            tf.config.threading.set_intra_op_parallelism_threads(threads)
            tf.config.threading.set_inter_op_parallelism_threads(threads)
        except RuntimeError:
            raise ConfigError(
                f"cannot set {threads} TensorFlow threads: TensorFlow already started in this "
                f"process with {tf.config.threading.get_intra_op_parallelism_threads()} "
                "(0: machine default). Call petseg.determinism.configure() first, before "
                "building models or datasets."
            ) from None
        tf.config.experimental.enable_op_determinism()
    # Seeds Python random, NumPy, TensorFlow and Keras' global seed generator.
    keras.utils.set_random_seed(seed)
    return {
        "seed": seed,
        "mode": "strict" if strict else "fast",
        "intra_op_threads": tf.config.threading.get_intra_op_parallelism_threads(),
        "inter_op_threads": tf.config.threading.get_inter_op_parallelism_threads(),
    }


def environment_record(settings: dict) -> dict:
    """Describes the software and machine a run used, as a JSON-able dict.

    Args:
        settings: What `configure` returned.

    Returns:
        Keys python, platform, packages (distribution -> version or None),
        tensorflow_build (is_cuda_build, cuda_version, cudnn_version),
        cpu (model, logical_cores, flags), devices and settings.
    """
    build = tf.sysconfig.get_build_info()
    cpu_model, cpu_flags = _cpu_info(Path("/proc/cpuinfo"))
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "packages": {name: _version(name) for name in PACKAGES},
        "tensorflow_build": {
            "is_cuda_build": bool(build.get("is_cuda_build", False)),
            "cuda_version": build.get("cuda_version"),
            "cudnn_version": build.get("cudnn_version"),
        },
        "cpu": {
            "model": cpu_model or platform.processor() or None,
            "logical_cores": os.cpu_count(),
            "flags": cpu_flags,
        },
        "devices": [
            {"name": device.name, "type": device.device_type}
            for device in tf.config.get_visible_devices()
        ],
        "settings": dict(settings),
    }


def _version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def _cpu_info(path: Path) -> tuple[str | None, list[str]]:
    """Reads the first processor's model name and sorted flags (Linux only)."""
    try:
        text = path.read_text()
    except OSError:
        return None, []
    model, flags = None, []
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and model is None:
            model = value.strip()
        elif key == "flags" and not flags:
            flags = sorted(value.split())
    return model, flags
