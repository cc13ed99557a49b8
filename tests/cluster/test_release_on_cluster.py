"""Releases from the cluster: a run's release step deploys from its pod, the champion lives in the cluster.

Two runs of the real flow on the node, with ``--deploy kubernetes`` for endpoint ``pets-flow``: seed 42
releases first and its pod serves behind the endpoint's Service; seed 7 is judged against it (read
from the cluster, on the second run's own images) and staged beside it (``--canary``). Then ``petseg
promote`` and ``petseg rollback`` move the Service between the two Deployments while a client sends
predictions to the Service's address through kube-proxy, and none may fail.

The privileges are read from what ran: the Jobs' pods (service account, secrets) and, from inside a
pod made from each Job's own pod template with only its command changed (the step pods have exited),
what the API server answers to a SelfSubjectAccessReview with that pod's token.
"""

from __future__ import annotations

import base64
import copy
import io
import json
import threading
import time

import numpy as np
import pytest
import requests
from PIL import Image

from cluster_client import client_data, jobs_of, kubectl, petseg_cli, pods_of, run_flow, step_of, wait_until
from cluster_release import FEEDBACK, PREDICT, local_server
from harness import REPO

SEG_FLOW = REPO / "flows" / "seg_flow.py"
TOKENS = {"predict": PREDICT, "feedback": FEEDBACK}
ENDPOINT = "pets-flow"
# The serving pods hold half a CPU of the node's two: compute steps ask for one, so they still fit beside them.
COMPUTE = ["--config-value", "compute", json.dumps({"cpu": 1, "memory": 3072, "gpu": 1})]
PARAMETERS = ["--source", "synth:24", "--trials", "2", "--tune_epochs", "1", "--epochs", "1", "--deploy", "kubernetes",
              "--endpoint", ENDPOINT, "--min_miou", "0", "--min_margin", "-1", "--lineage", "best-effort"]
ACCESS = (
    "import json\n"
    "from kubernetes import client, config\n"
    "config.load_incluster_config()\n"
    "api = client.AuthorizationV1Api()\n"
    "asked = {'get secrets': ('get', 'secrets', ''), 'create jobs': ('create', 'jobs', 'batch'),\n"
    "         'create pods/exec': ('create', 'pods', '', 'exec'), 'create pods': ('create', 'pods', ''),\n"
    "         'create deployments': ('create', 'deployments', 'apps'), 'patch services': ('patch', 'services', ''),\n"
    "         'get services': ('get', 'services', ''), 'update configmaps': ('update', 'configmaps', '')}\n"
    "answers = {}\n"
    "for name, (verb, resource, group, *sub) in asked.items():\n"
    "    spec = client.V1SelfSubjectAccessReviewSpec(resource_attributes=client.V1ResourceAttributes(\n"
    "        namespace=open('/var/run/secrets/kubernetes.io/serviceaccount/namespace').read(), verb=verb,\n"
    "        resource=resource, group=group, subresource=sub[0] if sub else None))\n"
    "    review = api.create_self_subject_access_review(client.V1SelfSubjectAccessReview(spec=spec))\n"
    "    answers[name] = review.status.allowed\n"
    "print('ACCESS ' + json.dumps(answers))\n")


