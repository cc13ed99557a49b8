"""Isotonic calibration, its JSON file, calibration error and pixel sampling."""

import json

import numpy as np
import pytest
import tensorflow as tf
from hypothesis import given, settings
from hypothesis import strategies as st

from petseg.errors import ModelError
from petseg.model import calibration
from petseg.model.calibration import Calibration
from petseg.release import bundle


def test_pool_adjacent_violators_by_hand():
    probs = np.array([[0.1], [0.2], [0.3], [0.4]])
    labels = np.array([[0], [1], [0], [1]])
    fitted = calibration.fit(probs, labels)
    # 0.2 -> 1 and 0.3 -> 0 violate monotonicity and are pooled at 0.5.
    np.testing.assert_allclose(fitted.thresholds[0], [0.1, 0.2, 0.3, 0.4])
    np.testing.assert_allclose(fitted.values[0], [0.0, 0.5, 0.5, 1.0])


def test_apply_maps_each_class_then_renormalises_by_hand():
    identity = (np.array([0.0, 1.0]), np.array([0.0, 1.0]))
    halving = (np.array([0.0, 1.0]), np.array([0.0, 0.5]))
    zero = (np.array([0.0, 1.0]), np.array([0.0, 0.0]))
    fitted = Calibration(thresholds=(identity[0], halving[0], zero[0]), values=(identity[1], halving[1], zero[1]))
    applied = fitted.apply(np.array([[0.6, 0.4, 0.0], [0.2, 0.2, 0.6], [0.0, 0.0, 1.0]]))
    # (0.6, 0.2, 0) / 0.8; (0.2, 0.1, 0) / 0.3; all mapped to 0: the raw probabilities stay.
    np.testing.assert_allclose(applied, [[0.75, 0.25, 0.0], [2 / 3, 1 / 3, 0.0], [0.0, 0.0, 1.0]], rtol=1e-6)
    assert applied.dtype == np.float32


def test_equal_probabilities_are_pooled_into_one_value():
    fitted = calibration.fit(np.array([[0.5], [0.5], [0.5], [0.7]]), np.array([[0], [0], [1], [1]]))
    np.testing.assert_allclose(fitted.thresholds[0], [0.5, 0.7])
    np.testing.assert_allclose(fitted.values[0], [1 / 3, 1.0])


def test_one_map_per_channel():
    probs = np.tile(np.linspace(0, 1, 11)[:, None], (1, 2))
    labels = np.stack([probs[:, 0] > 0.45, probs[:, 1] < 2], axis=1)  # channel 1 is always 1
    fitted = calibration.fit(probs, labels)
    np.testing.assert_allclose(np.interp([0.2, 0.8], fitted.thresholds[0], fitted.values[0]), [0.0, 1.0])
    np.testing.assert_allclose(fitted.values[1], [1.0, 1.0])


@settings(max_examples=40, deadline=None)
@given(
    st.lists(
        st.tuples(st.floats(0, 1, width=32), st.booleans()),
        min_size=1,
        max_size=60,
    )
)
def test_isotonic_fit_is_monotone_and_keeps_the_mean(pairs):
    probs = np.array([[p] for p, _ in pairs])
    labels = np.array([[float(y)] for _, y in pairs])
    fitted = calibration.fit(probs, labels)
    x, y = fitted.thresholds[0], fitted.values[0]
    assert np.all(np.diff(x) > 0)
    assert np.all(np.diff(y) >= 0)
    assert np.all((y >= 0) & (y <= 1))
    # Least-squares isotonic fits preserve the mean of the labels.
    assert np.mean(np.interp(probs[:, 0], x, y)) == pytest.approx(np.mean(labels), abs=1e-9)


def test_calibration_lowers_the_calibration_error():
    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.full(3, 0.5), 20_000)
    # An over-confident model: the classes really occur with the flatter distribution sqrt(p), normalised.
    truth = np.sqrt(probs) / np.sqrt(probs).sum(axis=1, keepdims=True)
    classes = (rng.random((20_000, 1)) > np.cumsum(truth, axis=1)).sum(axis=1)
    labels = np.eye(3)[np.minimum(classes, 2)]
    fitted = calibration.fit(probs[:10_000], labels[:10_000])
    report = calibration.summary(fitted, probs[10_000:], labels[10_000:])
    assert report["pixels"] == 10_000
    assert report["ece_before"] > 0.05
    assert report["ece_after"] < report["ece_before"] / 3


