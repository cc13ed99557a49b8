"""Kubernetes: the node agent, and the flow on a real control plane.

The tests share one throwaway cluster per session
(tests/support/cluster/cluster.py): a real etcd, kube-apiserver and
kube-controller-manager (built once by tests/support/cluster/build.sh and
cached), an S3 server, and the node agent (tests/support/node_agent.py)
standing in for kubelet and scheduler, so step pods run
as local processes in this Python environment. Flows are launched as the
``petseg`` service account of k8s/base, so its Role is what they may do.

Flows and the Metaflow client run in subprocesses: Metaflow reads its
configuration once per process, and this one may hold another.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import node_agent
import pytest

from harness import REPO

CLUSTER = REPO / "tests" / "support" / "cluster"
KSERVE_CRD = REPO / "tests" / "support" / "kserve" / "inferenceservices.serving.kserve.io.json"
SMOKE_FLOW = REPO / "tests" / "support" / "flows" / "k8s_smoke_flow.py"
SEG_FLOW = REPO / "flows" / "seg_flow.py"

# The real flow on a tiny source: every step still starts a process that
# imports TensorFlow, so the data and the epochs are as small as they go.
SEG_PARAMETERS = ["--source", "synth:24", "--trials", "2", "--tune_epochs", "1", "--epochs", "1",
                  "--deploy", "none", "--min_miou", "0", "--min_margin", "-1", "--lineage", "best-effort"]
COMPUTE_STEPS = {"trial", "train", "calibrate", "evaluate"}
SEG_STEPS = {"start", "ingest", "transform", "tune", "release", "end"} | COMPUTE_STEPS


# -- node agent, without a cluster ----------------------------------------------------------------

class _Obj:
    def __init__(self, data):
        self.data = data


class _FakeApi:
    """The two reads the agent's environment resolution makes."""

    def __init__(self):
        self.secrets = {"s3": {"AWS_ACCESS_KEY_ID": base64.b64encode(b"key").decode()}}
        self.config_maps = {"settings": {"MODE": "fast", "LEVEL": "3"}}

    def read_namespaced_secret(self, name, namespace):
        from kubernetes.client.rest import ApiException

        if name not in self.secrets:
            raise ApiException(status=404)
        return _Obj(self.secrets[name])

    def read_namespaced_config_map(self, name, namespace):
        from kubernetes.client.rest import ApiException

        if name not in self.config_maps:
            raise ApiException(status=404)
        return _Obj(self.config_maps[name])


def _pod(env, env_from=()):
    return {
        "metadata": {"name": "t-1", "namespace": "petseg", "uid": "u-1", "labels": {"job-name": "t"}},
        "spec": {"nodeName": "n", "serviceAccountName": "petseg",
                 "containers": [{"name": "c", "command": ["true"], "env": env, "envFrom": list(env_from)}]},
    }


