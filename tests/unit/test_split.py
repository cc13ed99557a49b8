"""The split rule: md5 of the sample id modulo 10."""

from collections import Counter

import pytest

from petseg.data.split import split_of
from petseg.oxford import SPLITS


@pytest.mark.parametrize(
    "sample_id, split",
    [
        ("Abyssinian_4", "training"),  # md5 % 10 == 6
        ("american_bulldog_100", "training"),
        ("Abyssinian_12", "validation"),  # 7
        ("pug_1", "validation"),
        ("Abyssinian_1", "test"),  # 8
        ("pug_3", "test"),
        ("beagle_4", "calibration"),  # 9
        ("Bengal_6", "calibration"),
    ],
)
def test_known_ids_keep_their_split(sample_id, split):
    assert split_of(sample_id) == split


def test_split_names_and_order():
    assert SPLITS == ("training", "validation", "test", "calibration")


def test_proportions_are_about_70_10_10_10():
    counts = Counter(split_of(f"havanese_{n}") for n in range(1, 10001))
    shares = {split: counts[split] / 10000 for split in SPLITS}
    assert shares["training"] == pytest.approx(0.7, abs=0.02)
    for split in SPLITS[1:]:
        assert shares[split] == pytest.approx(0.1, abs=0.015)


def test_training_only_ids_go_to_training_whatever_their_hash():
    # A feedback id a sender could steer into the test split by varying the content.
    crafted = next(f"feedback_{n:016x}" for n in range(10_000) if split_of(f"feedback_{n:016x}") == "test")
    assert split_of(crafted, training_only={crafted}) == "training"
    assert split_of(crafted, official_test={crafted}, training_only={crafted}) == "training"
    assert split_of("Abyssinian_1", training_only={crafted}) == "test"
