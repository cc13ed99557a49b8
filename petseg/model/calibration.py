"""Isotonic calibration of pixel probabilities, stored as plain arrays.

A segmentation model's softmax outputs are often over- or under-confident.
Isotonic regression (pool-adjacent-violators) fits, per class, the monotone
map from predicted probability to observed frequency on the calibration split
(one-vs-rest); the three calibrated values of a pixel are then divided by
their sum, so they are again a distribution over pet, background and border.
The map is a list of (threshold, value) points applied with `np.interp`, stored
as JSON (`to_dict`, `from_dict`): the serving process loads it without unpickling anything (the
original stored a pickled scikit-learn object).
"""

from dataclasses import dataclass

import numpy as np

from petseg.errors import ModelError

FORMAT = "petseg-isotonic-v2"
"""v2: per class, renormalised to sum to one (v1 calibrated independent sigmoid channels)."""
MASK_SOURCES = ("calibrated", "raw")
"""The probabilities a served mask can come from."""


@dataclass(frozen=True)
class Calibration:
    """One monotone map per class, np.interp(p, thresholds[c], values[c]), then renormalised.

    Attributes:
        thresholds: Per channel, strictly increasing probabilities.
        values: Per channel, calibrated probabilities at those thresholds
            (non-decreasing, in [0, 1]).
    """

    thresholds: tuple[np.ndarray, ...]
    values: tuple[np.ndarray, ...]

    def apply(self, probs) -> np.ndarray:
        """Calibrates class probabilities; inputs outside a class's range get its end values.

        Args:
            probs: Array (..., classes).

        Returns:
            float32 array of the same shape, summing to one over the last axis
            (a pixel whose calibrated values are all 0 keeps its raw ones).

        Raises:
            ModelError: The last axis does not have one entry per channel.
        """
        probs = np.asarray(probs, dtype=np.float32)
        if probs.ndim == 0 or probs.shape[-1] != len(self.thresholds):
            raise ModelError(
                f"calibration has {len(self.thresholds)} channels, probabilities have shape {probs.shape}"
            )
        out = np.empty_like(probs)
        for channel, (x, y) in enumerate(zip(self.thresholds, self.values)):
            out[..., channel] = np.interp(probs[..., channel], x, y)
        total = out.sum(axis=-1, keepdims=True)
        return np.where(total > 0, out / np.maximum(total, np.float32(1e-12)), probs).astype(np.float32)

    def to_dict(self) -> dict:
        """JSON-able form: {"format", "channels": [{"thresholds": [...], "values": [...]}]}."""
        return {
            "format": FORMAT,
            "channels": [
                {"thresholds": x.tolist(), "values": y.tolist()}
                for x, y in zip(self.thresholds, self.values)
            ],
        }

    @classmethod
    def from_dict(cls, data: dict) -> "Calibration":
        """Checks and reads what `to_dict` wrote.

        Raises:
            ModelError: A field is missing or malformed; the message names it.
        """
        if not isinstance(data, dict):
            raise ModelError(f"calibration must be a JSON object, got {type(data).__name__}")
        if data.get("format") != FORMAT:
            raise ModelError(f"field 'format' must be {FORMAT!r}, got {data.get('format')!r}")
        channels = data.get("channels")
        if not isinstance(channels, list) or not channels:
            raise ModelError("field 'channels' must be a non-empty list")
        thresholds, values = [], []
        for index, channel in enumerate(channels):
            if not isinstance(channel, dict):
                raise ModelError(f"field 'channels[{index}]' must be an object")
            x = _float_array(channel, "thresholds", index)
            y = _float_array(channel, "values", index)
            if x.shape != y.shape:
                raise ModelError(
                    f"fields 'channels[{index}].thresholds' and '.values' differ in length "
                    f"({x.size} and {y.size})"
                )
            if np.any(np.diff(x) <= 0):
                raise ModelError(f"field 'channels[{index}].thresholds' must be strictly increasing")
            if np.any(np.diff(y) < 0) or y[0] < 0 or y[-1] > 1:
                raise ModelError(f"field 'channels[{index}].values' must be non-decreasing within [0, 1]")
            thresholds.append(x)
            values.append(y)
        return cls(tuple(thresholds), tuple(values))