def test_node_agent_resolves_pod_environment(tmp_path):
    agent = node_agent.NodeAgent(_FakeApi(), node="n", workdir=tmp_path, pythonpath="/src")
    pod = _pod(
        env=[
            {"name": "PLAIN", "value": "1"},
            {"name": "LEVEL", "value": "overridden"},
            {"name": "POD", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
            {"name": "NS", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
            {"name": "JOB", "valueFrom": {"fieldRef": {"fieldPath": "metadata.labels['job-name']"}}},
            {"name": "SA", "valueFrom": {"fieldRef": {"fieldPath": "spec.serviceAccountName"}}},
            {"name": "KEY", "valueFrom": {"secretKeyRef": {"name": "s3", "key": "AWS_ACCESS_KEY_ID"}}},
            {"name": "MODE_COPY", "valueFrom": {"configMapKeyRef": {"name": "settings", "key": "MODE"}}},
            {"name": "GONE", "valueFrom": {"secretKeyRef": {"name": "nope", "key": "k", "optional": True}}},
        ],
        env_from=[{"secretRef": {"name": "s3"}}, {"configMapRef": {"name": "settings"}, "prefix": "CM_"},
                  {"configMapRef": {"name": "settings"}}],
    )
    env = agent._environment(pod, pod["spec"]["containers"][0], tmp_path)
    assert env["PLAIN"] == "1" and env["LEVEL"] == "overridden"
    assert (env["POD"], env["NS"], env["JOB"], env["SA"]) == ("t-1", "petseg", "t", "petseg")
    assert env["KEY"] == env["AWS_ACCESS_KEY_ID"] == "key"
    assert env["MODE_COPY"] == env["CM_MODE"] == env["MODE"] == "fast"
    assert "GONE" not in env
    assert env["PYTHONPATH"] == "/src" and env["HOME"] == str(tmp_path)
    assert env["PATH"].split(os.pathsep)[0] == str(Path(sys.executable).parent)


def test_node_agent_missing_secret_keeps_pod_waiting(tmp_path):
    agent = node_agent.NodeAgent(_FakeApi(), node="n", workdir=tmp_path)
    pod = _pod(env=[], env_from=[{"secretRef": {"name": "absent"}}])
    with pytest.raises(node_agent.EnvError, match="absent"):
        agent._environment(pod, pod["spec"]["containers"][0], tmp_path)


# -- the cluster ----------------------------------------------------------------------------------

@contextlib.contextmanager
def private_dir(prefix: str):
    """A temporary directory, removed on exit.

    Not pytest's tmp_path_factory: another pytest session of the same user
    may prune those directories while this one still runs a cluster in them.
    """
    directory = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        yield directory
    finally:
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture(scope="session")
def cluster():
    """A throwaway cluster for the session: its environment (KUBECONFIG, METAFLOW_HOME, ...)."""
    subprocess.run([str(CLUSTER / "build.sh")], check=True)
    with private_dir("petseg-cluster-") as directory, open(directory / "supervisor.log", "wb") as log:
        supervisor = subprocess.Popen([sys.executable, str(CLUSTER / "cluster.py"), "--dir", str(directory)],
                                      stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 300
            while not (directory / "env.sh").exists():
                if supervisor.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("the test cluster did not start:\n"
                                       + (directory / "supervisor.log").read_text(errors="replace")[-4000:])
                time.sleep(0.5)
            yield json.loads((directory / "env.json").read_text())
        finally:
            supervisor.send_signal(signal.SIGTERM)
            try:
                supervisor.wait(timeout=60)
            except subprocess.TimeoutExpired:
                supervisor.kill()
                supervisor.wait()


@pytest.fixture(scope="session")
def admin(cluster):
    """Kubernetes API clients as the cluster administrator."""
    from kubernetes import client, config

    api = config.new_client_from_config(config_file=cluster["PETSEG_ADMIN_KUBECONFIG"])
    return {"core": client.CoreV1Api(api), "batch": client.BatchV1Api(api),
            "custom": client.CustomObjectsApi(api), "ext": client.ApiextensionsV1Api(api)}


@pytest.fixture(scope="session")
def workdir():
    """Where flows are launched from (Metaflow keeps local metadata there)."""
    with private_dir("petseg-launch-") as directory:
        yield directory


def flow_env(cluster: dict) -> dict[str, str]:
    """This process's environment with the cluster's Metaflow and AWS settings in place of any others."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("METAFLOW_", "AWS_", "KUBECONFIG"))}
    env.setdefault("USER", "petseg-test")  # Metaflow needs a user name
    return {**env, **cluster, "PYTHONUNBUFFERED": "1"}


def run_flow(cluster: dict, workdir: Path, flow: Path, *args: str, timeout: float = 900):
    """Run a flow command; return (exit code, output, run id)."""
    run_id_file = workdir / f"run-id-{time.monotonic_ns()}"
    command = [sys.executable, str(flow), *args]
    if "run" in args or "resume" in args:
        command += ["--run-id-file", str(run_id_file)]
    result = subprocess.run(command, cwd=workdir, env=flow_env(cluster), capture_output=True, text=True,
                            timeout=timeout)
    output = result.stdout + result.stderr
    run_id = run_id_file.read_text().strip() if run_id_file.exists() else None
    return result.returncode, output, run_id


def client_data(cluster: dict, workdir: Path, pathspec: str, names: list[str]) -> dict:
    """Read a run's end-step artifacts and its steps through the Metaflow client."""
    script = (
        "import json, sys\n"
        "from metaflow import Run, namespace\n"
        "namespace(None)\n"
        f"run = Run({pathspec!r})\n"
        f"data = {{n: getattr(run['end'].task.data, n) for n in {names!r}}}\n"
        "print(json.dumps({'successful': run.successful, 'steps': sorted(s.id for s in run), 'data': data},"
        " default=str))\n"
    )
    result = subprocess.run([sys.executable, "-c", script], cwd=workdir, env=flow_env(cluster),
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def jobs_of(admin: dict, cluster: dict, flow: str, run_id: str) -> list:
    """The Jobs Metaflow created for one run."""
    jobs = admin["batch"].list_namespaced_job(cluster["PETSEG_K8S_NAMESPACE"]).items
    return [j for j in jobs if (j.metadata.annotations or {}).get("metaflow/flow_name") == flow
            and (j.metadata.annotations or {}).get("metaflow/run_id") == run_id]


def pods_of(admin: dict, cluster: dict, job) -> list:
    return admin["core"].list_namespaced_pod(cluster["PETSEG_K8S_NAMESPACE"],
                                             label_selector=f"job-name={job.metadata.name}").items


def s3_keys(cluster: dict, prefix: str) -> list[str]:
    import boto3

    s3 = boto3.client("s3", endpoint_url=cluster["PETSEG_S3_ENDPOINT"], region_name="us-east-1",
                      aws_access_key_id=cluster["AWS_ACCESS_KEY_ID"],
                      aws_secret_access_key=cluster["AWS_SECRET_ACCESS_KEY"])
    keys = []
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=cluster["PETSEG_S3_BUCKET"], Prefix=prefix):
        keys += [item["Key"] for item in page.get("Contents", [])]
    return keys


def test_smoke_flow_runs_as_jobs(cluster, admin, workdir):
    code, output, run_id = run_flow(cluster, workdir, SMOKE_FLOW, "run", "--with", "kubernetes", timeout=600)
    assert code == 0, output[-5000:]

    jobs = jobs_of(admin, cluster, "K8sSmokeFlow", run_id)
    steps = sorted(j.metadata.annotations["metaflow/step_name"] for j in jobs)
    assert steps == ["end", "join", "square", "square", "start"]
    for job in jobs:
        assert job.status.succeeded == 1
        spec = job.spec.template.spec
        assert spec.service_account_name == "petseg"
        assert [t.key for t in spec.tolerations] == ["nvidia.com/gpu"]
        container = spec.containers[0]
        assert container.image == "petseg:test"
        assert "petseg-s3" in [source.secret_ref.name for source in container.env_from]
        gpus = (container.resources.limits or {}).get("nvidia.com/gpu")
        assert gpus == ("1" if job.metadata.annotations["metaflow/step_name"] == "square" else None)
        (pod,) = pods_of(admin, cluster, job)
        assert pod.status.phase == "Succeeded"
        assert pod.status.container_statuses[0].state.terminated.exit_code == 0

    result = client_data(cluster, workdir, f"K8sSmokeFlow/{run_id}", ["total", "pods", "service_account"])
    assert result["successful"] and result["data"]["total"] == 13
    assert result["data"]["service_account"] == "petseg"
    pod_names = {p.metadata.name for j in jobs for p in pods_of(admin, cluster, j)}
    assert set(result["data"]["pods"]) <= pod_names
    assert any(f"K8sSmokeFlow/{run_id}/" in key for key in s3_keys(cluster, "metaflow/"))


def test_pod_of_a_deleted_job_is_stopped(cluster, admin):
    """Deleting a running Job stops its process, as kubelet would."""
    namespace = cluster["PETSEG_K8S_NAMESPACE"]
    job = {
        "apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "sleeper"},
        "spec": {"backoffLimit": 0, "template": {"spec": {
            "restartPolicy": "Never", "serviceAccountName": "petseg",
            "containers": [{"name": "sleep", "image": "none", "command": ["sleep", "300"]}]}}},
    }
    admin["batch"].create_namespaced_job(namespace, job)
    pods = lambda: admin["core"].list_namespaced_pod(namespace, label_selector="job-name=sleeper").items  # noqa: E731
    pod = _wait(lambda: [p for p in pods() if p.status.phase == "Running"], "the sleeper pod to run")[0]
    pid = int(pod.status.container_statuses[0].container_id.split("://")[1])
    assert Path(f"/proc/{pid}").exists()
    admin["batch"].delete_namespaced_job("sleeper", namespace, propagation_policy="Foreground")
    _wait(lambda: not Path(f"/proc/{pid}").exists() or "zombie" in _proc_state(pid), "the process to stop")


def test_pod_whose_command_cannot_start_fails(cluster, admin):
    namespace = cluster["PETSEG_K8S_NAMESPACE"]
    pod = {
        "apiVersion": "v1", "kind": "Pod", "metadata": {"name": "no-such-command"},
        "spec": {"restartPolicy": "Never", "serviceAccountName": "petseg",
                 "containers": [{"name": "main", "image": "none", "command": ["/no/such/command"]}]},
    }
    admin["core"].create_namespaced_pod(namespace, pod)

    def failed():
        current = admin["core"].read_namespaced_pod("no-such-command", namespace)
        return current if current.status.phase == "Failed" else None

    terminated = _wait(failed, "the pod to fail").status.container_statuses[0].state.terminated
    assert (terminated.exit_code, terminated.reason) == (128, "StartError")
    admin["core"].delete_namespaced_pod("no-such-command", namespace)


def _proc_state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/status").read_text().lower()
    except FileNotFoundError:
        return "zombie"


def _wait(check, what: str, timeout: float = 60):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = check()
        if result:
            return result
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


# -- the real flow ----------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def seg_runs(cluster, workdir):
    """A run of PetSegFlow made to fail at train, then resumed: ids and outputs of both."""
    if not SEG_FLOW.exists():
        pytest.fail("flows/seg_flow.py is missing")
    fault = '{"PETSEG_FAIL_AT": "train"}'
    code, output, failed_id = run_flow(cluster, workdir, SEG_FLOW, "run", "--with", "kubernetes",
                                       "--with", f"environment:vars={fault}", *SEG_PARAMETERS)
    failed = {"code": code, "output": output, "run_id": failed_id}
    code, output, resumed_id = run_flow(cluster, workdir, SEG_FLOW, "resume", "--origin-run-id", failed_id,
                                        "--with", "kubernetes")
    resumed = {"code": code, "output": output, "run_id": resumed_id}
    return failed, resumed


def test_seg_flow_failure_is_reported_and_resume_completes(seg_runs):
    failed, resumed = seg_runs
    assert failed["code"] != 0, failed["output"][-3000:]
    assert "PETSEG_FAIL_AT=train" in failed["output"]
    assert resumed["code"] == 0, resumed["output"][-5000:]


def test_seg_flow_steps_ran_as_jobs_with_gpu_limits(seg_runs, admin, cluster):
    failed, resumed = seg_runs
    assert resumed["code"] == 0
    failed_jobs = jobs_of(admin, cluster, "PetSegFlow", failed["run_id"])
    resumed_jobs = jobs_of(admin, cluster, "PetSegFlow", resumed["run_id"])
    step = lambda job: job.metadata.annotations["metaflow/step_name"]  # noqa: E731
    # Resume clones what succeeded before train; train and later steps run again.
    assert {step(j) for j in failed_jobs} == {"start", "ingest", "transform", "trial", "tune", "train"}
    assert {step(j) for j in resumed_jobs} == {"train", "calibrate", "evaluate", "release", "end"}
    assert [step(j) for j in failed_jobs].count("trial") == 2
    (failed_train,) = [j for j in failed_jobs if step(j) == "train"]
    assert failed_train.status.failed == 1
    for job in failed_jobs + resumed_jobs:
        limits = job.spec.template.spec.containers[0].resources.limits or {}
        assert ("nvidia.com/gpu" in limits) == (step(job) in COMPUTE_STEPS), step(job)
        if step(job) in COMPUTE_STEPS:
            assert limits["nvidia.com/gpu"] == "1"
        if job is not failed_train:
            assert job.status.succeeded == 1, step(job)


def client_json(cluster: dict, workdir: Path, body: str) -> dict:
    """Run Python through the Metaflow client with the cluster's settings; the JSON its last line prints."""
    script = "import json\nfrom metaflow import Flow, Run, namespace\nnamespace(None)\n" + body
    result = subprocess.run([sys.executable, "-c", script], cwd=workdir, env=flow_env(cluster),
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def petseg_cli(cluster: dict, workdir: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "petseg", *args], cwd=workdir, env=flow_env(cluster),
                          capture_output=True, text=True, timeout=600)


def _git(*args: str) -> str:
    return subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True, check=True).stdout.strip()


def test_seg_flow_records_the_launching_commit_from_pods_outside_any_checkout(seg_runs, cluster, workdir):
    """The pods run in directories outside any git checkout, with petseg from a copy outside it too (as
    an image holds it): the code version they record can only have come from the launch."""
    failed, resumed = seg_runs
    assert resumed["code"] == 0
    pods, image = Path(cluster["PETSEG_PODS_DIR"]), Path(cluster["PETSEG_POD_PYTHONPATH"])
    pod_dirs = [p for p in pods.iterdir() if p.is_dir()]
    assert pod_dirs
    for directory in [pods, image, *pod_dirs]:
        probe = subprocess.run(["git", "-C", str(directory), "rev-parse", "--git-dir"], capture_output=True)
        assert probe.returncode != 0, f"{directory} is inside a git checkout"
    found = subprocess.run([sys.executable, "-c", "import petseg; print(petseg.__file__)"], cwd=pod_dirs[0],
                           env={"PATH": os.environ["PATH"], "PYTHONPATH": str(image)}, capture_output=True,
                           text=True, check=True).stdout.strip()
    assert found.startswith(str(image)), found
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
    # Each stage records the package of the task that ran it (the resumed steps: the resume's package).
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


# -- Argo Workflows rendering ---------------------------------------------------------------------

def test_argo_workflow_template_renders(cluster, workdir):
    code, output, _ = run_flow(cluster, workdir, SEG_FLOW, "argo-workflows", "create", "--only-json",
                               timeout=300)
    assert code == 0, output[-3000:]
    template = json.loads(output[output.index("{"):output.rindex("}") + 1])
    assert template["kind"] == "WorkflowTemplate"
    assert template["metadata"]["namespace"] == cluster["PETSEG_K8S_NAMESPACE"]
    containers = {t["name"]: t for t in template["spec"]["templates"] if "container" in t}
    assert SEG_STEPS <= set(containers)
    for name, task in containers.items():
        container = task["container"]
        assert container["image"] == "petseg:test"
        assert task.get("serviceAccountName") == "petseg"
        assert "petseg-s3" in [e["secretRef"]["name"] for e in container.get("envFrom", []) if e.get("secretRef")]
        limits = container.get("resources", {}).get("limits", {})
        assert ("nvidia.com/gpu" in limits) == (name in COMPUTE_STEPS), name


# -- SeldonDeployment -------------------------------------------------------------------------------

RELEASE = {"version": "petseg-1764000000000001", "pathspec": "PetSegFlow/1764000000000001",
           "run_id": "1764000000000001", "model_fingerprint": "a" * 64, "dataset_fingerprint": "b" * 64,
           "code_version": "0.1.0", "model_uri": "s3://petseg/metaflow/release/"}


@pytest.fixture(scope="session")
def seldon_crd(cluster, admin):
    """The SeldonDeployment resource type, registered without an operator behind it."""
    import yaml

    crd = yaml.safe_load((CLUSTER / "seldondeployment-crd.yaml").read_text())
    admin["ext"].create_custom_resource_definition(crd)
    _wait(lambda: any(c.type == "Established" and c.status == "True" for c in
                      admin["ext"].read_custom_resource_definition(crd["metadata"]["name"]).status.conditions or []),
          "the SeldonDeployment CRD")
    return crd


def _set_state(admin, namespace: str, name: str, state: str, description: str = "") -> None:
    """Write status.state as the Seldon operator would (none runs here)."""
    from petseg.deploy.kubernetes import GROUP, PLURAL, VERSION

    body = {"status": {"state": state, "description": description}}
    admin["custom"].patch_namespaced_custom_object_status(GROUP, VERSION, namespace, PLURAL, name, body)


def test_seldon_deployment_create_replace_and_wait(cluster, admin, seldon_crd):
    import threading

    from kubernetes import config

    from petseg.deploy.kubernetes import GROUP, PLURAL, VERSION, apply_object, render_seldon_deployment
    from petseg.errors import ServingError

    namespace = cluster["PETSEG_K8S_NAMESPACE"]
    runner = config.new_client_from_config(config_file=cluster["KUBECONFIG"])  # the petseg service account
    rendered = render_seldon_deployment(RELEASE, image="petseg:test", namespace=namespace,
                                        secrets=["petseg-s3"], s3_endpoint_url=cluster["PETSEG_S3_ENDPOINT"])
    name = rendered["metadata"]["name"]

    # Created, then waited on until the (stand-in) operator reports it Available.
    outcome = {}
    waiter = threading.Thread(target=lambda: outcome.update(
        applied=apply_object(rendered, namespace=namespace, api_client=runner, timeout=60,
                             poll_interval=0.2)))
    waiter.start()
    _wait(lambda: admin["custom"].list_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL)["items"],
          "the SeldonDeployment")
    _set_state(admin, namespace, name, "Available")
    waiter.join(timeout=60)
    assert outcome["applied"]["status"]["state"] == "Available"
    created = outcome["applied"]

    # Applying again replaces it in place: one object, same uid, new spec.
    rendered_again = render_seldon_deployment(RELEASE, image="petseg:test", namespace=namespace,
                                              replicas=2, secrets=["petseg-s3"])
    again = apply_object(rendered_again, namespace=namespace, api_client=runner, timeout=5)
    items = admin["custom"].list_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL)["items"]
    assert [item["metadata"]["name"] for item in items] == [name]
    assert again["metadata"]["uid"] == created["metadata"]["uid"]
    assert again["spec"]["predictors"][0]["replicas"] == 2
    assert again["metadata"]["annotations"]["petseg/model-fingerprint"] == "a" * 64

    # A deployment that Seldon reports Failed is an error that says why.
    _set_state(admin, namespace, name, "Failed", "image pull failed")
    with pytest.raises(ServingError, match="image pull failed"):
        apply_object(rendered_again, namespace=namespace, api_client=runner, timeout=5)
    admin["custom"].delete_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)


