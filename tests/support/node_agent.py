"""A node agent that stands in for a kubelet in the throwaway test cluster.

The test cluster runs a real kube-apiserver and kube-controller-manager but
no kubelet and no scheduler. This agent plays both parts for one Node:

1. registers the Node, advertising cpu, memory, pods and ``nvidia.com/gpu``;
2. binds pending pods whose ``nodeSelector`` the Node's labels satisfy
   (the scheduler's part);
3. runs the first container's ``command`` + ``args`` of each bound pod as a
   local process, in its own temporary working directory, with the pod's
   environment (``env`` values, ``secretKeyRef``, ``configMapKeyRef``,
   ``fieldRef`` and ``envFrom`` secret/config-map references);
4. reports the pod ``Running``, then ``Succeeded`` or ``Failed`` with a
   terminated container state carrying the exit code, as a kubelet does;
5. stops a pod's process when the pod is deleted.

What it does not do: container images (the image is ignored and the command
runs in this agent's Python environment: ``python`` resolves to the
interpreter running the agent), volumes and mounts, init and sidecar
containers (only the first container runs), probes, restarts (every pod is
treated as ``restartPolicy: Never``), resource limits or accounting (it only
caps how many pods run at once), taints and tolerations, ``$(VAR)`` expansion,
``resourceFieldRef``, the log, exec and attach APIs (process output goes to a
file in the pod's working directory), node heartbeats and networking (pods
share the host's network).

Usage::

    python tests/support/node_agent.py --kubeconfig KUBECONFIG --workdir DIR \\
        [--node petseg-node] [--gpus 4] [--label key=value] [--max-pods 2] \\
        [--pythonpath DIR] [--env KEY=VALUE]
"""

from __future__ import annotations

import argparse
import base64
import datetime as dt
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import urllib3
from kubernetes import client, config
from kubernetes.client.rest import ApiException


@dataclass
class PodProcess:
    """A pod's container running as a local process."""

    namespace: str
    name: str
    uid: str
    container: str
    image: str
    process: subprocess.Popen
    workdir: Path
    started_at: str


class EnvError(Exception):
    """A pod's environment refers to something that does not exist (yet)."""


def now() -> str:
    """The current UTC time in the format the API expects."""
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def field_value(pod: dict, path: str) -> str:
    """Resolve a downward-API ``fieldRef`` path against a pod.

    Args:
        pod: The pod as a dict in the API's camelCase form.
        path: A field path such as ``metadata.name`` or ``metadata.labels['app']``.

    Returns:
        The value, or an empty string where the field is unset.
    """
    for prefix in ("metadata.labels", "metadata.annotations"):
        if path.startswith(prefix + "["):
            key = path[len(prefix) + 1 : -1].strip("'\"")
            section = prefix.split(".")[1]
            return (pod["metadata"].get(section) or {}).get(key, "")
    simple = {
        "metadata.name": pod["metadata"]["name"],
        "metadata.namespace": pod["metadata"]["namespace"],
        "metadata.uid": pod["metadata"]["uid"],
        "spec.nodeName": pod["spec"].get("nodeName", ""),
        "spec.serviceAccountName": pod["spec"].get("serviceAccountName", ""),
        "status.hostIP": "127.0.0.1",
        "status.podIP": "127.0.0.1",
    }
    if path not in simple:
        raise EnvError(f"unsupported fieldRef {path!r}")
    return simple[path] or ""


