"""Ingest and transform: every source form, checks on every sample, safe extraction, fingerprints."""

import functools
import hashlib
import http.server
import io
import itertools
import json
import shutil
import subprocess
import sys
import tarfile
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from petseg import keys, oxford
from petseg.data import archive, reviews, shards, synth, warehouse
from petseg.data.split import split_of
from petseg.errors import DataError
from petseg.oxford import SPLITS

COUNT = 12
SEED = 3


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def archives(tmp_path_factory):
    """A directory holding images.tar.gz and annotations.tar.gz."""
    directory = tmp_path_factory.mktemp("archives")
    synth.write_archives(directory, count=COUNT, seed=SEED)
    return directory


@pytest.fixture(scope="module")
def extracted(archives, tmp_path_factory):
    """The same samples extracted (do not modify: copy with ``layout``)."""
    directory = tmp_path_factory.mktemp("extracted")
    archive.safe_extract(archives / "images.tar.gz", directory)
    archive.safe_extract(archives / "annotations.tar.gz", directory)
    return directory


@pytest.fixture(scope="module")
def reference(archives, tmp_path_factory):
    """The ingest report of ``archives``."""
    return warehouse.ingest(str(archives), tmp_path_factory.mktemp("reference") / "out")


@pytest.fixture
def layout(extracted, tmp_path):
    """A writable copy of the extracted samples."""
    return Path(shutil.copytree(extracted, tmp_path / "layout"))


def sample_ids(root):
    return sorted(path.stem for path in (root / "images").glob("*.jpg"))


def assert_no_output(out_dir):
    """Neither the output nor a scratch directory beside it is left."""
    assert not out_dir.exists()
    assert [p.name for p in out_dir.parent.iterdir() if p.name.startswith(f".{out_dir.name}-")] == []


# ---------------------------------------------------------------- reproducibility


def test_fingerprint_definition_is_pinned():
    # sha256 over length-prefixed id, image file and trimap file; then over the sorted hashes, one per line.
    framed = b"".join(len(part).to_bytes(8, "big") + part for part in (b"pug_1", b"jpeg", b"png"))
    assert shards.sample_hash("pug_1", b"jpeg", b"png") == hashlib.sha256(framed).hexdigest()
    pinned = "a99b337bd50f1d378b0ae3d3d6694e65bcb37a6849cdee1608f0a8f5497ec949"
    assert shards.sample_hash("pug_1", b"jpeg", b"png") == pinned
    assert shards.sample_hash("pug_1", b"jpegp", b"ng") != shards.sample_hash("pug_1", b"jpeg", b"png")
    assert shards.fingerprint(["b", "a"]) == hashlib.sha256(b"a\nb\n").hexdigest()


def test_same_seed_same_fingerprint_and_shard_bytes(reference, tmp_path):
    again = synth.write_archives(tmp_path / "again", count=COUNT, seed=SEED)[0].parent
    report = warehouse.ingest(str(again), tmp_path / "out")
    assert report["fingerprint"] == reference["fingerprint"]
    assert [Path(p).read_bytes() for p in report["shards"]] == [Path(p).read_bytes() for p in reference["shards"]]
    generated = warehouse.ingest(f"synth:{COUNT}", tmp_path / "generated", seed=SEED)
    assert generated["fingerprint"] == reference["fingerprint"]
    other = warehouse.ingest(f"synth:{COUNT}", tmp_path / "other", seed=SEED + 1)
    assert other["fingerprint"] != reference["fingerprint"]


def test_archive_path_and_extracted_directory_read_the_same(archives, extracted, reference, tmp_path):
    assert warehouse.ingest(str(archives / "images.tar.gz"), tmp_path / "a")["fingerprint"] == reference["fingerprint"]
    assert warehouse.ingest(str(extracted), tmp_path / "b")["fingerprint"] == reference["fingerprint"]