def without_empty_defaults(schema):
    """A published CRD as the test cluster's API server (1.20) can take it: that version reads an empty-string
    ``default`` as null and refuses it (fixed in 1.21). KServe's CRD has such defaults only on the ``name`` of
    references (secrets, config maps), a probe's gRPC ``service`` and the status's ``targetModelState``,
    none of which petseg renders; every other constraint of the schema stays."""
    if isinstance(schema, dict):
        return {key: without_empty_defaults(value) for key, value in schema.items()
                if not (key == "default" and value == "")}
    if isinstance(schema, list):
        return [without_empty_defaults(value) for value in schema]
    return schema


@pytest.fixture(scope="session")
def mlserver_crds(cluster, admin):
    """The InferenceService (KServe's published definition and schema), Model and Server resource types,
    registered without a controller behind them."""
    import yaml

    crds = [without_empty_defaults(json.loads(KSERVE_CRD.read_text())),
            *yaml.safe_load_all((CLUSTER / "mlserver-crds.yaml").read_text())]
    for crd in crds:
        admin["ext"].create_custom_resource_definition(crd)
    for crd in crds:
        _wait(lambda: any(c.type == "Established" and c.status == "True" for c in
                          admin["ext"].read_custom_resource_definition(crd["metadata"]["name"]).status.conditions
                          or []), f"the {crd['spec']['names']['kind']} CRD")
    return crds


