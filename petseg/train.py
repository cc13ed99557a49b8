"""Training and streaming evaluation.

Training is bitwise reproducible when the process called
`petseg.determinism.configure(strict=True)` first and the datasets come in a
fixed order: the same seed, threads and data give the same weight bytes.
"""

import keras
import tensorflow as tf

from petseg import model as models
from petseg.calibration import Calibration
from petseg.metrics import SegmentationMetrics, bce_jaccard_loss


def fit(
    *,
    train: tf.data.Dataset,
    validation: tf.data.Dataset,
    arch: str,
    epochs: int,
    learning_rate: float,
    seed: int,
    log_dir: str | None = None,
    callbacks: list[keras.callbacks.Callback] | None = None,
    verbose: int = 2,
) -> tuple[keras.Model, dict]:
    """Builds and trains a model with Adam on the binary cross-entropy + Jaccard loss.

    Args:
        train: Batches of (images, one-hot masks), in a fixed order.
        validation: Batches for the end-of-epoch validation loss.
        arch: Model architecture, see `petseg.model.build`.
        epochs: Number of passes over `train`.
        learning_rate: Adam learning rate.
        seed: Seeds the weight initialisation (Keras' global seed is reset to
            it before the model is built).
        log_dir: Where TensorBoard logs go; None for no logs.
        callbacks: More Keras callbacks, e.g. timers.
        verbose: Keras progress output: 0 silent, 2 one line per epoch.

    Returns:
        The trained model and its history: {"loss": [...], "iou": [...],
        "val_loss": [...], "val_iou": [...]}, one Python float per epoch.
    """
    image_size = train.element_spec[0].shape[1]
    keras.utils.set_random_seed(seed)
    model = models.build(arch, image_size=image_size)
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate=learning_rate),
        loss=bce_jaccard_loss,
        # Positive-class IoU of the binarised maps, as SegmentationMetrics' "iou".
        metrics=[keras.metrics.BinaryIoU(target_class_ids=[1], threshold=0.5, name="iou")],
    )
    callbacks = list(callbacks or [])
    if log_dir:
        callbacks.append(keras.callbacks.TensorBoard(log_dir=log_dir))
    history = model.fit(
        train, validation_data=validation, epochs=epochs, callbacks=callbacks, shuffle=False, verbose=verbose
    )
    return model, {name: [float(v) for v in values] for name, values in history.history.items()}


def evaluate(model: keras.Model, dataset: tf.data.Dataset, calibration: Calibration | None = None) -> dict:
    """Streams a dataset through a model and computes the segmentation metrics.

    Args:
        model: A trained model.
        dataset: Batches of (images, one-hot masks).
        calibration: Applied to the probabilities first, if given.

    Returns:
        SegmentationMetrics' result: iou, f1, mean_iou, accuracy, precision, loss.
    """
    metrics = SegmentationMetrics()
    for images, masks in dataset:
        probs = model.predict_on_batch(images)
        if calibration is not None:
            probs = calibration.apply(probs)
        metrics.update(masks, probs)
    return metrics.result()
