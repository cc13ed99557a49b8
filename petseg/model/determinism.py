"""Seeds, op determinism, thread settings and CPU pins, and a record of the machine.

A training process calls `configure` once, first, before TensorFlow runs any
op. Bitwise identical weights need four things: the same seeds, TensorFlow's
deterministic kernels, the same thread counts, and the same kernels whatever
the CPU offers. Thread counts are easy to miss: the same seed trained with 1
and with 2 intra-op threads gives different weight bytes (float sums are
reduced in a different order). So strict mode fixes the thread counts to a
value that is part of the run's settings instead of taking whatever the
machine offers.

The CPU is the other thing that is easy to miss. oneDNN (TensorFlow's CPU
kernels, and the matrix product inside Eigen's contractions), TensorFlow's
choice of oneDNN graph rewrites, numpy's OpenBLAS and numpy's own SIMD loops
all pick code by the instruction set of the CPU they find, and different code
sums in a different order. Portable strict mode pins each of them to one
baseline, `BASELINE`, so that every CPU at or above it runs the same kernel
code, meant to give the same bits (at a cost: bench/determinism.py,
docs/PERFORMANCE.md). What the tests show is narrower: on one CPU, the pins
override every instruction-set level the process is offered
(tests/unit/test_portable.py). The same bits on another CPU (other cache
sizes, core count, microcode, model) are not shown yet; bench/device_check.sh
checks a second machine. The pins are set by
`pin_numpy` before numpy loads (it reads its pins once, at import), and
`configure` for TensorFlow and oneDNN. JPEG decoding (libjpeg-turbo's SIMD
paths) and Pillow's resizing give the same bytes at every level and need no
pin (tests/unit/test_portable.py checks both).

The original project patched TensorFlow with the `tensorflow-determinism`
package (`tfdeterminism.patch()`); since TensorFlow 2.8 the same work is built
in (`tf.config.experimental.enable_op_determinism`) and that package is empty.
"""

import ctypes
import glob
import importlib.metadata
import os
import platform
import sys
from collections.abc import MutableMapping
from pathlib import Path

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

BASELINE = "x86-64 with AVX2 and FMA"
"""The level portable strict mode pins its CPU kernels to, and the least CPU it runs on.

Every CPU at or above it then runs the same kernel code, meant to give the same bits; shown on one CPU
only (the pins override each level it can present), not yet on another CPU model (see the module docstring).
"""

BASELINE_FLAGS = ("avx2", "fma")
"""The /proc/cpuinfo flags that make a CPU the `BASELINE`."""

NUMPY_PINS = {
    # numpy's OpenBLAS picks its kernels per CPU (Haswell is its AVX2 + FMA kernel set).
    "OPENBLAS_CORETYPE": "Haswell",
    # numpy's own loops (exp, log, sums, ...) have AVX-512 variants chosen at run time; these are its
    # dispatch targets above AVX2 (numpy 1.26).
    "NPY_DISABLE_CPU_FEATURES": "AVX512F AVX512CD AVX512_KNL AVX512_KNM AVX512_SKX AVX512_CLX AVX512_CNL "
                                "AVX512_ICL",
}
"""Read by numpy once, when it is imported: set them first (`pin_numpy`)."""

TENSORFLOW_PINS = {
    # oneDNN's kernels (convolutions, and the matrix product inside Eigen's contractions even with
    # TensorFlow's oneDNN rewrites off) are chosen by instruction set: cap it at the baseline.
    "ONEDNN_MAX_CPU_ISA": "AVX2",
    # TensorFlow turns its oneDNN rewrites on by default only on CPUs with AVX512_VNNI, BF16 or AMX: fix
    # the choice. On (1) costs less than off at the same cap (bench/determinism.py).
    "TF_ENABLE_ONEDNN_OPTS": "1",
}
"""Read by TensorFlow at import (the rewrites) and by oneDNN at its first kernel (the cap): `configure` sets them."""

PORTABLE_PINS = {**NUMPY_PINS, **TENSORFLOW_PINS}
"""Every pin of portable strict mode, as recorded with a run."""