def test_mlserver_objects_are_applied_with_the_release_role(cluster, admin, mlserver_crds):
    """The InferenceService, Model and Server of the MLServer runtime, as the petseg service account applies them."""
    import threading

    from kubernetes import config

    from petseg.deploy import kubernetes as k8s

    namespace = cluster["PETSEG_K8S_NAMESPACE"]
    runner = config.new_client_from_config(config_file=cluster["KUBECONFIG"])  # the petseg service account
    objects = [
        k8s.render_inference_service(RELEASE, image="petseg:test", namespace=namespace, secrets=["petseg-s3"],
                                     s3_endpoint_url=cluster["PETSEG_S3_ENDPOINT"]),
        k8s.render_seldon_server(image="petseg:test", namespace=namespace, secrets=["petseg-s3"]),
        k8s.render_seldon_model(RELEASE, namespace=namespace),
    ]
    for rendered in objects:
        group, version, plural = k8s.RESOURCES[rendered["kind"]]
        name = rendered["metadata"]["name"]
        outcome = {}
        waiter = threading.Thread(target=lambda: outcome.update(applied=k8s.apply_object(
            rendered, namespace=namespace, api_client=runner, timeout=60, poll_interval=0.2)))
        waiter.start()
        _wait(lambda: [item for item in admin["custom"].list_namespaced_custom_object(
            group, version, namespace, plural)["items"] if item["metadata"]["name"] == name], f"the {plural}")
        # Report it Ready, as KServe's or Seldon's controller would (none runs here).
        admin["custom"].patch_namespaced_custom_object_status(
            group, version, namespace, plural, name,
            {"status": {"conditions": [{"type": "Ready", "status": "True", "reason": "Loaded"}]}})
        waiter.join(timeout=60)
        created = outcome["applied"]
        assert created["spec"] == rendered["spec"], rendered["kind"]
        assert created["metadata"]["labels"] == rendered["metadata"]["labels"]

        # Applying again replaces it in place: same uid.
        again = k8s.apply_object(rendered, namespace=namespace, api_client=runner, timeout=5)
        assert again["metadata"]["uid"] == created["metadata"]["uid"]
        admin["custom"].delete_namespaced_custom_object(group, version, namespace, plural, name)

    # Not ready in time: an error naming the object and its last condition.
    rendered = objects[0]
    with pytest.raises(Exception, match=r"InferenceService .* was not Ready after 1 s; last state: no Ready"):
        k8s.apply_object(rendered, namespace=namespace, api_client=runner, timeout=1, poll_interval=0.2)
    group, version, plural = k8s.RESOURCES["InferenceService"]
    admin["custom"].delete_namespaced_custom_object(group, version, namespace, plural, rendered["metadata"]["name"])


