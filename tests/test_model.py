"""Model building, saving and fingerprints; one short training and evaluation."""

import zipfile

import keras
import numpy as np
import pytest
import tensorflow as tf

from petseg import calibration, model, train
from petseg.errors import ConfigError, ModelError


def _blobs(count: int = 8, size: int = 32, seed: int = 0) -> tf.data.Dataset:
    """Images with a bright square (the "pet") and their one-hot masks, in batches of 4."""
    rng = np.random.default_rng(seed)
    images = rng.random((count, size, size, 3), dtype=np.float32) * 0.3
    masks = np.zeros((count, size, size, 3), dtype=np.float32)
    masks[..., 1] = 1
    for i in range(count):
        top, left = rng.integers(0, size // 2, size=2)
        images[i, top : top + size // 2, left : left + size // 2] += 0.6
        masks[i, top : top + size // 2, left : left + size // 2] = (1, 0, 0)
    return tf.data.Dataset.from_tensor_slices((images, masks)).batch(4)


@pytest.fixture(scope="module")
def log_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("logs")


@pytest.fixture(scope="module")
def trained(log_dir):
    """A small model trained for one epoch with TensorBoard logs, and its history."""
    return train.fit(
        train=_blobs(),
        validation=_blobs(seed=1),
        arch="small",
        epochs=1,
        learning_rate=1e-3,
        seed=0,
        log_dir=str(log_dir),
        verbose=0,
    )


def test_small_model_shape_and_size():
    small = model.build("small")
    assert small.input_shape == (None, 128, 128, 3)
    assert small.output_shape == (None, 128, 128, 3)
    assert small.count_params() < 200_000
    probs = small.predict_on_batch(np.zeros((1, 128, 128, 3), dtype=np.float32))
    assert np.all((probs > 0) & (probs < 1))  # sigmoid


def test_mobilenet_model_is_the_tutorial_unet():
    unet = model.build("mobilenetv2", image_size=128)
    assert unet.output_shape == (None, 128, 128, 3)
    assert 6_000_000 < unet.count_params() < 7_000_000
    filters = [unet.get_layer(f"up{i}_conv_transpose").filters for i in range(1, 5)]
    assert filters == [512, 256, 128, 64]
    assert unet.get_layer("encoder").trainable  # random encoder: trained with the rest


def test_imagenet_weights_unavailable_is_a_model_error(monkeypatch):
    def offline(*args, **kwargs):
        raise Exception("URL fetch failure on https://storage.googleapis.com/...: Name or service not known")

    # The MobileNetV2 application downloads its weights through this function.
    monkeypatch.setattr("keras.src.utils.file_utils.get_file", offline)
    with pytest.raises(ModelError, match="could not download the MobileNetV2 imagenet weights"):
        model.build("mobilenetv2", encoder_weights="imagenet")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"arch": "resnet"}, "unknown model arch 'resnet'"),
        ({"image_size": 100}, "multiple of 32"),
        ({"arch": "mobilenetv2", "encoder_weights": "random"}, "encoder_weights"),
        ({"arch": "small", "encoder_weights": "imagenet"}, "needs arch 'mobilenetv2'"),
    ],
)
def test_bad_settings_are_config_errors(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        model.build(**kwargs)


def test_same_seed_same_fingerprint_and_names():
    keras.utils.set_random_seed(5)
    first = model.build("small")
    keras.utils.set_random_seed(5)
    second = model.build("small")
    assert model.fingerprint(first) == model.fingerprint(second)
    keras.utils.set_random_seed(6)
    assert model.fingerprint(model.build("small")) != model.fingerprint(first)


def test_fingerprint_covers_every_weight():
    small = model.build("small", image_size=32)
    before = model.fingerprint(small)
    moving_mean = small.get_layer("down1_bn").moving_mean
    moving_mean.assign(moving_mean + 1.0)
    assert model.fingerprint(small) != before


def test_save_load_round_trip(trained, tmp_path):
    fitted, _ = trained
    path = model.save(fitted, tmp_path / "model.keras")
    loaded = model.load(path)
    assert model.fingerprint(loaded) == model.fingerprint(fitted)
    images = np.random.default_rng(0).random((2, 32, 32, 3), dtype=np.float32)
    np.testing.assert_array_equal(loaded.predict_on_batch(images), fitted.predict_on_batch(images))


def test_bytes_round_trip(trained):
    fitted, _ = trained
    assert model.fingerprint(model.from_bytes(model.to_bytes(fitted))) == model.fingerprint(fitted)


def test_save_needs_keras_suffix(tmp_path):
    with pytest.raises(ConfigError, match=r"\.keras"):
        model.save(model.build("small", image_size=32), tmp_path / "model.h5")


def test_load_refuses_missing_corrupt_and_unsafe_files(tmp_path):
    with pytest.raises(ModelError, match="does not exist"):
        model.load(tmp_path / "missing.keras")
    corrupt = tmp_path / "corrupt.keras"
    corrupt.write_bytes(b"not a zip file")
    with pytest.raises(ModelError, match="corrupt.keras"):
        model.load(corrupt)
    with pytest.raises(ModelError, match="stored model bytes"):
        model.from_bytes(b"not a zip file")
    # A Lambda layer carries Python bytecode: safe_mode must refuse it.
    image = keras.Input((4, 4, 3))
    unsafe = keras.Model(image, keras.layers.Lambda(lambda x: x * 2)(image))
    unsafe_path = tmp_path / "unsafe.keras"
    unsafe.save(unsafe_path)
    assert zipfile.is_zipfile(unsafe_path)
    with pytest.raises(ModelError, match="unsafe.keras"):
        model.load(unsafe_path)


def test_fit_returns_history_of_floats_and_logs(trained, log_dir):
    fitted, history = trained
    assert set(history) == {"loss", "iou", "val_loss", "val_iou"}
    assert all(len(values) == 1 and type(values[0]) is float for values in history.values())
    assert fitted.input_shape == (None, 32, 32, 3)
    assert list(log_dir.rglob("events.out.tfevents.*"))


def test_evaluate_matches_keras_validation_loss(trained):
    fitted, history = trained
    result = train.evaluate(fitted, _blobs(seed=1))
    assert set(result) == {"iou", "f1", "mean_iou", "accuracy", "precision", "loss"}
    assert result["loss"] == pytest.approx(history["val_loss"][0], rel=1e-4)
    assert result["iou"] == pytest.approx(history["val_iou"][0], rel=1e-4)


def test_evaluate_applies_calibration(trained):
    fitted, _ = trained
    fitted_calibration = calibration.fit_dataset(fitted, _blobs(seed=2))
    plain = train.evaluate(fitted, _blobs(seed=1))
    calibrated = train.evaluate(fitted, _blobs(seed=1), calibration=fitted_calibration)
    assert calibrated != plain
