"""Lineage graph (petseg.lineage.graph), its Pachyderm mirror (petseg.lineage.pachyderm, against the pachd stand-in),
and `petseg lineage` (petseg.cli.lineage)."""

import argparse
import ast
import hashlib
import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
from pachd_standin import running_standin, silent_pachd
from pachyderm_sdk import Client
from pachyderm_sdk.api import pfs

from harness import commit_files
from petseg.cli import lineage as lineage_commands
from petseg.errors import ConfigError, LineageError, RunError
from petseg.lineage import graph as lineage
from petseg.lineage import pachyderm, runs

RUN = "PetSegFlow/7"
FAST = {"attempts": 3, "delay": 0.01}


@pytest.fixture
def pachd():
    with running_standin() as standin:
        yield standin


@pytest.fixture
def client(pachd):
    return Client.from_pachd_address(pachd.address)


def outputs(stage: str, run: str = RUN) -> dict[str, bytes]:
    """Small, distinct output files for a stage of a run."""
    return {
        f"{stage}.json": json.dumps({"stage": stage, "run": run}).encode(),
        f"parts/{stage}-0.bin": (stage + run).encode() * 100,
    }


def read_parents(graph, stage):
    """What a stage of the real flow reads: every output of each of its declared parents recorded so far."""
    return [{"name": name, "sha256": output["sha256"]} for parent in lineage.STAGES[stage].parents
            for name, output in graph["stages"].get(parent, {}).get("outputs", {}).items()]


def record(graph, stage, *, address=None, run=RUN, files=None, inputs=None, dataset_fingerprint=None,
           model_fingerprint=None, **mirror_options):
    """What a flow step does: record the stage in the graph, then mirror it (given an address)."""
    files = files or outputs(stage, run)
    graph = lineage.record_stage(
        graph, stage, files=files, pathspec=f"{run}/{stage}/1",
        inputs=read_parents(graph, stage) if inputs is None else inputs,
        dataset_fingerprint=dataset_fingerprint, model_fingerprint=model_fingerprint,
    )
    return pachyderm.mirror_stage(graph, stage, files=files, address=address, **mirror_options)


def full_run(address, *, run=RUN, **kwargs) -> dict:
    graph = lineage.new_graph(pathspec=run, code_version="0.1.0+test")
    for stage in lineage.STAGES:
        fingerprints = {}
        if stage == "ingest":
            fingerprints["dataset_fingerprint"] = hashlib.sha256(run.encode()).hexdigest()
        if stage == "train":
            fingerprints["model_fingerprint"] = hashlib.sha256(b"m" + run.encode()).hexdigest()
        graph = record(graph, stage, address=address, run=run, **fingerprints, **kwargs)
    return graph


def repo(stage):
    return pfs.Repo(name=stage, project=pfs.Project(name=pachyderm.PROJECT))


def petseg_commits(client, stage, run=RUN):
    return [
        info for info in client.pfs.list_commit(repo=repo(stage))
        if f"petseg {stage} of {run}" in info.description
    ]


def open_commits(client, stage):
    return [i for i in client.pfs.list_commit(repo=repo(stage)) if not pachyderm._finished(i)]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# -- the graph, without Pachyderm ----------------------------------------------


def test_graph_without_pachyderm(tmp_path):
    local = tmp_path / "splits.json"
    local.write_bytes(b'{"training": 7}')
    graph = lineage.new_graph(pathspec=RUN, code_version="0.1.0")
    graph = record(graph, "ingest", dataset_fingerprint="d" * 64)
    graph = record(graph, "transform", files={"splits.json": local, "empty": b""})
    for stage in ("tune", "train", "calibrate", "evaluate", "release"):
        graph = record(graph, stage)

    assert json.loads(json.dumps(graph)) == graph
    assert graph["pachyderm"] is None and graph["dataset_fingerprint"] == "d" * 64
    assert {s: e["parents"] for s, e in graph["stages"].items()} == {
        "ingest": [], "transform": ["ingest"], "tune": ["transform"],
        "train": ["transform", "tune"], "calibrate": ["train", "transform"],
        "evaluate": ["calibrate", "train", "transform", "tune"], "release": ["calibrate", "evaluate", "train"],
    }
    transform = graph["stages"]["transform"]
    assert transform["outputs"] == {
        "empty": {"sha256": hashlib.sha256(b"").hexdigest(), "size": 0},
        "splits.json": {"sha256": hashlib.sha256(local.read_bytes()).hexdigest(), "size": 15},
    }
    assert transform["pathspec"] == f"{RUN}/transform/1" and transform["pachyderm"] is None