def _release(run: int) -> dict:
    return {**RELEASE, "version": f"petseg-{run}", "pathspec": f"PetSegFlow/{run}", "run_id": str(run),
            "model_fingerprint": f"{run}" * 64, "model_uri": f"s3://petseg/metaflow/releases/petseg-{run}/"}


@contextlib.contextmanager
def ready_controller(admin, namespace: str, kind: str, name: str):
    """Report the endpoint's object ready whenever it exists, as its controller would (none runs here)."""
    import threading

    from kubernetes import client

    from petseg.deploy import kubernetes as k8s

    group, version, plural = k8s.RESOURCES[kind]
    # Seldon Core v1 reports a state; KServe, and Seldon Core v2 for a Model or an Experiment, a Ready condition.
    status = ({"status": {"state": "Available"}} if kind == "SeldonDeployment"
              else {"status": {"conditions": [{"type": "Ready", "status": "True", "reason": "Loaded"}]}})
    stopped = threading.Event()

    def report():
        while not stopped.wait(0.2):
            with contextlib.suppress(client.ApiException):
                admin["custom"].patch_namespaced_custom_object_status(group, version, namespace, plural, name, status)

    thread = threading.Thread(target=report)
    thread.start()
    try:
        yield
    finally:
        stopped.set()
        thread.join()
        with contextlib.suppress(client.ApiException):
            admin["custom"].delete_namespaced_custom_object(group, version, namespace, plural, name)


