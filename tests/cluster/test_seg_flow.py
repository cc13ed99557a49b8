"""PetSegFlow in containers: every step a Job whose pod runs the project's image on the real node.

One local run and two cluster runs, shared by the tests: on the cluster, a run
that fails on purpose in train, and a resume of it whose train pod is deleted
(``kubectl delete pod``) while it runs: the Job controller starts the task
again in a new pod, and the resume completes. All with the same parameters and
``--portable true``: the resumed cluster run's data set, model and calibration
fingerprints must be those of the local run.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest

from cluster_client import (client_data, client_json, container_spec, flow_command, flow_env, jobs_of, kubectl,
                            petseg_cli, pods_of, run_flow, s3_keys, step_of, wait_until)
from harness import REPO

SEG_FLOW = REPO / "flows" / "seg_flow.py"
# The real flow on a tiny source: every step still starts a process that
# imports TensorFlow, so the data and the epochs are as small as they go.
SEG_PARAMETERS = ["--source", "synth:24", "--trials", "2", "--tune_epochs", "1", "--epochs", "1", "--portable", "true",
                  "--deploy", "none", "--min_miou", "0", "--min_margin", "-1", "--lineage", "best-effort"]
COMPUTE_STEPS = {"trial", "train", "calibrate", "evaluate"}
SEG_STEPS = {"start", "ingest", "transform", "tune", "release", "end"} | COMPUTE_STEPS
FINGERPRINTS = (
    "from petseg.release.bundle import calibration_bytes\n"
    "import hashlib\n"
    "def fingerprints(run):\n"
    "    return {'dataset': run['end'].task.data.dataset_fingerprint,\n"
    "            'model': run['end'].task.data.model_fingerprint,\n"
    "            'calibration': hashlib.sha256(calibration_bytes(run['calibrate'].task.data.calibration)).hexdigest()}\n"
)


def _train_pods(admin, cluster, exclude: set[str]) -> list:
    jobs = [j for j in admin["batch"].list_namespaced_job(cluster["PETSEG_K8S_NAMESPACE"]).items
            if (j.metadata.annotations or {}).get("metaflow/step_name") == "train"
            and j.metadata.annotations.get("metaflow/run_id") not in exclude]
    return [p for j in jobs for p in pods_of(admin, cluster, j) if p.status.phase == "Running"]


def _resume_with_train_pod_deleted(admin, cluster: dict, workdir: Path, origin: str) -> dict:
    """Resume ``origin`` on the cluster and delete its train pod once it runs; the resume's outcome."""
    run_id_file = workdir / f"run-id-{time.monotonic_ns()}"
    command = flow_command(SEG_FLOW, "resume", "--origin-run-id", origin, "--with", "kubernetes",
                           run_id_file=run_id_file)
    with subprocess.Popen(command, cwd=workdir, env=flow_env(cluster), stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True) as process:
        try:
            (pod,) = wait_until(lambda: _train_pods(admin, cluster, exclude={origin}), "the train pod to run", 600)
            time.sleep(2)  # into the step: the code package fetched, TensorFlow loading
            kubectl(cluster, "delete", "pod", pod.metadata.name, "--wait=false")
            output, _ = process.communicate(timeout=600)
        finally:
            if process.poll() is None:
                process.kill()
    run_id = run_id_file.read_text().strip() if run_id_file.exists() else None
    return {"code": process.returncode, "output": output, "run_id": run_id, "deleted_pod": pod.metadata.name}


@pytest.fixture(scope="session")
def local_run(workdir):
    """The same parameters on this machine (local datastore): the fingerprints a cluster run must match."""
    code, output, run_id = run_flow(None, workdir, SEG_FLOW, "run", "--max-workers", "1", *SEG_PARAMETERS)
    assert code == 0, output[-5000:]
    return client_json(None, workdir, FINGERPRINTS + f"print(json.dumps(fingerprints(Run('PetSegFlow/{run_id}'))))")


