"""The loss, the streaming metrics and the baselines against hand-computed values."""

import math

import keras
import numpy as np
import pytest

from petseg.errors import ModelError
from petseg.model import baselines
from petseg.model.metrics import DICE_SMOOTH, DICE_WEIGHT, SOFT_SMOOTH, SegmentationMetrics, scores, segmentation_loss

EYE = np.eye(3, dtype=np.float32)


def one_hot(classes) -> np.ndarray:
    return EYE[np.asarray(classes)]


# One image of 1x4 pixels. True classes: pet, pet, background, border.
TRUTH = one_hot([[[0, 0, 1, 2]]])
PROBS = np.array([[[[0.7, 0.2, 0.1],     # predicted pet (right)
                    [0.3, 0.6, 0.1],     # predicted background (wrong: pet)
                    [0.1, 0.8, 0.1],     # predicted background (right)
                    [0.2, 0.2, 0.6]]]],  # predicted border (right)
                 dtype=np.float32)


def test_loss_matches_hand_computation():
    cross_entropy = -(math.log(0.7) + math.log(0.3) + math.log(0.8) + math.log(0.6)) / 4
    intersections = (0.7 + 0.3, 0.8, 0.6)
    sums = (2 + 0.7 + 0.3 + 0.1 + 0.2, 1 + 0.2 + 0.6 + 0.8 + 0.2, 1 + 0.1 + 0.1 + 0.1 + 0.6)
    dice = np.mean([(2 * i + DICE_SMOOTH) / (s + DICE_SMOOTH) for i, s in zip(intersections, sums)])
    loss = keras.ops.convert_to_numpy(segmentation_loss(TRUTH, PROBS))
    assert loss.shape == (1,)
    assert loss[0] == pytest.approx(cross_entropy + DICE_WEIGHT * (1 - dice), rel=1e-5)


def test_loss_is_per_image_and_near_zero_for_perfect_predictions():
    truth = np.zeros((2, 4, 4, 3), dtype=np.float32)
    truth[0, :2, :, 0] = 1
    truth[0, 2:, :, 1] = 1
    truth[1, ..., 2] = 1
    perfect = np.clip(truth, 1e-6, 1 - 1e-6)
    losses = keras.ops.convert_to_numpy(segmentation_loss(truth, perfect))
    assert losses.shape == (2,)
    assert np.all(losses < 1e-3)
    worst = keras.ops.convert_to_numpy(segmentation_loss(truth, np.roll(perfect, 1, axis=-1)))
    assert np.all(worst > 1)


def test_metrics_match_hand_computation():
    metrics = SegmentationMetrics()
    metrics.update(TRUTH, PROBS)
    result = metrics.result()
    # Confusion (rows true, columns predicted): pet 1 right 1 as background; background 1; border 1.
    assert result["confusion"] == [[1, 1, 0], [0, 1, 0], [0, 0, 1]]
    assert result["pet_iou"] == pytest.approx(1 / 2)          # 1 hit / (2 true + 1 predicted - 1)
    assert result["background_iou"] == pytest.approx(1 / 2)   # 1 hit / (1 true + 2 predicted - 1)
    assert result["border_iou"] == pytest.approx(1.0)
    assert result["miou"] == pytest.approx((0.5 + 0.5 + 1.0) / 3)
    assert result["pixel_accuracy"] == pytest.approx(3 / 4)
    # Soft scores per class: intersection sum(y * p), sums sum(y) + sum(p).
    inter = np.array([1.0, 0.8, 0.6])
    sums = np.array([3.3, 2.8, 1.9])
    soft_iou = np.mean((inter + SOFT_SMOOTH) / (sums - inter + SOFT_SMOOTH))
    soft_f1 = np.mean((2 * inter + SOFT_SMOOTH) / (sums + SOFT_SMOOTH))
    assert result["soft_iou"] == pytest.approx(soft_iou, rel=1e-5)
    assert result["soft_f1"] == pytest.approx(soft_f1, rel=1e-5)
    # Thresholded at 0.5, 12 pixel-channels: wrong are pet of pixel 2 (0.3 vs 1) and background of
    # pixel 2 (0.6 vs 0); the rest agree.
    assert result["binary_accuracy"] == pytest.approx(10 / 12)
    assert result["loss"] == pytest.approx(float(keras.ops.convert_to_numpy(segmentation_loss(TRUTH, PROBS))[0]),
                                           rel=1e-5)
    assert result["images"] == 1


def test_pooled_iou_is_not_a_function_of_accuracy():
    """Two predictions with the same pixel accuracy and different per-class IoU: the metric tells them apart."""
    truth = one_hot([[[0, 0, 1, 1]]])
    swap_pet = one_hot([[[1, 0, 1, 1]]])      # one pet pixel called background
    swap_background = one_hot([[[0, 0, 0, 1]]])  # one background pixel called pet
    a, b = SegmentationMetrics(), SegmentationMetrics()
    a.update(truth, swap_pet)
    b.update(truth, swap_background)
    assert a.result()["pixel_accuracy"] == b.result()["pixel_accuracy"] == 0.75
    assert a.result()["pet_iou"] == pytest.approx(1 / 2)
    assert b.result()["pet_iou"] == pytest.approx(2 / 3)