def test_report_and_records(extracted, reference):
    assert reference["samples"] == COUNT and reference["skipped"] == []
    assert reference["shards"] == sorted(reference["shards"])
    assert sum(reference["species"].values()) == COUNT and reference["species"]["unlisted"] == 0
    records = [shards.decode(r) for r in shards.read_records(reference["shards"])]
    assert [r["id"] for r in records] == sample_ids(extracted)
    hashes = []
    for record in records:
        assert record["image"].shape == (128, 128, 3) and record["mask"].shape == (128, 128)
        assert set(np.unique(record["mask"])) <= {1, 2, 3}
        image_file = (extracted / "images" / f"{record['id']}.jpg").read_bytes()
        trimap_file = (extracted / "annotations" / "trimaps" / f"{record['id']}.png").read_bytes()
        assert record["sha256"] == shards.sample_hash(record["id"], image_file, trimap_file)
        hashes.append(record["sha256"])
    assert reference["fingerprint"] == shards.fingerprint(hashes)


def test_image_size_and_shard_size(archives, tmp_path):
    report = warehouse.ingest(str(archives), tmp_path / "out", image_size=32, shard_size=5)
    assert [Path(p).name for p in report["shards"]] == [f"samples-0000{i}.tfrecord" for i in range(3)]
    first = shards.decode(next(shards.read_records(report["shards"])))
    assert first["image"].shape == (32, 32, 3)


# ---------------------------------------------------------------- unsafe archives


def evil_archive(path, name, kind):
    with tarfile.open(path, "w:gz") as tar:
        member = tarfile.TarInfo(name)
        if kind == "file":
            member.size = 4
            tar.addfile(member, io.BytesIO(b"evil"))
            return
        member.type = {"symlink": tarfile.SYMTYPE, "hardlink": tarfile.LNKTYPE, "device": tarfile.CHRTYPE}[kind]
        member.linkname = "/etc/passwd" if kind != "device" else ""
        tar.addfile(member)


@pytest.mark.parametrize(
    "name, kind, says",
    [
        ("../x", "file", "contains '..'"),
        ("images/../../x", "file", "contains '..'"),
        ("ABSOLUTE", "file", "absolute path"),
        ("images/link.jpg", "symlink", "symbolic link to '/etc/passwd'"),
        ("images/hard.jpg", "hardlink", "hard link"),
        ("images/dev", "device", "device"),
    ],
)
def test_unsafe_members_are_refused(tmp_path, name, kind, says):
    name = name.replace("ABSOLUTE", str(tmp_path / "absolute_x"))
    bad = tmp_path / "evil.tar.gz"
    evil_archive(bad, name, kind)
    target = tmp_path / "sandbox" / "target"
    with pytest.raises(DataError, match=f"member '{name}' .*{says}"):
        archive.safe_extract(bad, target)
    assert not (tmp_path / "sandbox" / "x").exists() and not (tmp_path / "x").exists()
    assert not (tmp_path / "absolute_x").exists()
    assert list(target.rglob("*")) == [] or all(p.is_dir() for p in target.rglob("*"))


def test_ingest_of_an_unsafe_archive_stops_with_no_output(archives, tmp_path):
    source = tmp_path / "source"
    source.mkdir()
    evil_archive(source / "images.tar.gz", "../escaped.jpg", "file")
    shutil.copy(archives / "annotations.tar.gz", source)
    with pytest.raises(DataError, match=r"images.tar.gz: member '../escaped.jpg' contains '..'"):
        warehouse.ingest(str(source), tmp_path / "out")
    assert_no_output(tmp_path / "out")
    assert list(tmp_path.rglob("escaped.jpg")) == []


def test_corrupt_archive_is_named(tmp_path):
    bad = tmp_path / "images.tar.gz"
    bad.write_bytes(b"\x1f\x8b\x08\x00 not really gzip")
    (tmp_path / "annotations.tar.gz").write_bytes(b"")
    with pytest.raises(DataError, match=r"images.tar.gz: not a readable tar archive"):
        warehouse.ingest(str(bad), tmp_path / "out")
    assert_no_output(tmp_path / "out")


