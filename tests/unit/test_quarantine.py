"""The feedback store: pending with sender and release, duplicates, quotas, review, and what ingest may read."""

import io
import json

import numpy as np
import pytest
from PIL import Image

from petseg import oxford
from petseg.data import warehouse
from petseg.errors import DataError
from petseg.serving import quarantine
from petseg.serving.feedback import FeedbackSample


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


def test_quota_per_identity_and_cap_of_the_pending_store(tmp_path):
    store = quarantine.FeedbackStore(str(tmp_path), quota=2, pending_cap=3)
    _add(store, 0), _add(store, 1)
    with pytest.raises(quarantine.QuotaExceeded) as over:
        _add(store, 2)
    assert over.value.status == 429 and "'ana'" in str(over.value)
    _add(store, 3, identity="bo")
    with pytest.raises(quarantine.QuotaExceeded, match="feedback store: expected at most 3"):
        _add(store, 4, identity="cy")
    store.accept(store.records()[0]["id"], reviewer="rev")
    _add(store, 5, identity="cy")  # a review frees a place


def test_accept_records_who_and_when_and_ingest_reads_only_accepted(tmp_path):
    store = quarantine.FeedbackStore(str(tmp_path / "store"))
    kept, dropped, waiting = (_add(store, seed)["sample_id"] for seed in range(3))
    record = store.accept(kept, reviewer="rev")
    assert record["accepted_by"] == "rev" and record["identity"] == "ana" and record["accepted_at"]
    store.reject(dropped, reviewer="rev")
    assert [r["id"] for r in store.records("accepted")] == [kept]
    assert [r["id"] for r in store.records("rejected")] == [dropped]
    assert [r["id"] for r in store.records("pending")] == [waiting]
    assert f"{kept} " in (tmp_path / "store" / "accepted" / oxford.LIST_FILE).read_text()
    with pytest.raises(DataError, match="no pending feedback sample"):
        store.accept(dropped, reviewer="rev")

    report = warehouse.ingest("synth:4", tmp_path / "out", feedback=str(tmp_path / "store"))
    assert report["samples"] == 5
    (added,) = report["feedback_samples"]
    assert (added["id"], added["identity"], added["accepted_by"]) == (kept, "ana", "rev")


def test_the_store_works_under_an_s3_prefix(s3, moto_endpoint, tmp_path):
    s3.create_bucket(Bucket="quarantine")
    store = quarantine.FeedbackStore("s3://quarantine/feedback", s3_endpoint_url=moto_endpoint, quota=1)
    sample_id = _add(store, 0)["sample_id"]
    assert _add(store, 0)["status"] == "duplicate"
    with pytest.raises(quarantine.QuotaExceeded):
        _add(store, 1)
    store.accept(sample_id, reviewer="rev")
    record = json.loads(s3.get_object(Bucket="quarantine", Key=f"feedback/accepted/feedback/{sample_id}.json")
                        ["Body"].read())
    assert record["accepted_by"] == "rev"
    report = warehouse.ingest("synth:2", tmp_path / "out", feedback="s3://quarantine/feedback/",
                              s3_endpoint_url=moto_endpoint)
    assert [sample["id"] for sample in report["feedback_samples"]] == [sample_id]
