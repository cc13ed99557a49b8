"""The test cluster's node: containerd with runc, the kubelet, and the GPU device plugin.

A real node: the kubelet (1.20, built by ``build.sh``) runs pods through
containerd's CRI (Debian's containerd 1.6 serves the CRI v1alpha2 the
kubelet speaks) and runc, with the pod network of ``network.py``. Images
come from archives imported into containerd, since no registry is reachable:
the pause image (the sandbox every pod starts from) is packed here from the
``pause`` program built with the cluster, and the project's image from
``image.sh``'s archive. The one stand-in is the GPU: ``device_plugin.py``
advertises ``nvidia.com/gpu`` through the kubelet's device-plugin API.
"""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import subprocess
import tarfile
import time
from pathlib import Path

from processes import Processes, free_port, wait_for

NODE = "petseg-node"
# containerd 1.6's default sandbox image; the pause image is imported under this name.
PAUSE_IMAGE = "registry.k8s.io/pause:3.6"
GPUS = 2
# Fixed in kubelet 1.20, whatever its --root-dir.
DEVICE_PLUGINS = Path("/var/lib/kubelet/device-plugins")

CONTAINERD_CONFIG = """\
version = 2
root = "{dir}/root"
state = "{dir}/state"
[grpc]
  address = "{dir}/containerd.sock"
[ttrpc]
  address = "{dir}/containerd.sock.ttrpc"
[debug]
  address = ""
[plugins."io.containerd.internal.v1.opt"]
  path = "{dir}/opt"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{pause}"
  # These machines lack CAP_SYS_RESOURCE: without this every sandbox fails
  # with runc's "can't get final child's PID from pipe: EOF".
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        # cgroup v1 and no systemd as PID 1: the cgroupfs driver, as the kubelet's.
        SystemdCgroup = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "{cni_bin}"
    conf_dir = "{cni_conf}"
"""


def pause_archive(program: Path, archive: Path) -> Path:
    """Pack the ``pause`` program as a one-layer image in Docker's archive format, named ``PAUSE_IMAGE``."""
    layer = io.BytesIO()
    with tarfile.open(fileobj=layer, mode="w") as tar:
        info = tar.gettarinfo(str(program), arcname="pause")
        info.uid = info.gid = 0
        info.uname = info.gname = ""
        info.mode = 0o755
        with open(program, "rb") as data:
            tar.addfile(info, data)
    layer_bytes = layer.getvalue()
    config = json.dumps({
        "architecture": "amd64", "os": "linux",
        "config": {"Entrypoint": ["/pause"], "User": "65535:65535"},
        "rootfs": {"type": "layers", "diff_ids": ["sha256:" + hashlib.sha256(layer_bytes).hexdigest()]},
    }).encode()
    manifest = json.dumps([{"Config": "config.json", "RepoTags": [PAUSE_IMAGE], "Layers": ["layer.tar"]}]).encode()
    with tarfile.open(archive, "w") as tar:
        for name, data in (("layer.tar", layer_bytes), ("config.json", config), ("manifest.json", manifest)):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return archive


