"""Provenance without a flow run: the code version (petseg.codeversion), releases that verify
(petseg.release.bundle, petseg.lineage.verify) and OpenLineage events (petseg.lineage.openlineage), against real git
checkouts, a real S3 server (moto) and a real HTTP receiver on loopback."""

import hashlib
import json
import shutil
import subprocess
from pathlib import Path

import pytest
from lineage_receiver import running_receiver
from lineage_schema import validate

from harness import flip_one_byte
from petseg import codeversion
from petseg.cli import main as petseg
from petseg.errors import ConfigError, LineageError, ModelError
from petseg.flow import stages
from petseg.lineage import graph as lineage
from petseg.lineage import openlineage, verify
from petseg.release import bundle

# -- the code version ---------------------------------------------------------------------------------------


def git(directory: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(directory), *args], check=True, capture_output=True, text=True).stdout


@pytest.fixture
def checkout(tmp_path):
    """A git checkout with one commit and a flow file in flows/."""
    repo = tmp_path / "repo"
    (repo / "flows").mkdir(parents=True)
    (repo / "flows" / "flow.py").write_text("print('flow')\n")
    (repo / ".gitignore").write_text("*.log\n")
    git(repo, "init", "-q", "-b", "main")
    git(repo, "-c", "user.email=t@t", "-c", "user.name=t", "add", ".")
    git(repo, "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-q", "-m", "one")
    return repo


def test_a_clean_checkout_is_its_commit(checkout):
    facts = codeversion.git_facts(checkout / "flows")
    assert facts["commit"] == git(checkout, "rev-parse", "HEAD").strip()
    assert facts["dirty"] is False and facts["branch"] == "main" and facts["checkout"] == str(checkout)
    code = codeversion.record(facts, code_package=None)
    assert codeversion.describe(code) == facts["commit"]
    codeversion.require_clean(code)


@pytest.mark.parametrize("change", ["modified", "untracked"])
def test_uncommitted_changes_mark_the_code_dirty(checkout, change):
    if change == "modified":
        (checkout / "flows" / "flow.py").write_text("print('changed')\n")
    else:
        (checkout / "flows" / "new_module.py").write_text("x = 1\n")
    (checkout / "ignored.log").write_text("ignored files do not count\n")
    code = codeversion.record(codeversion.git_facts(checkout / "flows" / "flow.py"), code_package="f" * 40)
    assert code["dirty"] is True and code["code_package"] == "f" * 40
    assert codeversion.describe(code).endswith("-dirty")
    with pytest.raises(ConfigError, match=f"launched from {checkout} at .* with uncommitted changes"):
        codeversion.require_clean(code)


def test_outside_git_there_is_no_commit(tmp_path):
    code = codeversion.record(codeversion.git_facts(tmp_path), code_package=None)
    assert code["commit"] is None and code["checkout"] == str(tmp_path)
    assert codeversion.describe(code).startswith("petseg-")
    with pytest.raises(ConfigError, match="not a git checkout"):
        codeversion.require_clean(code)


def test_the_code_config_is_taken_at_launch_and_cannot_be_given(checkout):
    assert codeversion.at_launch(codeversion.AT_LAUNCH, checkout=str(checkout / "flows"))["commit"]
    with pytest.raises(ValueError, match="taken at launch"):
        codeversion.at_launch('{"commit": "feed"}', checkout=str(checkout / "flows"))


def test_require_clean_stops_a_dirty_run_in_its_settings(checkout, monkeypatch):
    monkeypatch.delenv("METAFLOW_CODE_SHA", raising=False)
    (checkout / "flows" / "flow.py").write_text("print('changed')\n")
    parameters = {"trials": 1, "tune_epochs": 1, "epochs": 1, "threads": 1, "image_size": 32, "batch_size": 0,
                  "deploy": "none", "server": "seldon", "lineage": "required", "split": "md5", "arch": "small", "seed": 1,
                  "deterministic": True, "require_clean": False, "endpoint": "petseg", "champion": "auto",
                  "canary": 0, "portable": False}
    facts = codeversion.git_facts(checkout / "flows")
    settings = stages.settings(parameters, code=facts)
    assert settings["code"]["dirty"] and settings["code_version"] == f"{facts['commit']}-dirty"
    with pytest.raises(stages.StepError, match="uncommitted changes"):
        stages.settings({**parameters, "require_clean": True}, code=facts)


