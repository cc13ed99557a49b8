"""Loss and streaming metrics for 3-channel sigmoid masks.

Each channel (pet, background, border) is a binary map. The metrics binarise
probabilities at 0.5 and pool one 2x2 confusion matrix over every pixel and
channel; iou, f1, precision, accuracy and mean_iou all derive from it, so
evaluation streams over a split in batches.
"""

import keras
import numpy as np

from petseg.errors import ModelError

THRESHOLD = 0.5
# Added to both sides of the soft IoU so that an image with an empty channel
# (no border pixels, say) that the model also predicts empty scores 1, not 0/0.
JACCARD_SMOOTH = 1.0


@keras.saving.register_keras_serializable(package="petseg")
def bce_jaccard_loss(y_true, y_pred):
    """Binary cross-entropy plus Jaccard (soft IoU) loss, per image.

    Both terms treat each channel as a binary map: the cross-entropy is the mean
    over pixels and channels, the soft IoU is computed per channel and averaged.

    Args:
        y_true: One-hot masks (batch, height, width, channels).
        y_pred: Probabilities of the same shape.

    Returns:
        Loss per image, shape (batch,); Keras averages it over the batch.
    """
    y_pred = keras.ops.convert_to_tensor(y_pred)
    y_true = keras.ops.cast(y_true, y_pred.dtype)
    bce = keras.ops.mean(keras.losses.binary_crossentropy(y_true, y_pred), axis=(1, 2))
    intersection = keras.ops.sum(y_true * y_pred, axis=(1, 2))
    union = keras.ops.sum(y_true + y_pred, axis=(1, 2)) - intersection
    jaccard = keras.ops.mean((intersection + JACCARD_SMOOTH) / (union + JACCARD_SMOOTH), axis=-1)
    return bce + 1.0 - jaccard


def _ratio(numerator: float, denominator: float) -> float:
    # Keras' convention: a metric with an empty denominator is 0.
    return float(numerator / denominator) if denominator else 0.0


class SegmentationMetrics:
    """Accumulates a binarised confusion matrix and the loss over batches.

    Example:
        metrics = SegmentationMetrics()
        for images, masks in dataset:
            metrics.update(masks, model.predict_on_batch(images))
        metrics.result()
    """

    def __init__(self) -> None:
        self.true_positive = 0
        self.false_positive = 0
        self.false_negative = 0
        self.true_negative = 0
        self.loss_sum = 0.0
        self.pixels = 0

    def update(self, y_true, y_prob) -> None:
        """Adds one batch.

        Args:
            y_true: One-hot masks (batch, height, width, channels), array or tensor.
            y_prob: Probabilities of the same shape.

        Raises:
            ModelError: The shapes differ or are not 4-D.
        """
        target = np.asarray(y_true, dtype=np.float32)
        prob = np.asarray(y_prob, dtype=np.float32)
        if target.shape != prob.shape or target.ndim != 4:
            raise ModelError(
                f"predictions of shape {prob.shape} do not match masks of shape {target.shape} "
                "(expected both (batch, height, width, channels))"
            )
        truth = target > THRESHOLD
        predicted = prob > THRESHOLD
        self.true_positive += int(np.count_nonzero(truth & predicted))
        self.false_positive += int(np.count_nonzero(~truth & predicted))
        self.false_negative += int(np.count_nonzero(truth & ~predicted))
        self.true_negative += int(np.count_nonzero(~truth & ~predicted))
        batch, height, width, _ = prob.shape
        losses = keras.ops.convert_to_numpy(bce_jaccard_loss(target, prob))
        # Weighted by pixels so that batches (and images) of any size count fairly.
        self.loss_sum += float(np.sum(losses, dtype=np.float64)) * height * width
        self.pixels += batch * height * width

    def result(self) -> dict:
        """The metrics so far, as Python floats.

        Returns:
            iou (of the positive class), f1, mean_iou (mean of positive and
            negative class IoU, like keras MeanIoU(num_classes=2) on the
            binarised maps), accuracy, precision and loss (mean per pixel).
        """
        tp, fp, fn, tn = self.true_positive, self.false_positive, self.false_negative, self.true_negative
        unions = (tp + fp + fn, tn + fp + fn)
        ious = (_ratio(tp, unions[0]), _ratio(tn, unions[1]))
        # Like Keras MeanIoU: a class absent from both truth and prediction is left out.
        present = [iou for iou, union in zip(ious, unions) if union]
        return {
            "iou": ious[0],
            "f1": _ratio(2 * tp, 2 * tp + fp + fn),
            "mean_iou": float(np.mean(present)) if present else 0.0,
            "accuracy": _ratio(tp + tn, tp + tn + fp + fn),
            "precision": _ratio(tp, tp + fp),
            "loss": _ratio(self.loss_sum, self.pixels),
        }
