"""Model building, saving and fingerprints; one short training and evaluation."""

import zipfile

import keras
import numpy as np
import pytest
import tensorflow as tf

from petseg.errors import ConfigError, ModelError
from petseg.model import calibration, determinism, train
from petseg.model import unet as model
from petseg.model.metrics import SegmentationMetrics


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
    determinism.configure(seed=0, strict=False)
    return train.fit(
        train=_blobs(),
        validation=_blobs(seed=1),
        arch="small",
        epochs=1,
        learning_rate=1e-3,
        log_dir=str(log_dir),
        echo=None,
    )


def test_small_model_shape_and_size():
    small = model.build("small")
    assert small.input_shape == (None, 128, 128, 3)
    assert small.output_shape == (None, 128, 128, 3)
    assert 500_000 < small.count_params() < 1_000_000
    probs = small.predict_on_batch(np.random.default_rng(0).random((2, 128, 128, 3), dtype=np.float32))
    np.testing.assert_allclose(probs.sum(axis=-1), 1.0, rtol=1e-5)  # softmax over the three classes
    assert model.build("small", width=8).count_params() < small.count_params() / 3


def test_decoder_upsamples_bilinearly_and_convolves_after_each_skip():
    small = model.build("small")
    kinds = {type(layer).__name__ for layer in small.layers}
    assert "Conv2DTranspose" not in kinds
    resizes = [layer for layer in small.layers if isinstance(layer, keras.layers.UpSampling2D)]
    assert resizes and all(layer.interpolation == "bilinear" for layer in resizes)
    for layer in small.layers:
        if isinstance(layer, keras.layers.Concatenate):
            follower = small.get_layer(layer.name.replace("_concat", "_conv"))
            assert follower.kernel_size == (3, 3)


def test_mobilenet_model_is_the_tutorial_unet():
    unet = model.build("mobilenetv2", image_size=128)
    assert unet.output_shape == (None, 128, 128, 3)
    assert 7_500_000 < unet.count_params() < 9_000_000
    filters = [unet.get_layer(f"up{i}_conv").filters for i in range(1, 5)]
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
        ({"width": 0}, "width must be a positive integer"),
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
    moving_mean = small.get_layer("down1a_bn").moving_mean
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
    assert set(history) == {"loss", "miou", "val_loss", "val_miou", "learning_rate", "best_epoch"}
    assert history["best_epoch"] == 1
    assert all(len(values) == 1 and type(values[0]) is float for key, values in history.items() if key != "best_epoch")
    assert fitted.input_shape == (None, 32, 32, 3)
    assert list(log_dir.rglob("events.out.tfevents.*"))


def test_evaluate_matches_keras_validation_loss(trained):
    fitted, history = trained
    result = train.evaluate(fitted, _blobs(seed=1))
    assert {"pet_iou", "background_iou", "border_iou", "miou", "pixel_accuracy", "confusion", "soft_iou", "soft_f1",
            "binary_accuracy", "loss", "images"} == set(result)
    assert result["loss"] == pytest.approx(history["val_loss"][0], rel=1e-4)
    assert result["miou"] == pytest.approx(history["val_miou"][0], rel=1e-4)


def test_evaluate_applies_calibration(trained):
    fitted, _ = trained
    fitted_calibration = calibration.fit(*calibration.collect(fitted, _blobs(seed=2)))
    plain = train.evaluate(fitted, _blobs(seed=1))
    calibrated = train.evaluate(fitted, _blobs(seed=1), calibration=fitted_calibration)
    by_hand, by_hand_plain = SegmentationMetrics(), SegmentationMetrics()
    for images, masks in _blobs(seed=1):
        probs = fitted.predict_on_batch(images)
        # A calibration that changes nothing would make the comparison below say nothing.
        assert np.abs(fitted_calibration.apply(probs) - probs).max() > 1e-3
        by_hand.update(masks, fitted_calibration.apply(probs))
        by_hand_plain.update(masks, probs)
    assert calibrated == by_hand.result()
    assert plain == by_hand_plain.result()
