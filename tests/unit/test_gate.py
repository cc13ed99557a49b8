"""The release gate and the served-mask choice: validation figures decide, the test split is never read."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from petseg.errors import ModelError
from petseg.model import calibration
from petseg.model.metrics import HEADLINE, paired_bootstrap
from petseg.release import gate

BASELINES = {"all-background": {"miou": 0.30}, "mean-mask": {"miou": 0.35}, "colour-position": {"miou": 0.40}}


class Unread(dict):
    """Figures the gate must not read: any look-up fails the test."""

    def __getitem__(self, key):
        raise AssertionError(f"the gate read test figure {key!r}")

    get = __getitem__


def _metrics(validation_miou: float, test_miou: float | None = None, *, source: str = "calibrated",
             champion: dict | None = None) -> dict:
    """Evaluate-step figures; ``test_miou`` None gives test figures that fail the test if read."""
    if test_miou is None:
        test = {"raw": Unread(), "calibrated": Unread(), "baselines": Unread()}
    else:
        test = {"raw": {"miou": test_miou}, "calibrated": {"miou": test_miou},
                "baselines": {name: {"miou": 0.99} for name in BASELINES}}
    metrics = {**test, "validation": {"raw": {"miou": validation_miou}, "calibrated": {"miou": validation_miou},
                                      "baselines": BASELINES},
               "mask": {"source": source, "reason": "..."}}
    if champion is not None:
        metrics["champion"] = champion
    return metrics


def _champion(difference: float, *, comparable: bool = True, note: str = "") -> dict:
    figures = {"miou": 0.7, "difference": {"miou": {"difference": difference,
                                                    "interval": [difference - 0.02, difference + 0.02]}}}
    out = {"version": "petseg-17", "image_size": 128, "mask_source": "calibrated", "comparable": comparable,
           "note": note}
    if comparable:
        out["validation"] = figures
        out["test"] = Unread()
    return out


def test_validation_passing_releases_though_test_figures_would_fail():
    # Validation clears floor and lead; on test the model is far below every baseline.
    passed, message = gate.decide(_metrics(0.70, test_miou=0.10), min_miou=0.5, min_margin=0.1)
    assert passed, message
    assert "validation mIoU 0.7000" in message and "0.1000" not in message


def test_validation_failing_rejects_though_test_figures_would_pass():
    passed, message = gate.decide(_metrics(0.45, test_miou=0.99), min_miou=0.5, min_margin=0.1)
    assert not passed and message.startswith("Release gate failed")
    assert "floor 0.50" in message and "0.9900" not in message


@pytest.mark.parametrize("champion", [None, _champion(0.0), _champion(0.0, comparable=False, note="other classes")])
def test_the_gate_never_reads_a_test_figure(champion):
    passed, _ = gate.decide(_metrics(0.70, champion=champion), min_miou=0.5, min_margin=0.1)
    assert passed


def test_each_rule_alone_rejects():
    assert not gate.decide(_metrics(0.49), min_miou=0.5, min_margin=0.0)[0]  # the floor
    assert not gate.decide(_metrics(0.49), min_miou=0.0, min_margin=0.1)[0]  # the lead over colour-position 0.40
    assert gate.decide(_metrics(0.51), min_miou=0.5, min_margin=0.1)[0]  # both met


def test_the_served_mask_is_what_the_gate_judges():
    metrics = _metrics(0.70)
    metrics["validation"]["raw"] = {"miou": 0.45}  # a raw mask would fail the floor
    assert gate.decide(metrics, min_miou=0.5, min_margin=0.1)[0]
    metrics["mask"]["source"] = "raw"
    passed, message = gate.decide(metrics, min_miou=0.5, min_margin=0.1)
    assert not passed and "raw mask" in message


def test_a_first_release_is_judged_against_the_baselines_alone():
    passed, message = gate.decide(_metrics(0.70), min_miou=0.5, min_margin=0.1)
    assert passed and "no champion (first release)" in message


@pytest.mark.parametrize("difference, released", [(0.05, True), (0.0, True), (-0.01, True), (-0.0101, False),
                                                  (-0.2, False)])
def test_the_champion_is_replaced_only_within_the_tolerance(difference, released):
    passed, message = gate.decide(_metrics(0.70, champion=_champion(difference)), min_miou=0.5, min_margin=0.1,
                                  tolerance=0.01)
    assert passed is released, message
    assert "against champion petseg-17 0.7000" in message and f"{difference:+.4f}" in message
    assert "tolerance 0.0100" in message


def test_the_default_tolerance_is_one_point_of_miou():
    assert gate.DEFAULT_TOLERANCE == 0.01
    assert gate.decide(_metrics(0.70, champion=_champion(-0.009)), min_miou=0.5, min_margin=0.1)[0]
    assert not gate.decide(_metrics(0.70, champion=_champion(-0.011)), min_miou=0.5, min_margin=0.1)[0]


def test_a_champion_that_cannot_be_compared_is_explained():
    champion = _champion(0.0, comparable=False, note="champion petseg-17 predicts 2 classes, not the 3")
    passed, message = gate.decide(_metrics(0.70, champion=champion), min_miou=0.5, min_margin=0.1)
    assert passed and "champion not compared: champion petseg-17 predicts 2 classes" in message


def test_a_champion_does_not_excuse_the_baselines():
    passed, _ = gate.decide(_metrics(0.45, champion=_champion(0.3)), min_miou=0.5, min_margin=0.1)
    assert not passed


# -- the served mask ----------------------------------------------------------------------------------

def test_the_raw_mask_is_served_when_calibration_lowers_validation_miou():
    source, reason = calibration.mask_source({"raw": {"miou": 0.7272}, "calibrated": {"miou": 0.7159}})
    assert source == "raw"
    assert "0.7159 calibrated, 0.7272 raw" in reason and "calibrated ones are served on request" in reason


def test_the_calibrated_mask_is_served_when_it_is_at_least_as_good():
    assert calibration.mask_source({"raw": {"miou": 0.70}, "calibrated": {"miou": 0.71}})[0] == "calibrated"
    assert calibration.mask_source({"raw": {"miou": 0.70}, "calibrated": {"miou": 0.70}})[0] == "calibrated"


@given(st.floats(0, 1), st.floats(0, 1))
def test_the_served_mask_never_scores_below_the_raw_model_on_validation(raw, calibrated):
    validation = {"raw": {"miou": raw}, "calibrated": {"miou": calibrated}}
    source, _ = calibration.mask_source(validation)
    assert validation[source]["miou"] >= raw
    assert gate.served({"validation": validation, "mask": {"source": source}}, "validation")["miou"] >= raw


def test_missing_validation_figures_are_a_model_error():
    with pytest.raises(ModelError, match="validation mIoU of the raw and the calibrated"):
        calibration.mask_source({"calibrated": {"miou": 0.7}})


def test_figures_from_before_the_choice_are_of_the_calibrated_mask():
    metrics = {"calibrated": {"miou": 0.7}, "raw": {"miou": 0.8}, "validation": {"calibrated": {"miou": 0.6}}}
    assert gate.served(metrics)["miou"] == 0.7 and gate.served(metrics, "validation")["miou"] == 0.6


# -- paired differences -------------------------------------------------------------------------------

def _confusions(hits: list[int], misses: list[int]) -> np.ndarray:
    """Per image: ``hits`` pet pixels right, ``misses`` pet pixels called background; 10 background pixels right."""
    return np.array([[[h, m, 0], [0, 10, 0], [0, 0, 0]] for h, m in zip(hits, misses)])


def test_a_predictor_against_itself_differs_by_nothing():
    same = _confusions([5, 8, 3, 9], [5, 2, 7, 1])
    for figure in paired_bootstrap(same, same, resamples=200, seed=1).values():
        assert figure == {"difference": 0.0, "interval": [0.0, 0.0]}


def test_paired_difference_by_hand():
    ours, theirs = _confusions([10, 10], [0, 0]), _confusions([5, 5], [5, 5])
    result = paired_bootstrap(ours, theirs, resamples=0)
    # Ours: pet IoU 1, background 1. Theirs: pet 10/20, background 20/30.
    assert result["pet_iou"]["difference"] == pytest.approx(0.5)
    assert result["background_iou"]["difference"] == pytest.approx(1 - 2 / 3)
    assert set(result) == set(HEADLINE)


def test_paired_intervals_hold_the_difference_and_follow_the_seed():
    rng = np.random.default_rng(0)
    ours = _confusions(rng.integers(5, 10, 30).tolist(), rng.integers(0, 5, 30).tolist())
    theirs = _confusions(rng.integers(3, 10, 30).tolist(), rng.integers(0, 7, 30).tolist())
    first = paired_bootstrap(ours, theirs, resamples=300, seed=3)
    assert first == paired_bootstrap(ours, theirs, resamples=300, seed=3)
    for figure in first.values():
        low, high = figure["interval"]
        assert low <= figure["difference"] <= high


def test_paired_comparison_needs_the_same_images():
    with pytest.raises(ModelError, match="same images"):
        paired_bootstrap(_confusions([1, 2], [1, 1]), _confusions([1], [1]))


def test_a_release_records_the_champion_it_replaces():
    from petseg.release import bundle

    assert gate.replaced(_metrics(0.7)) is None
    champion = {**_champion(0.01), "location": "/releases/petseg-17", "model_fingerprint": "f" * 64}
    replaced = gate.replaced(_metrics(0.7, champion=champion))
    assert replaced == {"version": "petseg-17", "location": "/releases/petseg-17", "model_fingerprint": "f" * 64,
                        "comparable": True}
    manifest = bundle.build_manifest(run_id="18", flow_name="PetSegFlow", model_fingerprint="a" * 64,
                                     dataset_fingerprint="d" * 64, code_version="0.1.0", metrics={}, settings={},
                                     location="/releases/petseg-18", image_size=128, replaces=replaced)
    assert manifest["replaces"] == replaced


def test_a_champion_that_no_longer_loads_travels_with_the_reason(tmp_path):
    (tmp_path / "petseg-17").mkdir()
    lost = gate.load_champion(str(tmp_path / "petseg-17"), version="petseg-17")
    assert lost.model is None and lost.version == "petseg-17"
    assert lost.problem.startswith("champion petseg-17 did not load: release ") and "lacks model.keras" in lost.problem
