"""What keeps a large request small: images decoded reduced, probabilities resized into eight bits a band at a time."""

import io

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from petseg.serving import messages, predictor

LIMITS = messages.Limits(max_bytes=2**24, max_pixels=4096 * 4096)


@pytest.mark.parametrize("source, target", [((16, 16), (100, 70)), ((16, 16), (9, 5)), ((8, 12), (8, 12))])
def test_upsample_is_tensorflows_bilinear_resize(source, target):
    probs = np.random.default_rng(0).random((2, *source, 3), dtype=np.float32)
    ours = predictor.upsample(probs, *target)
    np.testing.assert_allclose(ours, tf.image.resize(probs, target).numpy(), atol=1e-6)


def test_a_band_of_rows_is_bit_for_bit_those_rows_of_the_whole():
    probs = np.random.default_rng(1).random((1, 16, 16, 3), dtype=np.float32)
    whole = predictor.upsample(probs, 333, 257)
    for rows in (range(0, 100), range(100, 256), range(256, 333)):
        assert predictor.upsample(probs, 333, 257, rows=rows).tobytes() == whole[:, rows.start:rows.stop].tobytes()


@pytest.mark.parametrize("image_format", ["JPEG", "PNG"])
def test_a_large_image_is_decoded_reduced_and_keeps_its_size(image_format):
    pixels = np.zeros((3000, 2000, 3), np.uint8)
    pixels[1000:2000, 500:1500] = (200, 100, 50)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=image_format)
    image, found, size = messages.decode_image(buffer.getvalue(), where="binData", limits=LIMITS, work_side=512)
    assert (found, size, image.shape) == (image_format, (3000, 2000), (512, 341, 3))
    assert abs(int(image[256, 170, 0]) - 200) <= 4  # the pet is still there
    small, _, small_size = messages.decode_image(buffer.getvalue(), where="binData", limits=LIMITS)
    assert small.shape == (3000, 2000, 3) and small_size == (3000, 2000)


def test_the_eight_bit_mask_agrees_with_the_probabilities():
    probs = np.random.default_rng(2).random((1, 40, 30, 3), dtype=np.float32)
    bits = messages.eight_bits(probs)
    assert messages.class_mask(bits).tobytes() == messages.class_mask(probs).tobytes()
    assert messages.probability_png(bits[0]) == messages.probability_png(probs[0])


def test_pixels_as_lists_of_numbers_have_their_own_limit():
    limits = messages.Limits(max_pixels=10_000, max_list_pixels=100)
    with pytest.raises(messages.BadRequest, match="binData") as refused:
        messages.parse_prediction({"data": {"ndarray": np.zeros((11, 10, 3), int).tolist()}}, limits=limits)
    assert refused.value.status == 413
    from petseg.serving import v2_messages

    listed = v2_messages.Tensor("image", "UINT8", [1, 11, 10, 3], [0] * 330)
    with pytest.raises(messages.BadRequest, match="as a list"):
        v2_messages.read_images([listed], limits=limits)[0]
    as_bytes = v2_messages.Tensor("image", "UINT8", [1, 11, 10, 3], "AAAA" * 110)
    assert v2_messages.read_images([as_bytes], limits=limits)[0].shape == (1, 11, 10, 3)