def pin_numpy(environ: MutableMapping[str, str]) -> dict:
    """Sets numpy's CPU pins in `environ`: call it before numpy is imported, in the process or its parent.

    Returns:
        The pins set.
    """
    environ.update(NUMPY_PINS)
    return dict(NUMPY_PINS)


def configure(*, seed: int, strict: bool = True, threads: int = 2, portable: bool = False) -> dict:
    """Seeds every random generator and, when strict, makes TensorFlow deterministic.

    Strict mode: seeds for Python `random`, NumPy, TensorFlow and Keras, op
    determinism, and `threads` intra-op and inter-op threads. Portable strict
    mode also pins TensorFlow's and oneDNN's CPU kernels to `BASELINE` (and
    checks that numpy's were pinned before it loaded), so that every CPU at or
    above it runs the same kernel code (the same bits on another CPU model are
    not shown yet: see the module docstring); native strict mode lets them
    follow the CPU, so the bits hold on this CPU type only. Fast mode: seeds
    only; TensorFlow picks the thread counts (recorded as 0, the machine default), so
    the weight bytes depend on the machine's core count and on kernels that
    are not guaranteed deterministic.

    Call this before TensorFlow executes any op, and in portable mode before it
    is imported: thread counts cannot change once its runtime has started, and
    its oneDNN rewrites are chosen at import. Calling it again with the same
    settings is harmless. Portable mode sets `TENSORFLOW_PINS` in this
    process's environment: the one place the library changes it.

    Args:
        seed: Seed for every generator.
        strict: Bitwise reproducible (True) or seeds only (False).
        threads: Intra-op and inter-op thread count in strict mode.
        portable: In strict mode, pin the CPU kernels to `BASELINE`, so that other CPUs at or above it run
            the same kernel code.

    Returns:
        The settings to record with the run: seed, mode ("strict" or "fast"),
        intra_op_threads, inter_op_threads, portable and pins (the pinned
        environment, empty unless portable).

    Raises:
        ConfigError: `threads` is not a positive integer; TensorFlow has
            already started with other thread counts; or, when portable, the
            CPU is below `BASELINE`, or numpy or TensorFlow loaded before their
            pins were set (TensorFlow counts as pinned only when
            TF_ENABLE_ONEDNN_OPTS=1 was in the environment before it loaded).
    """
    if strict and (not isinstance(threads, int) or threads < 1):
        raise ConfigError(f"threads must be a positive integer, got {threads!r}")
    portable = bool(strict and portable)
    if portable:
        _require_baseline(_cpu_info(Path("/proc/cpuinfo"))[1])
        _require_tensorflow_unloaded_or_pinned()
        os.environ.update(TENSORFLOW_PINS)
    # Imported here, after the pins: TensorFlow reads TF_ENABLE_ONEDNN_OPTS when it loads.
    import keras  # noqa: F401  (loaded here, after the pins, with TensorFlow)
    import tensorflow as tf

    if strict:
        try:
            tf.config.threading.set_intra_op_parallelism_threads(threads)
            tf.config.threading.set_inter_op_parallelism_threads(threads)
        except RuntimeError:
            raise ConfigError(
                f"cannot set {threads} TensorFlow threads: TensorFlow already started in this "
                f"process with {tf.config.threading.get_intra_op_parallelism_threads()} "
                "(0: machine default). Call petseg.model.determinism.configure() first, before "
                "building models or datasets."
            ) from None
        tf.config.experimental.enable_op_determinism()
    if portable:
        _require_numpy_pinned(cpu_kernels())
    reseed(seed)
    return {
        "seed": seed,
        "mode": "strict" if strict else "fast",
        "intra_op_threads": tf.config.threading.get_intra_op_parallelism_threads(),
        "inter_op_threads": tf.config.threading.get_inter_op_parallelism_threads(),
        "portable": portable,
        "pins": dict(PORTABLE_PINS) if portable else {},
    }


def reseed(seed: int) -> None:
    """Seeds Python `random`, NumPy, TensorFlow and Keras' global seed generator again.

    Keras draws each initializer's seed from Python's `random` when the layer is
    built, so whatever else draws from it between `configure` and the model
    (boto3's retries and transfers, when the data comes from S3) would change
    the initial weights with the data store. Call it right before the model and
    its data are built: the same seed then gives the same weights wherever the
    data came from.
    """
    import keras

    keras.utils.set_random_seed(seed)


