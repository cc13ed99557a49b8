"""Training and streaming evaluation.

Training is bitwise reproducible when the process called
`petseg.model.determinism.configure(strict=True)` first (the one place a process
sets its seed) and the datasets come in a fixed order: the same seed, threads
and data give the same weight bytes.

The schedule is the one the original project tuned by hand, made automatic: a
cosine decay of the learning rate over the run (so the last epochs settle
instead of bouncing), and the weights of the epoch with the lowest validation
loss restored at the end (the original's ModelCheckpoint + EarlyStopping).
"""

import math
import time

import keras
import tensorflow as tf

from petseg.model import unet as models
from petseg.model.calibration import Calibration
from petseg.model.metrics import SegmentationMetrics, segmentation_loss
from petseg.oxford import CLASSES

WARMUP_EPOCHS = 1
"""Epochs at a tenth of the learning rate first: the batch statistics settle before large steps."""


def learning_rate_at(epoch: int, *, epochs: int, learning_rate: float) -> float:
    """The learning rate of an epoch (0-based): a short warm-up, then cosine decay to 1 % of the peak."""
    if epoch < WARMUP_EPOCHS and epochs > WARMUP_EPOCHS + 1:
        return learning_rate / 10
    start = WARMUP_EPOCHS if epochs > WARMUP_EPOCHS + 1 else 0
    progress = (epoch - start) / max(1, epochs - start)
    return learning_rate * (0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * progress)))


class _Schedule(keras.callbacks.Callback):
    """Sets the optimizer's learning rate at the start of each epoch and records it."""

    def __init__(self, *, epochs: int, learning_rate: float):
        super().__init__()
        self.epochs, self.learning_rate = epochs, learning_rate

    def on_epoch_begin(self, epoch, logs=None):
        self.model.optimizer.learning_rate.assign(
            learning_rate_at(epoch, epochs=self.epochs, learning_rate=self.learning_rate))

    def on_epoch_end(self, epoch, logs=None):
        if logs is not None:
            logs["learning_rate"] = float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate))


class _EpochLine(keras.callbacks.Callback):
    """One line per epoch: its number, the figures Keras logged and its duration."""

    def __init__(self, *, epochs: int, echo):
        super().__init__()
        self.epochs, self.echo, self.started = epochs, echo, 0.0

    def on_epoch_begin(self, epoch, logs=None):
        self.started = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        figures = "  ".join(f"{name} {value:.4g}" for name, value in (logs or {}).items())
        self.echo(f"epoch {epoch + 1}/{self.epochs}  {figures}  ({time.perf_counter() - self.started:.0f} s)")


def fit(
    *,
    train: tf.data.Dataset,
    validation: tf.data.Dataset,
    arch: str,
    epochs: int,
    learning_rate: float,
    width: int | None = None,
    log_dir: str | None = None,
    callbacks: list[keras.callbacks.Callback] | None = None,
    echo=print,
) -> tuple[keras.Model, dict]:
    """Builds and trains a model with Adam on cross-entropy + Dice.

    The weights start from the generators seeded by `petseg.model.determinism.configure`.

    Args:
        train: Batches of (images, one-hot masks), in a fixed order.
        validation: Batches for the end-of-epoch validation loss.
        arch: Model architecture, see `petseg.model.unet.build`.
        epochs: Number of passes over `train`.
        learning_rate: Peak Adam learning rate (see `learning_rate_at`).
        width: Filters of the small model's first block (None: its default).
        log_dir: Where TensorBoard logs go; None for no logs.
        callbacks: More Keras callbacks, e.g. timers.
        echo: Called with one line per epoch; None for silence.

    Returns:
        The trained model, with the weights of its best validation epoch, and
        its history: {"loss", "miou", "val_loss", "val_miou", "learning_rate"},
        one Python float per epoch, and "best_epoch" (1-based).
    """
    image_size = train.element_spec[0].shape[1]
    model = models.build(arch, image_size=image_size, width=width)
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate=learning_rate),
        loss=segmentation_loss,
        # mIoU of the argmax classes, as SegmentationMetrics' "miou".
        metrics=[keras.metrics.MeanIoU(num_classes=len(CLASSES), sparse_y_true=False, sparse_y_pred=False,
                                       name="miou")],
    )
    best = keras.callbacks.EarlyStopping(monitor="val_loss", patience=epochs, restore_best_weights=True)
    callbacks = [_Schedule(epochs=epochs, learning_rate=learning_rate), best, *(callbacks or [])]
    if echo is not None:
        callbacks.append(_EpochLine(epochs=epochs, echo=echo))
    if log_dir:
        callbacks.append(keras.callbacks.TensorBoard(log_dir=log_dir))
    history = model.fit(
        train, validation_data=validation, epochs=epochs, callbacks=callbacks, shuffle=False, verbose=0
    )
    record = {name: [float(v) for v in values] for name, values in history.history.items()}
    record["best_epoch"] = int(best.best_epoch) + 1
    return model, record


def evaluate(model: keras.Model, dataset: tf.data.Dataset, calibration: Calibration | None = None, *,
             bootstrap: int = 0, seed: int = 0) -> dict:
    """Streams a dataset through a model and computes the segmentation metrics.

    Args:
        model: A trained model.
        dataset: Batches of (images, one-hot masks).
        calibration: Applied to the probabilities first, if given.
        bootstrap: Resamples for the 95 % intervals (0: none).
        seed: Seed of the resampling.

    Returns:
        `SegmentationMetrics.result`.
    """
    metrics = SegmentationMetrics()
    for images, masks in dataset:
        probs = model.predict_on_batch(images)
        if calibration is not None:
            probs = calibration.apply(probs)
        metrics.update(masks, probs)
    return metrics.result(bootstrap=bootstrap, seed=seed)
