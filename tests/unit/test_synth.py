"""The embedded data set: Oxford layout, breed table, reproducible bytes."""

import argparse
import io
import os
import stat
import tarfile

import numpy as np
import pytest
from PIL import Image

from petseg import oxford
from petseg.cli import data as data_commands
from petseg.data import scenes, synth
from petseg.errors import ConfigError

COUNT = 16


@pytest.fixture(scope="module")
def archives(tmp_path_factory):
    return synth.write_archives(tmp_path_factory.mktemp("synth"), count=COUNT, seed=7)


def members(path):
    with tarfile.open(path) as tar:
        return {member.name: (member, tar.extractfile(member).read() if member.isfile() else None) for member in tar}


def test_same_seed_gives_identical_bytes_and_another_seed_does_not(archives, tmp_path):
    again = synth.write_archives(tmp_path / "again", count=COUNT, seed=7)
    other = synth.write_archives(tmp_path / "other", count=COUNT, seed=8)
    for first, second, third in zip(archives, again, other):
        assert first.read_bytes() == second.read_bytes()
        assert first.read_bytes() != third.read_bytes()


def test_archive_metadata_is_fixed(archives):
    for path in archives:
        raw = path.read_bytes()
        assert raw[:2] == b"\x1f\x8b"
        assert raw[4:8] == b"\0\0\0\0", "gzip mtime must be 0"
        assert not raw[3] & 0x08, "gzip header must not hold a file name"
        with tarfile.open(path) as tar:
            names = tar.getnames()
            assert names == sorted(names)
            for member in tar:
                assert (member.mtime, member.uid, member.gid, member.uname) == (0, 0, 0, "root")
                assert member.mode == (0o755 if member.isdir() else 0o644)


def test_layout_matches_oxford(archives):
    images, annotations = members(archives[0]), members(archives[1])
    ids = sorted(name.removeprefix("images/").removesuffix(".jpg") for name, (m, _) in images.items() if m.isfile())
    assert len(ids) == COUNT
    assert sorted(n for n, (m, _) in annotations.items() if m.isfile()) == (
        ["annotations/list.txt", "annotations/test.txt", "annotations/trainval.txt"]
        + [f"annotations/trimaps/{i}.png" for i in ids]
    )
    # The official split files: list.txt's lines without its header, every sample in exactly one.
    listed = [line for line in annotations["annotations/list.txt"][1].decode().splitlines() if not line.startswith("#")]
    halves = [annotations[f"annotations/{name}.txt"][1].decode().splitlines() for name in ("trainval", "test")]
    assert sorted(halves[0] + halves[1]) == sorted(listed)
    assert halves[0] and halves[1] and not set(halves[0]) & set(halves[1])

    lines = annotations["annotations/list.txt"][1].decode().splitlines()
    assert lines[:6] == [
        "#Image CLASS-ID SPECIES BREED ID",
        "#ID: 1:37 Class ids",
        "#SPECIES: 1:Cat 2:Dog",
        "#BREED ID: 1-25:Cat 1:12:Dog",
        "#All images with 1st letter as captial are cat images",
        "#images with small first letter are dog images",
    ]
    rows = [line.split(" ") for line in lines[6:]]
    assert sorted(row[0] for row in rows) == ids
    for sample_id, class_id, species, breed_id in rows:
        breed = oxford.BREEDS[int(class_id) - 1]
        assert sample_id.rsplit("_", 1) == [breed, sample_id.rsplit("_", 1)[1]]
        assert species == ("1" if sample_id[0].isupper() else "2")
        same_species = [b for b in oxford.BREEDS if oxford.species_of(b) == oxford.species_of(breed)]
        assert int(breed_id) == same_species.index(breed) + 1


def test_photos_and_trimaps_look_like_oxford(archives):
    images, annotations = members(archives[0]), members(archives[1])
    sizes = set()
    for name, (member, data) in images.items():
        if not member.isfile():
            continue
        photo = Image.open(io.BytesIO(data))
        assert photo.format == "JPEG" and photo.mode == "RGB"
        trimap_name = name.replace("images/", "annotations/trimaps/").replace(".jpg", ".png")
        trimap = Image.open(io.BytesIO(annotations[trimap_name][1]))
        assert trimap.format == "PNG" and trimap.mode == "L"
        assert trimap.size == photo.size
        assert all(scenes.SIDE_RANGE[0] <= side <= scenes.SIDE_RANGE[1] for side in photo.size)
        sizes.add(photo.size)
        values = np.asarray(trimap)
        assert set(np.unique(values)) == {1, 2, 3}
        # The border is a thin band, not a region.
        assert (values == 3).mean() < 0.2
    assert len(sizes) > COUNT // 2, "photo sizes should vary"


def test_breed_table_is_oxford():
    names = list(oxford.BREEDS)
    assert len(names) == 37 and names == sorted(names, key=str.lower)
    assert sum(oxford.species_of(name) == "cat" for name in names) == 12
    assert oxford.breed_ids("Abyssinian") == (1, 1, 1)
    assert oxford.breed_ids("yorkshire_terrier") == (37, 2, 25)
    assert oxford.breed_ids("Sphynx") == (34, 1, 12)


def test_every_oxford_breed_has_a_look():
    assert [breed.name for breed in scenes.BREEDS] == list(oxford.BREEDS)


def test_bad_count_and_seed_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="count must be at least 1, got 0"):
        synth.write_archives(tmp_path, count=0, seed=1)
    with pytest.raises(ConfigError, match="seed must be 0 or more, got -1"):
        synth.write_archives(tmp_path, count=1, seed=-1)


def test_command_writes_the_archives(tmp_path, capsys):
    parser = argparse.ArgumentParser(prog="petseg")
    data_commands.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["synth", "--out", str(tmp_path), "--count", "3", "--seed", "5"])
    assert args.handler(args) == 0
    assert capsys.readouterr().out.split() == [str(tmp_path / "images.tar.gz"), str(tmp_path / "annotations.tar.gz")]
    assert len(members(tmp_path / "images.tar.gz")) == 4  # images/ and three photos


def test_archives_are_readable_by_other_users(tmp_path):
    """Archives are data to share: mode 0644 under the usual umask 022, as open() would make them."""
    previous = os.umask(0o022)
    try:
        written = synth.write_archives(tmp_path, count=1, seed=3)
    finally:
        os.umask(previous)
    for path in written:
        mode = stat.S_IMODE(path.stat().st_mode)
        assert mode == 0o644, f"{path.name} has mode {mode:o}"
        assert mode & stat.S_IROTH and mode & stat.S_IRGRP
    assert not list(tmp_path.glob(".*.partial"))
