"""Predictors that learn nothing about shape, to set a model's figures beside.

A model's IoU means something only next to what a trivial predictor scores on
the same split. Each baseline is fitted on the training split in one pass and
predicts class probabilities like the model, so `petseg.model.metrics` scores both
the same way:

- all-background: every pixel is background (the majority class);
- mean-mask: every image gets the per-pixel class frequencies of the training
  masks (where pets usually are);
- colour-position: a lookup table from (quantised colour, coarse position) to
  the class frequencies seen there in training, backing off to the mean mask
  for cells it never saw. It knows colours and places, not shapes.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from petseg.model.metrics import SegmentationMetrics
from petseg.oxford import CLASSES

NAMES = ("all-background", "mean-mask", "colour-position")
COLOUR_LEVELS = 4
"""Levels per RGB channel (4 x 4 x 4 = 64 colours)."""
POSITION_CELLS = 8
"""The image is cut into 8 x 8 cells for the lookup."""
_BACKGROUND = CLASSES.index("background")


class Baselines:
    """The three baselines, fitted together in one pass over (images, one-hot masks) batches."""

    def __init__(self) -> None:
        self.mask_sum: np.ndarray | None = None  # (H, W, 3) class counts per pixel
        self.table: np.ndarray | None = None  # (colours * cells, 3) class counts
        self.images = 0

    def update(self, images, masks) -> None:
        """Adds a training batch: images (B, H, W, 3) in [0, 1], one-hot masks (B, H, W, 3)."""
        images = np.asarray(images, dtype=np.float32)
        masks = np.asarray(masks, dtype=np.float32)
        if self.mask_sum is None:
            height, width = masks.shape[1:3]
            self.mask_sum = np.zeros((height, width, len(CLASSES)), dtype=np.float64)
            self.table = np.zeros((COLOUR_LEVELS ** 3 * POSITION_CELLS ** 2, len(CLASSES)), dtype=np.float64)
        self.mask_sum += masks.sum(axis=0)
        keys = self._keys(images).ravel()
        for index in range(len(CLASSES)):
            self.table[:, index] += np.bincount(keys, weights=masks[..., index].ravel(), minlength=len(self.table))
        self.images += len(images)

    def _keys(self, images: np.ndarray) -> np.ndarray:
        """(B, H, W) lookup-table row of every pixel: colour bin times position cell."""
        levels = np.minimum((images * COLOUR_LEVELS).astype(np.int64), COLOUR_LEVELS - 1)
        colour = (levels[..., 0] * COLOUR_LEVELS + levels[..., 1]) * COLOUR_LEVELS + levels[..., 2]
        height, width = images.shape[1:3]
        rows = np.arange(height) * POSITION_CELLS // height
        cols = np.arange(width) * POSITION_CELLS // width
        cell = rows[:, None] * POSITION_CELLS + cols[None, :]
        return colour * POSITION_CELLS ** 2 + cell

    def predict(self, name: str, images) -> np.ndarray:
        """Class probabilities (B, H, W, 3) of baseline ``name`` for a batch of images."""
        if self.mask_sum is None:
            raise ValueError("the baselines are not fitted: call update with training batches first")
        images = np.asarray(images, dtype=np.float32)
        batch = len(images)
        mean_mask = self.mask_sum / self.images
        if name == "all-background":
            probs = np.zeros((batch, *mean_mask.shape), dtype=np.float32)
            probs[..., _BACKGROUND] = 1.0
            return probs
        if name == "mean-mask":
            return np.broadcast_to(mean_mask.astype(np.float32), (batch, *mean_mask.shape)).copy()
        if name == "colour-position":
            counts = self.table[self._keys(images)]  # (B, H, W, 3)
            # One pseudo-count of the mean mask: unseen cells fall back to where pets usually are.
            probs = (counts + mean_mask) / (counts.sum(axis=-1, keepdims=True) + 1.0)
            return probs.astype(np.float32)
        raise ValueError(f"unknown baseline {name!r}: expected one of {', '.join(NAMES)}")


def fit(batches: Iterable) -> Baselines:
    """Fits every baseline on (images, one-hot masks) batches of the training split."""
    baselines = Baselines()
    for images, masks in batches:
        baselines.update(images, masks)
    if not baselines.images:
        raise ValueError("no training images to fit the baselines on")
    return baselines


def score(baselines: Baselines, batches: Iterable, *, bootstrap: int = 0, seed: int = 0) -> dict:
    """Every baseline's metrics over (images, one-hot masks) batches, in one pass.

    Returns:
        {baseline name: `SegmentationMetrics.result`}.
    """
    metrics = {name: SegmentationMetrics() for name in NAMES}
    for images, masks in batches:
        for name, accumulator in metrics.items():
            accumulator.update(masks, baselines.predict(name, images))
    return {name: accumulator.result(bootstrap=bootstrap, seed=seed) for name, accumulator in metrics.items()}