def test_parents_are_the_stages_that_wrote_what_a_stage_read():
    graph = lineage.new_graph(pathspec=RUN, code={"commit": "c" * 40, "dirty": True}, code_version="c-dirty")
    graph = lineage.record_stage(graph, "ingest", files={"report.json": b"{}"}, pathspec=f"{RUN}/ingest/2",
                                 inputs=[{"name": "synth:8", "sha256": "d" * 64, "source": True}],
                                 blobs=[{"name": "samples-00000.tfrecord", "sha256": "a" * 64}])
    graph = lineage.record_stage(graph, "transform", files={"splits.json": b"[]"}, pathspec=f"{RUN}/transform/3",
                                 inputs=[{"name": "samples-00000.tfrecord", "sha256": "a" * 64, "blob": True},
                                         {"name": "elsewhere.bin", "sha256": "e" * 64}])
    entry = graph["stages"]["transform"]
    assert entry["parents"] == ["ingest"]
    assert {(i["name"], i["stage"]) for i in entry["inputs"]} == {("samples-00000.tfrecord", "ingest"),
                                                                  ("elsewhere.bin", None)}
    assert graph["stages"]["ingest"]["inputs"] == [{"name": "synth:8", "sha256": "d" * 64, "stage": None,
                                                    "source": True}]
    assert graph["code"]["dirty"] and graph["code_version"] == "c-dirty"
    # A blob is matched against blobs, a file against files: the same hash as a file is not the shard.
    graph = lineage.record_stage(graph, "tune", files={"t": b"1"}, pathspec=f"{RUN}/tune/6",
                                 inputs=[{"name": "x", "sha256": "a" * 64}])
    assert graph["stages"]["tune"]["parents"] == []


def test_reading_from_an_undeclared_stage_is_a_lineage_error():
    graph = record(lineage.new_graph(pathspec=RUN, code_version="v"), "ingest")
    report = graph["stages"]["ingest"]["outputs"]["ingest.json"]["sha256"]
    with pytest.raises(LineageError, match="stage tune read ingest.json from stage.s. ingest"):
        record(graph, "tune", inputs=[{"name": "ingest.json", "sha256": report}])


def test_record_stage_leaves_its_input_alone():
    graph = lineage.new_graph(pathspec=RUN, code_version="v")
    record(graph, "ingest")
    assert graph["stages"] == {}


@pytest.mark.parametrize(
    "stage, files, pathspec",
    [
        ("training", {"a": b""}, RUN),
        ("ingest", {"../escape": b""}, RUN),
        ("ingest", {"": b""}, RUN),
        ("ingest", {"a": Path("/no/such/file")}, RUN),
        ("ingest", {"a": b""}, "PetSegFlow"),
    ],
)
def test_bad_input_is_a_lineage_error(stage, files, pathspec):
    graph = lineage.new_graph(pathspec=RUN, code_version="v")
    with pytest.raises(LineageError):
        lineage.record_stage(graph, stage, files=files, pathspec=pathspec)


def test_merge_joins_branches_and_refuses_conflicts():
    base = record(lineage.new_graph(pathspec=RUN, code_version="v"), "transform")
    left = record(base, "tune")
    right = record(base, "train", model_fingerprint="m" * 64)
    merged = lineage.merge([left, right])
    assert set(merged["stages"]) == {"transform", "tune", "train"}
    assert merged["model_fingerprint"] == "m" * 64
    with pytest.raises(LineageError, match="tune"):
        lineage.merge([left, record(base, "tune", files={"other": b"x"})])


