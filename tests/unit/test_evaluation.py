"""The evaluate step's figures: the served mask chosen on validation, and a champion scored on the same images."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from petseg.model import evaluation
from petseg.model.calibration import Calibration
from petseg.release import gate

SIDE = 16
IDENTITY = Calibration(tuple(np.array([0.0, 1.0]) for _ in range(3)), tuple(np.array([0.0, 1.0]) for _ in range(3)))
# Border probabilities lifted to at least 0.9: calibrated, most pixels become border.
BORDER_UP = Calibration(tuple(np.array([0.0, 1.0]) for _ in range(3)),
                        (np.array([0.0, 1.0]), np.array([0.0, 1.0]), np.array([0.9, 1.0])))


def _model(side: int = SIDE, classes: int = 3) -> keras.Model:
    """A per-pixel softmax of fixed weights: pet where red leads, background where green does."""
    inputs = keras.Input((side, side, 3))
    layer = keras.layers.Conv2D(classes, 1, activation="softmax")
    model = keras.Model(inputs, layer(inputs))
    kernel = np.zeros((1, 1, 3, classes), np.float32)
    kernel[0, 0, 0, 0] = kernel[0, 0, 1, 1] = 8.0
    layer.set_weights([kernel, np.zeros(classes, np.float32)])
    return model


def _split(seed: int, count: int = 8) -> tf.data.Dataset:
    """Images whose true classes are the fixed model's raw argmax (so the raw mask is exact)."""
    images = np.random.default_rng(seed).random((count, SIDE, SIDE, 3), dtype=np.float32)
    truth = np.argmax(_model().predict_on_batch(images), axis=-1)
    masks = np.eye(3, dtype=np.float32)[truth]
    return tf.data.Dataset.from_tensor_slices((images, masks)).batch(4)


def _figures(calibration: Calibration, champion: evaluation.Champion | None = None) -> dict:
    return evaluation.figures(_model(), calibration, training=_split(0), validation=_split(1), test=_split(2),
                              image_size=SIDE, seed=0, bootstrap=50, champion=champion)


def _champion(model: keras.Model, *, side: int = SIDE) -> evaluation.Champion:
    return evaluation.Champion(version="petseg-17", location="/releases/petseg-17", model=model, calibration=IDENTITY,
                               mask_source="raw", image_size=side, model_fingerprint="f" * 64)


def test_the_raw_mask_is_served_where_calibration_moves_the_argmax():
    metrics = _figures(BORDER_UP)
    validation = metrics["validation"]
    # Exact on pet and background; border, in neither truth nor raw mask, counts 0 in the mean.
    assert validation["raw"]["pet_iou"] == validation["raw"]["background_iou"] == pytest.approx(1.0)
    assert validation["calibrated"]["miou"] < validation["raw"]["miou"]
    assert metrics["mask"]["source"] == "raw" and "raw" in metrics["mask"]["reason"]
    assert gate.served(metrics, "validation")["miou"] >= validation["raw"]["miou"]
    assert gate.served(metrics) is metrics["raw"]
    assert set(metrics["ece"]) == {"raw", "calibrated"} and "champion" not in metrics


def test_the_calibrated_mask_is_served_where_calibration_keeps_it():
    metrics = _figures(IDENTITY)
    assert metrics["mask"]["source"] == "calibrated"
    assert gate.served(metrics, "validation")["miou"] >= metrics["validation"]["raw"]["miou"]


def test_a_champion_like_the_candidate_differs_by_nothing_on_the_same_images():
    metrics = _figures(BORDER_UP, _champion(_model()))
    champion = metrics["champion"]
    assert champion["comparable"] and champion["note"] == "" and champion["version"] == "petseg-17"
    for split in ("validation", "test"):
        assert champion[split]["images"] == 8
        assert champion[split]["difference"]["miou"] == {"difference": 0.0, "interval": [0.0, 0.0]}
    passed, message = gate.decide(metrics, min_miou=0.5, min_margin=0.0)
    assert passed and "against champion petseg-17 0.6667: +0.0000" in message


def test_a_worse_champion_shows_a_positive_difference():
    worse = _model()
    worse.set_weights([-w for w in worse.get_weights()])
    champion = _figures(IDENTITY, _champion(worse))["champion"]
    difference = champion["validation"]["difference"]["miou"]
    assert difference["difference"] > 0 and difference["interval"][0] <= difference["difference"]


def test_a_champion_of_another_image_size_is_scored_through_its_own_size():
    champion = _figures(IDENTITY, _champion(_model(side=32), side=32))["champion"]
    assert champion["comparable"] and "takes 32-pixel images, the candidate 16" in champion["note"]
    assert champion["validation"]["images"] == 8


def test_a_champion_of_other_classes_is_explained_not_scored():
    metrics = _figures(IDENTITY, _champion(_model(classes=2)))
    champion = metrics["champion"]
    assert not champion["comparable"] and "validation" not in champion
    assert "predicts 2 classes, not the 3 of these masks" in champion["note"]
    passed, message = gate.decide(metrics, min_miou=0.5, min_margin=0.0)
    assert passed and "champion not compared" in message


def test_a_champion_that_did_not_load_is_explained_not_scored():
    lost = evaluation.Champion(version="petseg-17", location="/gone", problem="release /gone lacks model.keras")
    champion = _figures(IDENTITY, lost)["champion"]
    assert not champion["comparable"] and champion["note"] == "release /gone lacks model.keras"
    assert champion["location"] == "/gone"
