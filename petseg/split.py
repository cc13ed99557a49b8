"""Assign each sample to a split from its id alone.

The rule hashes the Oxford sample id, so a sample keeps its split when the
data set grows (new feedback, a bigger synthetic set) and on every machine:
``int(md5(id).hexdigest(), 16) % 10`` is 0-6 for training, 7 validation,
8 test and 9 calibration (about 70/10/10/10).
"""

import hashlib

SPLITS = ("training", "validation", "test", "calibration")


def split_of(sample_id: str) -> str:
    """Return the split a sample belongs to.

    Args:
        sample_id: Oxford image stem, e.g. ``"Abyssinian_12"``.

    Returns:
        One of :data:`SPLITS`.
    """
    bucket = int(hashlib.md5(sample_id.encode()).hexdigest(), 16) % 10
    if bucket <= 6:
        return "training"
    return SPLITS[bucket - 6]