def test_find_runs_by_model():
    graphs = [
        {"pathspec": "PetSegFlow/1", "model_fingerprint": "abcdef0123456789"},
        {"pathspec": "PetSegFlow/2", "model_fingerprint": "0123456789abcdef"},
        {"pathspec": "PetSegFlow/3", "model_fingerprint": None},
    ]
    assert [g["pathspec"] for g in lineage.find_runs_by_model("ABCDEF01", graphs)] == ["PetSegFlow/1"]
    assert lineage.find_runs_by_model("ffffffff", graphs) == []
    with pytest.raises(ConfigError):
        lineage.find_runs_by_model("abc", graphs)


def test_format_graph_shows_stages_outputs_and_commits(pachd):
    graph = full_run(pachd.address)
    text = lineage.format_graph(graph)
    commit_set = graph["pachyderm"]["commit_set"]
    assert f"train <- transform, tune    petseg/train@{commit_set}" in text
    digest = graph["stages"]["tune"]["outputs"]["tune.json"]["sha256"]
    assert digest[:12] in text and digest not in text
    plain = lineage.format_graph(full_run(None, run="PetSegFlow/8"))
    assert "ingest <- (input)    (not mirrored)" in plain


# -- the mirror ----------------------------------------------------------------


def test_one_finished_commit_per_stage_with_files_and_metadata(pachd, client):
    graph = full_run(pachd.address)
    commit_set = graph["pachyderm"]["commit_set"]
    for stage in lineage.STAGES:
        record_ = graph["stages"][stage]["pachyderm"]
        assert record_["mirrored"] and record_["commit"] == commit_set and not record_["reused"]
        (info,) = petseg_commits(client, stage)
        assert pachyderm._finished(info) and info.commit.id == commit_set
        files = commit_files(client, info.commit)
        assert files == {"/" + name: data for name, data in outputs(stage).items()}
        meta = json.loads(info.description.partition("\n")[2])
        assert meta["pathspec"] == f"{RUN}/{stage}/1" and meta["run_id"] == "7"
        assert meta["code_version"] == "0.1.0+test"
        assert meta["dataset_fingerprint"] == graph["dataset_fingerprint"]
        assert meta["outputs"] == graph["stages"][stage]["outputs"]
    meta = json.loads(petseg_commits(client, "release")[0].description.partition("\n")[2])
    assert meta["model_fingerprint"] == graph["model_fingerprint"]
    for stage in lineage.STAGES:
        assert open_commits(client, stage) == []


def test_provenance_between_repos_and_commits(pachd, client):
    graph = full_run(pachd.address)
    commit_set = graph["pachyderm"]["commit_set"]
    for stage, entry in lineage.STAGES.items():
        parents = entry.parents
        branch = client.pfs.inspect_branch(branch=pfs.Branch(repo=repo(stage), name="master"))
        assert sorted(b.repo.name for b in branch.direct_provenance) == sorted(parents)
        info = client.pfs.inspect_commit(commit=pfs.Commit(repo=repo(stage), id=commit_set))
        assert sorted(c.repo.name for c in info.direct_provenance) == sorted(parents)
        assert {c.id for c in info.direct_provenance} <= {commit_set}
    release = client.pfs.inspect_branch(branch=pfs.Branch(repo=repo("release"), name="master"))
    assert {b.repo.name for b in release.provenance} == set(lineage.STAGES) - {"release"}


def test_rerunning_a_stage_adds_no_commit(pachd, client):
    graph = full_run(pachd.address)
    before = {s: len(list(client.pfs.list_commit(repo=repo(s)))) for s in lineage.STAGES}
    # A retried ingest step starts again from the graph it was given: no commit set yet.
    start = lineage.new_graph(pathspec=RUN, code_version="0.1.0+test")
    again = record(start, "ingest", address=pachd.address)
    assert again["stages"]["ingest"]["pachyderm"]["reused"]
    assert again["pachyderm"] == graph["pachyderm"]
    again = record(graph, "train", address=pachd.address)
    assert again["stages"]["train"]["pachyderm"]["reused"]
    after = {s: len(list(client.pfs.list_commit(repo=repo(s)))) for s in lineage.STAGES}
    assert after == before


