"""Portable strict mode: the same model and calibration bits whatever the CPU offers at or above the baseline.

A CPU that offers less is emulated by capping this process's libraries at
each level this machine can present: oneDNN's instruction set
(ONEDNN_MAX_CPU_ISA), TensorFlow's default choice of oneDNN rewrites on such
a CPU (TF_ENABLE_ONEDNN_OPTS: on by default only with AVX512_VNNI, BF16 or
AMX), OpenBLAS's kernel set (OPENBLAS_CORETYPE) and numpy's AVX-512 loops
(NPY_DISABLE_CPU_FEATURES). Each level trains the same small model and fits
a calibration in a fresh process. Native strict mode must give more than one
fingerprint across the levels (else the emulation would reach no arithmetic
and prove nothing); portable mode must give exactly one.
"""

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from petseg.model import determinism

ROOT = Path(__file__).resolve().parents[2]
AVX512 = determinism.NUMPY_PINS["NPY_DISABLE_CPU_FEATURES"]

# The levels this machine can present, least first: (name, CPU flags it needs, environment).
LEVELS = [
    ("avx2 (Haswell)", ("avx2", "fma"),
     {"ONEDNN_MAX_CPU_ISA": "AVX2", "TF_ENABLE_ONEDNN_OPTS": "0", "OPENBLAS_CORETYPE": "Haswell",
      "NPY_DISABLE_CPU_FEATURES": AVX512}),
    ("avx2 (Zen)", ("avx2", "fma"),
     {"ONEDNN_MAX_CPU_ISA": "AVX2", "TF_ENABLE_ONEDNN_OPTS": "0", "OPENBLAS_CORETYPE": "Zen",
      "NPY_DISABLE_CPU_FEATURES": AVX512}),
    ("avx512 (Skylake-X)", ("avx512f", "avx512bw", "avx512vl", "avx512dq"),
     {"ONEDNN_MAX_CPU_ISA": "AVX512_CORE", "TF_ENABLE_ONEDNN_OPTS": "0", "OPENBLAS_CORETYPE": "SkylakeX"}),
    ("this CPU, uncapped", (), {}),
]

# Pins numpy first in portable mode (as flows/seg_flow.py does), then trains 2 epochs on generated data and
# fits the isotonic calibration on the model's probabilities.
TRAINING = """
import hashlib, json, os, sys
from petseg.model import determinism
portable = sys.argv[1] == "portable"
if portable:
    determinism.pin_numpy(os.environ)
import numpy as np
settings = determinism.configure(seed=5, strict=True, threads=2, portable=portable)
import tensorflow as tf
from petseg.model import calibration
from petseg.model import unet
from petseg.model import train
rng = np.random.default_rng(0)
images = rng.random((16, 64, 64, 3), dtype=np.float32)
pet = images[..., 0] > 0.5
masks = np.stack([pet, ~pet, np.zeros_like(pet)], axis=-1).astype(np.float32)
data = tf.data.Dataset.from_tensor_slices((images, masks)).batch(8)
fitted, _ = train.fit(train=data, validation=data, arch="small", epochs=2, learning_rate=1e-3, echo=None)
probs, labels = calibration.collect(fitted, data, seed=5)
table = calibration.fit(probs, labels).to_dict()
print(json.dumps({"model": unet.fingerprint(fitted),
                  "calibration": hashlib.sha256(json.dumps(table, sort_keys=True).encode()).hexdigest(),
                  "kernels": determinism.cpu_kernels(), "settings": settings}))
"""


def _present(flags: tuple) -> bool:
    have = set(determinism._cpu_info(Path("/proc/cpuinfo"))[1])
    return all(flag in have for flag in flags)


