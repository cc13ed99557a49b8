"""A throwaway single-node Kubernetes cluster for the cluster tests: the supervisor.

Runs in the foreground until SIGTERM or SIGINT, then stops everything it
started (and only that: its children also get SIGTERM from the kernel should
this process die first). It composes one module per component:

1. ``network.py``: the pod bridge, closed (loopback and the bridge only);
2. ``storage.py``: S3 (``moto_server``) on the bridge's gateway address;
3. ``control_plane.py``: etcd, kube-apiserver, kube-scheduler, kube-controller-manager;
4. ``node.py``: containerd and runc, the kubelet, the project's image imported,
   and ``device_plugin.py`` advertising ``nvidia.com/gpu`` (the one stand-in);
   ``service_proxy.py``: kube-proxy, for Service addresses;
5. then the project's kustomize base (``k8s/base``) is applied, the Secrets made
   from its templates, and a Metaflow profile written by
   ``petseg.deploy.kubeconfig`` as ``petseg configure kubernetes`` does.

When ready it writes ``DIR/env.sh`` (to ``source``) and ``DIR/env.json``:
``KUBECONFIG`` there authenticates as the ``petseg`` service account, so the
flow runs with the least privileges that ``k8s/base`` grants it;
``PETSEG_ADMIN_KUBECONFIG`` is the cluster administrator.

The binaries come from ``build.sh`` and the image from ``image.sh``, both
cached in ``$PETSEG_K8S_CACHE`` (default ``/var/cache/petseg-k8s``).

Usage (root: the node needs it)::

    python tests/support/cluster/cluster.py --dir /tmp/petseg-cluster --image NAME --image-archive FILE
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import network
import storage
from control_plane import ControlPlane
from node import NODE, Node
from pki import NAMESPACE, make_pki, write_kubeconfig
from processes import Processes, wait_for
from service_proxy import ServiceProxy

REPO = Path(__file__).resolve().parents[3]
SERVICE_ACCOUNT = "petseg"
"""Who launches flows (the ``KUBERNETES`` kubeconfig); step pods run as petseg-step, the release step as
petseg-release (k8s/base)."""
STEP_SERVICE_ACCOUNT = "petseg-step"


def cache_dir() -> Path:
    """Where ``build.sh`` and ``image.sh`` keep what they built."""
    return Path(os.environ.get("PETSEG_K8S_CACHE", "/var/cache/petseg-k8s"))


class LocalCluster:
    """The components of a throwaway cluster, started and stopped together.

    Args:
        directory: Working directory for data, keys, logs, kubeconfigs and the node's state.
        image: The project's image, as pods name it (``docker.io/library/petseg:TAG``).
        image_archive: Its archive, imported into the node's containerd.
        python: Interpreter for moto_server and the device plugin.
    """

    def __init__(self, directory: Path, *, image: str, image_archive: Path, python: str = sys.executable) -> None:
        self.dir = directory.resolve()
        self.image, self.image_archive, self.python = image, image_archive, python
        self.bin = cache_dir() / "bin"
        self.processes = Processes(self.dir / "logs")
        self.node: Node | None = None
        self.proxy: ServiceProxy | None = None
        self.env: dict[str, str] = {}

    def start(self) -> dict[str, str]:
        """Start the whole cluster; stop what was started if any part fails.

        Returns:
            The environment a client needs (also written to env.sh and env.json).
        """
        try:
            return self._start()
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """Stop the pods, then every process, then remove the bridge and the node's state."""
        if self.node is not None:
            self.node.stop_containers()
        self.processes.stop()
        if self.proxy is not None:
            self.proxy.stop()
        if self.node is not None:
            self.node.wipe()
        network.down()

    def _start(self) -> dict[str, str]:
        binaries = ("kube-apiserver", "kube-controller-manager", "kube-scheduler", "kubelet", "kube-proxy", "kubectl",
                    "pause")
        for name in binaries:
            if not (self.bin / name).exists():
                raise RuntimeError(f"{self.bin / name} is missing: run tests/support/cluster/build.sh first")
        for sub in ("etcd", "pki", "metaflow", "network", "node"):
            # A cluster's state never outlives it: keys and tokens are new.
            shutil.rmtree(self.dir / sub, ignore_errors=True)
        for sub in ("logs", "etcd", "pki", "metaflow", "node"):
            (self.dir / sub).mkdir(parents=True, exist_ok=True)
        gateway = network.GATEWAY
        cni_conf = network.up(self.dir / "network")
        s3_url = storage.start(self.processes, python=self.python, host=gateway)

        pki = self.dir / "pki"
        make_pki(pki, addresses=[gateway, "127.0.0.1", network.KUBERNETES_SERVICE])
        control = ControlPlane(self.processes, directory=self.dir, pki=pki, bin_dir=self.bin, host=gateway, node=NODE)
        control.start()
        self.node = Node(self.processes, directory=self.dir / "node", bin_dir=self.bin, address=gateway,
                         kubeconfig=control.node_kubeconfig, admin=control.admin, ca_file=pki / "ca.crt",
                         cni_conf=cni_conf, images=[self.image_archive], python=self.python)
        self.node.start()
        self.proxy = ServiceProxy(self.processes, bin_dir=self.bin, kubeconfig=control.proxy_kubeconfig, node=NODE)
        self.proxy.start()

        runner = self.dir / "runner.kubeconfig"
        token = self._apply_base(control.admin)
        write_kubeconfig(runner, server=control.server, ca_file=pki / "ca.crt", user=SERVICE_ACCOUNT, token=token)
        self._configure_metaflow(s3_url)

        self.env = {
            "KUBECONFIG": str(runner),
            "PETSEG_ADMIN_KUBECONFIG": str(control.admin),
            "PETSEG_KUBECTL": str(self.bin / "kubectl"),
            "PETSEG_IMAGE": self.image,
            "PETSEG_NODE": NODE,
            "PETSEG_NODE_DIR": str(self.dir / "node"),
            "PETSEG_S3_ENDPOINT": s3_url,
            "PETSEG_S3_BUCKET": storage.BUCKET,
            "PETSEG_K8S_NAMESPACE": NAMESPACE,
            "PETSEG_CLUSTER_DIR": str(self.dir),
            "PETSEG_TRUSTED_KEYS": str(self.dir / "trusted-keys"),
            "METAFLOW_HOME": str(self.dir / "metaflow"),
            "METAFLOW_PROFILE": "cluster",
            **storage.CREDENTIALS,
        }
        (self.dir / "env.json").write_text(json.dumps(self.env, indent=2))
        (self.dir / "env.sh").write_text("".join(f"export {k}={shlex.quote(v)}\n" for k, v in self.env.items()))
        return self.env

    def kubectl(self, kubeconfig: Path, *args: str, stdin: str | None = None) -> str:
        """Run the cached kubectl and return its output; fail on a non-zero exit."""
        result = subprocess.run(
            [str(self.bin / "kubectl"), f"--kubeconfig={kubeconfig}", *args],
            input=stdin,
            capture_output=True,
            text=True,
        )
        if result.returncode != 0:
            raise RuntimeError(f"kubectl {' '.join(args)} failed:\n{result.stderr}")
        return result.stdout

    def _get(self, kubeconfig: Path, *what: str) -> dict:
        """One object from the API, as JSON."""
        return json.loads(self.kubectl(kubeconfig, "-n", NAMESPACE, "get", *what, "-o", "json"))

    def _apply_base(self, admin: Path) -> str:
        """Apply k8s/base and the S3 secret made from its template; return the service account's token."""
        import yaml

        self.kubectl(admin, "apply", "-k", str(REPO / "k8s" / "base"))
        secret = yaml.safe_load((REPO / "k8s" / "base" / "s3-secret.template.yaml").read_text())
        if set(secret["stringData"]) != set(storage.CREDENTIALS):
            raise RuntimeError(f"s3-secret.template.yaml holds {sorted(secret['stringData'])}, "
                               f"expected {sorted(storage.CREDENTIALS)}")
        secret["stringData"] = storage.CREDENTIALS
        self.kubectl(admin, "apply", "-f", "-", stdin=json.dumps(secret))
        # The release step's signing key (its pod alone gets this Secret): a fresh P-256 key per cluster.
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ec

        key = ec.generate_private_key(ec.SECP256R1())
        signing = yaml.safe_load((REPO / "k8s" / "base" / "signing-secret.template.yaml").read_text())
        signing["stringData"] = {"PETSEG_SIGNING_KEY": key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()).decode()}
        self.kubectl(admin, "apply", "-f", "-", stdin=json.dumps(signing))
        # Its public key is what the operator trusts (PETSEG_TRUSTED_KEYS in the cluster's environment).
        public = key.public_key().public_bytes(serialization.Encoding.PEM,
                                               serialization.PublicFormat.SubjectPublicKeyInfo).decode()
        (self.dir / "trusted-keys").mkdir(exist_ok=True)
        (self.dir / "trusted-keys" / "cluster-signing.pub").write_text(public)
        # ... and what the serving pods trust: the same public key, as the cluster's operator publishes it.
        trusted = yaml.safe_load((REPO / "k8s" / "base" / "trusted-keys.template.yaml").read_text())
        trusted["data"] = {"cluster-signing.pub": public}
        self.kubectl(admin, "apply", "-f", "-", stdin=json.dumps(trusted))
        # The serving pods' S3 credential, as a shared-credentials file (moto takes any key).
        serving = yaml.safe_load((REPO / "k8s" / "base" / "serving-s3-secret.template.yaml").read_text())
        serving["stringData"] = {"credentials": "[default]\naws_access_key_id = serving\n"
                                                "aws_secret_access_key = serving\n"}
        self.kubectl(admin, "apply", "-f", "-", stdin=json.dumps(serving))

        def token() -> str:
            name = self._get(admin, "serviceaccount", SERVICE_ACCOUNT)["secrets"][0]["name"]
            return base64.b64decode(self._get(admin, "secret", name)["data"]["token"]).decode()

        return wait_for("service-account token", token, timeout=60)

    def _configure_metaflow(self, s3_url: str) -> None:
        sys.path.insert(0, str(REPO))
        from petseg.deploy import kubeconfig

        settings = kubeconfig.metaflow_config(
            s3_root=f"s3://{storage.BUCKET}/metaflow",
            namespace=NAMESPACE,
            image=self.image,
            endpoint_url=s3_url,
            secrets=["petseg-s3"],  # the name in k8s/base/s3-secret.template.yaml
            service_account=STEP_SERVICE_ACCOUNT,
            gpu=1,
        )
        kubeconfig.write_config(settings, self.dir / "metaflow" / "config_cluster.json")



