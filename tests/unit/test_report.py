"""What the card and the closing words say of the served mask and the champion."""

from petseg.model.metrics import HEADLINE
from petseg.release import report


def _figures(miou: float) -> dict:
    return {**{name: miou for name in HEADLINE}, "images": 12, "confusion": [[1, 0, 0], [0, 1, 0], [0, 0, 1]]}


def _metrics(champion: dict | None = None) -> dict:
    metrics = {"raw": _figures(0.72), "calibrated": _figures(0.71), "baselines": {"mean-mask": _figures(0.3)},
               "validation": {"raw": _figures(0.73), "calibrated": _figures(0.70), "baselines": {"mean-mask": _figures(0.3)}},
               "mask": {"source": "raw", "reason": "served mask: raw (validation mIoU 0.7000 calibrated, 0.7300 raw; "
                        "calibration moves the argmax and lowers it)"}}
    if champion is not None:
        metrics["champion"] = champion
    return metrics


def _champion() -> dict:
    def split(miou: float, difference: float) -> dict:
        return {**_figures(miou), "difference": {name: {"difference": difference,
                                                        "interval": [difference - 0.01, difference + 0.01]}
                                                 for name in HEADLINE}}

    return {"version": "petseg-17", "location": "/r/petseg-17", "model_fingerprint": "f" * 64, "image_size": 128,
            "mask_source": "calibrated", "comparable": True, "note": "", "validation": split(0.70, 0.03),
            "test": split(0.69, 0.03)}


def test_the_card_names_the_served_mask_and_why():
    metrics = _metrics()
    assert report.metrics_headers(metrics)[1:3] == ["model, raw (served)", "model, calibrated"]
    assert report.served_text(metrics).startswith("The served mask: raw (validation mIoU 0.7000 calibrated, 0.7300 raw")
    assert report.served_text(metrics).endswith("decided on the validation split only.")
    assert report.target_rows(metrics)[1][2] == "0.7200"  # the raw mask's test mIoU
    assert report.validation_rows(metrics)[:2] == [["model, raw", "0.7300"], ["model, calibrated", "0.7000"]]


def test_the_card_sets_the_champion_beside_the_candidate():
    metrics = _metrics(_champion())
    text = report.champion_text(metrics)
    assert text.startswith("The serving release petseg-17 (calibrated mask), scored on the same images")
    rows = report.champion_rows(metrics)
    assert len(rows) == len(HEADLINE) and len(rows[0]) == len(report.CHAMPION_HEADERS)
    assert rows[3] == ["mIoU", "0.7300", "0.7000", "+0.0300 [+0.020, +0.040]", "0.7200", "0.6900",
                       "+0.0300 [+0.020, +0.040]"]
    assert report.validation_rows(metrics)[-1] == ["champion petseg-17", "0.7000"]


def test_a_first_release_and_a_champion_not_compared_are_said_so():
    assert "this is a first release" in report.champion_text(_metrics())
    lost = {**_champion(), "comparable": False, "note": "champion petseg-17 predicts 2 classes, not the 3."}
    assert report.champion_text(_metrics(lost)) == ("The serving release was not compared: champion petseg-17 "
                                                    "predicts 2 classes, not the 3. The gate judged against the "
                                                    "baselines alone.")


def test_closing_words_point_at_the_endpoint():
    metrics = _metrics()
    deployment = {"url": "http://127.0.0.1:9000", "endpoint": "pets", "tokens_file": "/t.json"}
    facts = report.run_summary(metrics=metrics, dataset_fingerprint="d", model_fingerprint="m", released=True,
                               manifest={"version": "petseg-9"}, deployment=deployment)
    assert facts["test_miou"] == 0.72 and facts["best_baseline"] == "mean-mask"
    words = report.closing_words(facts, metrics=metrics, gate_message="Release gate passed.", flow_name="PetSegFlow",
                                 run_id="9")
    assert "serving at:   http://127.0.0.1:9000 (bearer tokens: /t.json), endpoint pets" in words
    assert "petseg status pets   (back: petseg rollback pets; stop: petseg stop pets)" in words
