"""U-Net segmentation models, saving, loading and fingerprints.

Two architectures share one output: a (size, size, 3) map of per-channel
probabilities for (pet, background, border).

- "mobilenetv2": the model of the TensorFlow image segmentation tutorial that
  the original project trained: a MobileNetV2 encoder and a pix2pix decoder
  (Conv2DTranspose + BatchNorm + ReLU blocks of 512, 256, 128 and 64 filters)
  with skip connections. About 6.5 M parameters.
- "small": the same shape of network with a few narrow blocks (about 0.1 M
  parameters), for fast CPU runs and tests.

The output is a sigmoid, as in the original, not a softmax: the loss (binary
cross-entropy + Jaccard) treats each channel as its own binary map, and the
calibration fits one monotone map per channel.
"""

import hashlib
import tempfile
from pathlib import Path

import keras
import numpy as np

from petseg.errors import ConfigError, ModelError

ARCHITECTURES = ("small", "mobilenetv2")
CLASSES = ("pet", "background", "border")

# MobileNetV2 activations used as skip connections (tutorial choice), by
# resolution for a 128x128 input: 64, 32, 16, 8 and 4 (the bottleneck).
_MOBILENET_SKIPS = (
    "block_1_expand_relu",
    "block_3_expand_relu",
    "block_6_expand_relu",
    "block_13_expand_relu",
    "block_16_project",
)
_DECODER_FILTERS = (512, 256, 128, 64)
# Keras' default of 0.99 averages the batch statistics over ~100 steps, while
# a short CPU run has ~20 steps an epoch, so validation saw stale statistics.
# Small model, 10 epochs on 286 images: the same training loss, validation
# loss 1.23 with 0.99 and 1.01 with 0.9.
BATCH_NORM_MOMENTUM = 0.9
_SMALL_ENCODER_FILTERS = (16, 32, 64, 64)
_SMALL_DECODER_FILTERS = (64, 32, 16)


def build(
    arch: str = "small", *, image_size: int = 128, encoder_weights: str | None = None
) -> keras.Model:
    """Builds an untrained segmentation model.

    Weights are drawn from Keras' global seed: call
    `petseg.determinism.configure` (or `keras.utils.set_random_seed`) first
    for reproducible weights. Every layer has a fixed name, so two builds give
    the same weight names in any process.

    Args:
        arch: "small" or "mobilenetv2".
        image_size: Height and width of the square input, a multiple of 32.
        encoder_weights: None (random encoder, trained with the rest) or
            "imagenet" (pretrained MobileNetV2, downloaded by Keras, frozen
            as in the original); only for "mobilenetv2".

    Returns:
        A Keras model from (batch, size, size, 3) images in [0, 1] to
        (batch, size, size, 3) probabilities.

    Raises:
        ConfigError: Unknown arch, bad image_size or encoder_weights.
        ModelError: The imagenet weights could not be downloaded.
    """
    if arch not in ARCHITECTURES:
        raise ConfigError(f"unknown model arch {arch!r}: use one of {', '.join(ARCHITECTURES)}")
    if not isinstance(image_size, int) or image_size < 32 or image_size % 32:
        raise ConfigError(f"image_size must be a multiple of 32 (at least 32), got {image_size!r}")
    if encoder_weights not in (None, "imagenet"):
        raise ConfigError(f"encoder_weights must be None or 'imagenet', got {encoder_weights!r}")
    if encoder_weights is not None and arch != "mobilenetv2":
        raise ConfigError(f"encoder_weights={encoder_weights!r} needs arch 'mobilenetv2', got {arch!r}")
    image = keras.Input(shape=(image_size, image_size, 3), name="image")
    if arch == "small":
        return _small_unet(image)
    return _mobilenet_unet(image, encoder_weights)


def _upsample(x, filters: int, name: str):
    """pix2pix upsample block: doubles the resolution."""
    x = keras.layers.Conv2DTranspose(
        filters,
        3,
        strides=2,
        padding="same",
        use_bias=False,
        kernel_initializer=keras.initializers.RandomNormal(0.0, 0.02),
        name=f"{name}_conv_transpose",
    )(x)
    x = keras.layers.BatchNormalization(momentum=BATCH_NORM_MOMENTUM, name=f"{name}_bn")(x)
    return keras.layers.ReLU(name=f"{name}_relu")(x)


def _downsample(x, filters: int, name: str):
    """Strided convolution block: halves the resolution."""
    x = keras.layers.Conv2D(filters, 3, strides=2, padding="same", use_bias=False, name=f"{name}_conv")(x)
    x = keras.layers.BatchNormalization(momentum=BATCH_NORM_MOMENTUM, name=f"{name}_bn")(x)
    return keras.layers.ReLU(name=f"{name}_relu")(x)