def test_streaming_equals_one_batch():
    rng = np.random.default_rng(0)
    truth = one_hot(rng.integers(0, 3, (5, 4, 4)))
    probs = rng.dirichlet(np.ones(3), (5, 4, 4)).astype(np.float32)
    whole = SegmentationMetrics()
    whole.update(truth, probs)
    streamed = SegmentationMetrics()
    for start in range(0, 5, 2):
        streamed.update(truth[start:start + 2], probs[start:start + 2])
    a, b = whole.result(bootstrap=200, seed=3), streamed.result(bootstrap=200, seed=3)
    assert a.keys() == b.keys()
    for key in a:
        assert a[key] == (pytest.approx(b[key]) if isinstance(a[key], float) else b[key])


def test_scores_of_a_confusion_matrix_by_hand():
    confusion = np.array([[8, 2, 0], [1, 6, 1], [0, 2, 2]])
    result = scores(confusion)
    assert result["pet_iou"] == pytest.approx(8 / (10 + 9 - 8))
    assert result["background_iou"] == pytest.approx(6 / (8 + 10 - 6))
    assert result["border_iou"] == pytest.approx(2 / (4 + 3 - 2))
    assert result["pixel_accuracy"] == pytest.approx(16 / 22)


def test_bootstrap_intervals_bracket_the_figure_and_shrink_with_agreement():
    rng = np.random.default_rng(1)
    truth = one_hot(rng.integers(0, 3, (40, 8, 8)))
    noisy = np.where(rng.random((40, 8, 8, 1)) < 0.3, one_hot(rng.integers(0, 3, (40, 8, 8))), truth)
    metrics = SegmentationMetrics()
    metrics.update(truth, noisy)
    result = metrics.result(bootstrap=500, seed=0)
    for name in ("pet_iou", "background_iou", "border_iou", "miou", "pixel_accuracy"):
        low, high = result["intervals"][name]
        assert low <= result[name] <= high
        assert high - low > 0
    perfect = SegmentationMetrics()
    perfect.update(truth, truth)
    assert perfect.result(bootstrap=100)["intervals"]["miou"] == [1.0, 1.0]


def test_mismatched_shapes_are_refused():
    with pytest.raises(ModelError, match=r"\(2, 4, 4, 3\).*\(2, 4, 4, 2\)|\(2, 4, 4, 2\).*\(2, 4, 4, 3\)"):
        SegmentationMetrics().update(np.zeros((2, 4, 4, 3)), np.zeros((2, 4, 4, 2)))


def test_empty_metrics_are_zero():
    result = SegmentationMetrics().result(bootstrap=10)
    assert result["miou"] == 0.0 and result["pixel_accuracy"] == 0.0 and result["images"] == 0
    assert "intervals" not in result


# -- baselines ----------------------------------------------------------------------------------------

# Two 2x2 training images. Pixel (0, 0) is pet in both, (1, 1) background in both, the others differ.
TRAIN_IMAGES = np.array([[[[0.9, 0.1, 0.1], [0.1, 0.9, 0.1]], [[0.1, 0.9, 0.1], [0.1, 0.1, 0.9]]],
                         [[[0.9, 0.1, 0.1], [0.9, 0.1, 0.1]], [[0.1, 0.9, 0.1], [0.1, 0.1, 0.9]]]],
                        dtype=np.float32)
TRAIN_MASKS = one_hot([[[0, 1], [2, 1]],
                       [[0, 0], [1, 1]]])


def fitted():
    return baselines.fit([(TRAIN_IMAGES, TRAIN_MASKS)])


def test_all_background_predicts_background_everywhere():
    probs = fitted().predict("all-background", TRAIN_IMAGES)
    assert np.all(np.argmax(probs, -1) == 1)


def test_mean_mask_is_the_per_pixel_class_frequency():
    probs = fitted().predict("mean-mask", TRAIN_IMAGES[:1])
    np.testing.assert_allclose(probs[0, 0, 0], [1, 0, 0])
    np.testing.assert_allclose(probs[0, 0, 1], [0.5, 0.5, 0])
    np.testing.assert_allclose(probs[0, 1, 0], [0, 0.5, 0.5])
    np.testing.assert_allclose(probs[0, 1, 1], [0, 1, 0])


def test_colour_position_lookup_by_hand():
    model = fitted()
    probs = model.predict("colour-position", TRAIN_IMAGES)
    # Pixel (0, 1): red in image 2 (pet), green in image 1 (background); each colour seen once there,
    # so counts (1 of its class) plus one pseudo-count of the mean mask (0.5, 0.5, 0), over 2.
    np.testing.assert_allclose(probs[1, 0, 1], [(1 + 0.5) / 2, 0.5 / 2, 0])
    np.testing.assert_allclose(probs[0, 0, 1], [0.5 / 2, (1 + 0.5) / 2, 0])
    # An unseen colour at (0, 0) falls back to the mean mask there.
    unseen = np.full((1, 2, 2, 3), 0.5, dtype=np.float32)
    np.testing.assert_allclose(model.predict("colour-position", unseen)[0, 0, 0], [1, 0, 0])


def test_baselines_are_scored_with_the_same_metrics():
    scored = baselines.score(fitted(), [(TRAIN_IMAGES, TRAIN_MASKS)])
    assert set(scored) == set(baselines.NAMES)
    # all-background on the training masks: background is 4 of 8 pixels, all predicted background.
    assert scored["all-background"]["pixel_accuracy"] == pytest.approx(4 / 8)
    assert scored["all-background"]["background_iou"] == pytest.approx(4 / 8)
    assert scored["all-background"]["pet_iou"] == 0.0
    # The colour-position lookup gets its training masks right but for pixel (1, 0): green in both
    # images, border in one and background in the other; the tie goes to background.
    assert scored["colour-position"]["pixel_accuracy"] == pytest.approx(7 / 8)