def test_a_retry_with_other_bytes_keeps_the_first_commit(pachd, client):
    graph = full_run(pachd.address)
    with pytest.warns(UserWarning, match="earlier attempt"):
        again = record(graph, "train", address=pachd.address, files={"model.keras": b"resaved"})
    assert again["stages"]["train"]["pachyderm"]["commit"] == graph["pachyderm"]["commit_set"]
    assert len(petseg_commits(client, "train")) == 1


def test_resumed_run_with_other_outputs_is_refused(pachd):
    graph = full_run(pachd.address)
    with pytest.raises(LineageError, match="already recorded by PetSegFlow/7"):
        record(graph, "evaluate", address=pachd.address, run="PetSegFlow/9",
               files={"metrics.json": b"{}"})


def test_next_run_gets_its_own_commit_set_with_only_its_files(pachd, client):
    first = full_run(pachd.address)
    second = full_run(pachd.address, run="PetSegFlow/8")
    assert first["pachyderm"]["commit_set"] != second["pachyderm"]["commit_set"]
    commit = pfs.Commit(repo=repo("tune"), id=second["pachyderm"]["commit_set"])
    assert set(commit_files(client, commit)) == {"/tune.json", "/parts/tune-0.bin"}
    info = client.pfs.inspect_commit(commit=commit)
    assert info.parent_commit.id == first["pachyderm"]["commit_set"]


def test_connection_dropped_mid_commit_is_retried_without_leftovers(pachd, client):
    pachd.drop_connection(method="ModifyFile", after_messages=3, outage_calls=4)
    graph = record(lineage.new_graph(pathspec=RUN, code_version="v"), "ingest",
                   address=pachd.address, attempts=5, delay=0.01)
    assert graph["stages"]["ingest"]["pachyderm"]["mirrored"]
    (info,) = petseg_commits(client, "ingest")
    assert pachyderm._finished(info)
    assert commit_files(client, info.commit) == {
        "/" + k: v for k, v in outputs("ingest").items()
    }
    assert open_commits(client, "ingest") == []


@pytest.mark.parametrize("stage, method", [("ingest", "ModifyFile"), ("calibrate", "FinishCommit")])
def test_outage_mid_commit_then_a_rerun_completes(pachd, client, stage, method):
    graph = lineage.new_graph(pathspec=RUN, code_version="v")
    for earlier in list(lineage.STAGES)[: list(lineage.STAGES).index(stage)]:
        graph = record(graph, earlier, address=pachd.address)
    pachd.drop_connection(method=method, after_messages=4, outage_calls=1000)
    with pytest.raises(LineageError, match=pachd.address) as failure:
        record(graph, stage, address=pachd.address, **FAST)
    assert "pachd is running" in str(failure.value)
    pachd.heal()
    # Nothing half written: an open commit holds none or all of the stage's files.
    names = {"/" + name for name in outputs(stage)}
    for info in open_commits(client, stage):
        assert set(commit_files(client, info.commit)) & names in (set(), names)
    graph = record(graph, stage, address=pachd.address, **FAST)
    (info,) = petseg_commits(client, stage)
    assert pachyderm._finished(info) and info.commit.id == graph["pachyderm"]["commit_set"]
    assert commit_files(client, info.commit) == {"/" + k: v for k, v in outputs(stage).items()}
    assert open_commits(client, stage) == []


def test_server_stopped_and_back(pachd, client):
    graph = record(lineage.new_graph(pathspec=RUN, code_version="v"), "ingest",
                   address=pachd.address)
    pachd.stop()
    with pytest.warns(UserWarning, match="cannot reach Pachyderm"):
        missed = record(graph, "transform", address=pachd.address, required=False, **FAST)
    assert missed["stages"]["transform"]["pachyderm"]["mirrored"] is False
    pachd.start()
    fresh = Client.from_pachd_address(pachd.address)
    graph = record(missed, "transform", address=pachd.address, **FAST)
    assert graph["stages"]["transform"]["pachyderm"]["mirrored"]
    assert len(petseg_commits(fresh, "transform")) == 1


