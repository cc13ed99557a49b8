"""Loss and streaming metrics for 3-class segmentation (pet, background, border).

The model ends in a softmax over the three trimap classes; a pixel's predicted
class is the argmax. From the confusion matrix of predicted against true class
come the Oxford/VOC figures: IoU per class, their mean (mIoU) and pixel
accuracy. Beside them, for comparison with the original project's published
figures, the soft per-image IoU and F1 averaged over classes (the
segmentation-models library's definitions) and binary accuracy of the
probabilities thresholded at 0.5.

Evaluation streams: `SegmentationMetrics.update` keeps one 3x3 confusion matrix
and a few sums per image (not the pixels), so a split of any size takes one
pass, and 95 % bootstrap intervals resample those per-image records.
"""

import keras
import numpy as np

from petseg.errors import ModelError
from petseg.oxford import CLASSES

HEADLINE = ("pet_iou", "background_iou", "border_iou", "miou", "pixel_accuracy")
"""The figures reported with a bootstrap interval."""
# segmentation-models' smoothing of the soft scores (keeps 0/0 at 1 for a class absent from both).
SOFT_SMOOTH = 1e-5
# Added to both sides of the soft Dice term of the loss, so an empty class predicted empty scores 1.
DICE_SMOOTH = 1.0
DICE_WEIGHT = 0.5
"""Weight of the soft Dice term beside the cross-entropy in `segmentation_loss`."""


@keras.saving.register_keras_serializable(package="petseg")
def segmentation_loss(y_true, y_pred):
    """Categorical cross-entropy plus a soft Dice term, per image.

    The cross-entropy is the mean over pixels; the Dice term (one minus the
    soft Dice averaged over the three classes) lifts the thin border class,
    about 5 % of the pixels, that cross-entropy alone learns last.

    Args:
        y_true: One-hot masks (batch, height, width, classes).
        y_pred: Softmax probabilities of the same shape.

    Returns:
        Loss per image, shape (batch,); Keras averages it over the batch.
    """
    y_pred = keras.ops.convert_to_tensor(y_pred)
    y_true = keras.ops.cast(y_true, y_pred.dtype)
    cross_entropy = keras.ops.mean(keras.losses.categorical_crossentropy(y_true, y_pred), axis=(1, 2))
    intersection = keras.ops.sum(y_true * y_pred, axis=(1, 2))
    sums = keras.ops.sum(y_true + y_pred, axis=(1, 2))
    dice = keras.ops.mean((2.0 * intersection + DICE_SMOOTH) / (sums + DICE_SMOOTH), axis=-1)
    return cross_entropy + DICE_WEIGHT * (1.0 - dice)


def _ratio(numerator, denominator):
    """Elementwise numerator / denominator, 0 where the denominator is 0 (Keras' convention)."""
    numerator = np.asarray(numerator, dtype=np.float64)
    denominator = np.asarray(denominator, dtype=np.float64)
    return np.divide(numerator, denominator, out=np.zeros(np.broadcast(numerator, denominator).shape),
                     where=denominator != 0)


def scores(confusion: np.ndarray) -> dict:
    """Per-class IoU, mIoU and pixel accuracy from a confusion matrix.

    Args:
        confusion: (..., 3, 3) counts, rows the true class, columns the predicted.

    Returns:
        pet_iou, background_iou, border_iou, miou and pixel_accuracy, floats
        (or arrays over the leading axes). A class absent from both truth and
        prediction has IoU 0 and still counts in the mean, so that the mean
        always has the same three terms.
    """
    confusion = np.asarray(confusion, dtype=np.float64)
    hits = np.diagonal(confusion, axis1=-2, axis2=-1)
    unions = confusion.sum(axis=-1) + confusion.sum(axis=-2) - hits
    iou = _ratio(hits, unions)
    out = {f"{name}_iou": iou[..., index] for index, name in enumerate(CLASSES)}
    out["miou"] = iou.mean(axis=-1)
    out["pixel_accuracy"] = _ratio(hits.sum(axis=-1), confusion.sum(axis=(-2, -1)))
    return out