@pytest.fixture(scope="session")
def seg_runs(cluster, admin, workdir):
    """A run made to fail at train, and a resume of it whose train pod is deleted while it runs."""
    fault = '{"PETSEG_FAIL_AT": "train"}'
    code, output, failed_id = run_flow(cluster, workdir, SEG_FLOW, "run", "--with", "kubernetes",
                                       "--with", f"environment:vars={fault}", *SEG_PARAMETERS)
    (train,) = [j for j in jobs_of(admin, cluster, "PetSegFlow", failed_id) if step_of(j) == "train"]
    (pod,) = pods_of(admin, cluster, train)
    failed = {"code": code, "output": output, "run_id": failed_id,
              "pod_log": kubectl(cluster, "logs", pod.metadata.name, check=False).stdout}
    return failed, _resume_with_train_pod_deleted(admin, cluster, workdir, failed_id)


def test_a_step_that_fails_in_its_pod_shows_its_error_in_the_output_and_in_kubectl_logs(seg_runs):
    failed, _ = seg_runs
    assert failed["code"] != 0, failed["output"][-3000:]
    assert "PETSEG_FAIL_AT=train" in failed["output"]
    assert "PETSEG_FAIL_AT=train" in failed["pod_log"]


def test_a_deleted_train_pod_is_started_again_by_its_job_and_the_resume_completes(seg_runs, admin, cluster):
    _, resumed = seg_runs
    assert resumed["code"] == 0, resumed["output"][-5000:]
    (train,) = [j for j in jobs_of(admin, cluster, "PetSegFlow", resumed["run_id"]) if step_of(j) == "train"]
    (pod,) = pods_of(admin, cluster, train)
    assert pod.metadata.name != resumed["deleted_pod"] and pod.status.phase == "Succeeded"
    assert train.status.succeeded == 1


def test_the_cluster_trains_the_model_this_machine_trains(seg_runs, local_run, cluster, workdir):
    """Same parameters, --portable true: the same data set, model and calibration, bit for bit."""
    _, resumed = seg_runs
    assert resumed["code"] == 0
    on_cluster = client_json(cluster, workdir,
                             FINGERPRINTS + f"print(json.dumps(fingerprints(Run('PetSegFlow/{resumed['run_id']}'))))")
    assert on_cluster == local_run


def test_seg_flow_steps_ran_as_jobs_of_the_image_as_its_user_with_gpus(seg_runs, admin, cluster):
    failed, resumed = seg_runs
    assert resumed["code"] == 0
    runs = {name: jobs_of(admin, cluster, "PetSegFlow", run["run_id"])
            for name, run in (("failed", failed), ("resumed", resumed))}
    steps = {name: sorted(step_of(j) for j in jobs) for name, jobs in runs.items()}
    # The resume clones what succeeded before train; train and later steps run again.
    assert steps["failed"] == sorted(["start", "ingest", "transform", "trial", "trial", "tune", "train"])
    assert set(steps["resumed"]) == {"train", "calibrate", "evaluate", "release", "end"}
    for job in runs["failed"] + runs["resumed"]:
        container = job.spec.template.spec.containers[0]
        limits = container.resources.limits or {}
        assert ("nvidia.com/gpu" in limits) == (step_of(job) in COMPUTE_STEPS), step_of(job)
        assert container.image == cluster["PETSEG_IMAGE"]
        if step_of(job) == "train" and job in runs["failed"]:
            assert job.status.failed == 1
            continue
        assert job.status.succeeded == 1, step_of(job)
        (pod,) = pods_of(admin, cluster, job)
        status = pod.status.container_statuses[0]
        assert status.state.terminated.exit_code == 0
        assert container_spec(cluster, status.container_id)["process"]["user"]["uid"] == 1000


def _git(*args: str) -> str:
    return subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True, check=True).stdout.strip()


