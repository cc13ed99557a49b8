"""The release gate: whether a candidate model is released, from validation figures only.

A candidate is released when, on the validation split, the mask it would serve
(`served`):

1. reaches the floor ``min_miou``;
2. leads the best baseline (`petseg.model.baselines`) by ``min_margin``;
3. is not worse than the serving champion, scored on the same images, by more
   than ``tolerance`` (candidate minus champion mIoU, `petseg.model.metrics.paired_bootstrap`).

A first release (no champion) is judged by 1 and 2 alone, and so is a
candidate whose champion cannot be scored on its images (other classes): the
message says why. The test split is never read here: it stays an unbiased
estimate of the released model.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from petseg.errors import PetsegError

if TYPE_CHECKING:
    from petseg.model.evaluation import Champion

DEFAULT_TOLERANCE = 0.01
"""How much validation mIoU a candidate may lose against the champion and still replace it: one point.
That is a third of the half-width of the 95 % interval of the default run's test pet IoU on its ~120
images (0.789-0.855, README), so a candidate within the noise of the images replaces the champion (newer
data and code win a tie), while a clearly worse one does not; and a tenth of the lead the default gate
asks over the baselines (``--min_margin 0.1``)."""


def served(metrics: dict, split: str = "test") -> dict:
    """The figures of the mask a release serves, on ``split`` (``test`` or ``validation``) of the evaluate
    step's figures (`petseg.model.evaluation.figures`); figures from before the choice are of the calibrated mask."""
    source = metrics.get("mask", {}).get("source", "calibrated")
    return metrics[source] if split == "test" else metrics["validation"][source]


def decide(metrics: dict, *, min_miou: float, min_margin: float,
           tolerance: float = DEFAULT_TOLERANCE) -> tuple[bool, str]:
    """Decide whether a candidate is released (see the module docstring).

    Args:
        metrics: the evaluate step's figures (`petseg.model.evaluation.figures`); only ``validation``,
            ``mask`` and the validation part of ``champion`` are read.
        min_miou: the floor.
        min_margin: the lead over the best baseline.
        tolerance: how much worse than the champion the candidate may be (validation mIoU).

    Returns:
        (passed, a one-line message with the figures and the thresholds of every rule).
    """
    validation = metrics["validation"]
    miou = float(served(metrics, "validation")["miou"])
    name, scored = max(validation["baselines"].items(), key=lambda item: item[1]["miou"])
    baseline = float(scored["miou"])
    source = metrics.get("mask", {}).get("source", "calibrated")
    figures = [f"validation mIoU {miou:.4f} ({source} mask; floor {min_miou:.2f})",
               f"best baseline {name} {baseline:.4f} (required lead {min_margin:.2f}, got {miou - baseline:+.4f})"]
    passed = miou >= min_miou and miou - baseline >= min_margin
    champion = metrics.get("champion")
    if champion is None:
        figures.append("no champion (first release)")
    elif not champion["comparable"]:
        figures.append(f"champion not compared: {champion['note']}")
    else:
        difference = champion["validation"]["difference"]["miou"]
        low, high = difference["interval"]
        figures.append(f"against champion {champion['version']} {champion['validation']['miou']:.4f}: "
                       f"{difference['difference']:+.4f} [{low:+.4f}, {high:+.4f}] "
                       f"(tolerance {tolerance:.4f})")
        passed = passed and difference["difference"] >= -tolerance
    if passed:
        return True, f"Release gate passed: {'; '.join(figures)}."
    return False, (f"Release gate failed: {'; '.join(figures)}; the model is not deployed "
                   "(train longer, or change --min_miou / --min_margin / --tolerance).")


def load_champion(location: str, *, version: str = "", s3_endpoint_url: str | None = None) -> Champion:
    """The champion at a release location, verified as a server loads it (`petseg.release.bundle.load_release`).

    A release that does not load (moved, incomplete, no longer verifying) is
    not scored; the reason travels with it and the gate's message says it.
    """
    from petseg.model import evaluation
    from petseg.release import bundle

    try:
        loaded = bundle.load_release(location, s3_endpoint_url=s3_endpoint_url)
    except PetsegError as err:
        return evaluation.Champion(version=version or location, location=location,
                                   problem=f"champion {version or location} did not load: {err}")
    return evaluation.Champion(version=str(loaded.manifest.get("version") or version), location=location,
                               model=loaded.model, calibration=loaded.calibration, mask_source=loaded.mask_source,
                               image_size=loaded.image_size, model_fingerprint=loaded.fingerprint)


def replaced(metrics: dict) -> dict | None:
    """What a released candidate's manifest records of the champion it replaces (None for a first release)."""
    champion = metrics.get("champion")
    if champion is None:
        return None
    return {key: champion[key] for key in ("version", "location", "model_fingerprint", "comparable")}
