"""The evaluate step's figures: the model, raw and calibrated, beside the baselines on validation and test images;
the probabilities its served mask comes from; and the serving champion scored on the same images, paired.

Validation figures are what the release decides on (`petseg.model.calibration.mask_source`, `petseg.release.gate`);
test figures, with 95 % bootstrap intervals, are the report.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from petseg.model import baselines, calibration
from petseg.model.calibration import Calibration
from petseg.model.metrics import SegmentationMetrics, paired_bootstrap
from petseg.oxford import CLASSES

SPLITS = ("validation", "test")
"""The splits the model is scored on: validation decides, test reports."""


@dataclasses.dataclass(frozen=True)
class Champion:
    """The release serving now, as evaluate scores it beside a candidate.

    Attributes:
        version: Its release version (``petseg-<run id>``).
        location: Where the release is.
        model: Its Keras model (None when it could not be loaded: see ``problem``).
        calibration: Its calibration.
        mask_source: The probabilities its served mask comes from (`petseg.model.calibration.MASK_SOURCES`).
        image_size: The side of the images it takes.
        model_fingerprint: Its model fingerprint.
        problem: Why it cannot be scored ("" when it can).
    """

    version: str
    location: str
    model: object = None
    calibration: Calibration | None = None
    mask_source: str = "calibrated"
    image_size: int = 0
    model_fingerprint: str = ""
    problem: str = ""

    def probabilities(self, images) -> np.ndarray:
        """The probabilities its served mask comes from, at the size of ``images`` (resized both ways when its
        image size differs)."""
        import tensorflow as tf

        images = tf.convert_to_tensor(images)
        side = int(images.shape[1])
        if side != self.image_size:
            images = tf.image.resize(images, (self.image_size, self.image_size), antialias=True)
        probs = self.model.predict_on_batch(images)
        if self.mask_source == "calibrated":
            probs = self.calibration.apply(probs)
        if side != self.image_size:
            probs = tf.image.resize(probs, (side, side)).numpy()
        return np.asarray(probs, dtype=np.float32)


def comparable(champion: Champion) -> str | None:
    """Why a champion cannot be scored on the candidate's images, or None when it can."""
    if champion.problem:
        return champion.problem
    classes = champion.model.output_shape[-1]
    if classes != len(CLASSES):
        return (f"champion {champion.version} predicts {classes} classes, not the {len(CLASSES)} of these masks "
                f"({', '.join(CLASSES)}); it cannot be scored on the same images")
    return None


def _score(model, fitted: Calibration, dataset, champion: Champion | None) -> dict[str, SegmentationMetrics]:
    """One pass over a split: the model raw and calibrated, and the champion's served mask."""
    scored = {"raw": SegmentationMetrics(), "calibrated": SegmentationMetrics()}
    if champion is not None:
        scored["champion"] = SegmentationMetrics()
    for images, masks in dataset:
        probs = model.predict_on_batch(images)
        scored["raw"].update(masks, probs)
        scored["calibrated"].update(masks, fitted.apply(probs))
        if champion is not None:
            scored["champion"].update(masks, champion.probabilities(images))
    return scored


def figures(model, fitted: Calibration, *, training, validation, test, image_size: int, seed: int,
            bootstrap: int, champion: Champion | None = None) -> dict:
    """Every figure of the evaluate step.

    Args:
        model: The candidate.
        fitted: Its calibration.
        training, validation, test: ``tf.data`` batches of (images, one-hot masks); baselines are fitted on training.
        image_size: The side of those images (the candidate's).
        seed: Seed of the bootstrap resampling and of the held-out pixel sample.
        bootstrap: Resamples for the test intervals and the paired differences.
        champion: The release serving now, or None (a first release).

    Returns:
        ``raw``, ``calibrated`` and ``baselines`` on test (with intervals); ``validation`` with ``raw``,
        ``calibrated`` and ``baselines``; ``mask`` (``source``, ``reason``: `petseg.model.calibration.mask_source`);
        ``ece`` on held-out test pixels; and ``champion`` (`champion_figures`) when there is one.
    """
    lookup = baselines.fit(training.as_numpy_iterator())
    why_not = comparable(champion) if champion is not None else None
    scoring = champion if why_not is None else None
    runs = {split: _score(model, fitted, dataset, scoring) for split, dataset in zip(SPLITS, (validation, test))}
    metrics = {
        "raw": runs["test"]["raw"].result(bootstrap=bootstrap, seed=seed),
        "calibrated": runs["test"]["calibrated"].result(bootstrap=bootstrap, seed=seed),
        "baselines": baselines.score(lookup, test.as_numpy_iterator(), bootstrap=bootstrap, seed=seed),
        "validation": {"raw": runs["validation"]["raw"].result(),
                       "calibrated": runs["validation"]["calibrated"].result(),
                       "baselines": baselines.score(lookup, validation.as_numpy_iterator())},
    }
    source, reason = calibration.mask_source(metrics["validation"])
    metrics["mask"] = {"source": source, "reason": reason}
    held_out = calibration.summary(fitted, *calibration.collect(model, test, seed=seed))
    metrics["ece"] = {"raw": held_out["ece_before"], "calibrated": held_out["ece_after"]}
    if champion is not None:
        metrics["champion"] = champion_figures(champion, runs, source=source, why_not=why_not,
                                               image_size=image_size, bootstrap=bootstrap, seed=seed)
    return metrics


def champion_figures(champion: Champion, runs: dict, *, source: str, why_not: str | None, image_size: int,
                     bootstrap: int, seed: int) -> dict:
    """The champion beside the candidate's served mask, on the same images of each split.

    Returns:
        ``version``, ``location``, ``model_fingerprint``, ``image_size``, ``mask_source``, ``comparable``
        and ``note`` (why not, or how it was scored); when comparable, per split its figures and
        ``difference``: candidate minus champion per headline figure, with a paired bootstrap interval
        over the same images (`petseg.model.metrics.paired_bootstrap`).
    """
    note = why_not or ""
    if why_not is None and champion.image_size != image_size:
        note = (f"champion {champion.version} takes {champion.image_size}-pixel images, the candidate "
                f"{image_size}: the same images were resized to its size and its probabilities back, as its "
                "server resizes requests")
    out = {"version": champion.version, "location": champion.location, "model_fingerprint": champion.model_fingerprint,
           "image_size": champion.image_size, "mask_source": champion.mask_source, "comparable": why_not is None,
           "note": note}
    if why_not is not None:
        return out
    for split in SPLITS:
        candidate, held = runs[split][source], runs[split]["champion"]
        out[split] = held.result()
        out[split]["difference"] = paired_bootstrap(np.asarray(candidate.confusions), np.asarray(held.confusions),
                                                    resamples=bootstrap, seed=seed)
    return out