def _png(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (96, 80, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


MESSAGE = {"binData": base64.b64encode(_png(11)).decode()}


def _run(cluster, workdir, *extra):
    code, output, run_id = run_flow(cluster, workdir, SEG_FLOW, *COMPUTE, "run", "--with", "kubernetes", *PARAMETERS,
                                    *extra, timeout=1500)
    assert code == 0, output[-6000:]
    data = client_data(cluster, workdir, f"PetSegFlow/{run_id}", ["manifest", "deployment", "metrics",
                                                                    "gate_message", "champion_release"])["data"]
    return {"run_id": run_id, "output": output, **data}


@pytest.fixture(scope="module")
def runs(cluster, admin, workdir, tokens_secret):
    """Seed 42 released and served; then seed 7 judged against it and staged beside it. Afterwards the endpoint
    is deleted: its pods' CPU requests would keep other tests' steps from being scheduled on the 2-CPU node."""
    namespace = cluster["PETSEG_K8S_NAMESPACE"]
    try:
        first = _run(cluster, workdir, "--seed", "42")
        second = _run(cluster, workdir, "--seed", "7", "--canary", "50", "--tolerance", "1")
        yield first, second
    finally:
        selector = f"petseg/endpoint={ENDPOINT}"
        for found in admin["apps"].list_namespaced_deployment(namespace, label_selector=selector).items:
            admin["apps"].delete_namespaced_deployment(found.metadata.name, namespace)
        kubectl(cluster, "delete", "service,configmap", "-l", selector, "--wait=false")
        wait_until(lambda: not admin["core"].list_namespaced_pod(namespace, label_selector=selector).items,
                   "the endpoint's pods to be gone", 120)


def _service(admin, cluster):
    return admin["core"].read_namespaced_service(ENDPOINT, cluster["PETSEG_K8S_NAMESPACE"])


def _pod_url(admin, cluster, version: str) -> str:
    pods = admin["core"].list_namespaced_pod(cluster["PETSEG_K8S_NAMESPACE"],
                                             label_selector=f"petseg/endpoint={ENDPOINT},petseg/version={version}")
    (pod,) = [p for p in pods.items if p.metadata.deletion_timestamp is None]
    return f"http://{pod.status.pod_ip}:9000"


def _predict(url: str, token: str | None, timeout: float = 60) -> requests.Response:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    with requests.Session() as session:  # a new connection each time: kube-proxy picks the pod per connection
        return session.post(url + "/api/v1.0/predictions", json=MESSAGE, headers=headers, timeout=timeout)


def test_a_run_deploys_from_its_release_pod_and_its_service_answers_with_the_local_servers_mask(
        runs, cluster, admin, tokens_secret, tmp_path):
    first, _ = runs
    version = first["manifest"]["version"]
    assert first["deployment"]["kind"] == "kubernetes" and first["deployment"]["traffic"] == {version: 100}
    (release,) = [j for j in jobs_of(admin, cluster, "PetSegFlow", first["run_id"]) if step_of(j) == "release"]
    assert release.spec.template.spec.service_account_name == "petseg-release"
    service = _service(admin, cluster)
    assert service.metadata.annotations["petseg/version"] == version
    assert service.metadata.annotations["petseg/changed-by"]
    # The serving pod runs the image the release step ran in.
    (pod,) = admin["core"].list_namespaced_pod(
        cluster["PETSEG_K8S_NAMESPACE"], label_selector=f"petseg/endpoint={ENDPOINT},petseg/version={version}").items
    assert pod.spec.containers[0].image == cluster["PETSEG_IMAGE"]
    assert all(c.ready for c in pod.status.container_statuses)
    address = f"http://{service.spec.cluster_ip}"  # through kube-proxy
    tokens = TOKENS
    assert _predict(address, None).status_code == 401
    answer = _predict(address, tokens["predict"])
    assert answer.status_code == 200, answer.text

    import boto3

    s3 = boto3.client("s3", endpoint_url=cluster["PETSEG_S3_ENDPOINT"], region_name="us-east-1",
                      aws_access_key_id=cluster["AWS_ACCESS_KEY_ID"],
                      aws_secret_access_key=cluster["AWS_SECRET_ACCESS_KEY"])
    bucket, prefix = first["manifest"]["location"][len("s3://"):].split("/", 1)
    release_dir = tmp_path / version
    release_dir.mkdir()
    for item in s3.list_objects_v2(Bucket=bucket, Prefix=prefix)["Contents"]:
        target = release_dir / item["Key"][len(prefix):].lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(s3.get_object(Bucket=bucket, Key=item["Key"])["Body"].read())
    with local_server(cluster, release_dir, tmp_path, fingerprint=first["manifest"]["model_fingerprint"]) as url:
        expected = _predict(url, tokens["predict"])
    assert expected.status_code == 200
    assert answer.json()["binData"] == expected.json()["binData"]  # the same mask PNG, byte for byte


def test_the_second_run_is_judged_against_the_release_the_cluster_serves_and_staged_beside_it(runs, cluster,
                                                                                               admin):
    first, second = runs
    champion = second["champion_release"]
    assert champion["version"] == first["manifest"]["version"]
    assert champion["location"] == first["manifest"]["location"]
    assert first["champion_release"] is None  # the first release had nothing to beat but the baselines
    assert second["metrics"]["champion"]["version"] == first["manifest"]["version"]
    assert first["manifest"]["version"] in second["gate_message"]
    assert second["manifest"]["replaces"]["version"] == first["manifest"]["version"]
    service = _service(admin, cluster)
    assert service.metadata.annotations["petseg/version"] == first["manifest"]["version"]  # still serving
    assert service.metadata.annotations["petseg/candidate"] == second["manifest"]["version"]
    assert second["deployment"]["candidate"] == second["manifest"]["version"]
    record = admin["core"].read_namespaced_config_map(f"petseg-endpoint-{ENDPOINT}", cluster["PETSEG_K8S_NAMESPACE"])
    assert [r["version"] for r in json.loads(record.data["releases.json"])] == [
        first["manifest"]["version"], second["manifest"]["version"]]


def test_promote_and_rollback_switch_the_service_between_the_two_deployments_with_no_failed_request(
        runs, cluster, admin, workdir, tokens_secret):
    first, second = runs
    tokens = TOKENS
    versions = [first["manifest"]["version"], second["manifest"]["version"]]
    masks = {}
    for version in versions:  # what each release's own pod answers
        answer = _predict(_pod_url(admin, cluster, version), tokens["predict"])
        assert answer.status_code == 200, answer.text
        masks[answer.json()["binData"]] = version
    assert len(masks) == 2, "the two releases answer with the same mask: the switch could not be seen"
    address = f"http://{_service(admin, cluster).spec.cluster_ip}"
    answered, failures, stop = [], [], threading.Event()

    def client():
        deadline = time.monotonic() + 600  # bounded: stops by itself
        while not stop.is_set() and time.monotonic() < deadline:
            try:
                answer = _predict(address, tokens["predict"], timeout=30)
                if answer.status_code != 200:
                    failures.append(f"{answer.status_code} {answer.text[:200]}")
                else:
                    answered.append(masks.get(answer.json()["binData"], "unknown"))
            except requests.RequestException as err:
                failures.append(repr(err))

    thread = threading.Thread(target=client, daemon=True)
    thread.start()
    try:
        wait_until(lambda: len(answered) >= 3, "the client's first answers", 120)
        promoted = petseg_cli(cluster, workdir, "promote", ENDPOINT, "--namespace", cluster["PETSEG_K8S_NAMESPACE"],
                              "--by", "ops")
        assert promoted.returncode == 0, promoted.stderr
        assert f"traffic {versions[1]} 100 %" in promoted.stdout
        mark = len(answered)
        wait_until(lambda: answered[mark:].count(versions[1]) >= 3, "answers from the promoted release", 120)
        rolled = petseg_cli(cluster, workdir, "rollback", ENDPOINT, "--kubernetes", "--namespace",
                            cluster["PETSEG_K8S_NAMESPACE"], "--by", "ops")
        assert rolled.returncode == 0, rolled.stderr
        assert f"traffic {versions[0]} 100 %" in rolled.stdout
        mark = len(answered)
        wait_until(lambda: answered[mark:].count(versions[0]) >= 3, "answers from the release rolled back to", 120)
    finally:
        stop.set()
        thread.join(timeout=60)
    assert not failures, failures[:5]
    assert "unknown" not in answered
    assert answered.index(versions[1]) < len(answered) - answered[::-1].index(versions[0]) - 1
    service = _service(admin, cluster)
    assert service.metadata.annotations["petseg/version"] == versions[0]
    assert service.metadata.annotations["petseg/rolled-back-by"] == "ops"
    assert json.loads(service.metadata.annotations["petseg/history"]) == []
    # The other release's pods still run, Ready for the next promote; nothing else of the endpoint does.
    deployments = admin["apps"].list_namespaced_deployment(cluster["PETSEG_K8S_NAMESPACE"],
                                                           label_selector=f"petseg/endpoint={ENDPOINT}").items
    assert len(deployments) <= 2


def _access_from_a_pod_of(admin, cluster, job, name: str) -> dict:
    """What a pod made from ``job``'s pod template (its service account, secrets, mounts) may do, asked from
    inside it."""
    template = admin["batch"].api_client.sanitize_for_serialization(job.spec.template)
    spec = copy.deepcopy(template["spec"])
    spec["restartPolicy"] = "Never"
    container = spec["containers"][0]
    container["command"], container["args"] = ["python", "-c", ACCESS], []
    container["resources"] = {}
    body = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name}, "spec": spec}
    admin["core"].create_namespaced_pod(cluster["PETSEG_K8S_NAMESPACE"], body)
    try:
        wait_until(lambda: admin["core"].read_namespaced_pod(name, cluster["PETSEG_K8S_NAMESPACE"]).status.phase
                   in ("Succeeded", "Failed"), f"pod {name} to finish", 180)
        log = kubectl(cluster, "logs", name).stdout
    finally:
        admin["core"].delete_namespaced_pod(name, cluster["PETSEG_K8S_NAMESPACE"])
    (line,) = [line for line in log.splitlines() if line.startswith("ACCESS ")]
    return json.loads(line[len("ACCESS "):])