def _float_array(channel: dict, field: str, index: int) -> np.ndarray:
    name = f"channels[{index}].{field}"
    raw = channel.get(field)
    if not isinstance(raw, list) or not raw:
        raise ModelError(f"field '{name}' must be a non-empty list of numbers")
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in raw):
        raise ModelError(f"field '{name}' must hold only numbers")
    array = np.asarray(raw, dtype=np.float64)
    if not np.all(np.isfinite(array)):
        raise ModelError(f"field '{name}' must hold finite numbers")
    return array


def fit(probs, labels) -> Calibration:
    """Fits one isotonic map per channel.

    Args:
        probs: Predicted probabilities (..., channels).
        labels: Binary truth of the same shape.

    Returns:
        The calibration.

    Raises:
        ModelError: Shapes differ or there is nothing to fit.
    """
    probs = np.asarray(probs, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.float64)
    if probs.shape != labels.shape or probs.ndim < 2 or probs.size == 0:
        raise ModelError(
            f"calibration needs probabilities and labels of one shape (..., channels), "
            f"got {probs.shape} and {labels.shape}"
        )
    channels = probs.shape[-1]
    probs = probs.reshape(-1, channels)
    labels = labels.reshape(-1, channels)
    maps = [_isotonic(probs[:, c], labels[:, c]) for c in range(channels)]
    return Calibration(tuple(x for x, _ in maps), tuple(y for _, y in maps))


