"""The feedback store: pending with sender and release, duplicates, quotas, review, and what ingest may read."""

import io
import json
import shutil

import numpy as np
import pytest
from PIL import Image

from petseg import keys, oxford
from petseg.data import reviews, warehouse
from petseg.errors import DataError
from petseg.serving import quarantine
from petseg.serving.feedback import FeedbackSample


@pytest.fixture(scope="module")
def reviewer():
    """The reviewer's signing key: the user's, made and trusted on first use (tests have a private config dir)."""
    return keys.ensure_signing_key()[0]


def _sample(seed: int, breed: str | None = "beagle") -> FeedbackSample:
    pixels = np.random.default_rng(seed).integers(0, 256, (12, 16, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG")
    trimap = np.full((12, 16), 2, np.uint8)
    trimap[3:9, 4:12] = 1
    return FeedbackSample(buffer.getvalue(), trimap, 0.5, breed)


def _add(store, seed, identity="ana"):
    return store.add(_sample(seed), identity=identity, model_version="petseg-1", model_fingerprint="f" * 64)


def test_a_sample_is_pending_with_sender_time_release_and_content_hash(tmp_path):
    store = quarantine.FeedbackStore(str(tmp_path))
    stored = _add(store, 0)
    assert stored["status"] == "pending" and stored["sample_id"].startswith("feedback_")
    (record,) = store.records("pending")
    assert record["identity"] == "ana" and record["model_version"] == "petseg-1"
    assert record["model_fingerprint"] == "f" * 64 and len(record["content_sha256"]) == 64
    assert record["received"].endswith("+00:00")
    assert stored["sample_id"] == "feedback_" + record["content_sha256"][:16]
    assert not (tmp_path / oxford.FEEDBACK_ACCEPTED).exists()  # nothing ingest reads


def test_duplicates_are_dropped_even_after_review(tmp_path):
    store = quarantine.FeedbackStore(str(tmp_path))
    first = _add(store, 0)
    assert _add(store, 0, identity="bo") == {"sample_id": first["sample_id"], "status": "duplicate"}
    store.reject(first["sample_id"], reviewer="cy")
    assert _add(store, 0)["status"] == "duplicate"
    assert store.records("pending") == []


def test_quota_per_identity_and_cap_of_the_pending_store(tmp_path, reviewer):
    store = quarantine.FeedbackStore(str(tmp_path), quota=2, pending_cap=3)
    _add(store, 0), _add(store, 1)
    with pytest.raises(quarantine.QuotaExceeded) as over:
        _add(store, 2)
    assert over.value.status == 429 and "'ana'" in str(over.value)
    _add(store, 3, identity="bo")
    with pytest.raises(quarantine.QuotaExceeded, match="feedback store: expected at most 3"):
        _add(store, 4, identity="cy")
    store.accept(store.records()[0]["id"], reviewer="rev", signing_key=reviewer)
    _add(store, 5, identity="cy")  # a review frees a place


def test_accept_records_who_and_when_and_ingest_reads_only_accepted(tmp_path, reviewer):
    store = quarantine.FeedbackStore(str(tmp_path / "store"))
    kept, dropped, waiting = (_add(store, seed)["sample_id"] for seed in range(3))
    record = store.accept(kept, reviewer="rev", signing_key=reviewer)
    assert record["accepted_by"] == "rev" and record["identity"] == "ana" and record["accepted_at"]
    assert record["accepted_key"] == keys.key_id(keys.public_pem_of(keys.private_pem(reviewer)))
    store.reject(dropped, reviewer="rev")
    assert [r["id"] for r in store.records("accepted")] == [kept]
    assert [r["id"] for r in store.records("rejected")] == [dropped]
    assert [r["id"] for r in store.records("pending")] == [waiting]
    assert f"{kept} " in (tmp_path / "store" / "accepted" / oxford.LIST_FILE).read_text()
    with pytest.raises(DataError, match="no pending feedback sample"):
        store.accept(dropped, reviewer="rev", signing_key=reviewer)

    report = warehouse.ingest("synth:4", tmp_path / "out", feedback=str(tmp_path / "store"))
    assert report["samples"] == 5
    (added,) = report["feedback_samples"]
    assert (added["id"], added["identity"], added["accepted_by"]) == (kept, "ana", "rev")
    assert added["accepted_key"] == record["accepted_key"] and added["breed"] == "beagle"


def test_the_store_works_under_an_s3_prefix(s3, moto_endpoint, tmp_path, reviewer):
    s3.create_bucket(Bucket="quarantine")
    store = quarantine.FeedbackStore("s3://quarantine/feedback", s3_endpoint_url=moto_endpoint, quota=1)
    sample_id = _add(store, 0)["sample_id"]
    assert _add(store, 0)["status"] == "duplicate"
    with pytest.raises(quarantine.QuotaExceeded):
        _add(store, 1)
    store.accept(sample_id, reviewer="rev", signing_key=reviewer)
    record = json.loads(s3.get_object(Bucket="quarantine", Key=f"feedback/accepted/feedback/{sample_id}.json")
                        ["Body"].read())
    assert record["accepted_by"] == "rev"
    report = warehouse.ingest("synth:2", tmp_path / "out", feedback="s3://quarantine/feedback/",
                              s3_endpoint_url=moto_endpoint)
    assert [sample["id"] for sample in report["feedback_samples"]] == [sample_id]


# -- what a server's credential could write: planted samples -------------------------------------------------
# The serving credential adds pending samples and holds no trusted key. Each plant writes into accepted/ what
# that credential could (at worst, anything under the store), and the next ingest must refuse it, naming it.


def _plant_copied_from_pending(store, root, sample_id, tmp_path, reviewer):
    """The pending sample's files and record copied into accepted/, as `accept` would lay them out, unsigned."""
    pending = root / "pending" / "ana"
    accepted = root / oxford.FEEDBACK_ACCEPTED
    for source, target in ((f"{sample_id}.jpg", oxford.image_file(sample_id)),
                           (f"{sample_id}.png", oxford.trimap_file(sample_id))):
        (accepted / target).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(pending / source, accepted / target)
    record = {**json.loads((pending / f"{sample_id}.json").read_text()), "status": "accepted", "accepted_by": "rev"}
    (accepted / reviews.record_file(sample_id)).parent.mkdir(parents=True, exist_ok=True)
    (accepted / reviews.record_file(sample_id)).write_text(json.dumps(record))
    return f"accepted feedback sample {sample_id} has no signed acceptance"


def _plant_signed_by_own_key(store, root, sample_id, tmp_path, reviewer):
    """The same, with an acceptance signed properly by a key of the planter's own, which nobody trusts."""
    _plant_copied_from_pending(store, root, sample_id, tmp_path, reviewer)
    own, identifier = keys.create(private=tmp_path / "planter" / "k.key", trusted=tmp_path / "planter" / "trusted")
    accepted = root / oxford.FEEDBACK_ACCEPTED
    bundle = reviews.sign(sample_id, image=(accepted / oxford.image_file(sample_id)).read_bytes(),
                          trimap=(accepted / oxford.trimap_file(sample_id)).read_bytes(), record={},
                          signing_key=str(own))
    (accepted / reviews.acceptance_file(sample_id)).write_bytes(bundle)
    return f"is signed by key {keys.short(identifier)}, which is not trusted"


def _plant_changed_after_review(store, root, sample_id, tmp_path, reviewer):
    """A sample a reviewer accepted, its image then replaced."""
    store.accept(sample_id, reviewer="rev", signing_key=reviewer)
    image = root / oxford.FEEDBACK_ACCEPTED / oxford.image_file(sample_id)
    image.write_bytes(_sample(99).jpeg)
    return f"{image}: hashes to [0-9a-f]{{64}} but the reviewer accepted [0-9a-f]{{64}}: it changed after review"


def _plant_with_another_acceptance(store, root, sample_id, tmp_path, reviewer):
    """An accepted sample's files and signed acceptance copied under a new id."""
    store.accept(sample_id, reviewer="rev", signing_key=reviewer)
    accepted, planted = root / oxford.FEEDBACK_ACCEPTED, "feedback_planted"
    for name in (oxford.image_file, oxford.trimap_file, reviews.acceptance_file):
        shutil.copy(accepted / name(sample_id), accepted / name(planted))
    return f"it accepts {sample_id!r} .*, not feedback sample {planted}"


PLANTS = {"copied from pending": _plant_copied_from_pending, "signed by its own key": _plant_signed_by_own_key,
          "changed after review": _plant_changed_after_review,
          "another sample's acceptance": _plant_with_another_acceptance}


@pytest.mark.parametrize("skip_bad", [False, True], ids=["stop", "skip_bad"])
@pytest.mark.parametrize("plant", list(PLANTS))
def test_a_sample_planted_in_accepted_is_refused_at_ingest_naming_it(tmp_path, reviewer, plant, skip_bad):
    root = tmp_path / "store"
    store = quarantine.FeedbackStore(str(root))
    sample_id = _add(store, 0)["sample_id"]
    says = PLANTS[plant](store, root, sample_id, tmp_path, reviewer)
    with pytest.raises(DataError, match=says) as refused:
        warehouse.ingest("synth:2", tmp_path / "out", feedback=str(root), skip_bad=skip_bad)
    assert str(root / oxford.FEEDBACK_ACCEPTED) in str(refused.value) and "refusing to train on it" in str(refused.value)
    assert not (tmp_path / "out").exists()


def test_a_planted_sample_is_refused_under_an_s3_prefix_too(s3, moto_endpoint, tmp_path):
    s3.create_bucket(Bucket="planted")
    store = quarantine.FeedbackStore("s3://planted/feedback", s3_endpoint_url=moto_endpoint)
    sample_id = _add(store, 0)["sample_id"]
    for source, target in ((".jpg", oxford.image_file(sample_id)), (".png", oxford.trimap_file(sample_id))):
        s3.copy_object(Bucket="planted", Key=f"feedback/accepted/{target}",
                       CopySource={"Bucket": "planted", "Key": f"feedback/pending/ana/{sample_id}{source}"})
    with pytest.raises(DataError, match=f"s3://planted/feedback/accepted/images/{sample_id}.jpg: accepted feedback "
                                        f"sample {sample_id} has no signed acceptance"):
        warehouse.ingest("synth:2", tmp_path / "out", feedback="s3://planted/feedback", s3_endpoint_url=moto_endpoint)
