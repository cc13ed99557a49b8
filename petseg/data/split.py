"""Assign each sample to a split from its id alone.

Two rules:

- ``md5`` (the default): the rule hashes the Oxford sample id, so a sample
  keeps its split when the data set grows (new feedback, a bigger synthetic
  set) and on every machine: ``int(md5(id).hexdigest(), 16) % 10`` is 0-6 for
  training, 7 validation, 8 test and 9 calibration (about 70/10/10/10).
- ``official``: the release's own ``annotations/test.txt`` is the test split,
  so figures compare with published Oxford-IIIT Pet results; everything else
  (``annotations/trainval.txt`` and samples in neither file, such as feedback)
  is carved by the same hash: 7 validation, 9 calibration, the rest training.

Under either rule, samples named in ``training_only`` (accepted feedback,
whose ids a sender can steer into any bucket by varying the content) go to
training. So validation, test and calibration are a function of the source
alone: runs with and without feedback are scored on the same images.
"""

import hashlib
from collections.abc import Collection

from petseg.oxford import SPLITS

RULES = ("md5", "official")


def _bucket(sample_id: str) -> int:
    return int(hashlib.md5(sample_id.encode()).hexdigest(), 16) % 10


def split_of(sample_id: str, *, official_test: Collection[str] | None = None,
             training_only: Collection[str] = ()) -> str:
    """Return the split a sample belongs to.

    Args:
        sample_id: Oxford image stem, e.g. ``"Abyssinian_12"``.
        official_test: The ids of the official test list, for the
            ``official`` rule; None for the ``md5`` rule.
        training_only: Ids that go to training whatever their hash (accepted feedback).

    Returns:
        One of :data:`SPLITS`.
    """
    if sample_id in training_only:
        return "training"
    bucket = _bucket(sample_id)
    if official_test is not None:
        if sample_id in official_test:
            return "test"
        return {7: "validation", 9: "calibration"}.get(bucket, "training")
    if bucket <= 6:
        return "training"
    return SPLITS[bucket - 6]
