"""The tf.data pipeline: shapes, one-hot masks, deterministic order, seeded shuffle, aligned flips."""

import numpy as np
import pytest

from petseg.data import pipeline, shards, warehouse
from petseg.errors import DataError

SIZE = 16
COUNT = 20


def marked_sample(index):
    """A sample whose left ``width`` columns are a red pet; green holds the index."""
    width = 2 + index % 6
    image = np.zeros((SIZE, SIZE, 3), dtype=np.uint8)
    image[..., 2] = 255
    image[:, :width] = (255, 0, 0)
    image[..., 1] = index
    mask = np.full((SIZE, SIZE), 2, dtype=np.uint8)
    mask[:, :width] = 1
    mask[:, width] = 3
    return shards.encode(f"pug_{index}", image, mask, f"{index:064x}")


@pytest.fixture(scope="module")
def marked(tmp_path_factory):
    """Shards of COUNT marked samples, 6 per file."""
    directory = tmp_path_factory.mktemp("marked")
    with shards.ShardWriter(directory, "samples", 6) as writer:
        for index in range(COUNT):
            writer.write(marked_sample(index))
    return [str(directory / name) for name in writer.names]


def indices(dataset):
    """The sample index of every example, in order."""
    return [int(round(v * 255)) for images, _ in dataset for v in images.numpy()[:, 0, 0, 1]]


def test_batches_of_images_and_one_hot_masks(tmp_path):
    report = warehouse.ingest("synth:6", tmp_path / "ingest", seed=1)
    batches = list(pipeline.dataset(report["shards"], batch_size=4, image_size=warehouse.IMAGE_SIZE, shuffle=True,
                                    augment=True))
    assert [images.shape[0] for images, _ in batches] == [4, 2]
    for images, masks in batches:
        assert images.dtype.name == "float32" and masks.dtype.name == "float32"
        assert images.shape[1:] == (128, 128, 3) and masks.shape[1:] == (128, 128, 3)
        assert 0.0 <= images.numpy().min() and images.numpy().max() <= 1.0
        assert np.array_equal(masks.numpy().sum(axis=-1), np.ones(masks.shape[:3]))
        assert masks.numpy()[..., 0].sum() > 0 and masks.numpy()[..., 2].sum() > 0


def test_channels_follow_trimap_values(marked):
    images, masks = next(iter(pipeline.dataset(marked, batch_size=1, image_size=SIZE)))
    width = 2  # sample 0
    assert masks.numpy()[0, 0, :width].tolist() == [[1.0, 0.0, 0.0]] * width  # pet
    assert masks.numpy()[0, 0, width].tolist() == [0.0, 0.0, 1.0]  # border
    assert masks.numpy()[0, 0, -1].tolist() == [0.0, 1.0, 0.0]  # background
    assert images.numpy()[0, 0, 0].tolist() == [1.0, 0.0, 0.0]


def test_order_is_the_shard_order_without_shuffle(marked):
    dataset = pipeline.dataset(marked, batch_size=3, image_size=SIZE)
    assert indices(dataset) == list(range(COUNT))
    assert indices(dataset) == list(range(COUNT))


def test_shuffle_is_seeded(marked):
    first = indices(pipeline.dataset(marked, batch_size=4, image_size=SIZE, shuffle=True, seed=5))
    assert first == indices(pipeline.dataset(marked, batch_size=4, image_size=SIZE, shuffle=True, seed=5))
    assert sorted(first) == list(range(COUNT)) and first != list(range(COUNT))
    assert first != indices(pipeline.dataset(marked, batch_size=4, image_size=SIZE, shuffle=True, seed=6))


def test_each_epoch_is_reshuffled_reproducibly(marked):
    def two_epochs():
        dataset = pipeline.dataset(marked, batch_size=5, image_size=SIZE, shuffle=True, seed=2)
        return indices(dataset), indices(dataset)

    epoch_1, epoch_2 = two_epochs()
    assert epoch_1 != epoch_2 and sorted(epoch_1) == sorted(epoch_2)
    assert two_epochs() == (epoch_1, epoch_2)


def test_repeat_continues_past_one_epoch(marked):
    dataset = pipeline.dataset(marked, batch_size=COUNT, image_size=SIZE, repeat=True)
    assert len(indices(dataset.take(3))) == 3 * COUNT


def test_flip_keeps_image_and_mask_aligned(marked):
    def flipped_batch(seed):
        return next(iter(pipeline.dataset(marked, batch_size=COUNT, image_size=SIZE, augment=True, seed=seed)))

    images, masks = (t.numpy() for t in flipped_batch(3))
    red = images[..., 0] > 0.5
    assert np.array_equal(red, masks[..., 0] == 1.0)
    flipped = red[:, 0, -1]  # the pet moved to the right edge
    assert 0 < flipped.sum() < COUNT
    for index in np.flatnonzero(flipped):
        assert masks[index, 0, -(2 + index % 6) - 1].tolist() == [0.0, 0.0, 1.0]  # border flipped too
    again_images, again_masks = (t.numpy() for t in flipped_batch(3))
    assert np.array_equal(images, again_images) and np.array_equal(masks, again_masks)
    other = flipped_batch(4)[0].numpy()[..., 0] > 0.5
    assert not np.array_equal(other[:, 0, -1], flipped)


def test_wrong_image_size_and_empty_split_are_refused(marked):
    with pytest.raises(DataError, match=f"images are {SIZE}x{SIZE} but the pipeline expects 128x128"):
        pipeline.dataset(marked, batch_size=2, image_size=128)
    with pytest.raises(DataError, match="no shard files given"):
        pipeline.dataset([], batch_size=2, image_size=SIZE)