@pytest.mark.parametrize("kind", ["SeldonDeployment", "InferenceService"])
def test_an_endpoint_is_one_object_through_canary_promote_and_consecutive_rollbacks(cluster, admin, workdir,
                                                                                    seldon_crd, mlserver_crds, kind):
    """Each change as the API server stores it, field by field; KServe's object under KServe's own schema."""
    from kubernetes import config

    from petseg.deploy import kubernetes as k8s
    from petseg.deploy import rollout

    namespace, name = cluster["PETSEG_K8S_NAMESPACE"], f"pets-{kind.lower()}"
    runner = config.new_client_from_config(config_file=cluster["KUBECONFIG"])  # the petseg service account
    group, version, plural = k8s.RESOURCES[kind]
    server = "seldon" if kind == "SeldonDeployment" else "mlserver"
    options = {"endpoint": name, "server": server, "image": "petseg:test", "namespace": namespace,
               "secrets": ["petseg-s3"], "api_client": runner, "timeout": 30}

    def stored() -> dict:  # one object for the endpoint, whatever the release
        [item] = admin["custom"].list_namespaced_custom_object(group, version, namespace, plural,
                                                               label_selector=f"petseg/endpoint={name}")["items"]
        assert item["metadata"]["name"] == name
        return item

    def change(step, who: str) -> dict:
        return rollout.apply(name, lambda current: step(current, who=who), namespace=namespace, kind=kind,
                             api_client=runner, timeout=30, poll_interval=0.2)

    with ready_controller(admin, namespace, kind, name):
        first = rollout.roll_out(_release(1), who="ana", **options)
        assert first["traffic"] == {"petseg-1": 100} and first["name"] == name
        uid = stored()["metadata"]["uid"]
        assert rollout.roll_out(_release(2), who="bo", canary=10, **options)["traffic"] == \
            {"petseg-1": 90, "petseg-2": 10}
        body = stored()
        if kind == "SeldonDeployment":
            assert [(p["name"], p["traffic"]) for p in body["spec"]["predictors"]] == [("petseg-1", 90),
                                                                                       ("petseg-2", 10)]
        else:  # nothing the published schema does not know was pruned
            assert body["spec"]["predictor"]["canaryTrafficPercent"] == 10
            env = {item["name"]: item["value"] for item in body["spec"]["predictor"]["containers"][0]["env"]}
            assert env["MODEL_URI"] == _release(2)["model_uri"] and env["MODEL_FINGERPRINT"] == "2" * 64
            assert body["spec"]["predictor"]["annotations"]["petseg/version"] == "petseg-2"
        assert body["metadata"]["annotations"]["petseg/rolled-out-by"] == "bo"

        result = petseg_cli(cluster, workdir, "promote", name, "--namespace", namespace, "--by", "cy",
                            "--kind", "seldon" if kind == "SeldonDeployment" else "kserve")
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip() == f"{name}: promoted by cy; traffic petseg-2 100 %"
        body = stored()
        assert rollout.traffic(body) == {"petseg-2": 100}
        assert body["metadata"]["annotations"]["petseg/promoted-by"] == "cy"
        assert "canaryTrafficPercent" not in body["spec"].get("predictor", {})

        rollout.roll_out(_release(3), who="dee", **options)
        for expected in ("petseg-2", "petseg-1"):  # consecutive rollbacks, one release back each
            change(rollout.rollback, "eve")
            body = stored()
            assert rollout.traffic(body) == {expected: 100} and rollout.serving_of(body) == expected
            assert body["metadata"]["annotations"]["petseg/rolled-back-by"] == "eve"
            assert body["metadata"]["annotations"]["petseg/rolled-back-at"]
        if kind == "SeldonDeployment":
            assert [p["name"] for p in body["spec"]["predictors"]] == ["petseg-1"]
        else:
            assert "canaryTrafficPercent" not in body["spec"]["predictor"]
        assert body["metadata"]["uid"] == uid
        result = petseg_cli(cluster, workdir, "rollback", name, "--kubernetes", "--namespace", namespace,
                            "--kind", "seldon" if kind == "SeldonDeployment" else "kserve")
        assert result.returncode == 2 and "no earlier release to roll back to (serving: petseg-1)" in result.stderr



