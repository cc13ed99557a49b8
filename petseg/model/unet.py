"""U-Net segmentation models, saving, loading and fingerprints.

Both architectures end in a softmax over the three trimap classes (pet,
background, border): a (size, size, 3) map of class probabilities whose
argmax is the predicted class.

- "small": a U-Net sized for CPU training. Encoder: four stride-2 blocks of
  two 3x3 convolutions (1/2 to 1/16), the last one dilated so that the
  receptive field spans the whole 128 px image: telling a pet from a
  pet-coloured cushion takes its shape, not its colour. Decoder: bilinear
  upsampling, concatenation with the skip, and a 3x3 convolution after each
  concatenation, up to full resolution, where the skip is the image itself.
  About 0.8 M parameters at the default width 16.
- "mobilenetv2": the model of the TensorFlow segmentation tutorial that the
  original project trained, a MobileNetV2 encoder (random weights: no
  download), with the same decoder blocks (512, 256, 128, 64 filters). About
  8.2 M parameters, for real data on a GPU.

Upsampling is bilinear resize followed by a convolution, not a transposed
convolution (whose 3x3 kernel over stride 2 paints a checkerboard) and not
nearest-neighbour `UpSampling2D` (which has no deterministic GPU gradient, so
strict mode would fail on a GPU).
"""

import hashlib
import json
import tempfile
from pathlib import Path

import keras
import numpy as np

from petseg.data.warehouse import IMAGE_SIZE
from petseg.errors import ConfigError, ModelError
from petseg.model.architectures import ARCHITECTURES
from petseg.oxford import CLASSES

DEFAULT_WIDTH = 16
"""Width unit of the small model: blocks at 1/2 to 1/16 resolution have 2, 4, 6 and 8 times as many
filters, the full-resolution block half as many."""
_SMALL_MULTIPLIERS = (1, 2, 4, 6, 8)

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
BATCH_NORM_MOMENTUM = 0.9


def build(
    arch: str = "small", *, image_size: int = IMAGE_SIZE, width: int | None = None, encoder_weights: str | None = None
) -> keras.Model:
    """Builds an untrained segmentation model.

    Weights are drawn from Keras' global seed: call
    `petseg.model.determinism.configure` (or `keras.utils.set_random_seed`) first
    for reproducible weights. Every layer has a fixed name, so two builds give
    the same weight names in any process.

    Args:
        arch: "small" or "mobilenetv2".
        image_size: Height and width of the square input, a multiple of 32.
        width: Filters of the small model's first block (None: DEFAULT_WIDTH).
        encoder_weights: None (random encoder, trained with the rest) or
            "imagenet" (pretrained MobileNetV2, downloaded by Keras, frozen
            as in the original); only for "mobilenetv2".

    Returns:
        A Keras model from (batch, size, size, 3) images in [0, 1] to
        (batch, size, size, 3) class probabilities.

    Raises:
        ConfigError: Unknown arch, bad image_size, width or encoder_weights.
        ModelError: The imagenet weights could not be downloaded.
    """
    if arch not in ARCHITECTURES:
        raise ConfigError(f"unknown model arch {arch!r}: use one of {', '.join(ARCHITECTURES)}")
    if not isinstance(image_size, int) or image_size < 32 or image_size % 32:
        raise ConfigError(f"image_size must be a multiple of 32 (at least 32), got {image_size!r}")
    width = DEFAULT_WIDTH if width is None else width
    if not isinstance(width, int) or width < 1:
        raise ConfigError(f"width must be a positive integer, got {width!r}")
    if encoder_weights not in (None, "imagenet"):
        raise ConfigError(f"encoder_weights must be None or 'imagenet', got {encoder_weights!r}")
    if encoder_weights is not None and arch != "mobilenetv2":
        raise ConfigError(f"encoder_weights={encoder_weights!r} needs arch 'mobilenetv2', got {arch!r}")
    image = keras.Input(shape=(image_size, image_size, 3), name="image")
    if arch == "small":
        return _small_unet(image, width)
    return _mobilenet_unet(image, encoder_weights)


def _conv(x, filters: int, name: str, *, strides: int = 1, dilation: int = 1):
    """3x3 convolution, batch normalisation, ReLU."""
    x = keras.layers.Conv2D(filters, 3, strides=strides, dilation_rate=dilation, padding="same", use_bias=False,
                            name=f"{name}_conv")(x)
    x = keras.layers.BatchNormalization(momentum=BATCH_NORM_MOMENTUM, name=f"{name}_bn")(x)
    return keras.layers.ReLU(name=f"{name}_relu")(x)


def _up(x, skip, filters: int, name: str):
    """Doubles the resolution (bilinear), joins the skip connection, and mixes them with a 3x3 convolution."""
    x = keras.layers.UpSampling2D(2, interpolation="bilinear", name=f"{name}_resize")(x)
    x = keras.layers.Concatenate(name=f"{name}_concat")([x, skip])
    return _conv(x, filters, name)


def _output(x):
    return keras.layers.Conv2D(len(CLASSES), 1, activation="softmax", name="mask")(x)


def _small_unet(image, width: int) -> keras.Model:
    filters = [width * m for m in _SMALL_MULTIPLIERS]
    skips, x = [], image
    for depth, count in enumerate(filters[1:], start=1):
        last = depth == len(filters) - 1
        x = _conv(x, count, f"down{depth}a", strides=2)
        x = _conv(x, count, f"down{depth}b", dilation=2 if last else 1)
        skips.append(x)
    # Bottleneck at 1/16; back up through 1/8 and 1/4 to 1/2.
    for depth, (count, skip) in enumerate(zip(reversed(filters[1:-1]), reversed(skips[:-1])), start=1):
        x = _up(x, skip, count, name=f"up{depth}")
    # Full resolution costs the most per filter: a narrow block joined with the image itself, whose
    # edges place the thin border band.
    x = _up(x, image, filters[0] // 2, name="up_full")
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
        x = _up(x, skip, filters, name=f"up{depth}")
    # The first skip is at 1/2: one more upsampling, joined with the image itself for sharp edges.
    x = _up(x, image, _DECODER_FILTERS[-1] // 2, name="up_full")
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
    """sha256 over the model's architecture (its Keras config) and weights (names, dtypes, shapes and values).

    A `.keras` file records its save time, so two saves of the same model
    differ as bytes; this hash does not. The architecture is the config the
    file stores, without the training setup (``compile_config``), as canonical
    JSON: a model whose layers were rewired over the same weights hashes differently.

    Returns:
        The hex digest.
    """
    config = json.loads(model.to_json())
    config.pop("compile_config", None)
    digest = hashlib.sha256()
    digest.update(json.dumps(config, sort_keys=True, separators=(",", ":")).encode())
    digest.update(b"\n")
    for weight in model.weights:
        value = np.ascontiguousarray(keras.ops.convert_to_numpy(weight))
        header = f"{weight.path}|{value.dtype.str}|{','.join(map(str, value.shape))}\n"
        digest.update(header.encode())
        digest.update(value.tobytes())
    return digest.hexdigest()