def _train(mode: str, env: dict) -> dict:
    base = {k: v for k, v in os.environ.items() if k not in determinism.PORTABLE_PINS}
    completed = subprocess.run([sys.executable, "-c", TRAINING, mode], cwd=ROOT, capture_output=True, text=True,
                               env={**base, **env, "PYTHONPATH": str(ROOT), "TF_CPP_MIN_LOG_LEVEL": "2"},
                               timeout=600, check=False)
    assert completed.returncode == 0, completed.stderr[-3000:]
    return json.loads(completed.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def trained() -> dict:
    """{(mode, level name): result} for both modes at every level this machine can present."""
    levels = [(name, env) for name, flags, env in LEVELS if _present(flags)]
    jobs = [(mode, name, env) for mode in ("native", "portable") for name, env in levels]
    with ThreadPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(lambda job: _train(job[0], job[2]), jobs))
    return {(mode, name): result for (mode, name, _), result in zip(jobs, results)}


def test_the_emulated_levels_change_native_bits(trained):
    native = {name: result["model"] for (mode, name), result in trained.items() if mode == "native"}
    assert len(native) >= 2, "this machine presents only one level: nothing to compare"
    assert len(set(native.values())) > 1, native


def test_portable_bits_are_the_same_at_every_level(trained):
    portable = {name: (result["model"], result["calibration"])
                for (mode, name), result in trained.items() if mode == "portable"}
    assert len(set(portable.values())) == 1, portable


def test_portable_processes_run_the_pinned_kernels_and_record_the_pins(trained):
    for (mode, name), result in trained.items():
        if mode == "portable":
            assert result["kernels"] == {"openblas_core": "Haswell", "numpy_avx512": False,
                                         "onednn_rewrites": True, "onednn_max_isa": "AVX2"}, name
            assert result["settings"]["portable"] is True
            assert result["settings"]["pins"] == determinism.PORTABLE_PINS


DECODING = """
import hashlib, io, sys
import numpy as np
from PIL import Image
rng = np.random.default_rng(0)
digest = hashlib.sha256()
for index in range(6):
    pixels = (rng.random((97, 131, 3)) * 255).astype(np.uint8)
    for subsampling in (0, 2):
        encoded = io.BytesIO()
        Image.fromarray(pixels).save(encoded, "JPEG", quality=90, subsampling=subsampling)
        image = Image.open(io.BytesIO(encoded.getvalue())).convert("RGB")
        digest.update(encoded.getvalue())
        digest.update(np.asarray(image.resize((64, 64), Image.Resampling.BILINEAR)).tobytes())
print(digest.hexdigest())
"""


@pytest.mark.parametrize("level", ["JSIMD_FORCENONE", "JSIMD_FORCESSE2", "JSIMD_FORCEAVX2"])
def test_jpeg_coding_and_resizing_need_no_pin(level):
    """libjpeg-turbo picks SIMD code per CPU; its accurate integer DCT gives the same bytes at every level."""
    def run(env: dict) -> str:
        clean = {k: v for k, v in os.environ.items() if not k.startswith("JSIMD_")}
        return subprocess.run([sys.executable, "-c", DECODING], env={**clean, **env}, capture_output=True,
                              text=True, check=True, timeout=120).stdout.strip()
    assert run({level: "1"}) == run({})


def _configure_after(module: str, env: dict) -> str:
    """What `configure` says in a fresh process that imported `module` first."""
    script = (f"import {module}\nfrom petseg.model import determinism\nfrom petseg.errors import ConfigError\n"
              "try:\n    determinism.configure(seed=1, portable=True)\nexcept ConfigError as err:\n    print(err)\n")
    clean = {k: v for k, v in os.environ.items() if k not in determinism.PORTABLE_PINS}
    return subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, check=True,
                          env={**clean, "PYTHONPATH": str(ROOT), "TF_CPP_MIN_LOG_LEVEL": "2", **env},
                          timeout=300).stdout


def test_numpy_loaded_before_its_pins_is_refused():
    out = _configure_after("numpy", {"OPENBLAS_CORETYPE": "Zen"})
    assert "numpy loaded before its CPU pins" in out and "pin_numpy" in out


def test_a_cpu_below_the_baseline_is_refused():
    with pytest.raises(determinism.ConfigError, match="lacks avx2"):
        determinism._require_baseline(["sse2", "sse4_1", "fma"])


def test_tensorflow_loaded_before_its_pins_is_refused():
    out = _configure_after("tensorflow", {})
    assert "TensorFlow loaded before its CPU pins" in out and "TF_ENABLE_ONEDNN_OPTS=1" in out