def test_unreachable_and_required_raises_naming_the_address():
    address = f"127.0.0.1:{free_port()}"
    graph = lineage.new_graph(pathspec=RUN, code_version="v")
    started = time.monotonic()
    with pytest.raises(LineageError) as failure:
        record(graph, "ingest", address=address, **FAST)
    message = str(failure.value)
    assert address in message and "3 attempt" in message and "pachd is running" in message
    assert time.monotonic() - started < 10


def test_unreachable_and_best_effort_warns_and_records():
    address = f"127.0.0.1:{free_port()}"
    graph = lineage.new_graph(pathspec=RUN, code_version="v")
    with pytest.warns(UserWarning, match=address):
        graph = record(graph, "ingest", address=address, required=False, **FAST)
    missed = graph["stages"]["ingest"]["pachyderm"]
    assert missed["mirrored"] is False and address in missed["error"]
    assert missed["files"] == sorted(outputs("ingest"))
    assert graph["pachyderm"] is None
    with pytest.warns(UserWarning, match="ingest stage of PetSegFlow/7 was not mirrored"):
        graph = record(graph, "transform", address=address, required=False, **FAST)
    assert graph["stages"]["transform"]["pachyderm"]["mirrored"] is False


@pytest.mark.timeout(120)
@pytest.mark.parametrize("required", [True, False])
def test_a_pachd_that_accepts_and_never_answers_costs_at_most_the_timeout(required):
    """Every call has a deadline: the stage gives up (or warns) after its timeout, not never."""
    with silent_pachd() as address:
        graph = lineage.new_graph(pathspec=RUN, code_version="v")
        if required:
            with pytest.raises(LineageError, match=address) as failure:
                record(graph, "ingest", address=address, attempts=3, delay=0.2, timeout=3)
            assert "DEADLINE_EXCEEDED" in str(failure.value) or "no time left" in str(failure.value)
        else:
            with pytest.warns(UserWarning, match=address):
                graph = record(graph, "ingest", address=address, required=False, attempts=3, delay=0.2,
                               timeout=3)
            assert graph["stages"]["ingest"]["pachyderm"]["mirrored"] is False


@pytest.mark.timeout(120)
@pytest.mark.parametrize("stage, method", [("ingest", "ModifyFile"), ("calibrate", "FinishCommit")])
def test_a_call_that_never_returns_leaves_no_half_written_commit(pachd, client, stage, method):
    graph = lineage.new_graph(pathspec=RUN, code_version="v")
    for earlier in list(lineage.STAGES)[: list(lineage.STAGES).index(stage)]:
        graph = record(graph, earlier, address=pachd.address)
    pachd.hang(method=method)
    with pytest.warns(UserWarning, match=f"stage {stage} was not mirrored"):
        missed = record(graph, stage, address=pachd.address, required=False, attempts=2, delay=0.1, timeout=3)
    assert missed["stages"][stage]["pachyderm"]["mirrored"] is False
    assert method in pachd.calls
    pachd.heal()
    names = {"/" + name for name in outputs(stage)}
    if stage == "ingest":  # the commit it started was dropped
        assert petseg_commits(client, stage) == [] and open_commits(client, stage) == []
    else:  # the commit set's open commit was cleared back to empty: "stage not run"
        for info in open_commits(client, stage):
            assert not set(commit_files(client, info.commit)) & names
    graph = record(graph, stage, address=pachd.address, **FAST)
    (info,) = petseg_commits(client, stage)
    assert pachyderm._finished(info)


def test_commit_digests_read_every_mirrored_file_back(pachd):
    graph = full_run(pachd.address)
    found = pachyderm.commit_digests(graph, address=pachd.address, timeout=10)
    assert set(found) == set(lineage.STAGES)
    for stage, entry in graph["stages"].items():
        assert found[stage]["finished"] and found[stage]["commit"] == graph["pachyderm"]["commit_set"]
        assert found[stage]["files"] == {name: out["sha256"] for name, out in entry["outputs"].items()}


def test_bad_address_is_a_config_error():
    graph = record(lineage.new_graph(pathspec=RUN, code_version="v"), "ingest")
    with pytest.raises(ConfigError, match="bad Pachyderm address"):
        pachyderm.mirror_stage(graph, "ingest", files={}, address="ftp://somewhere:1")