class SegmentationMetrics:
    """Accumulates per-image confusion matrices, soft scores and the loss over batches.

    Example:
        metrics = SegmentationMetrics()
        for images, masks in dataset:
            metrics.update(masks, model.predict_on_batch(images))
        metrics.result()
    """

    def __init__(self) -> None:
        self.confusions: list[np.ndarray] = []  # one (3, 3) int64 matrix per image
        self.soft_iou: list[np.ndarray] = []  # per image, mean over classes
        self.soft_f1: list[np.ndarray] = []
        self.binary_hits = 0
        self.loss_sum = 0.0
        self.pixels = 0

    def update(self, y_true, y_prob) -> None:
        """Adds one batch.

        Args:
            y_true: One-hot masks (batch, height, width, 3), array or tensor.
            y_prob: Class probabilities of the same shape.

        Raises:
            ModelError: The shapes differ or are not (batch, height, width, 3).
        """
        target = np.asarray(y_true, dtype=np.float32)
        prob = np.asarray(y_prob, dtype=np.float32)
        if target.shape != prob.shape or target.ndim != 4 or target.shape[-1] != len(CLASSES):
            raise ModelError(
                f"predictions of shape {prob.shape} do not match masks of shape {target.shape} "
                f"(expected both (batch, height, width, {len(CLASSES)}))"
            )
        batch, height, width, classes = prob.shape
        codes = np.argmax(target, axis=-1) * classes + np.argmax(prob, axis=-1)
        offsets = np.arange(batch)[:, None] * classes * classes
        counts = np.bincount((codes.reshape(batch, -1) + offsets).ravel(), minlength=batch * classes * classes)
        self.confusions.extend(counts.reshape(batch, classes, classes).astype(np.int64))
        intersection = np.sum(target * prob, axis=(1, 2), dtype=np.float64)
        sums = np.sum(target + prob, axis=(1, 2), dtype=np.float64)
        self.soft_iou.extend(np.mean((intersection + SOFT_SMOOTH) / (sums - intersection + SOFT_SMOOTH), axis=-1))
        self.soft_f1.extend(np.mean((2 * intersection + SOFT_SMOOTH) / (sums + SOFT_SMOOTH), axis=-1))
        self.binary_hits += int(np.count_nonzero((prob > 0.5) == (target > 0.5)))
        losses = keras.ops.convert_to_numpy(segmentation_loss(target, np.clip(prob, 1e-7, 1.0)))
        self.loss_sum += float(np.sum(losses, dtype=np.float64)) * height * width
        self.pixels += batch * height * width

    @property
    def confusion(self) -> np.ndarray:
        """The pooled (3, 3) confusion matrix so far."""
        if not self.confusions:
            return np.zeros((len(CLASSES), len(CLASSES)), dtype=np.int64)
        return np.sum(self.confusions, axis=0)

    def result(self, *, bootstrap: int = 0, seed: int = 0) -> dict:
        """The metrics so far, as plain Python values.

        Args:
            bootstrap: Number of bootstrap resamples of the images for the 95 %
                intervals of the headline figures; 0 for none.
            seed: Seed of the resampling.

        Returns:
            pet_iou, background_iou, border_iou, miou, pixel_accuracy (pooled
            over all pixels), confusion (3x3 list, rows true, columns
            predicted, in CLASSES order), soft_iou and soft_f1 (per image,
            averaged over classes, then over images), binary_accuracy, loss
            (mean per pixel), images, and with ``bootstrap`` an ``intervals``
            dict of [low, high] per headline figure.
        """
        confusion = self.confusion
        out = {name: float(value) for name, value in scores(confusion).items()}
        out.update({
            "confusion": confusion.tolist(),
            "soft_iou": float(np.mean(self.soft_iou)) if self.soft_iou else 0.0,
            "soft_f1": float(np.mean(self.soft_f1)) if self.soft_f1 else 0.0,
            "binary_accuracy": float(_ratio(self.binary_hits, self.pixels * len(CLASSES))),
            "loss": float(_ratio(self.loss_sum, self.pixels)),
            "images": len(self.confusions),
        })
        if bootstrap and self.confusions:
            out["intervals"] = bootstrap_intervals(np.asarray(self.confusions), resamples=bootstrap, seed=seed)
        return out


def _resampled(confusions: np.ndarray, weights: np.ndarray) -> dict:
    """The headline figures of each resample: per-image confusion matrices pooled with ``weights``."""
    return scores(np.einsum("ri,ijk->rjk", weights, confusions.astype(np.float64)))


def _weights(images: int, *, resamples: int, seed: int) -> np.ndarray:
    """(resamples, images) counts: images drawn with replacement (multinomial), the same for a seed."""
    rng = np.random.default_rng(seed)
    return rng.multinomial(images, np.full(images, 1.0 / images), size=resamples)


def bootstrap_intervals(confusions: np.ndarray, *, resamples: int = 1000, seed: int = 0) -> dict:
    """95 % percentile intervals of the headline figures, resampling images with replacement.

    Args:
        confusions: (images, 3, 3) per-image confusion matrices.
        resamples: Number of resamples.
        seed: Seed of the resampling.

    Returns:
        {figure: [low, high]} for each of HEADLINE.
    """
    resampled = _resampled(confusions, _weights(len(confusions), resamples=resamples, seed=seed))
    return {name: [float(np.percentile(resampled[name], 2.5)), float(np.percentile(resampled[name], 97.5))]
            for name in HEADLINE}


def paired_bootstrap(candidate: np.ndarray, champion: np.ndarray, *, resamples: int = 1000, seed: int = 0) -> dict:
    """Candidate minus champion per headline figure on the same images, with a 95 % paired bootstrap interval.

    Each resample draws one set of images and pools both predictors' confusion
    matrices over it, so the interval is that of the difference on shared
    images (narrower than two separate intervals would suggest).

    Args:
        candidate, champion: (images, 3, 3) per-image confusion matrices, the same images in the same order.
        resamples: Number of resamples (0: the difference alone, its interval the point).
        seed: Seed of the resampling.

    Returns:
        {figure: {"difference": float, "interval": [low, high]}} for each of HEADLINE.

    Raises:
        ModelError: the two do not hold the same number of images, or none.
    """
    candidate, champion = np.asarray(candidate), np.asarray(champion)
    if candidate.shape != champion.shape or candidate.ndim != 3 or not len(candidate):
        raise ModelError(f"a paired comparison needs both predictors' confusion matrices on the same images, "
                         f"got shapes {candidate.shape} and {champion.shape}")
    point = {name: float(scores(candidate.sum(axis=0))[name] - scores(champion.sum(axis=0))[name])
             for name in HEADLINE}
    if not resamples:
        return {name: {"difference": value, "interval": [value, value]} for name, value in point.items()}
    weights = _weights(len(candidate), resamples=resamples, seed=seed)
    ours, theirs = _resampled(candidate, weights), _resampled(champion, weights)
    out = {}
    for name in HEADLINE:
        differences = ours[name] - theirs[name]
        out[name] = {"difference": point[name], "interval": [float(np.percentile(differences, 2.5)),
                                                             float(np.percentile(differences, 97.5))]}
    return out
