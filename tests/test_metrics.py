"""The loss and the streaming metrics against hand-computed values."""

import math

import keras
import numpy as np
import pytest

from petseg.errors import ModelError
from petseg.metrics import SegmentationMetrics, bce_jaccard_loss

# One image of 1x4 pixels, one channel: truth 1 1 0 0, predicted 1 0 1 0.
TRUTH = np.array([1, 1, 0, 0], dtype=np.float32).reshape(1, 1, 4, 1)
PROBS = np.array([0.9, 0.4, 0.6, 0.1], dtype=np.float32).reshape(1, 1, 4, 1)


def test_loss_matches_hand_computation():
    bce = -(math.log(0.9) + math.log(0.4) + math.log(1 - 0.6) + math.log(1 - 0.1)) / 4
    intersection = 0.9 + 0.4
    union = (1 + 1) + (0.9 + 0.4 + 0.6 + 0.1) - intersection
    jaccard = (intersection + 1) / (union + 1)  # smoothed by 1
    loss = keras.ops.convert_to_numpy(bce_jaccard_loss(TRUTH, PROBS))
    assert loss.shape == (1,)
    assert loss[0] == pytest.approx(bce + 1 - jaccard, rel=1e-5)


def test_loss_is_per_image_and_near_zero_for_perfect_predictions():
    truth = np.zeros((2, 4, 4, 3), dtype=np.float32)
    truth[0, :2, :, 0] = 1
    truth[0, 2:, :, 1] = 1
    truth[1, ..., 2] = 1
    perfect = np.clip(truth, 1e-6, 1 - 1e-6)
    losses = keras.ops.convert_to_numpy(bce_jaccard_loss(truth, perfect))
    assert losses.shape == (2,)
    assert np.all(losses < 1e-3)
    worst = keras.ops.convert_to_numpy(bce_jaccard_loss(truth, 1 - perfect))
    assert np.all(worst > 1)


def test_metrics_match_hand_computation():
    metrics = SegmentationMetrics()
    metrics.update(TRUTH, PROBS)
    result = metrics.result()
    # tp = fp = fn = tn = 1
    assert result["iou"] == pytest.approx(1 / 3)
    assert result["f1"] == pytest.approx(0.5)
    assert result["precision"] == pytest.approx(0.5)
    assert result["accuracy"] == pytest.approx(0.5)
    assert result["mean_iou"] == pytest.approx(1 / 3)
    expected_loss = float(keras.ops.convert_to_numpy(bce_jaccard_loss(TRUTH, PROBS))[0])
    assert result["loss"] == pytest.approx(expected_loss)
    assert all(isinstance(value, float) for value in result.values())


def test_metrics_agree_with_keras():
    rng = np.random.default_rng(0)
    truth = (rng.random((3, 5, 5, 3)) > 0.6).astype(np.float32)
    probs = rng.random((3, 5, 5, 3)).astype(np.float32)
    metrics = SegmentationMetrics()
    metrics.update(truth, probs)
    result = metrics.result()
    predicted = (probs > 0.5).astype(np.float32)
    for name, keras_metric, y_pred in [
        ("mean_iou", keras.metrics.MeanIoU(num_classes=2), predicted),
        ("accuracy", keras.metrics.BinaryAccuracy(), probs),
        ("precision", keras.metrics.Precision(), probs),
        ("iou", keras.metrics.BinaryIoU(target_class_ids=[1]), probs),
    ]:
        keras_metric.update_state(truth.ravel(), y_pred.ravel())
        assert result[name] == pytest.approx(float(keras_metric.result()), rel=1e-5), name


def test_streaming_equals_one_pass_and_weights_loss_by_pixels():
    rng = np.random.default_rng(1)
    truth = (rng.random((5, 4, 4, 3)) > 0.5).astype(np.float32)
    probs = rng.random((5, 4, 4, 3)).astype(np.float32)
    whole = SegmentationMetrics()
    whole.update(truth, probs)
    streamed = SegmentationMetrics()
    streamed.update(truth[:1], probs[:1])
    streamed.update(truth[1:], probs[1:])
    assert streamed.result() == pytest.approx(whole.result())


def test_loss_weights_images_of_different_sizes_by_pixels():
    small_truth, small_probs = TRUTH, PROBS  # 4 pixels
    big_truth = np.ones((1, 2, 6, 1), dtype=np.float32)  # 12 pixels
    big_probs = np.full((1, 2, 6, 1), 0.7, dtype=np.float32)
    metrics = SegmentationMetrics()
    metrics.update(small_truth, small_probs)
    metrics.update(big_truth, big_probs)
    small = float(keras.ops.convert_to_numpy(bce_jaccard_loss(small_truth, small_probs))[0])
    big = float(keras.ops.convert_to_numpy(bce_jaccard_loss(big_truth, big_probs))[0])
    assert metrics.result()["loss"] == pytest.approx((4 * small + 12 * big) / 16)


def test_empty_metrics_are_zero():
    assert SegmentationMetrics().result() == {
        "iou": 0.0,
        "f1": 0.0,
        "mean_iou": 0.0,
        "accuracy": 0.0,
        "precision": 0.0,
        "loss": 0.0,
    }


def test_mismatched_shapes_are_a_model_error():
    with pytest.raises(ModelError, match="do not match"):
        SegmentationMetrics().update(np.zeros((1, 4, 4, 3)), np.zeros((1, 4, 4, 1)))