# -- releases that verify -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_release(tmp_path_factory):
    """A release of an untrained small model with a calibration fitted on random probabilities."""
    from releases import small_release

    return small_release(tmp_path_factory.mktemp("release") / "petseg-7", code_version="c" * 40 + "-dirty",
                         settings={"code": {"commit": "c" * 40, "dirty": True, "code_package": "p" * 40}})


def test_a_release_records_its_file_hashes_and_loads(small_release):
    manifest = json.loads((small_release / "manifest.json").read_text())
    for name in bundle.HASHED_FILES:
        assert manifest["sha256"][name] == hashlib.sha256((small_release / name).read_bytes()).hexdigest()
    loaded = bundle.load_release(str(small_release))
    assert loaded.tags()["code_version"].endswith("-dirty") and loaded.tags()["code_package"] == "p" * 40
    assert verify.verify_release(str(small_release)).summary("r").startswith("verified r, signed by key ")


@pytest.mark.parametrize("name", ["model.keras", "calibration.json"])
def test_a_release_with_one_byte_changed_does_not_load_or_verify(small_release, name):
    original = flip_one_byte(small_release / name)
    try:
        found = hashlib.sha256((small_release / name).read_bytes()).hexdigest()
        with pytest.raises(ModelError, match=f"does not verify against key [0-9a-f]{{16}}: {name} hashes to {found}"):
            bundle.load_release(str(small_release))
        with pytest.raises(verify.Refusal) as refused:
            verify.verify_release(str(small_release))
        assert f"{name} hashes to {found} but was signed as" in str(refused.value)
    finally:
        (small_release / name).write_bytes(original)


def test_a_manifest_without_hashes_is_refused_by_its_signature_and_by_the_hash_check(small_release, tmp_path):
    copy = tmp_path / "old"
    shutil.copytree(small_release, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    del manifest["sha256"]
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ModelError, match="manifest.json hashes to"):
        bundle.load_release(str(copy))
    files = {name: (copy / name).read_bytes() for name in bundle.HASHED_FILES}
    with pytest.raises(ModelError, match="records no sha256"):
        bundle.check_files(manifest, files, uri=str(copy))


@pytest.mark.parametrize("added", ["sitecustomize.py", "model-settings.json", "extra/notes.txt", ".hidden"])
def test_a_file_the_signature_does_not_cover_is_refused_naming_it(small_release, tmp_path, added, capsys):
    copy = shutil.copytree(small_release, tmp_path / "petseg-7")
    (copy / added).parent.mkdir(exist_ok=True)
    (copy / added).write_text("import os\n")
    says = f"release {copy} holds {added.split('/')[0]}, which its signature does not cover"
    with pytest.raises(ModelError, match=says):
        bundle.load_release(str(copy))
    with pytest.raises(verify.Refusal, match=says):
        verify.verify_release(str(copy))
    assert petseg(["verify", "--release", str(copy)]) == 1
    assert capsys.readouterr().out.startswith(f"REFUSED {says}")
    (copy / added).unlink()  # removing what was added leaves the release as it was signed
    if added.startswith("extra/"):
        (copy / "extra").rmdir()
    assert bundle.load_release(str(copy)).signer


def test_a_model_server_serves_a_release_only_as_its_own_model(small_release):
    assert bundle.load_release(str(small_release), model_name="petseg-7").manifest["version"] == "petseg-7"
    assert bundle.load_release(str(small_release), model_name="petseg-7_3").signer  # Seldon's generation suffix
    with pytest.raises(ModelError, match="is 'petseg-7', but the model server was told to serve it as model "
                                         "'petseg-8', another release's"):
        bundle.load_release(str(small_release), model_name="petseg-8")