def test_a_seldon_v2_endpoint_is_one_experiment_through_canary_promote_and_consecutive_rollbacks(
        cluster, admin, workdir, mlserver_crds):
    """Each release's Model, and the endpoint's Experiment between them, as the API server stores them (under a
    schema that prunes what it does not know), field by field."""
    from kubernetes import config

    from petseg.deploy import kubernetes as k8s
    from petseg.deploy import rollout

    namespace, name = cluster["PETSEG_K8S_NAMESPACE"], "pets-experiment"
    runner = config.new_client_from_config(config_file=cluster["KUBECONFIG"])  # the petseg service account
    options = {"endpoint": name, "server": "seldon-v2", "namespace": namespace, "api_client": runner, "timeout": 30}

    def stored(kind: str = "Experiment", **selector) -> list[dict]:
        group, version, plural = k8s.RESOURCES[kind]
        return admin["custom"].list_namespaced_custom_object(group, version, namespace, plural, **selector)["items"]

    def experiment() -> dict:  # one object for the endpoint, whatever the release
        [item] = stored(label_selector=f"petseg/endpoint={name}")
        assert item["metadata"]["name"] == name
        return item

    def cli(*args: str) -> subprocess.CompletedProcess:
        return petseg_cli(cluster, workdir, *args, name, "--namespace", namespace, "--kind", "seldon-v2")

    with contextlib.ExitStack() as controllers:
        for kind, ready in [("Experiment", name), *(("Model", f"petseg-{run}") for run in (1, 2, 3))]:
            controllers.enter_context(ready_controller(admin, namespace, kind, ready))
        first = rollout.roll_out(_release(1), who="ana", **options)
        assert first["traffic"] == {"petseg-1": 100} and first["name"] == name
        assert first["headers"] == {"seldon-model": f"{name}.experiment"}
        body = experiment()
        assert body["spec"] == {"candidates": [{"name": "petseg-1", "weight": 100}]}
        uid = body["metadata"]["uid"]
        [model] = [m for m in stored("Model") if m["metadata"]["name"] == "petseg-1"]
        assert model["spec"] == k8s.render_seldon_model(_release(1), namespace=namespace)["spec"]

        assert rollout.roll_out(_release(2), who="bo", canary=10, **options)["traffic"] == \
            {"petseg-1": 90, "petseg-2": 10}
        body = experiment()  # nothing pruned: the stored candidates are the rendered ones
        assert body["spec"] == {"candidates": [{"name": "petseg-1", "weight": 90}, {"name": "petseg-2", "weight": 10}]}
        assert body["metadata"]["annotations"]["petseg/rolled-out-by"] == "bo"
        assert {m["metadata"]["name"] for m in stored("Model")} >= {"petseg-1", "petseg-2"}

        result = cli("promote", "--by", "cy")
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip() == f"{name}: promoted by cy; traffic petseg-2 100 %"
        body = experiment()
        assert body["spec"] == {"candidates": [{"name": "petseg-2", "weight": 100}]}
        assert body["metadata"]["annotations"]["petseg/promoted-by"] == "cy"

        rollout.roll_out(_release(3), who="dee", **options)
        for expected in ("petseg-2", "petseg-1"):  # consecutive rollbacks, one release back each
            result = cli("rollback", "--kubernetes", "--by", "eve")
            assert result.returncode == 0, result.stderr
            body = experiment()
            assert body["spec"] == {"candidates": [{"name": expected, "weight": 100}]}  # no stale candidate
            assert rollout.traffic(body) == {expected: 100} and rollout.serving_of(body) == expected
            assert body["metadata"]["annotations"]["petseg/rolled-back-by"] == "eve"
            assert body["metadata"]["annotations"]["petseg/rolled-back-at"]
        assert body["metadata"]["uid"] == uid
        result = cli("rollback", "--kubernetes")
        assert result.returncode == 2 and "no earlier release to roll back to (serving: petseg-1)" in result.stderr