def test_mirror_stage_needs_the_stage_recorded_first(pachd):
    graph = lineage.new_graph(pathspec=RUN, code_version="v")
    with pytest.raises(LineageError, match="record it first"):
        pachyderm.mirror_stage(graph, "ingest", files=outputs("ingest"), address=pachd.address)
    with pytest.raises(LineageError, match="unknown stage"):
        pachyderm.mirror_stage(graph, "training", files={}, address=pachd.address)


def test_mirror_stage_adds_only_the_mirror_records_and_leaves_its_input_alone(pachd):
    graph = lineage.new_graph(pathspec=RUN, code_version="v")
    for stage in ("ingest", "transform"):
        recorded = lineage.record_stage(graph, stage, files=outputs(stage), pathspec=f"{RUN}/{stage}/1")
        before = json.loads(json.dumps(recorded))
        assert pachyderm.mirror_stage(recorded, stage, files=outputs(stage), address=None) == recorded
        graph = pachyderm.mirror_stage(recorded, stage, files=outputs(stage), address=pachd.address)
        assert recorded == before
        mirrored = graph["stages"][stage].pop("pachyderm")
        assert mirrored["mirrored"] and mirrored["repo"] == stage
        assert graph["stages"][stage] == {k: v for k, v in recorded["stages"][stage].items() if k != "pachyderm"}
        graph["stages"][stage]["pachyderm"] = mirrored
    assert graph["pachyderm"] == {"address": pachd.address, "project": "petseg",
                                  "commit_set": graph["stages"]["ingest"]["pachyderm"]["commit"]}


