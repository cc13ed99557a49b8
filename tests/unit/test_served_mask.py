"""A release serves the mask its manifest chose (calibrated or raw), and the calibrated probabilities on request."""

import json

import keras
import numpy as np
import pytest

from petseg.errors import ModelError
from petseg.model import unet as models
from petseg.model.calibration import Calibration
from petseg.release import bundle
from petseg.serving import messages
from petseg.serving import predictor as serving
from petseg.serving import v2_messages

SIDE = 16
BORDER_UP = Calibration(tuple(np.array([0.0, 1.0]) for _ in range(3)),
                        (np.array([0.0, 1.0]), np.array([0.0, 1.0]), np.array([0.9, 1.0])))


def _model() -> keras.Model:
    inputs = keras.Input((SIDE, SIDE, 3))
    layer = keras.layers.Conv2D(3, 1, activation="softmax")
    model = keras.Model(inputs, layer(inputs))
    kernel = np.zeros((1, 1, 3, 3), np.float32)
    kernel[0, 0, 0, 0] = kernel[0, 0, 1, 1] = 8.0
    layer.set_weights([kernel, np.zeros(3, np.float32)])
    return model


def _release(source: str | None) -> bundle.Release:
    manifest = {"image_size": SIDE, **({"mask_source": source} if source else {})}
    model = _model()
    return bundle.Release(model, BORDER_UP, manifest, "here", models.fingerprint(model))


IMAGES = np.random.default_rng(0).random((2, SIDE, SIDE, 3), dtype=np.float32)


def test_a_raw_mask_release_answers_raw_probabilities_and_calibrated_ones_on_request():
    predictor = serving.Predictor(_release("raw"))
    raw = np.asarray(_model().predict_on_batch(IMAGES))
    np.testing.assert_allclose(predictor.predict(IMAGES), raw, atol=1e-6)
    np.testing.assert_allclose(predictor.predict(IMAGES, calibrated=True), BORDER_UP.apply(raw), atol=1e-6)
    assert np.array_equal(predictor.predict_eight_bits(IMAGES), messages.eight_bits(predictor.predict(IMAGES)))
    assert _release("raw").tags()["mask_source"] == "raw"


@pytest.mark.parametrize("source", ["calibrated", None])
def test_a_calibrated_mask_release_answers_calibrated_probabilities(source):
    predictor = serving.Predictor(_release(source))
    expected = BORDER_UP.apply(_model().predict_on_batch(IMAGES))
    np.testing.assert_allclose(predictor.predict(IMAGES), expected, atol=1e-6)
    assert _release(source).mask_source == "calibrated"


def test_the_mask_output_comes_from_the_served_probabilities_beside_calibrated_ones():
    predictor = serving.Predictor(_release("raw"))
    calibrated, raw = predictor.predict(IMAGES, calibrated=True), predictor.predict_eight_bits(IMAGES)
    mask, values = v2_messages.encode_outputs(calibrated, ("mask", "probabilities"), mask_probs=raw)
    assert mask["data"] == messages.class_mask(raw).ravel().tolist()
    assert mask["data"] != messages.class_mask(calibrated).ravel().tolist()  # calibration moved the argmax
    assert np.array_equal(np.asarray(values["data"], np.float32), calibrated.ravel())


def test_a_manifest_naming_no_known_mask_source_does_not_load(tmp_path):
    model = _model()
    manifest = bundle.build_manifest(run_id="9", flow_name="PetSegFlow", model_fingerprint=models.fingerprint(model),
                                     dataset_fingerprint="d" * 64, code_version="0.1.0+test",
                                     metrics={"mask": {"source": "raw"}}, settings={}, location=str(tmp_path / "r"),
                                     image_size=SIDE)
    assert manifest["mask_source"] == "raw" and manifest["metrics"]["mask"] == {"source": "raw"}
    bundle.export(str(tmp_path / "r"), model_keras=models.to_bytes(model), calibration=BORDER_UP.to_dict(),
                  manifest=manifest)
    assert bundle.load_release(str(tmp_path / "r")).mask_source == "raw"
    bundle.export(str(tmp_path / "bad"), model_keras=models.to_bytes(model), calibration=BORDER_UP.to_dict(),
                  manifest={**manifest, "mask_source": "sometimes"})
    with pytest.raises(ModelError, match="field 'mask_source' is 'sometimes', expected one of calibrated, raw"):
        bundle.load_release(str(tmp_path / "bad"))
    assert json.loads((tmp_path / "bad" / "manifest.json").read_text())["mask_source"] == "sometimes"