def test_step_pods_cannot_read_secrets_create_jobs_or_exec_and_only_the_release_pod_deploys(runs, cluster, admin):
    first, _ = runs
    jobs = {step_of(j): j for j in jobs_of(admin, cluster, "PetSegFlow", first["run_id"])}
    for step, job in jobs.items():
        pod_spec = job.spec.template.spec
        secrets = {e.secret_ref.name for e in pod_spec.containers[0].env_from or [] if e.secret_ref}
        assert pod_spec.service_account_name == ("petseg-release" if step == "release" else "petseg-step"), step
        assert ("petseg-signing" in secrets) == (step == "release"), step
        (pod,) = pods_of(admin, cluster, job)  # what the kubelet ran
        assert pod.spec.service_account_name == pod_spec.service_account_name
    step = _access_from_a_pod_of(admin, cluster, jobs["evaluate"], "access-evaluate")
    assert step == {"get secrets": False, "create jobs": False, "create pods/exec": False, "create pods": False,
                    "create deployments": False, "patch services": False, "get services": True,
                    "update configmaps": False}
    release = _access_from_a_pod_of(admin, cluster, jobs["release"], "access-release")
    assert release == {"get secrets": False, "create jobs": False, "create pods/exec": False, "create pods": False,
                       "create deployments": True, "patch services": True, "get services": True,
                       "update configmaps": True}
