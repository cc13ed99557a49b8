"""One layout of a run's files beside the datastore, and of what a deployment keeps outside its release."""

import pytest

from petseg import layout
from petseg.errors import ConfigError


@pytest.mark.parametrize("root", ["/data/metaflow", "/data/metaflow/", "s3://bucket/metaflow"])
def test_a_runs_files_live_under_petseg_beside_the_datastore(root):
    where = layout.Layout(root)
    base = root.rstrip("/")
    assert where.blobs == f"{base}/petseg/blobs"
    assert where.release("7") == f"{base}/petseg/releases/petseg-7"
    assert where.openlineage("PetSegFlow/7/train/3") == f"{base}/petseg/openlineage/PetSegFlow/7"
    assert where.artifact("PetSegFlow/7/train/3", "model_keras") == f"{base}/PetSegFlow/7/train/3/model_keras"
    assert layout.feedback(where.release("7")) == f"{base}/petseg/feedback/petseg-7"


def test_a_recorded_blob_store_finds_the_rest():
    assert layout.Layout.of_blobs("s3://bucket/metaflow/petseg/blobs/") == layout.Layout("s3://bucket/metaflow")
    with pytest.raises(ConfigError, match="is not a petseg blob store"):
        layout.Layout.of_blobs("/data/elsewhere")


def test_feedback_of_a_release_elsewhere_is_beside_it():
    assert layout.feedback("/data/my-release/") == "/data/my-release-feedback"
    assert layout.feedback("releases/petseg-7") == "feedback/petseg-7"


def test_a_deployment_keeps_its_record_in_the_state_directory(tmp_path, monkeypatch):
    monkeypatch.setenv("PETSEG_STATE_DIR", str(tmp_path / "state"))
    release = tmp_path / "releases" / "petseg-7"
    release.mkdir(parents=True)
    record = layout.deployment_dir(str(release))
    assert record.parent == tmp_path / "state" / "deployments" and record.name.startswith("petseg-7-")
    assert layout.deployment_dir(str(release) + "/") == record  # one directory, however it is named
    assert layout.deployment_dir("s3://bucket/petseg/releases/petseg-7/") != record
