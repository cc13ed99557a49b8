"""The test node: pods run by a real kubelet in containerd from the project's image.

Nothing here writes a status: pods, Jobs and nodes get theirs from the
kubelet and the controllers alone.
"""

from __future__ import annotations

import ipaddress
import json

from cluster_client import (client_data, container_spec, jobs_of, kubectl, node_tasks, pods_of, run_flow, s3_keys,
                            step_of, wait_until)
from harness import REPO

SMOKE_FLOW = REPO / "tests" / "support" / "flows" / "k8s_smoke_flow.py"
POD_SUBNET = ipaddress.ip_network("10.213.0.0/24")


def _pod(name: str, image: str, command: list[str], **container) -> dict:
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name},
            "spec": {"restartPolicy": "Never", "serviceAccountName": "petseg", "terminationGracePeriodSeconds": 5,
                     "containers": [{"name": "main", "image": image, "command": command, **container}]}}


def _phase(admin, namespace: str, name: str, *phases: str):
    pod = admin["core"].read_namespaced_pod(name, namespace)
    return pod if pod.status.phase in phases else None


def test_the_node_is_a_kubelet_on_containerd_with_gpus_from_its_device_plugin(cluster, admin):
    node = admin["core"].read_node(cluster["PETSEG_NODE"])
    assert node.status.node_info.container_runtime_version.startswith("containerd://1.6")
    assert node.status.node_info.kubelet_version.startswith("v1.20")
    assert node.status.capacity["nvidia.com/gpu"] == node.status.allocatable["nvidia.com/gpu"] == "2"
    assert [a.address for a in node.status.addresses if a.type == "InternalIP"] == ["10.213.0.1"]


def test_smoke_flow_runs_in_containers_of_the_image_as_its_user_with_limits_and_gpus(cluster, admin, workdir):
    code, output, run_id = run_flow(cluster, workdir, SMOKE_FLOW, "run", "--with", "kubernetes", timeout=900)
    assert code == 0, output[-5000:]

    jobs = jobs_of(admin, cluster, "K8sSmokeFlow", run_id)
    assert sorted(step_of(j) for j in jobs) == ["end", "join", "square", "square", "start"]
    for job in jobs:
        assert job.status.succeeded == 1
        spec = job.spec.template.spec
        assert spec.service_account_name == "petseg-step"  # the steps' least privilege (k8s/base)
        assert [t.key for t in spec.tolerations] == ["nvidia.com/gpu"]
        container = spec.containers[0]
        assert container.image == cluster["PETSEG_IMAGE"]
        assert "petseg-s3" in [source.secret_ref.name for source in container.env_from]
        gpus = (container.resources.limits or {}).get("nvidia.com/gpu")
        assert gpus == ("1" if step_of(job) == "square" else None)
        (pod,) = pods_of(admin, cluster, job)
        assert pod.status.phase == "Succeeded"
        assert ipaddress.ip_address(pod.status.pod_ip) in POD_SUBNET
        status = pod.status.container_statuses[0]
        assert status.state.terminated.exit_code == 0 and status.state.terminated.reason == "Completed"
        assert status.image == cluster["PETSEG_IMAGE"]
        # What containerd was told to run: the image's user, not root.
        assert container_spec(cluster, status.container_id)["process"]["user"]["uid"] == 1000

    result = client_data(cluster, workdir, f"K8sSmokeFlow/{run_id}", ["total", "pods", "service_account", "facts"])
    assert result["successful"] and result["data"]["total"] == 13
    assert result["data"]["service_account"] == "petseg-step"
    pod_names = {p.metadata.name for j in jobs for p in pods_of(admin, cluster, j)}
    assert set(result["data"]["pods"]) <= pod_names
    facts = result["data"]["facts"]
    assert len(facts) == 2
    for seen in facts:
        # The image's user, working directory and installed package, not this checkout.
        assert (seen["uid"], seen["gid"], seen["home"]) == (1000, 1000, "/home/petseg")
        assert seen["cwd"].startswith("/home/petseg/")  # where Metaflow unpacked the code package
        assert "/site-packages/petseg/" in seen["petseg"]
        # Limits the kubelet applied (Guaranteed: 512 MB, 1 CPU) and the device the device plugin granted.
        assert int(seen["memory_limit"]) == 512 * 1000 * 1000
        assert int(seen["cpu_quota"]) == int(seen["cpu_period"])
        assert seen["gpus"] and seen["gpus"].startswith("fake-gpu-")
        # The code package and artifacts came from S3 on the pod bridge, with the Secret's keys.
        assert seen["s3_endpoint"] == cluster["PETSEG_S3_ENDPOINT"] and seen["aws_key_set"]
        assert seen["service_account_token"]
    assert len({seen["gpus"] for seen in facts}) >= 1
    assert any(f"K8sSmokeFlow/{run_id}/" in key for key in s3_keys(cluster, "metaflow/"))