class NodeAgent:
    """Registers a Node and runs the pods bound to it as local processes.

    Args:
        api: A CoreV1Api client with rights over nodes, pods, secrets and
            config maps.
        node: The Node's name.
        workdir: Where each pod gets its working directory.
        gpus: How many ``nvidia.com/gpu`` the Node advertises.
        labels: Extra Node labels, e.g. for a GPU ``nodeSelector``.
        max_pods: How many pods run at the same time; others wait.
        pythonpath: Each pod's ``PYTHONPATH``; stands in for packages that
            the real image installs.
        image_env: Environment every pod starts from; stands in for the
            image's ``ENV`` lines.
    """

    def __init__(
        self,
        api: client.CoreV1Api,
        *,
        node: str,
        workdir: Path,
        gpus: int = 4,
        labels: dict[str, str] | None = None,
        max_pods: int = 2,
        pythonpath: str | None = None,
        image_env: dict[str, str] | None = None,
    ) -> None:
        self.api = api
        self.node = node
        self.workdir = workdir
        self.gpus = gpus
        self.labels = {"kubernetes.io/hostname": node, "kubernetes.io/os": "linux", **(labels or {})}
        self.max_pods = max_pods
        self.pythonpath = pythonpath
        self.image_env = image_env or {}
        self.running: dict[str, PodProcess] = {}
        self.waiting_reason: dict[str, str] = {}

    # -- node ---------------------------------------------------------------

    def register(self) -> None:
        """Create (or refresh) the Node and mark it Ready."""
        body = {"apiVersion": "v1", "kind": "Node", "metadata": {"name": self.node, "labels": self.labels}}
        try:
            self.api.create_node(body)
        except ApiException as error:
            if error.status != 409:
                raise
            self.api.patch_node(self.node, {"metadata": {"labels": self.labels}})
        resources = {"cpu": "16", "memory": "64Gi", "pods": "110", "nvidia.com/gpu": str(self.gpus)}
        status = {
            "capacity": resources,
            "allocatable": resources,
            "addresses": [{"type": "InternalIP", "address": "127.0.0.1"}, {"type": "Hostname", "address": self.node}],
            "conditions": [
                {
                    "type": "Ready",
                    "status": "True",
                    "reason": "NodeAgentReady",
                    "message": "node agent is running pods as local processes",
                    "lastHeartbeatTime": now(),
                    "lastTransitionTime": now(),
                }
            ],
            "nodeInfo": {
                "architecture": "amd64",
                "operatingSystem": "linux",
                "osImage": "local processes",
                "kernelVersion": os.uname().release,
                "containerRuntimeVersion": "local://0",
                "kubeletVersion": "node-agent",
                "kubeProxyVersion": "none",
                "machineID": "",
                "systemUUID": "",
                "bootID": "",
            },
        }
        self.api.patch_node_status(self.node, {"status": status})

    # -- one pass -----------------------------------------------------------

    def sync(self) -> None:
        """Do one round of binding, starting, reaping and stopping pods."""
        pods = self._list_pods()
        live = {p["metadata"]["uid"] for p in pods if not p["metadata"].get("deletionTimestamp")}
        for uid in [u for u in self.running if u not in live]:
            self._stop(self.running.pop(uid), deleted=True)
        for pod in pods:
            meta, spec = pod["metadata"], pod["spec"]
            phase = (pod.get("status") or {}).get("phase", "Pending")
            if meta.get("deletionTimestamp"):
                if spec.get("nodeName") == self.node and meta["uid"] not in self.running:
                    self._delete(meta["namespace"], meta["name"])
                continue
            if not spec.get("nodeName") and phase == "Pending":
                if self._fits(spec):
                    self._bind(meta["namespace"], meta["name"])
            elif spec.get("nodeName") == self.node and phase == "Pending" and meta["uid"] not in self.running:
                if len(self.running) < self.max_pods:
                    self._start(pod)
        for uid, proc in list(self.running.items()):
            code = proc.process.poll()
            if code is not None:
                del self.running[uid]
                self._finish(proc, code)

    def run_forever(self, interval: float = 0.5) -> None:
        """Register the Node, then sync until SIGTERM or SIGINT.

        Args:
            interval: Seconds between two passes.
        """
        stop = []
        signal.signal(signal.SIGTERM, lambda *_: stop.append(True))
        signal.signal(signal.SIGINT, lambda *_: stop.append(True))
        self.register()
        while not stop:
            try:
                self.sync()
            except ApiException as error:
                print(f"node-agent: API error {error.status}: {error.reason}", file=sys.stderr, flush=True)
            except urllib3.exceptions.HTTPError as error:  # the API server is restarting
                print(f"node-agent: API unreachable: {error}", file=sys.stderr, flush=True)
            time.sleep(interval)
        for proc in list(self.running.values()):
            self._stop(proc, deleted=False)

    # -- helpers ------------------------------------------------------------

    def _list_pods(self) -> list[dict]:
        # Raw JSON keeps the API's field names (camelCase), as in the manifests.
        response = self.api.list_pod_for_all_namespaces(_preload_content=False)
        return json.loads(response.data)["items"]

    def _fits(self, spec: dict) -> bool:
        selector = spec.get("nodeSelector") or {}
        return all(self.labels.get(k) == v for k, v in selector.items())

    def _bind(self, namespace: str, name: str) -> None:
        body = client.V1Binding(
            metadata=client.V1ObjectMeta(name=name),
            target=client.V1ObjectReference(api_version="v1", kind="Node", name=self.node),
        )
        try:
            # The generated client fails to read the Binding's (empty) answer
            # back, so the raw response is taken instead.
            self.api.create_namespaced_pod_binding(name, namespace, body, _preload_content=False)
        except ApiException as error:
            if error.status not in (404, 409):
                raise

    def _environment(self, pod: dict, container: dict, workdir: Path) -> dict[str, str]:
        namespace = pod["metadata"]["namespace"]
        path = os.pathsep.join([str(Path(sys.executable).parent), "/usr/local/bin", "/usr/bin", "/bin"])
        env = {
            "PATH": path,
            "HOME": str(workdir),
            "HOSTNAME": pod["metadata"]["name"],
            "LANG": "C.UTF-8",
            "TMPDIR": str(workdir / "tmp"),
            **self.image_env,
        }
        if self.pythonpath:
            env["PYTHONPATH"] = self.pythonpath
        for source in container.get("envFrom") or []:
            prefix = source.get("prefix", "")
            if "secretRef" in source:
                ref = source["secretRef"]
                data = self._secret(namespace, ref["name"], ref.get("optional", False))
            else:
                ref = source["configMapRef"]
                data = self._config_map(namespace, ref["name"], ref.get("optional", False))
            env.update({prefix + k: v for k, v in data.items()})
        for var in container.get("env") or []:
            if "valueFrom" not in var:
                env[var["name"]] = var.get("value", "")
                continue
            source = var["valueFrom"]
            if "fieldRef" in source:
                env[var["name"]] = field_value(pod, source["fieldRef"]["fieldPath"])
            elif "secretKeyRef" in source or "configMapKeyRef" in source:
                is_secret = "secretKeyRef" in source
                ref = source["secretKeyRef" if is_secret else "configMapKeyRef"]
                optional = ref.get("optional", False)
                lookup = self._secret if is_secret else self._config_map
                data = lookup(namespace, ref["name"], optional)
                if ref["key"] in data:
                    env[var["name"]] = data[ref["key"]]
                elif not optional:
                    raise EnvError(f"key {ref['key']!r} not found in {ref['name']!r}")
            else:
                raise EnvError(f"unsupported valueFrom in {var['name']!r}: {sorted(source)}")
        return env

    def _secret(self, namespace: str, name: str, optional: bool) -> dict[str, str]:
        try:
            secret = self.api.read_namespaced_secret(name, namespace)
        except ApiException as error:
            if error.status == 404 and optional:
                return {}
            if error.status == 404:
                raise EnvError(f'secret "{name}" not found') from error
            raise
        return {k: base64.b64decode(v).decode() for k, v in (secret.data or {}).items()}

    def _config_map(self, namespace: str, name: str, optional: bool) -> dict[str, str]:
        try:
            return self.api.read_namespaced_config_map(name, namespace).data or {}
        except ApiException as error:
            if error.status == 404 and optional:
                return {}
            if error.status == 404:
                raise EnvError(f'configmap "{name}" not found') from error
            raise

    def _start(self, pod: dict) -> None:
        meta = pod["metadata"]
        container = pod["spec"]["containers"][0]
        workdir = self.workdir / f"{meta['namespace']}_{meta['name']}"
        (workdir / "tmp").mkdir(parents=True, exist_ok=True)
        try:
            env = self._environment(pod, container, workdir)
            command = (container.get("command") or []) + (container.get("args") or [])
            if not command:
                raise EnvError("the container has no command and images are not run here")
        except EnvError as error:
            # A kubelet keeps such a pod waiting and retries: the secret or
            # config map may still be created.
            self._wait(pod, container["name"], str(error))
            return
        self.waiting_reason.pop(meta["uid"], None)
        started_at = now()
        try:
            with open(workdir / "output.log", "ab") as log:
                process = subprocess.Popen(
                    command,
                    cwd=workdir,
                    env=env,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
        except OSError as error:
            # What a kubelet reports when the runtime cannot start the command.
            state = {"terminated": {"exitCode": 128, "reason": "StartError", "message": str(error),
                                    "startedAt": started_at, "finishedAt": now()}}
            status = {"phase": "Failed", "containerStatuses": [
                {"name": container["name"], "image": container.get("image", ""), "imageID": "", "ready": False,
                 "restartCount": 0, "state": state}]}
            self._patch(meta["namespace"], meta["name"], status)
            return
        proc = PodProcess(
            namespace=meta["namespace"],
            name=meta["name"],
            uid=meta["uid"],
            container=container["name"],
            image=container.get("image", ""),
            process=process,
            workdir=workdir,
            started_at=started_at,
        )
        self.running[meta["uid"]] = proc
        state = {"running": {"startedAt": proc.started_at}}
        self._patch_status(proc.namespace, proc.name, "Running", proc, state, ready=True)

    def _wait(self, pod: dict, container: str, message: str) -> None:
        uid = pod["metadata"]["uid"]
        if self.waiting_reason.get(uid) == message:
            return
        self.waiting_reason[uid] = message
        status = {
            "phase": "Pending",
            "containerStatuses": [
                {
                    "name": container,
                    "image": pod["spec"]["containers"][0].get("image", ""),
                    "imageID": "",
                    "ready": False,
                    "restartCount": 0,
                    "state": {"waiting": {"reason": "CreateContainerConfigError", "message": message}},
                }
            ],
        }
        self._patch(pod["metadata"]["namespace"], pod["metadata"]["name"], status)

    def _finish(self, proc: PodProcess, code: int) -> None:
        exit_code = code if code >= 0 else 128 - code  # killed by signal N: 128 + N
        state = {
            "terminated": {
                "exitCode": exit_code,
                "reason": "Completed" if exit_code == 0 else "Error",
                "startedAt": proc.started_at,
                "finishedAt": now(),
                "containerID": f"local://{proc.process.pid}",
            }
        }
        phase = "Succeeded" if exit_code == 0 else "Failed"
        self._patch_status(proc.namespace, proc.name, phase, proc, state, ready=False)
        shutil.rmtree(proc.workdir / "tmp", ignore_errors=True)

    def _stop(self, proc: PodProcess, *, deleted: bool) -> None:
        try:
            os.killpg(proc.process.pid, signal.SIGTERM)
            proc.process.wait(timeout=5)
        except ProcessLookupError:
            pass
        except subprocess.TimeoutExpired:
            os.killpg(proc.process.pid, signal.SIGKILL)
            proc.process.wait()
        if deleted:
            self._delete(proc.namespace, proc.name)

    def _delete(self, namespace: str, name: str) -> None:
        # A kubelet confirms a graceful deletion by deleting with grace 0.
        try:
            self.api.delete_namespaced_pod(name, namespace, grace_period_seconds=0)
        except ApiException as error:
            if error.status != 404:
                raise

    def _patch_status(
        self, namespace: str, name: str, phase: str, proc: PodProcess, state: dict, *, ready: bool
    ) -> None:
        condition = "True" if ready else "False"
        status = {
            "phase": phase,
            "hostIP": "127.0.0.1",
            "podIP": "127.0.0.1",
            "startTime": proc.started_at,
            "conditions": [
                {"type": "PodScheduled", "status": "True"},
                {"type": "Initialized", "status": "True"},
                {"type": "ContainersReady", "status": condition},
                {"type": "Ready", "status": condition},
            ],
            "containerStatuses": [
                {
                    "name": proc.container,
                    "image": proc.image,
                    "imageID": "",
                    "containerID": f"local://{proc.process.pid}",
                    "ready": ready,
                    "started": ready,
                    "restartCount": 0,
                    "state": state,
                }
            ],
        }
        self._patch(namespace, name, status)

    def _patch(self, namespace: str, name: str, status: dict) -> None:
        try:
            self.api.patch_namespaced_pod_status(name, namespace, {"status": status})
        except ApiException as error:
            if error.status != 404:  # deleted meanwhile
                raise


def main(argv: list[str] | None = None) -> int:
    """Run the node agent until it is stopped.

    Args:
        argv: Command-line arguments (default: ``sys.argv[1:]``).

    Returns:
        The exit status.
    """
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kubeconfig", required=True, help="kubeconfig with rights over nodes and pods")
    parser.add_argument("--workdir", required=True, type=Path, help="directory for the pods' working directories")
    parser.add_argument("--node", default="petseg-node", help="name of the Node to register")
    parser.add_argument("--gpus", type=int, default=4, help="nvidia.com/gpu the Node advertises")
    parser.add_argument("--label", action="append", default=[], help="extra Node label KEY=VALUE (repeatable)")
    parser.add_argument("--max-pods", type=int, default=2, help="pods run at the same time")
    parser.add_argument("--pythonpath", help="the pods' PYTHONPATH (packages the image would install)")
    parser.add_argument("--env", action="append", default=[], help="image environment KEY=VALUE (repeatable)")
    args = parser.parse_args(argv)
    config.load_kube_config(config_file=args.kubeconfig)
    labels = dict(item.split("=", 1) for item in args.label)
    agent = NodeAgent(
        client.CoreV1Api(),
        node=args.node,
        workdir=args.workdir,
        gpus=args.gpus,
        labels=labels,
        max_pods=args.max_pods,
        pythonpath=args.pythonpath,
        image_env=dict(item.split("=", 1) for item in args.env),
    )
    agent.run_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