def cpu_kernels() -> dict:
    """Which CPU kernels this process's numpy and TensorFlow actually use (loaded libraries only).

    Returns:
        openblas_core (OpenBLAS's kernel set, e.g. "Haswell"; None if numpy is
        not loaded or not built on OpenBLAS), numpy_avx512 (whether numpy's
        AVX-512 loops are enabled), onednn_rewrites (TensorFlow's oneDNN
        rewrites; None if TensorFlow is not loaded) and onednn_max_isa (the
        oneDNN cap in the environment, None when uncapped).
    """
    numpy = sys.modules.get("numpy")
    record = {"openblas_core": None, "numpy_avx512": None, "onednn_rewrites": None,
              "onednn_max_isa": os.environ.get("ONEDNN_MAX_CPU_ISA")}
    if numpy is not None:
        from numpy.core._multiarray_umath import __cpu_features__

        record["numpy_avx512"] = bool(__cpu_features__.get("AVX512F"))
        record["openblas_core"] = _openblas_core(Path(numpy.__file__).parent)
    if "tensorflow" in sys.modules:
        from tensorflow.python.util import _pywrap_util_port

        record["onednn_rewrites"] = bool(_pywrap_util_port.IsMklEnabled())
    return record


def _openblas_core(numpy_dir: Path) -> str | None:
    """The kernel set OpenBLAS chose in this process (the library numpy bundles)."""
    for path in sorted(glob.glob(f"{numpy_dir}.libs/libopenblas*.so*")):
        library = ctypes.CDLL(path)
        for symbol in ("openblas_get_corename64_", "openblas_get_corename"):
            function = getattr(library, symbol, None)
            if function is not None:
                function.restype = ctypes.c_char_p
                return function().decode()
    return None


def _require_baseline(flags: list[str]) -> None:
    missing = [flag for flag in BASELINE_FLAGS if flags and flag not in flags]
    if missing:
        raise ConfigError(
            f"portable strict mode needs a CPU with {BASELINE}; this one lacks {', '.join(missing)}. "
            "Run with --portable false: the bits then hold on this CPU type only."
        )


def _require_tensorflow_unloaded_or_pinned() -> None:
    """Refuses a process where TensorFlow loaded before its pins were set.

    Part of TensorFlow settles its oneDNN rewrites when it loads and part when it
    first runs: a process that loaded it with other settings would mix the two.
    """
    if "tensorflow" in sys.modules and os.environ.get("TF_ENABLE_ONEDNN_OPTS") != TENSORFLOW_PINS["TF_ENABLE_ONEDNN_OPTS"]:
        raise ConfigError(
            "TensorFlow loaded before its CPU pins: call petseg.model.determinism.configure() before anything imports "
            "TensorFlow, or set " + " ".join(f"{name}={value}" for name, value in TENSORFLOW_PINS.items())
            + " in the environment before the process starts."
        )


def _require_numpy_pinned(kernels: dict) -> None:
    """Refuses a process whose numpy loaded before its pins were set."""
    if kernels["openblas_core"] not in (None, NUMPY_PINS["OPENBLAS_CORETYPE"]) or kernels["numpy_avx512"]:
        raise ConfigError(
            f"numpy loaded before its CPU pins (OpenBLAS kernels {kernels['openblas_core']}, AVX-512 loops "
            f"{'on' if kernels['numpy_avx512'] else 'off'}): call petseg.model.determinism.pin_numpy(os.environ) "
            "before anything imports numpy (flows/seg_flow.py does it first), or set "
            + " ".join(f"{name}='{value}'" for name, value in NUMPY_PINS.items()) + " in the environment."
        )


def environment_record(settings: dict) -> dict:
    """Describes the software and machine a run used, as a JSON-able dict.

    Args:
        settings: What `configure` returned.

    Returns:
        Keys python, platform, packages (distribution -> version or None),
        tensorflow_build (is_cuda_build, cuda_version, cudnn_version),
        cpu (model, logical_cores, flags), cpu_kernels (`cpu_kernels`),
        devices and settings.
    """
    import tensorflow as tf

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
        "cpu_kernels": cpu_kernels(),
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
