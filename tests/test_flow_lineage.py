"""The flow's lineage mirrored into Pachyderm.

No Pachyderm server can run here (no pachd binary in any reachable registry): the runs mirror
into tests/pachd_standin.py, a gRPC server on loopback that speaks Pachyderm's PFS protocol with
pachyderm-sdk's own messages and keeps repos, branches and commits in memory with Pachyderm's
semantics (see its docstring for what it does not implement).
"""

import json
import subprocess
import sys

import pytest
from pachyderm_sdk import Client
from pachyderm_sdk.api import pfs

from conftest import REPO
from petseg import lineage
from test_lineage import commit_files as files_of

pytestmark = pytest.mark.flow

EXPECTED_FILES = {
    "warehouse": {"/ingest_report.json"},
    "transform": {"/splits.json"},
    "tune": {"/trials.json", "/selected.json"},
    "model": {"/model.keras", "/fingerprint.txt"},
    "calibrate": {"/calibration.json", "/report.json"},
    "evaluate": {"/metrics.json"},
    "release": {"/manifest.json", "/decision.txt"},
}


def commits_of(client, stage, run_id):
    repo = pfs.Repo(name=stage, project=pfs.Project(name=lineage.PROJECT))
    return [info for info in client.pfs.list_commit(repo=repo)
            if f"PetSegFlow/{run_id}" in info.description and info.finished]


def test_one_finished_commit_per_stage_with_files_and_metadata(pachd, released_run):
    client = Client.from_pachd_address(pachd.address)
    graph = released_run["end"].task.data.lineage_graph
    model_fingerprint = released_run["train"].task.data.model_fingerprint
    for stage, files in EXPECTED_FILES.items():
        commits = commits_of(client, stage, released_run.id)
        assert len(commits) == 1, (stage, commits)
        info = commits[0]
        assert set(files_of(client, info.commit)) == files
        assert released_run["ingest"].task.data.dataset_fingerprint in info.description
        assert graph["stages"][stage]["pachyderm"]["commit"] == info.commit.id
        if stage in ("model", "calibrate", "evaluate", "release"):
            assert model_fingerprint in info.description
    model_bytes = files_of(client, commits_of(client, "model", released_run.id)[0].commit)["/model.keras"]
    assert model_bytes == released_run["train"].task.data.model_keras


def test_provenance_is_the_flow_graph(pachd, released_run):
    client = Client.from_pachd_address(pachd.address)
    for stage, parents in lineage.STAGES.items():
        branch = client.pfs.inspect_branch(
            branch=pfs.Branch(repo=pfs.Repo(name=stage, project=pfs.Project(name=lineage.PROJECT)), name="master"))
        assert sorted(p.repo.name for p in branch.direct_provenance) == sorted(parents), stage


def test_resumed_run_adds_no_duplicates(pachd, resumed_run):
    failed, resumed, _ = resumed_run
    client = Client.from_pachd_address(pachd.address)
    graph = resumed["end"].task.data.lineage_graph
    commit_set = graph["pachyderm"]["commit_set"]
    for stage in EXPECTED_FILES:
        repo = pfs.Repo(name=stage, project=pfs.Project(name=lineage.PROJECT))
        in_set = [i for i in client.pfs.list_commit(repo=repo) if i.commit.id == commit_set]
        assert len(in_set) == 1 and in_set[0].finished, stage


def test_lineage_command_shows_the_graph(pachd, released_run, resumed_run):
    result = subprocess.run([sys.executable, "-m", "petseg", "lineage", released_run.id, "--json"],
                            capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0, result.stderr
    graph = json.loads(result.stdout)
    assert set(graph["stages"]) == set(lineage.STAGES)
    assert all(stage["pachyderm"]["commit"] for stage in graph["stages"].values())
    model = released_run["train"].task.data.model_fingerprint
    found = subprocess.run([sys.executable, "-m", "petseg", "lineage", "--model", model[:12], "--json"],
                           capture_output=True, text=True, cwd=REPO)
    assert found.returncode == 0, found.stderr
    assert released_run.id in found.stdout
