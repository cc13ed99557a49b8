"""The flow's lineage mirrored into Pachyderm.

No Pachyderm server can run here (no pachd binary in any reachable registry): the runs mirror
into tests/support/pachd_standin.py, a gRPC server on loopback that speaks Pachyderm's PFS protocol with
pachyderm-sdk's own messages and keeps repos, branches and commits in memory with Pachyderm's
semantics (see its docstring for what it does not implement).
"""

import json
import subprocess
import sys

from pachyderm_sdk import Client
from pachyderm_sdk.api import pfs

from harness import REPO
from harness import commit_files as files_of
from petseg.lineage import graph as lineage
from petseg.lineage import pachyderm

EXPECTED_FILES = {
    "ingest": {"/ingest_report.json"},
    "transform": {"/splits.json"},
    "tune": {"/trials.json", "/selected.json"},
    "train": {"/model.keras", "/fingerprint.txt", "/history.json"},
    "calibrate": {"/calibration.json", "/report.json"},
    "evaluate": {"/metrics.json"},
    "release": {"/manifest.json", "/decision.txt"},
}


def commits_of(client, stage, run_id):
    repo = pfs.Repo(name=stage, project=pfs.Project(name=pachyderm.PROJECT))
    return [info for info in client.pfs.list_commit(repo=repo)
            if f"PetSegFlow/{run_id}" in info.description and info.finished]


def test_one_finished_commit_per_stage_with_files_and_metadata(flow_pachd, released_run):
    client = Client.from_pachd_address(flow_pachd.address)
    graph = released_run["end"].task.data.lineage_graph
    model_fingerprint = released_run["train"].task.data.model_fingerprint
    for stage, files in EXPECTED_FILES.items():
        commits = commits_of(client, stage, released_run.id)
        assert len(commits) == 1, (stage, commits)
        info = commits[0]
        assert set(files_of(client, info.commit)) == files
        assert released_run["ingest"].task.data.dataset_fingerprint in info.description
        assert graph["stages"][stage]["pachyderm"]["commit"] == info.commit.id
        if stage in ("train", "calibrate", "evaluate", "release"):
            assert model_fingerprint in info.description
    model_bytes = files_of(client, commits_of(client, "train", released_run.id)[0].commit)["/model.keras"]
    assert model_bytes == released_run["train"].task.data.model_keras


def steps_upstream(run, step: str) -> set[str]:
    """The steps before ``step`` in the run's own step graph, as the Metaflow Client reports it."""
    found, todo = set(), [run[step]]
    while todo:
        for parent in todo.pop().parent_steps:
            if parent.id not in found:
                found.add(parent.id)
                todo.append(parent)
    return found


def test_provenance_is_the_flow_graph(flow_pachd, released_run):
    """Pachyderm's provenance is what the run recorded, and follows the flow's own steps.

    Expected values come from the run, not from petseg.lineage.graph.STAGES (which wrote the provenance):
    direct provenance from the run's lineage graph artifact, full provenance from the steps upstream
    of each stage's step in the run's step graph.
    """
    client = Client.from_pachd_address(flow_pachd.address)
    graph = released_run["end"].task.data.lineage_graph
    commit_set = graph["pachyderm"]["commit_set"]
    step_of = {stage: entry["pathspec"].split("/")[2] for stage, entry in graph["stages"].items()}
    assert set(step_of) == set(EXPECTED_FILES)
    for stage, entry in graph["stages"].items():
        repo = pfs.Repo(name=stage, project=pfs.Project(name=pachyderm.PROJECT))
        branch = client.pfs.inspect_branch(branch=pfs.Branch(repo=repo, name="master"))
        assert sorted(p.repo.name for p in branch.direct_provenance) == sorted(entry["parents"]), stage
        commit = client.pfs.inspect_commit(commit=pfs.Commit(repo=repo, id=commit_set))
        assert sorted(c.repo.name for c in commit.direct_provenance) == sorted(entry["parents"]), stage
        upstream = steps_upstream(released_run, step_of[stage])
        recorded_upstream = {other for other, step in step_of.items() if step in upstream}
        assert {p.repo.name for p in branch.provenance} == recorded_upstream, stage


def test_resumed_run_adds_no_duplicates(flow_pachd, resumed_run):
    failed, resumed, _ = resumed_run
    client = Client.from_pachd_address(flow_pachd.address)
    graph = resumed["end"].task.data.lineage_graph
    commit_set = graph["pachyderm"]["commit_set"]
    for stage in EXPECTED_FILES:
        repo = pfs.Repo(name=stage, project=pfs.Project(name=pachyderm.PROJECT))
        in_set = [i for i in client.pfs.list_commit(repo=repo) if i.commit.id == commit_set]
        assert len(in_set) == 1 and in_set[0].finished, stage


def test_lineage_command_shows_the_graph(flow_pachd, released_run, resumed_run):
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