def imported_modules(module) -> set[str]:
    """The modules a module imports, anywhere in it (``from petseg import x`` counts as petseg.x)."""
    found = set()
    for node in ast.walk(ast.parse(Path(module.__file__).read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def test_the_graph_knows_nothing_of_pachyderm_and_the_mirror_builds_on_the_graph():
    graph_imports = imported_modules(lineage)
    assert not {name for name in graph_imports if name.startswith(("pachyderm", "grpc", "argparse", "petseg."))
                and name not in ("petseg.errors", "petseg.errors.ConfigError", "petseg.errors.LineageError")}
    assert "petseg.lineage.graph" in imported_modules(pachyderm)


# -- the stand-in's own semantics ---------------------------------------------


def test_standin_refuses_commits_on_output_branches_and_applies_streams_whole(pachd, client):
    full_run(pachd.address)
    with pytest.raises(grpc.RpcError) as refused:
        client.pfs.start_commit(branch=pfs.Branch(repo=repo("train"), name="master"))
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    with pytest.raises(grpc.RpcError) as missing:
        client.pfs.inspect_repo(repo=repo("nothing"))
    assert missing.value.code() == grpc.StatusCode.NOT_FOUND
    commit = client.pfs.start_commit(branch=pfs.Branch(repo=repo("ingest"), name="master"))
    pachd.drop_connection(method="ModifyFile", after_messages=3, outage_calls=0)
    with pytest.raises(grpc.RpcError):
        client.pfs.put_file_from_bytes(commit=commit, path="/late.txt", data=b"x" * 10)
    assert "/late.txt" not in commit_files(client, commit)


def test_standin_runs_from_the_command_line():
    port = free_port()
    script = Path(__file__).parents[1] / "support" / "pachd_standin.py"
    process = subprocess.Popen(
        [sys.executable, str(script), "--port", str(port)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert "listening on" in process.stdout.readline()
        version = Client.from_pachd_address(f"127.0.0.1:{port}").get_version()
        assert (version.major, version.minor) == (2, 12)
    finally:
        process.terminate()
        process.wait(timeout=10)


# -- petseg lineage --------------------------------------------------------------


def run_cli(monkeypatch, capsys, argv, graphs):
    monkeypatch.setattr(runs, "run_graph", lambda run: graphs[0])
    monkeypatch.setattr(runs, "run_graphs", lambda: iter(graphs))
    parser = argparse.ArgumentParser(prog="petseg")
    lineage_commands.register(parser.add_subparsers())
    args = parser.parse_args(argv)
    code = args.handler(args)
    return code, capsys.readouterr().out


def test_cli_shows_a_run_as_text_or_json(monkeypatch, capsys):
    graph = full_run(None)
    code, out = run_cli(monkeypatch, capsys, ["lineage", "latest"], [graph])
    assert code == 0 and out.startswith(RUN) and "calibrate <- train, transform" in out
    code, out = run_cli(monkeypatch, capsys, ["lineage", "7", "--json"], [graph])
    assert code == 0 and json.loads(out) == graph


def test_cli_finds_runs_by_model(monkeypatch, capsys):
    graphs = [full_run(None), full_run(None, run="PetSegFlow/8")]
    wanted = graphs[1]["model_fingerprint"]
    code, out = run_cli(monkeypatch, capsys, ["lineage", "--model", wanted[:10]], graphs)
    assert code == 0 and out.startswith("PetSegFlow/8 ") and len(out.splitlines()) == 1
    code, out = run_cli(monkeypatch, capsys, ["lineage", "--model", wanted, "--json"], graphs)
    assert [g["pathspec"] for g in json.loads(out)] == ["PetSegFlow/8"]
    code, out = run_cli(monkeypatch, capsys, ["lineage", "--model", "f" * 64], graphs)
    assert code == 1 and "no finished PetSegFlow run" in out


def test_cli_needs_a_run_or_a_model(monkeypatch, capsys):
    with pytest.raises(ConfigError):
        run_cli(monkeypatch, capsys, ["lineage"], [])


def test_cli_refuses_runs_of_other_flows():
    with pytest.raises(RunError, match="belongs to flow 'OtherFlow'"):
        runs.run_graph("OtherFlow/3")


# -- what a step read and wrote, from its stage's declaration ------------------------------------------------


def test_task_files_follow_each_stage_declaration():
    shard = lambda name: {"name": name, "sha256": hashlib.sha256(name.encode()).hexdigest()}  # noqa: E731
    artifacts = {
        "ingest_report": {"source": "synth:8", "feedback": None, "fingerprint": "f" * 64,
                          "shards": [shard("samples-00000.tfrecord")]},
        "splits": {"splits": {split: [shard(f"{split}-00000.tfrecord")] for split in
                              ("training", "validation", "test", "calibration")}, "counts": {}},
        "trial_results": [], "best": {"index": 0}, "model_keras": b"weights", "model_fingerprint": "m" * 64,
        "history": {}, "calibration": {"classes": []}, "calibration_report": {}, "metrics": {"mIoU": 0.5},
        "manifest": {"version": "petseg-7"}, "gate_message": "passed",
    }
    url = "blobs/{}".format
    reads, writes = lineage.task_files("ingest", artifacts.__getitem__, blob_url=url)
    assert reads == [{"name": "synth:8", "sha256": "f" * 64, "source": True, "location": "synth:8"}]
    assert writes == [{**shard("samples-00000.tfrecord"), "blob": True,
                       "location": url(shard("samples-00000.tfrecord")["sha256"])}]
    reads, writes = lineage.task_files("transform", artifacts.__getitem__, blob_url=url)
    assert [r["name"] for r in reads] == ["ingest_report.json", "samples-00000.tfrecord"]
    assert len(writes) == 4 and all(w["blob"] for w in writes)
    reads, writes = lineage.task_files("evaluate", artifacts.__getitem__, blob_url=url)
    assert {r["name"] for r in reads if not r.get("blob")} == set(lineage.STAGES["evaluate"].reads)
    assert {r["name"] for r in reads if r.get("blob")} == {"training-00000.tfrecord", "validation-00000.tfrecord",
                                                           "test-00000.tfrecord"}
    assert writes == []
    model = next(r for r in reads if r["name"] == "model.keras")
    assert model["sha256"] == lineage.sha256(b"weights")
    for stage, entry in lineage.STAGES.items():  # every file a stage reads is an earlier stage's output
        for name in entry.reads:
            assert lineage.producer_of(name) in entry.parents, (stage, name)