# ---------------------------------------------------------------- bad samples


def corrupt_jpeg(root, sample_id):
    path = root / "images" / f"{sample_id}.jpg"
    path.write_bytes(path.read_bytes()[: 400])
    return f"images/{sample_id}.jpg: image does not decode"


def trimap_value_7(root, sample_id):
    path = root / "annotations" / "trimaps" / f"{sample_id}.png"
    values = np.asarray(Image.open(path)).copy()
    values[5, 9] = 7
    Image.fromarray(values).save(path)
    return f"annotations/trimaps/{sample_id}.png: trimap holds value 7 (first at row 5, column 9); expected only 1"


def size_mismatch(root, sample_id):
    path = root / "annotations" / "trimaps" / f"{sample_id}.png"
    trimap = Image.open(path)
    width, height = trimap.size
    trimap.crop((0, 0, width - 1, height)).save(path)
    return (f"annotations/trimaps/{sample_id}.png: trimap is {width - 1}x{height} "
            f"but images/{sample_id}.jpg is {width}x{height}")


def missing_trimap(root, sample_id):
    (root / "annotations" / "trimaps" / f"{sample_id}.png").unlink()
    return f"images/{sample_id}.jpg: its trimap annotations/trimaps/{sample_id}.png is missing"


BREAKAGES = [corrupt_jpeg, trimap_value_7, size_mismatch, missing_trimap]


@pytest.mark.parametrize("breakage", BREAKAGES)
def test_bad_sample_stops_ingest_naming_file_and_problem(layout, tmp_path, breakage):
    sample_id = sample_ids(layout)[4]
    message = breakage(layout, sample_id)
    with pytest.raises(DataError) as raised:
        warehouse.ingest(str(layout), tmp_path / "out")
    assert message in str(raised.value)
    assert str(raised.value).startswith(f"{layout}: ")
    assert_no_output(tmp_path / "out")


def test_skip_bad_lists_every_skipped_sample(layout, extracted, tmp_path):
    broken = dict(zip(sample_ids(layout)[:4], BREAKAGES))
    messages = [breakage(layout, sample_id) for sample_id, breakage in broken.items()]
    report = warehouse.ingest(str(layout), tmp_path / "out", skip_bad=True)
    assert report["samples"] == COUNT - 4
    assert sorted(s["file"] for s in report["skipped"]) == sorted(m.split(": ", 1)[0] for m in messages)
    for skipped in report["skipped"]:
        assert skipped["source"] == str(layout)
        assert any(f"{skipped['file']}: {skipped['reason']}".startswith(m) for m in messages)

    # The kept samples fingerprint exactly like a source without the bad ones.
    clean = Path(shutil.copytree(extracted, tmp_path / "clean"))
    for sample_id in broken:
        (clean / "images" / f"{sample_id}.jpg").unlink()
    assert warehouse.ingest(str(clean), tmp_path / "clean_out")["fingerprint"] == report["fingerprint"]


def test_all_bad_is_an_error(layout, tmp_path):
    for sample_id in sample_ids(layout):
        missing_trimap(layout, sample_id)
    with pytest.raises(DataError, match=f"all {COUNT} samples are bad"):
        warehouse.ingest(str(layout), tmp_path / "out", skip_bad=True)
    assert_no_output(tmp_path / "out")


# ---------------------------------------------------------------- sources and outputs


@pytest.mark.parametrize("source", ["does/not/exist", "EMPTY", "synth:0", "synth:many", "tfds:mnist"])
def test_unusable_sources_are_named(tmp_path, source):
    if source == "EMPTY":
        source = str(tmp_path / "empty")
        Path(source).mkdir()
    with pytest.raises(DataError, match=f"source '{source}'"):
        warehouse.ingest(source, tmp_path / "out")
    assert_no_output(tmp_path / "out")


def test_missing_source_lists_accepted_forms(tmp_path):
    with pytest.raises(DataError, match="does not exist; accepted sources: synth:COUNT"):
        warehouse.ingest(str(tmp_path / "nowhere"), tmp_path / "out")