class Node:
    """Start containerd, import the images, start the kubelet and the device plugin, wait until Ready.

    Args:
        processes: Where the processes are tracked.
        directory: The node's state: containerd's, the kubelet's, logs of containers.
        bin_dir: The Kubernetes binaries (``kubelet``, ``kubectl``, ``pause``).
        address: The node's address, on the pod bridge.
        kubeconfig: The kubelet's credentials (``system:node:NODE``).
        admin: An administrator's kubeconfig, to watch the node come up.
        ca_file: The authority whose client certificates the kubelet accepts (the API server's).
        cni_conf: The pod network's CNI configuration directory.
        images: Image archives to import.
        python: The interpreter for the device plugin.
    """

    def __init__(self, processes: Processes, *, directory: Path, bin_dir: Path, address: str, kubeconfig: Path,
                 admin: Path, ca_file: Path, cni_conf: Path, images: list[Path], python: str) -> None:
        self.processes, self.dir, self.bin, self.address = processes, directory, bin_dir, address
        self.kubeconfig, self.admin, self.ca_file, self.cni_conf = kubeconfig, admin, ca_file, cni_conf
        self.images, self.python = images, python
        self.socket = directory / "containerd" / "containerd.sock"

    def start(self) -> None:
        self._containerd()
        archive = pause_archive(self.bin / "pause", self.dir / "pause.docker.tar")
        for image in [archive, *self.images]:
            self.ctr("images", "import", str(image))
        # Sockets a stopped kubelet and plugin left behind would be taken for live ones.
        shutil.rmtree(DEVICE_PLUGINS, ignore_errors=True)
        DEVICE_PLUGINS.mkdir(parents=True)
        self._kubelet()
        self.processes.spawn("device-plugin", [self.python, str(Path(__file__).with_name("device_plugin.py")),
                                               f"--kubelet-dir={DEVICE_PLUGINS}", f"--count={GPUS}"])
        wait_for(f"node {NODE} Ready with {GPUS} nvidia.com/gpu", self._ready, timeout=180,
                 log=self.processes.log("kubelet"))

    def ctr(self, *args: str) -> str:
        """Run containerd's ``ctr`` in the kubelet's namespace (``k8s.io``)."""
        result = subprocess.run(["ctr", f"--address={self.socket}", "--namespace=k8s.io", *args],
                                capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"ctr {' '.join(args)} failed: {result.stderr.strip()}")
        return result.stdout

    def _containerd(self) -> None:
        state = self.dir / "containerd"
        state.mkdir(parents=True, exist_ok=True)
        config = state / "config.toml"
        config.write_text(CONTAINERD_CONFIG.format(dir=state, pause=PAUSE_IMAGE, cni_bin="/usr/lib/cni",
                                                   cni_conf=self.cni_conf))
        proc = self.processes.spawn("containerd", ["containerd", f"--config={config}"])
        wait_for("containerd", lambda: self.ctr("version"), timeout=60, proc=proc,
                 log=self.processes.log("containerd"))

    def _kubelet(self) -> None:
        root = self.dir / "kubelet"
        root.mkdir(parents=True, exist_ok=True)
        endpoint = f"unix://{self.socket}"
        self.processes.spawn("kubelet", [
            str(self.bin / "kubelet"),
            f"--kubeconfig={self.kubeconfig}",
            f"--hostname-override={NODE}", f"--node-ip={self.address}",
            f"--root-dir={root}", f"--cert-dir={root / 'pki'}",
            "--container-runtime=remote", f"--container-runtime-endpoint={endpoint}",
            f"--image-service-endpoint={endpoint}", "--runtime-request-timeout=15m",
            "--cgroup-driver=cgroupfs",
            # Its API (logs, exec) on the node's address, for the API server alone: a client
            # certificate from the cluster's authority, nothing anonymous, no read-only port.
            f"--address={self.address}", f"--port={free_port(self.address)}", "--read-only-port=0",
            "--healthz-port=0", "--anonymous-auth=false", f"--client-ca-file={self.ca_file}",
            "--authorization-mode=AlwaysAllow",
            "--node-labels=nvidia.com/gpu.present=true",
            # A shared test machine: no swap check, no eviction or image collection for a full disk.
            "--fail-swap-on=false",
            "--eviction-hard=memory.available<100Mi,nodefs.available<1%,imagefs.available<1%",
            "--image-gc-high-threshold=100", "--image-gc-low-threshold=99",
            # No registry is reachable: images are imported, never pulled.
            f"--pod-infra-container-image={PAUSE_IMAGE}",
            "--serialize-image-pulls=false",
            "--node-status-update-frequency=4s",
        ])

    def _ready(self) -> bool:
        result = subprocess.run([str(self.bin / "kubectl"), f"--kubeconfig={self.admin}", "get", "node", NODE,
                                 "-o", "json"], capture_output=True, text=True)
        if result.returncode != 0:
            return False
        node = json.loads(result.stdout)
        ready = any(c["type"] == "Ready" and c["status"] == "True" for c in node["status"].get("conditions", []))
        gpus = node["status"].get("allocatable", {}).get("nvidia.com/gpu")
        tainted = any(t["key"].startswith("node.kubernetes.io/not-ready") for t in node["spec"].get("taints", []))
        return ready and gpus == str(GPUS) and not tainted

    def wipe(self) -> None:
        """After the processes stopped: unmount what the pods left mounted, then remove the node's state."""
        with open("/proc/self/mounts") as mounts:
            points = [line.split()[1] for line in mounts if str(self.dir) in line.split()[1]]
        for point in sorted(points, key=len, reverse=True):
            subprocess.run(["umount", "-l", point], capture_output=True)
        time.sleep(0.2)
        subprocess.run(["rm", "-rf", str(self.dir)], capture_output=True)

    def stop_containers(self) -> None:
        """Kill every container of the node: they outlive containerd and the kubelet otherwise."""
        try:
            tasks = [line.split()[0] for line in self.ctr("tasks", "list", "--quiet").splitlines() if line.strip()]
        except RuntimeError:
            return
        for task in tasks:
            subprocess.run(["ctr", f"--address={self.socket}", "--namespace=k8s.io", "tasks", "kill", "--signal",
                            "SIGKILL", task], capture_output=True)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                if not self.ctr("tasks", "list", "--quiet").strip():
                    return
            except RuntimeError:
                return
            time.sleep(0.5)