def _output(x):
    # Sigmoid per channel: see the module docstring.
    return keras.layers.Conv2DTranspose(
        len(CLASSES), 3, strides=2, padding="same", activation="sigmoid", name="mask"
    )(x)


def _small_unet(image) -> keras.Model:
    skips = []
    x = image
    for depth, filters in enumerate(_SMALL_ENCODER_FILTERS, start=1):
        x = _downsample(x, filters, name=f"down{depth}")
        skips.append(x)
    # Resolutions 1/2, 1/4, 1/8 and the 1/16 bottleneck; back up to 1/2, then
    # the output layer doubles to full size, as in the MobileNetV2 model.
    for depth, (filters, skip) in enumerate(zip(_SMALL_DECODER_FILTERS, reversed(skips[:-1])), start=1):
        x = _upsample(x, filters, name=f"up{depth}")
        x = keras.layers.Concatenate(name=f"up{depth}_concat")([x, skip])
    return keras.Model(image, _output(x), name="small_unet")


def _mobilenet_unet(image, encoder_weights: str | None) -> keras.Model:
    size = image.shape[1]
    try:
        base = keras.applications.MobileNetV2(
            input_shape=(size, size, 3), include_top=False, weights=encoder_weights
        )
    except Exception as err:  # Keras raises a bare Exception when a download fails.
        if encoder_weights is None:
            raise
        raise ModelError(
            f"could not download the MobileNetV2 imagenet weights ({err}); "
            "use encoder_weights=None, or run once with network access to fill the Keras cache"
        ) from None
    encoder = keras.Model(
        base.input, [base.get_layer(name).output for name in _MOBILENET_SKIPS], name="encoder"
    )
    # The original froze the pretrained encoder; a random one must learn.
    encoder.trainable = encoder_weights is None
    # MobileNetV2 expects inputs in [-1, 1]; the pipeline gives [0, 1].
    x = keras.layers.Rescaling(2.0, offset=-1.0, name="to_mobilenet_range")(image)
    *skips, x = encoder(x)
    for depth, (filters, skip) in enumerate(zip(_DECODER_FILTERS, reversed(skips)), start=1):
        x = _upsample(x, filters, name=f"up{depth}")
        x = keras.layers.Concatenate(name=f"up{depth}_concat")([x, skip])
    return keras.Model(image, _output(x), name="mobilenetv2_unet")


def save(model: keras.Model, path: str | Path) -> Path:
    """Saves a model in the Keras `.keras` format.

    Args:
        model: The model.
        path: Target file; must end in ".keras".

    Returns:
        The path written.
    """
    path = Path(path)
    if path.suffix != ".keras":
        raise ConfigError(f"model file {path} must end in .keras")
    model.save(path)
    return path


def load(path: str | Path) -> keras.Model:
    """Loads a `.keras` model with safe_mode on and without its training setup.

    Args:
        path: A file written by `save`.

    Returns:
        The model, not compiled.

    Raises:
        ModelError: The file is missing or is not a loadable Keras model.
    """
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"model file {path} does not exist")
    return _load(path, f"model file {path}")


def _load(path: Path, description: str) -> keras.Model:
    try:
        return keras.saving.load_model(path, compile=False, safe_mode=True)
    except Exception as err:  # Keras raises many kinds for a bad file.
        raise ModelError(f"{description} is not a loadable Keras model: {err}") from None


def to_bytes(model: keras.Model) -> bytes:
    """The `.keras` file of a model as bytes (to store as a Metaflow artifact)."""
    with tempfile.TemporaryDirectory() as tmp:
        return save(model, Path(tmp) / "model.keras").read_bytes()


def from_bytes(data: bytes) -> keras.Model:
    """Loads a model from what `to_bytes` returned.

    Raises:
        ModelError: The bytes are not a `.keras` file.
    """
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.keras"
        path.write_bytes(data)
        return _load(path, "the stored model bytes")


def fingerprint(model: keras.Model) -> str:
    """sha256 over the model's weights (names, dtypes, shapes and values, in order).

    A `.keras` file records its save time, so two saves of the same weights
    differ as bytes; this hash does not.

    Returns:
        The hex digest.
    """
    digest = hashlib.sha256()
    for weight in model.weights:
        value = np.ascontiguousarray(keras.ops.convert_to_numpy(weight))
        header = f"{weight.path}|{value.dtype.str}|{','.join(map(str, value.shape))}\n"
        digest.update(header.encode())
        digest.update(value.tobytes())
    return digest.hexdigest()