def test_service_account_has_no_rights_beyond_its_roles(cluster):
    from kubernetes import client, config

    runner = config.new_client_from_config(config_file=cluster["KUBECONFIG"])
    core = client.CoreV1Api(runner)
    with pytest.raises(client.ApiException) as denied:
        core.list_namespaced_secret(cluster["PETSEG_K8S_NAMESPACE"])
    assert denied.value.status == 403
    with pytest.raises(client.ApiException) as denied:
        client.BatchV1Api(runner).list_namespaced_job("default")
    assert denied.value.status == 403
    assert core.list_namespaced_pod(cluster["PETSEG_K8S_NAMESPACE"]).items is not None


# -- kustomize ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("target", ["base", "overlays/gpu"])
def test_kustomize_renders(cluster, target):
    import yaml

    result = subprocess.run([cluster["PETSEG_KUBECTL"], "kustomize", str(REPO / "k8s" / target)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    objects = {(o["kind"], o["metadata"]["name"]): o for o in yaml.safe_load_all(result.stdout)}
    assert ("Namespace", "petseg") in objects and ("ServiceAccount", "petseg") in objects
    assert all(o["metadata"].get("namespace") == "petseg" for (kind, _), o in objects.items() if kind != "Namespace")
    assert not [kind for kind, _ in objects if kind == "Secret"]  # credentials are never part of the base
    settings = objects[("ConfigMap", "petseg-metaflow")]["data"]
    assert settings["METAFLOW_KUBERNETES_SERVICE_ACCOUNT"] == "petseg"
    if target == "overlays/gpu":
        assert settings["METAFLOW_KUBERNETES_NODE_SELECTOR"] == "nvidia.com/gpu.present=true"
        assert json.loads(settings["METAFLOW_KUBERNETES_TOLERATIONS"])[0]["key"] == "nvidia.com/gpu"
    else:
        assert "METAFLOW_KUBERNETES_TOLERATIONS" not in settings