def main(argv: list[str] | None = None) -> int:
    """Start the cluster, print its environment, and run until stopped.

    Args:
        argv: Command-line arguments (default: ``sys.argv[1:]``).

    Returns:
        The exit status.
    """
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", type=Path, required=True, help="working directory (created; reused if present)")
    parser.add_argument("--image", required=True, help="the project's image, as pods name it")
    parser.add_argument("--image-archive", type=Path, required=True, help="its archive (tests/support/cluster/image.sh)")
    args = parser.parse_args(argv)
    args.dir.mkdir(parents=True, exist_ok=True)
    for stale in ("env.sh", "env.json"):
        (args.dir / stale).unlink(missing_ok=True)
    stopping = []
    signal.signal(signal.SIGTERM, lambda *_: stopping.append(True))
    signal.signal(signal.SIGINT, lambda *_: stopping.append(True))
    cluster = LocalCluster(args.dir, image=args.image, image_archive=args.image_archive)
    try:
        cluster.start()
        print(f"cluster ready: source {args.dir / 'env.sh'}", flush=True)
        while not stopping and not cluster.processes.dead():
            time.sleep(0.5)
        for name, code in cluster.processes.dead():
            print(f"{name} exited with {code}; see {cluster.processes.log(name)}", flush=True)
    finally:
        cluster.stop()
        (args.dir / "env.sh").unlink(missing_ok=True)
    return 0 if stopping else 1


if __name__ == "__main__":
    sys.exit(main())