def test_seg_flow_records_the_launching_commit_from_pods_of_the_image(seg_runs, cluster, workdir):
    """The pods run the image, which holds no git checkout: the code version they record can only have come
    from the launch."""
    failed, resumed = seg_runs
    assert resumed["code"] == 0
    commit, dirty = _git("rev-parse", "HEAD"), bool(_git("status", "--porcelain"))
    facts = client_json(cluster, workdir, (
        f"run = Run('PetSegFlow/{resumed['run_id']}')\n"
        f"origin_start = Run('PetSegFlow/{failed['run_id']}')['start'].task\n"
        "print(json.dumps({'settings': run['start'].task.data.settings,\n"
        "                  'manifest': run['release'].task.data.manifest,\n"
        "                  'graph': run['end'].task.data.lineage_graph,\n"
        "                  'package': json.loads(origin_start.metadata_dict['code-package'])['sha']}))\n"))
    code = facts["settings"]["code"]
    assert (code["commit"], code["dirty"]) == (commit, dirty)
    assert code["code_package"] == facts["package"] and len(code["code_package"]) == 40
    version = commit + ("-dirty" if dirty else "")
    assert facts["settings"]["code_version"] == facts["manifest"]["code_version"] == version
    assert facts["graph"]["code"] == code and facts["graph"]["code_version"] == version
    packages = {stage: entry["code_package"] for stage, entry in facts["graph"]["stages"].items()}
    assert packages["ingest"] == code["code_package"] and all(len(p or "") == 40 for p in packages.values())


def test_cluster_runs_are_tagged_by_the_launcher_and_found_by_their_model(seg_runs, cluster, workdir):
    failed, resumed = seg_runs
    assert resumed["code"] == 0
    for run in (failed, resumed):
        assert "not visible" not in run["output"]
        assert f"petseg: tagged PetSegFlow/{run['run_id']} with dataset:" in run["output"]
    found = client_json(cluster, workdir, (
        f"run = Run('PetSegFlow/{resumed['run_id']}')\n"
        "model = run['end'].task.data.model_fingerprint\n"
        "dataset = run['end'].task.data.dataset_fingerprint\n"
        f"failed = Run('PetSegFlow/{failed['run_id']}')\n"
        "print(json.dumps({'by_model': [r.id for r in Flow('PetSegFlow').runs(f'model:{model}')],\n"
        "                  'by_dataset': [r.id for r in Flow('PetSegFlow').runs(f'dataset:{dataset}')],\n"
        "                  'accepted': [r.id for r in Flow('PetSegFlow').runs('release:accepted')],\n"
        "                  'failed_tags': sorted(failed.user_tags)}))\n"))
    assert resumed["run_id"] in found["by_model"] and resumed["run_id"] in found["accepted"]
    assert {resumed["run_id"], failed["run_id"]} <= set(found["by_dataset"])
    assert [t.split(":")[0] for t in found["failed_tags"]] == ["dataset"]  # it never trained a model


def test_a_cluster_run_verifies_and_keeps_its_openlineage_events_in_s3(seg_runs, cluster, workdir):
    from lineage_schema import validate

    _, resumed = seg_runs
    assert resumed["code"] == 0
    result = petseg_cli(cluster, workdir, "verify", resumed["run_id"])
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    assert result.stdout.startswith(f"verified PetSegFlow/{resumed['run_id']} ") and "release files" in result.stdout
    result = petseg_cli(cluster, workdir, "lineage", resumed["run_id"], "--openlineage")
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    events = [json.loads(line) for line in result.stdout.splitlines()]
    for event in events:
        validate(event)
    steps = {event["run"]["facets"]["metaflow"].get("step") for event in events}
    assert {"train", "calibrate", "evaluate", "release", "end"} <= steps
    commit = _git("rev-parse", "HEAD")
    assert {event["run"]["facets"]["petseg"]["code"]["commit"] for event in events} == {commit}
    assert all(event["run"]["facets"]["petseg"]["code"].get("code_package") for event in events)
    assert any(d["namespace"] == f"s3://{cluster['PETSEG_S3_BUCKET']}" for e in events for d in e.get("inputs", []))


def test_seg_flow_artifacts_in_s3_and_client(seg_runs, cluster, workdir):
    _, resumed = seg_runs
    assert resumed["code"] == 0
    pathspec = f"PetSegFlow/{resumed['run_id']}"
    result = client_data(cluster, workdir, pathspec, ["metrics", "model_fingerprint", "dataset_fingerprint"])
    assert result["successful"]
    assert set(result["steps"]) == SEG_STEPS
    assert len(result["data"]["model_fingerprint"]) == 64
    keys = s3_keys(cluster, "metaflow/")
    assert any(f"{pathspec}/train/" in key for key in keys)
    assert any(key.startswith("metaflow/data/") or "/data/" in key for key in keys)
    assert any("petseg/blobs/" in key for key in keys)