def test_directory_without_samples_is_an_error(tmp_path):
    (tmp_path / "src" / "images").mkdir(parents=True)
    with pytest.raises(DataError, match="no samples found"):
        warehouse.ingest(str(tmp_path / "src"), tmp_path / "out")


def test_output_directory_must_be_new_or_empty(archives, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(DataError, match="already exists and is not empty"):
        warehouse.ingest(str(archives), tmp_path / "out")
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"
    (tmp_path / "empty").mkdir()
    assert warehouse.ingest(str(archives), tmp_path / "empty")["samples"] == COUNT


def make_feedback(root, ids, extracted):
    """Copy samples of ``extracted`` under new ids into a feedback store's accepted folder, with review records and
    acceptances signed by the (trusted) user's key, as `petseg feedback accept` leaves them."""
    accepted = root / "accepted"
    (accepted / "images").mkdir(parents=True)
    (accepted / "annotations" / "trimaps").mkdir(parents=True)
    (accepted / "feedback").mkdir(parents=True)
    for old, new in ids.items():
        for folder, suffix in (("images", ".jpg"), ("annotations/trimaps", ".png")):
            shutil.copy(extracted / folder / f"{old}{suffix}", accepted / folder / f"{new}{suffix}")
        record = {"id": new, "identity": "ana", "received": "2026-01-01T00:00:00+00:00", "model_version": "petseg-1",
                  "content_sha256": "0" * 64, "accepted_by": "bo", "accepted_at": "2026-01-02T00:00:00+00:00"}
        (accepted / reviews.record_file(new)).write_text(json.dumps(record))
        (accepted / reviews.acceptance_file(new)).write_bytes(reviews.sign(
            new, image=(accepted / oxford.image_file(new)).read_bytes(),
            trimap=(accepted / oxford.trimap_file(new)).read_bytes(), record=record,
            signing_key=keys.ensure_signing_key()[0]))
    return root


def test_feedback_adds_samples(archives, extracted, reference, tmp_path):
    first, second = sample_ids(extracted)[:2]
    renames = {first: first.rsplit("_", 1)[0] + "_9001", second: "feedback_2"}
    feedback = make_feedback(tmp_path / "feedback", renames, extracted)
    report = warehouse.ingest(str(archives), tmp_path / "out", feedback=str(feedback))
    assert report["samples"] == COUNT + 2 and report["feedback"] == str(feedback)
    assert report["fingerprint"] != reference["fingerprint"]
    assert report["species"]["unlisted"] == 2
    ids = [shards.decode(r)["id"] for r in shards.read_records(report["shards"])]
    assert ids == sorted(ids) and "feedback_2" in ids
    assert [(sample["id"], sample["identity"], sample["accepted_by"]) for sample in report["feedback_samples"]] == \
        sorted((new, "ana", "bo") for new in renames.values())


def test_feedback_store_without_accepted_samples_adds_none(archives, reference, tmp_path):
    pending = tmp_path / "feedback" / "pending" / "ana"
    pending.mkdir(parents=True)
    (pending / "feedback_1.json").write_text("{}")
    report = warehouse.ingest(str(archives), tmp_path / "out", feedback=str(tmp_path / "feedback"))
    assert report["feedback_samples"] == [] and report["fingerprint"] == reference["fingerprint"]


def test_feedback_with_a_known_id_is_refused(archives, extracted, tmp_path):
    first = sample_ids(extracted)[0]
    feedback = make_feedback(tmp_path / "feedback", {first: first}, extracted)
    with pytest.raises(DataError, match=f"images/{first}.jpg has the same id"):
        warehouse.ingest(str(archives), tmp_path / "out", feedback=str(feedback))
    assert_no_output(tmp_path / "out")


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture
def http_root(tmp_path):
    """An HTTP server on loopback serving a directory; yields (directory, base URL)."""
    root = tmp_path / "www"
    root.mkdir()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(QuietHandler, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_http_source(http_root, archives, reference, tmp_path):
    root, base = http_root
    (root / "pets").mkdir()
    for name in ("images.tar.gz", "annotations.tar.gz"):
        shutil.copy(archives / name, root / "pets")
    assert warehouse.ingest(f"{base}/pets/", tmp_path / "a")["fingerprint"] == reference["fingerprint"]
    assert warehouse.ingest(f"{base}/pets/images.tar.gz", tmp_path / "b")["fingerprint"] == reference["fingerprint"]
    with pytest.raises(DataError, match=rf"{base}/missing/images.tar.gz: HTTP 404"):
        warehouse.ingest(f"{base}/missing/", tmp_path / "c")
    assert_no_output(tmp_path / "c")


def test_s3_source_and_feedback(s3, moto_endpoint, archives, extracted, reference, tmp_path):
    s3.create_bucket(Bucket="pets")
    for name in ("images.tar.gz", "annotations.tar.gz"):
        s3.upload_file(str(archives / name), "pets", f"oxford/{name}")
    report = warehouse.ingest("s3://pets/oxford/", tmp_path / "a", s3_endpoint_url=moto_endpoint)
    assert report["fingerprint"] == reference["fingerprint"]

    first = sample_ids(extracted)[0]
    feedback = make_feedback(tmp_path / "feedback", {first: "feedback_1"}, extracted)
    for path in sorted(p for p in feedback.rglob("*") if p.is_file()):
        s3.upload_file(str(path), "pets", f"feedback/{path.relative_to(feedback).as_posix()}")
    report = warehouse.ingest("s3://pets/oxford", tmp_path / "b", feedback="s3://pets/feedback/",
                              s3_endpoint_url=moto_endpoint)
    local = warehouse.ingest(str(archives), tmp_path / "c", feedback=str(feedback))
    assert report["samples"] == COUNT + 1 and report["fingerprint"] == local["fingerprint"]

    with pytest.raises(DataError, match="s3://nobucket/x: cannot list .*NoSuchBucket"):
        warehouse.ingest("s3://nobucket/x/", tmp_path / "d", s3_endpoint_url=moto_endpoint)
    assert_no_output(tmp_path / "d")


def test_tfds_source_keeps_the_released_bytes(extracted, reference, tmp_path):
    import tensorflow as tf
    import tensorflow_datasets as tfds

    def as_dataset(self, split, decoders=None, read_config=None, shuffle_files=False):
        # Examples as the oxford_iiit_pet builder stores them: the original file bytes.
        def examples():
            for sample_id in sample_ids(extracted):
                breed = sample_id.rsplit("_", 1)[0]
                yield {
                    "image": (extracted / "images" / f"{sample_id}.jpg").read_bytes(),
                    "segmentation_mask": (extracted / "annotations" / "trimaps" / f"{sample_id}.png").read_bytes(),
                    "file_name": f"{sample_id}.jpg",
                    "label": oxford.BREEDS.index(breed),
                    "species": oxford.SPECIES.index(oxford.species_of(breed)),
                }

        signature = {name: tf.TensorSpec((), tf.string) for name in ("image", "segmentation_mask", "file_name")}
        signature.update({name: tf.TensorSpec((), tf.int64) for name in ("label", "species")})
        return tf.data.Dataset.from_generator(examples, output_signature=signature)

    with tfds.testing.mock_data(as_dataset_fn=as_dataset):
        report = warehouse.ingest("tfds:oxford_iiit_pet", tmp_path / "out")
    assert report["fingerprint"] == reference["fingerprint"]
    assert report["species"] == reference["species"]


# ---------------------------------------------------------------- transform


def test_transform_splits_by_id(reference, tmp_path):
    result = warehouse.transform(reference["shards"], tmp_path / "splits", shard_size=2)
    assert set(result["splits"]) == set(SPLITS) == set(result["counts"])
    assert sum(result["counts"].values()) == COUNT
    assert result["manifest"] == {
        r["id"]: split_of(r["id"]) for r in map(shards.decode, shards.read_records(reference["shards"]))
    }
    ingested = set(shards.read_records(reference["shards"]))
    for split, paths in result["splits"].items():
        records = list(shards.read_records(paths))
        assert len(records) == result["counts"][split]
        assert all(len(list(shards.read_records([p]))) <= 2 for p in paths)
        assert set(records) <= ingested
        assert all(split_of(shards.decode(r)["id"]) == split for r in records)
    again = warehouse.transform(reference["shards"], tmp_path / "again", shard_size=2)
    for split in SPLITS:
        assert [Path(p).read_bytes() for p in again["splits"][split]] == [
            Path(p).read_bytes() for p in result["splits"][split]
        ]


def test_transform_of_a_missing_shard_leaves_no_output(reference, tmp_path):
    with pytest.raises(DataError, match="nope.tfrecord: cannot read shard"):
        warehouse.transform(reference["shards"] + [str(tmp_path / "nope.tfrecord")], tmp_path / "splits")
    assert_no_output(tmp_path / "splits")


def test_official_split_takes_test_txt_and_carves_the_rest(extracted, reference, tmp_path):
    test_ids = sorted(line.split()[0] for line in (extracted / "annotations" / "test.txt").read_text().splitlines())
    assert reference["official_test"] == test_ids
    result = warehouse.transform(reference["shards"], tmp_path / "splits", official_test=reference["official_test"])
    manifest = result["manifest"]
    assert sorted(i for i, split in manifest.items() if split == "test") == test_ids
    for sample_id, split in manifest.items():
        if sample_id not in test_ids:
            bucket = int(hashlib.md5(sample_id.encode()).hexdigest(), 16) % 10
            assert split == {7: "validation", 9: "calibration"}.get(bucket, "training")


def test_one_official_split_file_alone_is_refused(layout, tmp_path):
    (layout / "annotations" / "test.txt").unlink()
    with pytest.raises(DataError, match="annotations/trainval.txt is present but annotations/test.txt is not"):
        warehouse.ingest(str(layout), tmp_path / "out")
    assert_no_output(tmp_path / "out")


def test_a_source_without_split_files_has_no_official_test(layout, tmp_path):
    for name in ("test", "trainval"):
        (layout / "annotations" / f"{name}.txt").unlink()
    assert warehouse.ingest(str(layout), tmp_path / "out")["official_test"] is None


def test_shard_records_are_byte_identical_to_tensorflows(tmp_path):
    import tensorflow as tf

    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)
    mask = rng.integers(1, 4, (8, 8), dtype=np.uint8)
    ours = shards.encode("pug_3", image, mask, "ab" * 32)

    def feature(value):
        if isinstance(value, int):
            return tf.train.Feature(int64_list=tf.train.Int64List(value=[value]))
        return tf.train.Feature(bytes_list=tf.train.BytesList(value=[value]))

    example = tf.train.Example(features=tf.train.Features(feature={
        "id": feature(b"pug_3"), "image": feature(image.tobytes()), "mask": feature(mask.tobytes()),
        "height": feature(8), "width": feature(8), "sha256": feature(("ab" * 32).encode())}))
    assert ours == example.SerializeToString(deterministic=True)
    with shards.ShardWriter(tmp_path / "ours", "s", 10) as writer:
        writer.write(ours)
    with tf.io.TFRecordWriter(str(tmp_path / "theirs.tfrecord")) as writer:
        writer.write(ours)
    assert (tmp_path / "ours" / "s-00000.tfrecord").read_bytes() == (tmp_path / "theirs.tfrecord").read_bytes()
    decoded = shards.decode(ours)
    assert decoded["id"] == "pug_3" and decoded["sha256"] == "ab" * 32
    np.testing.assert_array_equal(decoded["image"], image)
    np.testing.assert_array_equal(decoded["mask"], mask)


def test_record_bytes_are_pinned():
    # Bytes that change here change every shard file written from the same samples.
    image = np.arange(4 * 5 * 3, dtype=np.uint8).reshape(4, 5, 3)
    mask = (np.arange(4 * 5, dtype=np.uint8) % 3 + 1).reshape(4, 5)
    record = shards.encode("pug_7", image, mask, "0123456789abcdef" * 4)
    assert len(record) == 242
    assert hashlib.sha256(record).hexdigest() == "843e5020ab2f442bb152a9e2919d427b025b94a880a5a9c875d670ca1eb04750"
    assert hashlib.sha256(shards.frame(record)).hexdigest() == (
        "3a91714279f05267a0299383c8e11a5395216ce1c4c6f6a0607f8f415c1af605")


def test_shards_do_not_import_tensorflow():
    code = "import sys, petseg.data.shards, petseg.data.warehouse; print('tensorflow' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"


@pytest.mark.parametrize("record, message", [
    (b"\x0a\x05ab", r"record: not a serialised tf.train.Example \(.*\): not a petseg shard record"),
    (b"", "record lacks feature\\(s\\) id, image, mask, height, width, sha256: not a petseg shard record"),
    (shards.encode("pug_1", np.zeros((2, 2, 3), np.uint8), np.ones((4, 5), np.uint8), "ab" * 32),
     r"record: its features do not fit together \(.*\): not a petseg shard record"),
])
def test_a_record_that_is_not_a_shard_record_is_a_data_error(record, message):
    with pytest.raises(DataError, match=message):
        shards.decode(record)


def test_a_damaged_length_is_named(reference, tmp_path):
    shard = tmp_path / "damaged.tfrecord"
    content = bytearray(Path(reference["shards"][0]).read_bytes())
    content[9] ^= 0xFF  # the masked CRC-32C of the first record's length
    shard.write_bytes(bytes(content))
    with pytest.raises(DataError, match=r"damaged.tfrecord: cannot read shard \(record 0: corrupt or truncated length\)"):
        list(shards.read_records([shard]))


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_a_damaged_shard_is_named(reference, tmp_path, damage):
    shard = tmp_path / "damaged.tfrecord"
    content = bytearray(Path(reference["shards"][0]).read_bytes())
    if damage == "truncate":
        content = content[:-100]
    else:
        content[40] ^= 0xFF
    shard.write_bytes(bytes(content))
    with pytest.raises(DataError, match=r"damaged.tfrecord: cannot read shard \(record \d+: corrupt or truncated data\)"):
        list(shards.read_records([shard]))


def _crafted_id(split: str) -> str:
    """A feedback id whose md5 bucket names ``split``, as a sender varying the content could find one."""
    return next(f"feedback_{n:016x}" for n in itertools.count() if split_of(f"feedback_{n:016x}") == split)


def test_accepted_feedback_goes_to_training_only_and_held_out_splits_stay_the_sources(
        archives, extracted, reference, tmp_path):
    crafted = {split: _crafted_id(split) for split in ("validation", "test", "calibration")}
    source_ids = sample_ids(extracted)
    feedback = make_feedback(tmp_path / "feedback", dict(zip(source_ids, crafted.values())), extracted)
    report = warehouse.ingest(str(archives), tmp_path / "out", feedback=str(feedback))
    assert sorted(sample["id"] for sample in report["feedback_samples"]) == sorted(crafted.values())
    with_feedback = warehouse.transform(report["shards"], tmp_path / "with", official_test=None,
                                        training_only=[sample["id"] for sample in report["feedback_samples"]])
    without = warehouse.transform(reference["shards"], tmp_path / "without")
    assert all(with_feedback["manifest"][sample_id] == "training" for sample_id in crafted.values())
    for split in ("validation", "test", "calibration"):
        held_out = sorted(i for i, s in with_feedback["manifest"].items() if s == split)
        assert held_out == sorted(i for i, s in without["manifest"].items() if s == split)
    assert with_feedback["counts"]["training"] == without["counts"]["training"] + len(crafted)
