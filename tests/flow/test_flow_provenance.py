"""Provenance of real runs: the launching code version everywhere, `petseg verify`, OpenLineage events from
every step, lineage edges that are what each step opened, and bounded Pachyderm calls."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from lineage_schema import validate

from harness import REPO, TINY, flip_one_byte, run_flow, session_root
from petseg.lineage import graph as lineage
from petseg.lineage import openlineage


def petseg(*args):
    return subprocess.run([sys.executable, "-m", "petseg", *args], capture_output=True, text=True, cwd=REPO)


def git(*args: str, cwd: Path = REPO) -> str:
    return subprocess.run(["git", "-C", str(cwd), *args], capture_output=True, text=True, check=True).stdout.strip()


def run_events(receiver, run) -> list[dict]:
    return [event for event in receiver.events if event["run"]["facets"]["metaflow"]["run_id"] == run.id]


# -- the code version ----------------------------------------------------------------------------------------


def test_the_code_version_is_the_launching_checkouts_everywhere(released_run, lineage_receiver, flow_pachd):
    commit, dirty = git("rev-parse", "HEAD"), bool(git("status", "--porcelain"))
    version = commit + ("-dirty" if dirty else "")
    settings = released_run["start"].task.data.settings
    code = settings["code"]
    assert (code["commit"], code["dirty"], code["checkout"]) == (commit, dirty, str(REPO))
    assert code["code_package"] is None  # a local run ships no code package
    assert settings["code_version"] == version
    manifest = released_run["release"].task.data.manifest
    assert manifest["code_version"] == version and manifest["settings"]["code"] == code
    from petseg.release import bundle

    assert bundle.load_release(manifest["location"]).tags()["code_version"] == version
    graph = released_run["end"].task.data.lineage_graph
    assert graph["code"] == code and graph["code_version"] == version
    from pachyderm_sdk import Client
    from pachyderm_sdk.api import pfs

    client = Client.from_pachd_address(flow_pachd.address)
    commit_info = client.pfs.inspect_commit(commit=pfs.Commit(
        repo=pfs.Repo(name="train", project=pfs.Project(name="petseg")), id=graph["pachyderm"]["commit_set"]))
    assert json.loads(commit_info.description.partition("\n")[2])["code"] == code
    events = run_events(lineage_receiver, released_run)
    assert events and {event["run"]["facets"]["petseg"]["code_version"] for event in events} == {version}
    assert {event["run"]["facets"]["petseg"]["code"].get("dirty", False) for event in events} == {dirty}


def test_require_clean_refuses_a_run_from_a_checkout_with_uncommitted_changes(tmp_path):
    checkout = tmp_path / "checkout"
    for part in ("flows", "petseg"):
        shutil.copytree(REPO / part, checkout / part, ignore=shutil.ignore_patterns("__pycache__"))
    for args in (["init", "-q", "-b", "main"], ["add", "."], ["commit", "-q", "-m", "copy"]):
        subprocess.run(["git", "-c", "user.email=t@t", "-c", "user.name=t", "-C", str(checkout), *args], check=True)
    flow = checkout / "flows" / "seg_flow.py"
    flow.write_text(flow.read_text() + "# an edit nobody committed\n")
    result = subprocess.run([sys.executable, str(flow), "run", "--require_clean", "True", "--source", "synth:8",
                             "--deploy", "none"], capture_output=True, text=True, cwd=session_root())
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert f"--require_clean: the run was launched from {checkout} at " in output
    assert "with uncommitted changes; commit them" in output and "Traceback" not in output
    assert "/ingest/" not in output  # stopped in its start step


# -- petseg verify -------------------------------------------------------------------------------------------


def test_verify_proves_a_run_its_release_and_its_model(released_run, flow_pachd):
    result = petseg("verify", released_run.id, "--pachyderm", flow_pachd.address)
    assert result.returncode == 0, result.stdout + result.stderr
    (line,) = result.stdout.splitlines()
    assert line.startswith(f"verified PetSegFlow/{released_run.id} ") and line.endswith("match")
    for checked in ("lineage outputs", "shards", "fingerprints", "release files", "7 Pachyderm commits"):
        assert checked in line
    manifest = released_run["release"].task.data.manifest
    result = petseg("verify", "--release", manifest["location"])
    assert result.returncode == 0 and result.stdout.startswith(f"verified release {manifest['location']}, signed by key ")
    result = petseg("verify", "--model", manifest["model_fingerprint"][:16])
    assert result.returncode == 0 and f"PetSegFlow/{released_run.id} " in result.stdout


def test_verify_names_a_shard_the_weights_or_the_calibration_table_with_one_byte_changed(released_run):
    release_dir = Path(released_run["release"].task.data.manifest["location"])
    shard = released_run["transform"].task.data.splits["splits"]["test"][0]
    blob = Path(released_run["start"].task.data.blob_root) / shard["sha256"][:2] / shard["sha256"]
    refused = f"REFUSED release {release_dir} does not verify against key "
    for path, named in ((blob, f"MISMATCH shard {shard['name']} does not match: expected "),
                        (release_dir / "model.keras", refused), (release_dir / "calibration.json", refused)):
        original = flip_one_byte(path)
        try:
            result = petseg("verify", released_run.id)
            found = lineage.sha256(path.read_bytes())
        finally:
            path.write_bytes(original)
        assert result.returncode == 1, result.stdout + result.stderr
        (line,) = result.stdout.splitlines()
        assert line.startswith(named) and (str(path) in line or f"{path.name} hashes to {found}" in line)
        assert lineage.sha256(original) in line and found in line
    assert petseg("verify", released_run.id).returncode == 0


# -- OpenLineage ---------------------------------------------------------------------------------------------


def test_every_step_sends_valid_openlineage_events_over_http(released_run, lineage_receiver):
    events = run_events(lineage_receiver, released_run)
    for event in events:
        validate(event)
    assert set(lineage_receiver.paths) == {"/api/v1/lineage"}
    by_task = {}
    for event in events:
        by_task.setdefault(event["run"]["facets"]["metaflow"]["pathspec"], []).append(event["eventType"])
    tasks = {task.pathspec for step in released_run for task in step}
    assert by_task == {**{task: ["START", "COMPLETE"] for task in tasks},
                       f"PetSegFlow/{released_run.id}": ["START", "COMPLETE"]}
    parent = openlineage.run_uuid(f"PetSegFlow/{released_run.id}")
    for event in events:
        assert event["job"]["namespace"] == "petseg-tests"
        facets = event["run"]["facets"]
        assert facets.get("parent", {}).get("run", {}).get("runId", parent) == parent
        assert facets["petseg"]["split_rule"] == "md5"
        assert facets["petseg"]["determinism"] == {"seed": 42, "strict": True, "threads": 2, "portable": True}
    evaluate = next(e for e in events if e["job"]["name"] == "PetSegFlow.evaluate" and e["eventType"] == "COMPLETE")
    inputs = {d["facets"]["petseg_file"]["file"]: d["facets"]["petseg_file"] for d in evaluate["inputs"]}
    graph = released_run["end"].task.data.lineage_graph
    assert inputs["model.keras"]["sha256"] == graph["stages"]["train"]["outputs"]["model.keras"]["sha256"]
    assert inputs["calibration.json"]["stage"] == "calibrate"
    test_shards = released_run["transform"].task.data.splits["splits"]["test"]
    assert {s["name"]: s["sha256"] for s in test_shards}.items() <= {n: f["sha256"] for n, f in inputs.items()}.items()
    ingest = next(e for e in events if e["job"]["name"] == "PetSegFlow.ingest" and e["eventType"] == "COMPLETE")
    written = {d["facets"]["petseg_file"]["sha256"] for d in ingest["outputs"]}
    assert {s["sha256"] for s in released_run["ingest"].task.data.ingest_report["shards"]} <= written
    assert ingest["inputs"][0]["facets"]["petseg_file"]["kind"] == "source"


def test_without_a_transport_events_are_kept_and_a_failed_step_sends_fail(resumed_run):
    failed, resumed, _ = resumed_run
    for run, origin in ((failed, None), (resumed, failed.id)):
        result = petseg("lineage", run.id, "--openlineage")
        assert result.returncode == 0, result.stderr
        events = [json.loads(line) for line in result.stdout.splitlines()]
        for event in events:
            validate(event)
        assert {event["run"]["facets"]["metaflow"].get("origin_run_id") for event in events} == {origin}
        train = [e["eventType"] for e in events if e["job"]["name"] == "PetSegFlow.train"]
        assert train == (["START", "FAIL"] if origin is None else ["START", "COMPLETE"])
    failure = next(e for e in json.loads("[" + ",".join(petseg("lineage", failed.id, "--openlineage").stdout
                                                        .splitlines()) + "]") if e["eventType"] == "FAIL")
    assert "PETSEG_FAIL_AT=train" in failure["run"]["facets"]["errorMessage"]["message"]


def test_required_events_that_cannot_be_delivered_fail_the_step():
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    status, run, output = run_flow(env={"OPENLINEAGE_URL": f"http://127.0.0.1:{port}"}, **TINY)
    assert status == "failed"
    assert f"was not delivered to the OpenLineage http transport at http://127.0.0.1:{port}" in output
    assert [step.id for step in run] == ["start"] and not run["start"].task.successful


# -- lineage edges -------------------------------------------------------------------------------------------


def opened_files(opens_log: Path) -> dict[tuple[str, str], set[str]]:
    """(step, task id) -> the files under the datastore its task process opened (tests/support/open_audit)."""
    found = {}
    for log in opens_log.glob("*.log"):
        first, *paths = log.read_text().splitlines()
        argv = first.removeprefix("ARGV ").split("\x1f")
        if "step" in argv and "--task-id" in argv:
            key = (argv[argv.index("step") + 1], argv[argv.index("--task-id") + 1])
            found.setdefault(key, set()).update(paths)
    return found


def test_lineage_edges_are_what_each_step_opened(released_run, opens_log):
    """Expected edges come from the files each task process opened (an audit hook), not from petseg.

    A file a task opened is matched to the stage that wrote it: a shard in the blob store by its key (the
    ingest stage wrote the ingest report's shards, transform the splits'), an artifact in Metaflow's datastore
    by its content address (the artifact of a stage output, petseg.lineage.graph.STAGES).
    """
    graph = released_run["end"].task.data.lineage_graph
    writer = {s["sha256"]: "ingest" for s in released_run["ingest"].task.data.ingest_report["shards"]}
    for records in released_run["transform"].task.data.splits["splits"].values():
        writer.update({s["sha256"]: "transform" for s in records})
    for stage, entry in lineage.STAGES.items():
        for artifact in entry.outputs.values():
            writer[released_run[stage].task[artifact].sha] = stage
    opened = opened_files(opens_log)
    assert opened, "the audit hook logged nothing"
    recorded_steps = {entry["pathspec"].split("/")[2] for entry in graph["stages"].values()}
    for stage, entry in graph["stages"].items():
        step = released_run[entry["pathspec"].split("/")[2]]
        steps = {step.id} | {p.id for p in step.parent_steps if p.id not in recorded_steps and p.id != "start"}
        expected = set()
        for (step_name, _task), paths in opened.items():
            if step_name in steps:
                expected |= {writer[Path(p).name] for p in paths if Path(p).name in writer}
        expected.discard(stage)
        assert sorted(expected) == entry["parents"], stage
        assert set(entry["parents"]) <= set(lineage.STAGES[stage].parents), stage
    assert graph["stages"]["evaluate"]["parents"] == ["calibrate", "train", "transform", "tune"]
    assert graph["stages"]["release"]["parents"] == ["calibrate", "evaluate", "train"]


# -- bounded Pachyderm calls ---------------------------------------------------------------------------------


@pytest.mark.timeout(600)
def test_a_pachd_that_never_answers_fails_the_step_within_its_timeout():
    """With --lineage required, the ingest step fails once its PETSEG_LINEAGE_TIMEOUT is spent (the pytest
    timeout bounds the whole run), and the silent pachd holds no commit."""
    from pachd_standin import silent_pachd

    with silent_pachd() as address:
        status, run, output = run_flow(env={"PETSEG_LINEAGE_TIMEOUT": "5"}, **TINY, pachyderm=address)
    assert status == "failed"
    assert f"stage ingest was not mirrored: cannot reach Pachyderm at {address}" in output
    assert "DEADLINE_EXCEEDED" in output or "no time left" in output
    assert {step.id for step in run} == {"start", "ingest"} and not run["ingest"].task.successful