def _isotonic(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Pool-adjacent-violators: the non-decreasing fit of y on x, least squares.

    Returns the (threshold, value) points where the fitted step function starts
    and ends each constant block; np.interp between them reproduces the fit
    and interpolates linearly across gaps, as scikit-learn's IsotonicRegression.
    """
    # Equal x values must get one fitted value: pool them first, weighted.
    unique_x, inverse, weights = np.unique(x, return_inverse=True, return_counts=True)
    means = np.bincount(inverse, weights=y) / weights
    # Each block: [mean, weight, index of its first unique x, index of its last].
    blocks: list[list[float]] = []
    for i, (mean, weight) in enumerate(zip(means.tolist(), weights.tolist())):
        blocks.append([mean, weight, i, i])
        while len(blocks) > 1 and blocks[-2][0] >= blocks[-1][0]:
            last = blocks.pop()
            prev = blocks[-1]
            total = prev[1] + last[1]
            prev[0] = (prev[0] * prev[1] + last[0] * last[1]) / total
            prev[1] = total
            prev[3] = last[3]
    thresholds, values = [], []
    for mean, _, first, last in blocks:
        for i in sorted({first, last}):
            thresholds.append(unique_x[i])
            values.append(mean)
    return np.asarray(thresholds), np.clip(np.asarray(values), 0.0, 1.0)


def mask_source(validation: dict) -> tuple[str, str]:
    """Which probabilities the served mask comes from, decided on validation figures only.

    Calibration per class, renormalised, can move a pixel's argmax, so the
    calibrated mask may be worse than the raw model's. The rule: the calibrated
    mask is served when its validation mIoU is at least the raw model's, the raw
    mask otherwise; so the served mask never scores below the raw model on
    validation. The calibrated probabilities are still there for whoever asks.

    Args:
        validation: ``{"raw": {"miou": ...}, "calibrated": {"miou": ...}}`` on the validation split.

    Returns:
        (one of `MASK_SOURCES`, a sentence with the figures).

    Raises:
        ModelError: a figure is missing.
    """
    try:
        raw, calibrated = float(validation["raw"]["miou"]), float(validation["calibrated"]["miou"])
    except (KeyError, TypeError, ValueError):
        raise ModelError("choosing the served mask needs the validation mIoU of the raw and the calibrated "
                         f"model, got {sorted(validation) if isinstance(validation, dict) else validation!r}") from None
    figures = f"validation mIoU {calibrated:.4f} calibrated, {raw:.4f} raw"
    if calibrated >= raw:
        return "calibrated", f"served mask: calibrated ({figures}; calibration does not lower it)"
    return "raw", (f"served mask: raw ({figures}; calibration moves the argmax and lowers it, so the mask comes "
                   "from the raw probabilities and the calibrated ones are served on request)")


def _bin_stats(probs, labels, bins: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    probs = np.asarray(probs, dtype=np.float64).ravel()
    labels = np.asarray(labels, dtype=np.float64).ravel()
    if probs.shape != labels.shape or probs.size == 0:
        raise ModelError(f"need as many labels as probabilities, got {probs.size} and {labels.size}")
    if bins < 1:
        raise ModelError(f"bins must be at least 1, got {bins}")
    # Equal-width bins over [0, 1]; a probability of exactly 1 falls in the last.
    index = np.minimum((probs * bins).astype(np.int64), bins - 1)
    counts = np.bincount(index, minlength=bins)
    prob_sums = np.bincount(index, weights=probs, minlength=bins)
    label_sums = np.bincount(index, weights=labels, minlength=bins)
    return counts, prob_sums, label_sums


def expected_calibration_error(probs, labels, bins: int = 15) -> float:
    """Expected calibration error: sum over bins of (share of pixels) * |mean p - frequency|.

    All channels are pooled, each pixel-channel value counting once.

    Args:
        probs: Probabilities, any shape.
        labels: Binary truth, same number of values.
        bins: Number of equal-width bins over [0, 1].
    """
    counts, prob_sums, label_sums = _bin_stats(probs, labels, bins)
    return float(np.sum(np.abs(prob_sums - label_sums)) / np.sum(counts))


def reliability_curve(probs, labels, bins: int = 15) -> dict:
    """Data for a reliability diagram, JSON-able.

    Returns:
        bin_centers, mean_predicted, observed_frequency (None for empty bins)
        and counts, one entry per bin.
    """
    counts, prob_sums, label_sums = _bin_stats(probs, labels, bins)
    filled = counts > 0
    safe = np.maximum(counts, 1)
    return {
        "bin_centers": ((np.arange(bins) + 0.5) / bins).tolist(),
        "mean_predicted": [float(v) if f else None for v, f in zip(prob_sums / safe, filled)],
        "observed_frequency": [float(v) if f else None for v, f in zip(label_sums / safe, filled)],
        "counts": counts.tolist(),
    }


def collect(model, dataset, *, max_pixels: int = 200_000, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Predicts over a dataset and keeps a bounded, uniform sample of pixels.

    Streams batch by batch: every pixel gets a key from a generator seeded with
    `seed`, and the `max_pixels` pixels with the smallest keys are kept (a
    uniform sample without replacement). The same model, dataset order and
    seed give the same sample.

    Args:
        model: Keras model from images to (batch, h, w, channels) probabilities.
        dataset: Yields (images, one-hot masks) batches.
        max_pixels: Most pixels kept (each with all its channels).
        seed: Seed of the sampling keys.

    Returns:
        probs and labels, float32 arrays of shape (pixels, channels).
    """
    if max_pixels < 1:
        raise ModelError(f"max_pixels must be at least 1, got {max_pixels}")
    rng = np.random.default_rng(seed)
    keys = np.empty(0)
    probs = labels = None
    for images, masks in dataset:
        batch_probs = np.asarray(model.predict_on_batch(images), dtype=np.float32)
        channels = batch_probs.shape[-1]
        batch_probs = batch_probs.reshape(-1, channels)
        batch_labels = np.asarray(masks, dtype=np.float32).reshape(-1, channels)
        batch_keys = rng.random(len(batch_probs))
        if probs is None:
            keys, probs, labels = batch_keys, batch_probs, batch_labels
        else:
            keys = np.concatenate([keys, batch_keys])
            probs = np.concatenate([probs, batch_probs])
            labels = np.concatenate([labels, batch_labels])
        if len(keys) > max_pixels:
            keep = np.sort(np.argpartition(keys, max_pixels - 1)[:max_pixels])
            keys, probs, labels = keys[keep], probs[keep], labels[keep]
    if probs is None:
        raise ModelError("the calibration dataset is empty")
    return probs, labels


def summary(calibration: Calibration, probs, labels, *, bins: int = 15) -> dict:
    """Calibration quality on held-out pixels, before and after.

    Args:
        calibration: The fitted calibration.
        probs: Uncalibrated probabilities (pixels, channels), e.g. from `collect`
            on the test split.
        labels: Binary truth of the same shape.
        bins: Number of bins.

    Returns:
        pixels, ece_before, ece_after, reliability_before, reliability_after.
    """
    calibrated = calibration.apply(probs)
    return {
        "pixels": int(np.asarray(probs).shape[0]),
        "ece_before": expected_calibration_error(probs, labels, bins),
        "ece_after": expected_calibration_error(calibrated, labels, bins),
        "reliability_before": reliability_curve(probs, labels, bins),
        "reliability_after": reliability_curve(calibrated, labels, bins),
    }
