"""How the cluster tier talks to the test cluster: flows, the Metaflow client, kubectl, containerd, S3."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path


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


def flow_env(cluster: dict) -> dict[str, str]:
    """This process's environment with the cluster's Metaflow and AWS settings in place of any others."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("METAFLOW_", "AWS_", "KUBECONFIG"))}
    env.setdefault("USER", "petseg-test")  # Metaflow needs a user name
    return {**env, **cluster, "PYTHONUNBUFFERED": "1"}


def flow_command(flow: Path, *args: str, run_id_file: Path | None = None) -> list[str]:
    command = [sys.executable, str(flow), *args]
    if run_id_file is not None:
        command += ["--run-id-file", str(run_id_file)]
    return command


def run_flow(cluster: dict | None, workdir: Path, flow: Path, *args: str, timeout: float = 1200):
    """Run a flow command; return (exit code, output, run id). ``cluster`` None: on this machine, not the cluster."""
    run_id_file = workdir / f"run-id-{time.monotonic_ns()}"
    env = flow_env(cluster) if cluster else {**os.environ, "PYTHONUNBUFFERED": "1"}
    result = subprocess.run(flow_command(flow, *args, run_id_file=run_id_file if {"run", "resume"} & set(args)
                                         else None),
                            cwd=workdir, env=env, capture_output=True, text=True, timeout=timeout)
    output = result.stdout + result.stderr
    run_id = run_id_file.read_text().strip() if run_id_file.exists() else None
    return result.returncode, output, run_id


def client_json(cluster: dict | None, workdir: Path, body: str) -> dict:
    """Run Python through the Metaflow client with the cluster's settings (None: this machine's); the JSON its
    last line prints."""
    script = "import json\nfrom metaflow import Flow, Run, namespace\nnamespace(None)\n" + body
    env = flow_env(cluster) if cluster else dict(os.environ)
    result = subprocess.run([sys.executable, "-c", script], cwd=workdir, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def client_data(cluster: dict, workdir: Path, pathspec: str, names: list[str]) -> dict:
    """A run's end-step artifacts and its steps, through the Metaflow client."""
    return client_json(cluster, workdir, (
        f"run = Run({pathspec!r})\n"
        f"data = {{n: getattr(run['end'].task.data, n) for n in {names!r}}}\n"
        "print(json.dumps({'successful': run.successful, 'steps': sorted(s.id for s in run), 'data': data},"
        " default=str))\n"))


def petseg_cli(cluster: dict, workdir: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "petseg", *args], cwd=workdir, env=flow_env(cluster),
                          capture_output=True, text=True, timeout=600)


def kubectl(cluster: dict, *args: str, admin: bool = True, check: bool = True) -> subprocess.CompletedProcess:
    """The cluster's kubectl, as the administrator (or as the flow's service account)."""
    kubeconfig = cluster["PETSEG_ADMIN_KUBECONFIG"] if admin else cluster["KUBECONFIG"]
    result = subprocess.run([cluster["PETSEG_KUBECTL"], f"--kubeconfig={kubeconfig}",
                             f"--namespace={cluster['PETSEG_K8S_NAMESPACE']}", *args],
                            capture_output=True, text=True, timeout=120)
    if check:
        assert result.returncode == 0, f"kubectl {' '.join(args)}: {result.stderr}"
    return result


def _ctr(cluster: dict, *args: str) -> str:
    """containerd's ``ctr`` on the test node, in the kubelet's namespace."""
    socket = Path(cluster["PETSEG_NODE_DIR"]) / "containerd" / "containerd.sock"
    return subprocess.run(["ctr", f"--address={socket}", "--namespace=k8s.io", *args], capture_output=True,
                          text=True, check=True).stdout


def container_spec(cluster: dict, container_id: str) -> dict:
    """The OCI runtime spec containerd ran a pod's container with (``containerd://ID`` from its status)."""
    return json.loads(_ctr(cluster, "containers", "info", container_id.split("://")[-1]))["Spec"]


def node_tasks(cluster: dict) -> str:
    """The containers running on the node, as containerd lists them."""
    return _ctr(cluster, "tasks", "list")


def jobs_of(admin: dict, cluster: dict, flow: str, run_id: str) -> list:
    """The Jobs Metaflow created for one run."""
    jobs = admin["batch"].list_namespaced_job(cluster["PETSEG_K8S_NAMESPACE"]).items
    return [j for j in jobs if (j.metadata.annotations or {}).get("metaflow/flow_name") == flow
            and (j.metadata.annotations or {}).get("metaflow/run_id") == run_id]


def pods_of(admin: dict, cluster: dict, job) -> list:
    return admin["core"].list_namespaced_pod(cluster["PETSEG_K8S_NAMESPACE"],
                                             label_selector=f"job-name={job.metadata.name}").items


def step_of(job) -> str:
    return job.metadata.annotations["metaflow/step_name"]


def s3_keys(cluster: dict, prefix: str) -> list[str]:
    import boto3

    s3 = boto3.client("s3", endpoint_url=cluster["PETSEG_S3_ENDPOINT"], region_name="us-east-1",
                      aws_access_key_id=cluster["AWS_ACCESS_KEY_ID"],
                      aws_secret_access_key=cluster["AWS_SECRET_ACCESS_KEY"])
    keys = []
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=cluster["PETSEG_S3_BUCKET"], Prefix=prefix):
        keys += [item["Key"] for item in page.get("Contents", [])]
    return keys


def wait_until(check, what: str, timeout: float = 120):
    """Call ``check`` until it returns a true value; fail naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = check()
        if result:
            return result
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")