def test_a_metaflow_run_is_refused_as_a_model_uri_before_metaflow_is_asked(monkeypatch):
    import metaflow

    def never(*args, **kwargs):
        pytest.fail("a server looked the run up: its artifacts are pickles")

    monkeypatch.setattr(metaflow, "Run", never)
    with pytest.raises(ConfigError, match="PetSegFlow/7 is a Metaflow run, whose artifacts are pickles.*"
                                          "`petseg serve RUN` finds it"):
        bundle.load_release("PetSegFlow/7")


def test_a_release_on_s3_verifies_and_names_a_changed_file(s3, moto_endpoint, small_release):
    s3.create_bucket(Bucket="releases")
    for name in bundle.ALL_FILES:
        s3.upload_file(str(small_release / name), "releases", f"r/petseg-7/{name}")
    tally = verify.verify_release("s3://releases/r/petseg-7", s3_endpoint_url=moto_endpoint)
    assert tally.counts["release files"] == 3
    changed = bytearray((small_release / "calibration.json").read_bytes())
    changed[10] ^= 0x01
    s3.put_object(Bucket="releases", Key="r/petseg-7/calibration.json", Body=bytes(changed))
    with pytest.raises(verify.Refusal, match="calibration.json hashes to [0-9a-f]{64} but was signed as") as refused:
        verify.verify_release("s3://releases/r/petseg-7", s3_endpoint_url=moto_endpoint)
    assert refused.value.where == "s3://releases/r/petseg-7"
    with pytest.raises(ModelError, match="calibration.json hashes to"):
        bundle.load_release("s3://releases/r/petseg-7/", s3_endpoint_url=moto_endpoint)
    s3.upload_file(str(small_release / "calibration.json"), "releases", "r/petseg-7/calibration.json")
    s3.put_object(Bucket="releases", Key="r/petseg-7/sitecustomize.py", Body=b"import os\n")
    with pytest.raises(ModelError, match="holds sitecustomize.py, which its signature does not cover"):
        bundle.load_release("s3://releases/r/petseg-7/", s3_endpoint_url=moto_endpoint)


# -- OpenLineage events --------------------------------------------------------------------------------------

CODE = {"commit": "a" * 40, "dirty": True, "branch": "main", "checkout": "/src/petseg", "repository": None,
        "code_package": None}


def events_of_a_task(error=None):
    graph = lineage.new_graph(pathspec="PetSegFlow/5", code=CODE, code_version="a" * 40 + "-dirty")
    graph = lineage.record_stage(graph, "train", files={"model.keras": b"weights"}, pathspec="PetSegFlow/5/train/7")
    reads = [{"name": "model.keras", "sha256": lineage.sha256(b"weights")},
             {"name": "calibration-00000.tfrecord", "sha256": "b" * 64, "blob": True,
              "location": "s3://bucket/metaflow/petseg/blobs/bb/" + "b" * 64}]
    graph = lineage.record_stage(graph, "calibrate", files={"calibration.json": b"{}"}, inputs=reads,
                                 pathspec="PetSegFlow/5/calibrate/8")
    inputs, outputs = openlineage.task_datasets(graph, pathspec="PetSegFlow/5/calibrate/8", reads=reads,
                                                writes=[], datastore_root="s3://bucket/metaflow")
    facts = {"namespace": "petseg", "pathspec": "PetSegFlow/5/calibrate/8", "attempt": 0, "origin_run_id": None,
             "code": CODE, "code_version": "a" * 40 + "-dirty", "determinism": {"seed": 42, "strict": True, "threads": 2},
             "split_rule": "md5", "image_size": 128, "engine_version": "2.19.39"}
    start = openlineage.task_event("START", **facts)
    end = openlineage.task_event("FAIL" if error else "COMPLETE", stage="calibrate", inputs=inputs,
                                 outputs=outputs, error=error, model_fingerprint="f" * 64, **facts)
    return [json.loads(openlineage.to_json(event)) for event in (start, end)]