def test_a_pod_logs_through_kubectl_and_a_deleted_job_stops_its_container(cluster, admin):
    namespace = cluster["PETSEG_K8S_NAMESPACE"]
    job = {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "sleeper"},
           "spec": {"backoffLimit": 0, "template": _pod("sleeper", cluster["PETSEG_IMAGE"], [
               "python", "-c", "import time; print('sleeper up', flush=True); time.sleep(300)"])}}
    job["spec"]["template"].pop("apiVersion"), job["spec"]["template"].pop("kind")
    admin["batch"].create_namespaced_job(namespace, job)
    pods = lambda: admin["core"].list_namespaced_pod(namespace, label_selector="job-name=sleeper").items  # noqa: E731
    pod = wait_until(lambda: [p for p in pods() if p.status.phase == "Running"], "the sleeper pod to run")[0]
    wait_until(lambda: "sleeper up" in kubectl(cluster, "logs", pod.metadata.name, check=False).stdout,
               "the sleeper's log line through kubectl logs", timeout=60)
    container = pod.status.container_statuses[0].container_id
    assert container_spec(cluster, container)["process"]["args"][0] == "python"

    admin["batch"].delete_namespaced_job("sleeper", namespace, propagation_policy="Foreground")
    wait_until(lambda: not pods(), "the sleeper pod to go", timeout=90)
    wait_until(lambda: container.split("://")[-1] not in node_tasks(cluster), "its container to stop", timeout=60)


def test_pod_whose_command_cannot_start_fails(cluster, admin):
    namespace = cluster["PETSEG_K8S_NAMESPACE"]
    admin["core"].create_namespaced_pod(namespace, _pod("no-such-command", cluster["PETSEG_IMAGE"],
                                                        ["/no/such/command"]))
    failed = wait_until(lambda: _phase(admin, namespace, "no-such-command", "Failed"), "the pod to fail")
    terminated = failed.status.container_statuses[0].state.terminated
    assert (terminated.exit_code, terminated.reason) == (128, "StartError")
    assert "/no/such/command" in terminated.message
    admin["core"].delete_namespaced_pod("no-such-command", namespace)


def test_gpus_are_granted_by_the_kubelets_device_manager_and_never_more_than_the_node_has(cluster, admin):
    namespace = cluster["PETSEG_K8S_NAMESPACE"]
    gpu = {"limits": {"nvidia.com/gpu": "1"}}
    admin["core"].create_namespaced_pod(namespace, _pod(
        "one-gpu", cluster["PETSEG_IMAGE"], ["sh", "-c", "echo devices=$NVIDIA_VISIBLE_DEVICES"], resources=gpu))
    wait_until(lambda: _phase(admin, namespace, "one-gpu", "Succeeded"), "the one-gpu pod to finish")
    assert kubectl(cluster, "logs", "one-gpu").stdout.strip() in {"devices=fake-gpu-0", "devices=fake-gpu-1"}

    admin["core"].create_namespaced_pod(namespace, _pod(
        "three-gpus", cluster["PETSEG_IMAGE"], ["true"], resources={"limits": {"nvidia.com/gpu": "3"}}))

    def unschedulable():
        events = admin["core"].list_namespaced_event(namespace, field_selector="involvedObject.name=three-gpus")
        return [e for e in events.items if e.reason == "FailedScheduling" and "nvidia.com/gpu" in e.message]

    wait_until(unschedulable, "the scheduler to refuse three GPUs", timeout=60)
    assert _phase(admin, namespace, "three-gpus", "Pending")
    for name in ("one-gpu", "three-gpus"):
        admin["core"].delete_namespaced_pod(name, namespace)


def test_the_pod_network_is_the_closed_bridge(cluster, admin):
    """A pod has an address on the bridge, routes to the bridge and, through its gateway, to the Service range only
    (no default route), and reaches S3 there."""
    namespace = cluster["PETSEG_K8S_NAMESPACE"]
    probe = ("import json, urllib.request\n"
             "routes = [line.split()[1:3] for line in open('/proc/net/route').read().splitlines()[1:]]\n"
             f"s3 = urllib.request.urlopen({cluster['PETSEG_S3_ENDPOINT'] + '/moto-api/'!r}, timeout=10).status\n"
             "print(json.dumps({'routes': routes, 's3': s3}))\n")
    admin["core"].create_namespaced_pod(namespace, _pod("net-probe", cluster["PETSEG_IMAGE"], ["python", "-c", probe]))
    pod = wait_until(lambda: _phase(admin, namespace, "net-probe", "Succeeded", "Failed"), "the probe to finish")
    logs = kubectl(cluster, "logs", "net-probe").stdout
    assert pod.status.phase == "Succeeded", logs
    seen = json.loads(logs.strip().splitlines()[-1])
    assert seen["s3"] == 200
    # /proc/net/route: destination and gateway in little-endian hex; no 00000000 destination (default route).
    routes = {str(ipaddress.ip_address(bytes.fromhex(dest)[::-1])): str(ipaddress.ip_address(bytes.fromhex(gw)[::-1]))
              for dest, gw in seen["routes"]}
    assert routes == {"10.213.0.0": "0.0.0.0", "10.213.1.0": "10.213.0.1"}, seen["routes"]
    assert ipaddress.ip_address(pod.status.pod_ip) in POD_SUBNET
    admin["core"].delete_namespaced_pod("net-probe", namespace)
