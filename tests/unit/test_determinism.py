"""Strict mode gives the same weight bytes in separate processes."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import tensorflow as tf

from petseg.errors import ConfigError
from petseg.model import determinism

ROOT = Path(__file__).resolve().parents[2]

# Trains the small model for 2 epochs on generated, shuffled data, then tries
# to change the thread count, which TensorFlow no longer allows.
TRAINING = """
import json
import os

from petseg.model import determinism

determinism.pin_numpy(os.environ)  # before numpy loads, as flows/seg_flow.py does
settings = determinism.configure(seed=11, strict=True, threads=2)  # before TensorFlow loads
import numpy as np
import tensorflow as tf

from petseg.model import unet
from petseg.model import train
from petseg.errors import ConfigError

rng = np.random.default_rng(0)
images = rng.random((16, 64, 64, 3), dtype=np.float32)
pet = images[..., 0] > 0.5
masks = np.stack([pet, ~pet, np.zeros_like(pet)], axis=-1).astype(np.float32)
data = tf.data.Dataset.from_tensor_slices((images, masks)).shuffle(16, seed=3).batch(8)
fitted, history = train.fit(
    train=data, validation=data, arch="small", epochs=2, learning_rate=1e-3, echo=None
)
try:
    determinism.configure(seed=11, strict=True, threads=1)
    late = None
except ConfigError as err:
    late = str(err)
print(json.dumps({"settings": settings, "fingerprint": unet.fingerprint(fitted), "history": history, "late": late}))
"""


def _start_training() -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", TRAINING],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.fixture(scope="module")
def two_runs() -> list[dict]:
    """Two training processes, run side by side."""
    processes = [_start_training(), _start_training()]
    runs = []
    for process in processes:
        stdout, stderr = process.communicate(timeout=600)
        assert process.returncode == 0, stderr[-3000:]
        runs.append(json.loads(stdout.strip().splitlines()[-1]))
    return runs


def test_strict_training_is_bitwise_identical_across_processes(two_runs):
    first, second = two_runs
    assert first["fingerprint"] == second["fingerprint"]
    assert first["history"] == second["history"]


def test_strict_settings_are_recorded(two_runs):
    assert two_runs[0]["settings"] == {"seed": 11, "mode": "strict", "intra_op_threads": 2, "inter_op_threads": 2,
                                       "portable": False, "pins": {}}


def test_configuring_threads_too_late_is_a_config_error(two_runs):
    late = two_runs[0]["late"]
    assert late is not None
    assert "configure() first" in late


def test_fast_mode_sets_seeds_only():
    settings = determinism.configure(seed=3, strict=False)
    assert settings["mode"] == "fast"
    assert settings["portable"] is False and settings["pins"] == {}
    assert settings["seed"] == 3
    assert isinstance(settings["intra_op_threads"], int)  # 0: TensorFlow's machine default


def test_bad_thread_count_is_a_config_error():
    with pytest.raises(ConfigError, match="threads"):
        determinism.configure(seed=0, threads=0)


def test_environment_record():
    settings = {"seed": 1, "mode": "strict", "intra_op_threads": 2, "inter_op_threads": 2}
    record = determinism.environment_record(settings)
    json.dumps(record)
    assert record["settings"] == settings
    assert set(record["packages"]) >= {"tensorflow", "keras", "numpy", "protobuf", "metaflow", "seldon-core", "pillow", "petseg"}
    assert record["packages"]["keras"]
    assert record["tensorflow_build"]["is_cuda_build"] is tf.test.is_built_with_cuda()
    assert record["cpu"]["flags"] == sorted(record["cpu"]["flags"])
    assert any(device["type"] == "CPU" for device in record["devices"])
    assert record["python"].count(".") == 2


def test_reseed_gives_the_same_initial_weights_whatever_drew_from_random_before():
    """Fetching data from S3 draws from Python's random, which seeds Keras' initializers."""
    import random

    from petseg.model import unet

    determinism.reseed(7)
    expected = unet.fingerprint(unet.build("small"))
    determinism.reseed(7)
    random.random()  # what a boto3 transfer does
    determinism.reseed(7)
    assert unet.fingerprint(unet.build("small")) == expected