def test_expected_calibration_error_and_reliability_by_hand():
    probs = np.array([0.1, 0.1, 0.9, 1.0])
    labels = np.array([0, 1, 1, 1])
    # bin [0, 0.5): mean p 0.1, frequency 0.5; bin [0.5, 1]: mean p 0.95, frequency 1.
    assert calibration.expected_calibration_error(probs, labels, bins=2) == pytest.approx(
        0.5 * 0.4 + 0.5 * 0.05
    )
    curve = calibration.reliability_curve(probs, labels, bins=4)
    assert curve == {
        "bin_centers": [0.125, 0.375, 0.625, 0.875],
        "mean_predicted": [pytest.approx(0.1), None, None, pytest.approx(0.95)],
        "observed_frequency": [0.5, None, None, 1.0],
        "counts": [2, 0, 0, 2],
    }
    json.dumps(curve)


def test_json_round_trip():
    rng = np.random.default_rng(1)
    probs = rng.random((500, 3))
    fitted = calibration.fit(probs, rng.random((500, 3)) < probs)
    text = bundle.calibration_bytes(fitted.to_dict())  # calibration.json, as a release holds it
    assert json.loads(text)["format"] == calibration.FORMAT
    loaded = Calibration.from_dict(json.loads(text))
    np.testing.assert_array_equal(loaded.apply(probs), fitted.apply(probs))
    assert Calibration.from_dict(fitted.to_dict()).to_dict() == fitted.to_dict()


@pytest.mark.parametrize(
    ("content", "field"),
    [
        ({"format": calibration.FORMAT}, "'channels'"),
        ({"format": "other"}, "'format'"),
        ({"format": calibration.FORMAT, "channels": [{"thresholds": [0.1, 0.2], "values": [0.0]}]}, "channels[0].thresholds"),
        ({"format": calibration.FORMAT, "channels": [{"thresholds": [0.2, 0.1], "values": [0, 1]}]}, "'channels[0].thresholds'"),
        ({"format": calibration.FORMAT, "channels": [{"thresholds": [0.1, 0.2], "values": [1, 0]}]}, "'channels[0].values'"),
        ({"format": calibration.FORMAT, "channels": [{"thresholds": [0.1], "values": ["a"]}]}, "'channels[0].values'"),
        ({"format": calibration.FORMAT, "channels": [{"values": [0.5]}]}, "'channels[0].thresholds'"),
    ],
)
def test_malformed_table_names_the_field(content, field):
    with pytest.raises(ModelError) as info:
        Calibration.from_dict(content)
    assert field in str(info.value)


def test_wrong_channel_count_is_a_model_error():
    fitted = calibration.fit(np.array([[0.1, 0.2], [0.3, 0.4]]), np.array([[0, 1], [1, 0]]))
    with pytest.raises(ModelError, match="2 channels"):
        fitted.apply(np.zeros((4, 4, 3)))


class _Constant:
    """Stands in for a model: predicts the red channel's value for every class."""

    def predict_on_batch(self, images):
        images = np.asarray(images)
        return np.repeat(images[..., :1], 3, axis=-1)


def _dataset(images: int = 6, size: int = 8, batch: int = 4) -> tf.data.Dataset:
    rng = np.random.default_rng(2)
    x = rng.random((images, size, size, 3), dtype=np.float32)
    y = (rng.random((images, size, size, 3)) < x[..., :1]).astype(np.float32)
    return tf.data.Dataset.from_tensor_slices((x, y)).batch(batch)


def test_collect_keeps_a_bounded_deterministic_sample():
    probs, labels = calibration.collect(_Constant(), _dataset(), max_pixels=100, seed=3)
    assert probs.shape == labels.shape == (100, 3)
    again, _ = calibration.collect(_Constant(), _dataset(), max_pixels=100, seed=3)
    np.testing.assert_array_equal(probs, again)
    other, _ = calibration.collect(_Constant(), _dataset(), max_pixels=100, seed=4)
    assert not np.array_equal(probs, other)


def test_collect_keeps_every_pixel_under_the_bound():
    probs, labels = calibration.collect(_Constant(), _dataset(), max_pixels=10_000)
    assert probs.shape == (6 * 8 * 8, 3)
    fitted = calibration.fit(probs, labels)
    assert len(fitted.thresholds) == 3


def test_collect_from_an_empty_dataset_is_a_model_error():
    with pytest.raises(ModelError, match="empty"):
        calibration.collect(_Constant(), _dataset().take(0))