def test_events_are_valid_openlineage_and_carry_provenance():
    start, complete = events_of_a_task()
    for event in (start, complete):
        validate(event)
    assert start["run"]["runId"] == complete["run"]["runId"]
    assert complete["run"]["facets"]["parent"]["run"]["runId"] == openlineage.run_uuid("PetSegFlow/5")
    assert complete["run"]["facets"]["metaflow"]["pathspec"] == "PetSegFlow/5/calibrate/8"
    petseg_facet = complete["run"]["facets"]["petseg"]
    assert petseg_facet["code"]["dirty"] is True and petseg_facet["split_rule"] == "md5"
    assert petseg_facet["determinism"] == {"seed": 42, "strict": True, "threads": 2}
    assert complete["job"]["facets"]["sourceCodeLocation"]["version"] == "a" * 40
    datasets = {(d["namespace"], d["name"]): d["facets"]["petseg_file"] for d in complete["inputs"]}
    assert datasets[("s3://bucket", "metaflow/PetSegFlow/5/train/7/model_keras")]["stage"] == "train"
    assert datasets[("s3://bucket", "metaflow/petseg/blobs/bb/" + "b" * 64)]["file"] == "calibration-00000.tfrecord"
    (output,) = complete["outputs"]
    assert output["name"] == "metaflow/PetSegFlow/5/calibrate/8/calibration"


def test_a_failed_step_sends_fail_with_its_error_and_the_schema_catches_broken_events():
    from jsonschema import ValidationError

    _, failed = events_of_a_task(error=RuntimeError("fault drill"))
    validate(failed)
    assert failed["eventType"] == "FAIL"
    assert "fault drill" in failed["run"]["facets"]["errorMessage"]["message"]
    broken = json.loads(json.dumps(failed))
    del broken["run"]["facets"]["petseg"]["determinism"]
    with pytest.raises(ValidationError):
        validate(broken)
    broken = json.loads(json.dumps(failed))
    broken["eventType"] = "DONE"
    with pytest.raises(ValidationError):
        validate(broken)


@pytest.mark.parametrize("where", ["local", "s3"])
def test_without_a_transport_events_are_kept_as_json_lines(tmp_path, where, request):
    if where == "s3":
        s3, endpoint = request.getfixturevalue("s3"), request.getfixturevalue("moto_endpoint")
        s3.create_bucket(Bucket="store")
        root = "s3://store/metaflow"
    else:
        endpoint, root = None, str(tmp_path / ".metaflow")
    location = openlineage.events_location(root, "PetSegFlow/5/calibrate/8")
    delivery = openlineage.Delivery(location=location, name="calibrate.8.0.jsonl", s3_endpoint_url=endpoint)
    start, complete = (openlineage.task_event(kind, namespace="petseg", pathspec="PetSegFlow/5/calibrate/8",
                                              attempt=0, origin_run_id=None, code=CODE, code_version="v",
                                              determinism={"seed": 1, "strict": False, "threads": 2},
                                              split_rule="md5", image_size=64)
                       for kind in ("START", "COMPLETE"))
    assert delivery.send(start) is None and delivery.send(complete) is None
    kept = openlineage.read_events(location, s3_endpoint_url=endpoint)
    assert [event["eventType"] for event in kept] == ["START", "COMPLETE"]
    for event in kept:
        validate(event)


def test_events_travel_over_the_http_transport_configured_by_openlineage_url(monkeypatch, tmp_path):
    from openlineage.client import OpenLineageClient

    with running_receiver() as receiver:
        monkeypatch.chdir(tmp_path)  # no openlineage.yml here
        monkeypatch.setenv("OPENLINEAGE_URL", receiver.url)
        for name in ("OPENLINEAGE_CONFIG", "OPENLINEAGE_DISABLED"):
            monkeypatch.delenv(name, raising=False)
        client = OpenLineageClient(config={"facets": {"source_code_location": {"disabled": True}}})
        delivery = openlineage.Delivery(client=client)
        start, complete = events_of_a_task()
        for event in (start, complete):
            assert delivery.send(openlineage.task_event(event["eventType"], **_facts(event))) is None
    assert receiver.paths == ["/api/v1/lineage"] * 2
    for event in receiver.events:
        validate(event)
    assert [event["eventType"] for event in receiver.events] == ["START", "COMPLETE"]


def _facts(event):
    facet = event["run"]["facets"]
    return {"namespace": event["job"]["namespace"], "pathspec": facet["metaflow"]["pathspec"],
            "attempt": facet["metaflow"]["attempt"], "origin_run_id": None, "code": facet["petseg"]["code"],
            "code_version": facet["petseg"]["code_version"], "determinism": facet["petseg"]["determinism"],
            "split_rule": facet["petseg"]["split_rule"], "image_size": facet["petseg"]["image_size"]}


@pytest.mark.parametrize("required", [True, False])
def test_an_unreachable_receiver_fails_a_required_delivery_and_warns_a_best_effort_one(monkeypatch, required):
    import socket

    from openlineage.client import OpenLineageClient

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    monkeypatch.setenv("OPENLINEAGE__TRANSPORT__TYPE", "http")
    monkeypatch.setenv("OPENLINEAGE__TRANSPORT__URL", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("OPENLINEAGE__TRANSPORT__RETRY", json.dumps({"total": 1, "backoff_factor": 0.1}))
    delivery = openlineage.Delivery(client=OpenLineageClient(), required=required)
    event = openlineage.task_event("START", **_facts(events_of_a_task()[0]))
    if required:
        with pytest.raises(LineageError, match=f"START event of PetSegFlow.calibrate was not delivered to .*{port}"):
            delivery.send(event)
    else:
        assert "was not delivered" in delivery.send(event)


def test_file_hashes_of_a_release_are_those_of_its_files():
    manifest = {"version": "petseg-5", "location": "/r"}
    files = bundle.release_files(model_keras=b"weights", calibration={"classes": []}, manifest=manifest)
    sealed = json.loads(files["manifest.json"])
    signatures = {"model.sig": b"sig"}
    assert bundle.file_hashes(sealed, signatures) == {name: hashlib.sha256(data).hexdigest()
                                                      for name, data in {**files, **signatures}.items()}


def test_a_graph_of_another_format_is_refused_by_name(small_release):
    graph = {**lineage.new_graph(pathspec="PetSegFlow/7", code_version="c0ffee"), "format": 2}
    with pytest.raises(LineageError, match="PetSegFlow/7 has format 2, and this petseg proves format 3.*c0ffee"):
        verify.verify_run("PetSegFlow/7", release=str(small_release), read_graph=lambda: graph,
                          artifacts=lambda step, name: None, blob_root=lambda: "/nowhere")


def _never(*args):
    pytest.fail("a run's artifact (a pickle) was read before its signed release verified")


def _with_a_file_added(release, tmp_path):
    copy = shutil.copytree(release, tmp_path / release.name)
    (copy / "sitecustomize.py").write_text("print('hello')\n")
    return copy, "holds sitecustomize.py, which its signature does not cover"


def _unsigned(release, tmp_path):
    copy = shutil.copytree(release, tmp_path / release.name)
    (copy / "model.sig").unlink()
    return copy, "is not signed"


@pytest.mark.parametrize("run, change", [("PetSegFlow/8", None), ("PetSegFlow/7", _with_a_file_added),
                                         ("PetSegFlow/7", _unsigned)],
                         ids=["another run's release", "a file added", "unsigned"])
def test_a_run_is_not_read_before_its_signed_release_verifies(small_release, tmp_path, run, change):
    release, says = change(small_release, tmp_path) if change else (small_release, "the run the release names")
    with pytest.raises(verify.Mismatch, match=says):
        verify.verify_run(run, release=str(release), read_graph=_never, artifacts=_never, blob_root=_never)
