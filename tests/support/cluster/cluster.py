"""A throwaway Kubernetes cluster and S3 server on loopback, for the cluster tests.

Runs in the foreground until SIGTERM or SIGINT, then stops everything it
started (and only that: it tracks its children, which also get SIGTERM from
the kernel should this process die first):

1. etcd, its data in ``DIR/etcd``;
2. kube-apiserver on 127.0.0.1 with token authentication, RBAC, a
   service-account signing key, minimal admission plugins and the
   ``TTLAfterFinished`` feature gate;
3. kube-controller-manager with the job, service-account, token,
   namespace, garbage-collector and ttl-after-finished controllers;
4. ``moto_server`` (S3) with one bucket;
5. the node agent (``tests/support/node_agent.py``) in place of kubelet and scheduler,
   its pods running in ``DIR/pods`` with ``DIR/image`` as their PYTHONPATH: a copy of
   ``petseg/`` taken at start, as the image installs it, so that no pod finds the
   repository's git checkout (its working directory and its code are outside it);
6. the project's kustomize base (``k8s/base``) applied, the S3 secret made
   from ``k8s/base/s3-secret.template.yaml`` with the test server's (dummy)
   credentials, and a Metaflow profile written by ``petseg.deploy.kubeconfig`` as
   ``petseg configure kubernetes`` does.

When ready it writes ``DIR/env.sh`` (to ``source``) and ``DIR/env.json``:
``KUBECONFIG`` there authenticates as the ``petseg`` service account, so the
flow runs with the least privileges that ``k8s/base`` grants it;
``PETSEG_ADMIN_KUBECONFIG`` is the cluster administrator.

The binaries come from ``tests/support/cluster/build.sh`` (cached in
``$PETSEG_K8S_CACHE``, default ``/var/cache/petseg-k8s``).

Usage::

    python tests/support/cluster/cluster.py --dir /tmp/petseg-cluster
"""

from __future__ import annotations

import argparse
import base64
import ctypes
import datetime as dt
import json
import os
import secrets
import shlex
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]
NAMESPACE = "petseg"
SERVICE_ACCOUNT = "petseg"
BUCKET = "petseg"
IMAGE = "petseg:test"
ADMISSION_OFF = (
    # Everything 1.20 enables by default except NamespaceLifecycle and
    # ServiceAccount: the cluster has no storage, quotas, webhooks or nodes
    # that report conditions, so those plugins would only add noise.
    "LimitRanger,TaintNodesByCondition,Priority,DefaultTolerationSeconds,DefaultStorageClass,"
    "StorageObjectInUseProtection,PersistentVolumeClaimResize,RuntimeClass,CertificateApproval,"
    "CertificateSigning,CertificateSubjectRestriction,DefaultIngressClass,MutatingAdmissionWebhook,"
    "ValidatingAdmissionWebhook,ResourceQuota"
)
CONTROLLERS = "job,serviceaccount,serviceaccount-token,namespace,garbagecollector,ttl-after-finished"


def cache_dir() -> Path:
    """Where ``build.sh`` keeps the control-plane binaries."""
    return Path(os.environ.get("PETSEG_K8S_CACHE", "/var/cache/petseg-k8s"))


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that is free right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _die_with_parent() -> None:
    # PR_SET_PDEATHSIG: the kernel sends SIGTERM to the child when this
    # process dies, so a crash of the supervisor leaves nothing behind.
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)


def make_keys(pki: Path) -> None:
    """Write the service-account key pair and a self-signed serving certificate.

    Args:
        pki: Directory for ``sa.key``, ``sa.pub``, ``apiserver.key`` and ``apiserver.crt``.
    """
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    from cryptography.x509.oid import NameOID

    pki.mkdir(parents=True, exist_ok=True)

    def write_key(path: Path) -> rsa.RSAPrivateKey:
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        path.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL, serialization.NoEncryption()
            )
        )
        return key

    sa_key = write_key(pki / "sa.key")
    (pki / "sa.pub").write_bytes(
        sa_key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    key = write_key(pki / "apiserver.key")
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "petseg-test-apiserver")])
    start = dt.datetime.now(dt.timezone.utc) - dt.timedelta(minutes=5)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + dt.timedelta(days=7))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.SubjectAlternativeName(
                [
                    x509.DNSName("localhost"),
                    x509.DNSName("kubernetes.default.svc"),
                    x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                ]
            ),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    (pki / "apiserver.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def write_kubeconfig(path: Path, *, server: str, ca_file: Path, user: str, token: str) -> None:
    """Write a kubeconfig for one token user.

    Args:
        path: Where to write it.
        server: The API server's URL.
        ca_file: PEM file that verifies the server's certificate.
        user: A name for the user entry.
        token: The bearer token.
    """
    ca = base64.b64encode(ca_file.read_bytes()).decode()
    kubeconfig = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "petseg-test", "cluster": {"server": server, "certificate-authority-data": ca}}],
        "users": [{"name": user, "user": {"token": token}}],
        "contexts": [{"name": user, "context": {"cluster": "petseg-test", "user": user, "namespace": NAMESPACE}}],
        "current-context": user,
    }
    path.write_text(json.dumps(kubeconfig, indent=2))
    path.chmod(0o600)


def wait_for(what: str, check, *, timeout: float, proc: subprocess.Popen | None = None, log: Path | None = None):
    """Call ``check`` until it returns a true value, or fail after ``timeout`` seconds.

    Args:
        what: Names the awaited condition in the error.
        check: Returns a true value when ready; exceptions count as not ready.
        timeout: Seconds to wait.
        proc: A process that must stay alive meanwhile.
        log: Its log file, quoted in the error.

    Returns:
        What ``check`` returned.
    """
    deadline = time.monotonic() + timeout
    while True:
        try:
            result = check()
            if result:
                return result
        except Exception:  # not up yet
            pass
        dead = proc is not None and proc.poll() is not None
        if dead or time.monotonic() > deadline:
            tail = log.read_text(errors="replace")[-3000:] if log and log.exists() else ""
            state = f"exited with {proc.returncode}" if dead else f"not ready after {timeout:.0f} s"
            raise RuntimeError(f"{what} {state}\n{tail}")
        time.sleep(0.3)


class LocalCluster:
    """The processes of a throwaway cluster, started and stopped together.

    Args:
        directory: Working directory for data, keys, logs and kubeconfigs.
        python: Interpreter for moto_server and the node agent (the one whose
            environment stands in for the container image).
    """

    def __init__(self, directory: Path, *, python: str = sys.executable) -> None:
        self.dir = directory.resolve()
        self.python = python
        self.bin = cache_dir() / "bin"
        self.procs: list[tuple[str, subprocess.Popen]] = []
        self.env: dict[str, str] = {}

    # -- processes ----------------------------------------------------------

    def spawn(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> subprocess.Popen:
        """Start one process, logging to ``DIR/logs/NAME.log``, and track it."""
        log = self.dir / "logs" / f"{name}.log"
        with open(log, "ab") as out:
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                preexec_fn=_die_with_parent,
                start_new_session=True,
            )
        self.procs.append((name, proc))
        (self.dir / "pids").write_text("".join(f"{n} {p.pid}\n" for n, p in self.procs))
        return proc

    def stop(self) -> None:
        """Stop every started process, the last started first."""
        for name, proc in reversed(self.procs):
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        self.procs.clear()
        (self.dir / "pids").unlink(missing_ok=True)

    # -- start --------------------------------------------------------------

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

    def _start(self) -> dict[str, str]:
        for name in ("kube-apiserver", "kube-controller-manager", "kubectl"):
            if not (self.bin / name).exists():
                raise RuntimeError(f"{self.bin / name} is missing: run tests/support/cluster/build.sh first")
        for sub in ("etcd", "pki", "pods", "metaflow"):
            # A cluster's state never outlives it: keys and tokens are new.
            shutil.rmtree(self.dir / sub, ignore_errors=True)
        for sub in ("logs", "etcd", "pki", "pods", "metaflow"):
            (self.dir / sub).mkdir(parents=True, exist_ok=True)
        pki = self.dir / "pki"
        make_keys(pki)
        admin_token = secrets.token_hex(16)
        (pki / "tokens.csv").write_text(f"{admin_token},admin,admin,system:masters\n")
        ports = {name: free_port() for name in ("etcd", "peer", "apiserver", "s3")}

        etcd_url = f"http://127.0.0.1:{ports['etcd']}"
        peer_url = f"http://127.0.0.1:{ports['peer']}"
        etcd = self.spawn(
            "etcd",
            [
                "etcd",
                "--name=petseg-test",
                f"--data-dir={self.dir / 'etcd'}",
                f"--listen-client-urls={etcd_url}",
                f"--advertise-client-urls={etcd_url}",
                f"--listen-peer-urls={peer_url}",
                f"--initial-advertise-peer-urls={peer_url}",
                f"--initial-cluster=petseg-test={peer_url}",
            ],
        )
        wait_for("etcd", lambda: urllib.request.urlopen(etcd_url + "/health", timeout=2).status == 200,
                 timeout=60, proc=etcd, log=self.dir / "logs/etcd.log")

        server = f"https://127.0.0.1:{ports['apiserver']}"
        apiserver = self.spawn(
            "kube-apiserver",
            [
                str(self.bin / "kube-apiserver"),
                f"--etcd-servers={etcd_url}",
                "--bind-address=127.0.0.1",
                "--advertise-address=127.0.0.1",
                f"--secure-port={ports['apiserver']}",
                "--insecure-port=0",
                f"--tls-cert-file={pki / 'apiserver.crt'}",
                f"--tls-private-key-file={pki / 'apiserver.key'}",
                f"--token-auth-file={pki / 'tokens.csv'}",
                "--authorization-mode=RBAC",
                f"--service-account-key-file={pki / 'sa.pub'}",
                f"--service-account-signing-key-file={pki / 'sa.key'}",
                "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
                "--service-cluster-ip-range=10.96.0.0/16",
                "--enable-admission-plugins=NamespaceLifecycle,ServiceAccount",
                f"--disable-admission-plugins={ADMISSION_OFF}",
                "--feature-gates=TTLAfterFinished=true",
                f"--cert-dir={pki}",
            ],
        )
        context = ssl.create_default_context(cafile=str(pki / "apiserver.crt"))

        def ready() -> bool:
            request = urllib.request.Request(server + "/readyz", headers={"Authorization": f"Bearer {admin_token}"})
            return urllib.request.urlopen(request, context=context, timeout=5).status == 200

        wait_for("kube-apiserver", ready, timeout=180, proc=apiserver, log=self.dir / "logs/kube-apiserver.log")
        admin = self.dir / "admin.kubeconfig"
        write_kubeconfig(admin, server=server, ca_file=pki / "apiserver.crt", user="admin", token=admin_token)

        self.spawn(
            "kube-controller-manager",
            [
                str(self.bin / "kube-controller-manager"),
                f"--kubeconfig={admin}",
                f"--controllers={CONTROLLERS}",
                f"--service-account-private-key-file={pki / 'sa.key'}",
                f"--root-ca-file={pki / 'apiserver.crt'}",
                "--feature-gates=TTLAfterFinished=true",
                "--leader-elect=false",
                "--port=0",
                "--secure-port=0",
                "--use-service-account-credentials=false",
            ],
        )

        s3_url = f"http://127.0.0.1:{ports['s3']}"
        moto = self.spawn(
            "moto_server", [self.python, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(ports["s3"])]
        )
        wait_for("moto_server", lambda: urllib.request.urlopen(s3_url + "/moto-api/", timeout=2).status == 200,
                 timeout=60, proc=moto, log=self.dir / "logs/moto_server.log")
        credentials = {
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
        }
        self._create_bucket(s3_url, credentials)

        # What the image holds (Dockerfile: `pip install /src` of petseg/): a copy outside any checkout.
        image = self.dir / "image"
        shutil.rmtree(image, ignore_errors=True)
        shutil.copytree(REPO / "petseg", image / "petseg", ignore=shutil.ignore_patterns("__pycache__"))
        agent_env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(self.dir)}
        self.spawn(
            "node-agent",
            [
                self.python,
                str(REPO / "tests" / "support" / "node_agent.py"),
                f"--kubeconfig={admin}",
                f"--workdir={self.dir / 'pods'}",
                "--label=nvidia.com/gpu.present=true",
                f"--pythonpath={image}",
                # As the Dockerfile's ENV: the packages are there already.
                "--env=METAFLOW_SKIP_INSTALL_DEPENDENCIES=1",
            ],
            env=agent_env,
        )

        runner = self.dir / "runner.kubeconfig"
        token = self._apply_base(admin, credentials)
        write_kubeconfig(runner, server=server, ca_file=pki / "apiserver.crt", user=SERVICE_ACCOUNT, token=token)
        self._configure_metaflow(s3_url)

        self.env = {
            "KUBECONFIG": str(runner),
            "PETSEG_ADMIN_KUBECONFIG": str(admin),
            "PETSEG_KUBECTL": str(self.bin / "kubectl"),
            "PETSEG_S3_ENDPOINT": s3_url,
            "PETSEG_S3_BUCKET": BUCKET,
            "PETSEG_K8S_NAMESPACE": NAMESPACE,
            "PETSEG_CLUSTER_DIR": str(self.dir),
            "PETSEG_POD_PYTHONPATH": str(image),
            "PETSEG_PODS_DIR": str(self.dir / "pods"),
            "PETSEG_TRUSTED_KEYS": str(self.dir / "trusted-keys"),
            "METAFLOW_HOME": str(self.dir / "metaflow"),
            "METAFLOW_PROFILE": "cluster",
            **credentials,
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

    def _create_bucket(self, s3_url: str, credentials: dict[str, str]) -> None:
        import boto3

        s3 = boto3.client(
            "s3",
            endpoint_url=s3_url,
            aws_access_key_id=credentials["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=credentials["AWS_SECRET_ACCESS_KEY"],
            region_name=credentials["AWS_DEFAULT_REGION"],
        )
        s3.create_bucket(Bucket=BUCKET)

    def _get(self, kubeconfig: Path, *what: str) -> dict:
        """One object from the API, as JSON."""
        return json.loads(self.kubectl(kubeconfig, "-n", NAMESPACE, "get", *what, "-o", "json"))

    def _apply_base(self, admin: Path, credentials: dict[str, str]) -> str:
        """Apply k8s/base and the S3 secret made from its template; return the service account's token."""
        import yaml

        self.kubectl(admin, "apply", "-k", str(REPO / "k8s" / "base"))
        secret = yaml.safe_load((REPO / "k8s" / "base" / "s3-secret.template.yaml").read_text())
        if set(secret["stringData"]) != set(credentials):
            raise RuntimeError(f"s3-secret.template.yaml holds {sorted(secret['stringData'])}, "
                               f"expected {sorted(credentials)}")
        secret["stringData"] = credentials
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
        (self.dir / "trusted-keys").mkdir(exist_ok=True)
        (self.dir / "trusted-keys" / "cluster-signing.pub").write_bytes(key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))

        def token() -> str:
            name = self._get(admin, "serviceaccount", SERVICE_ACCOUNT)["secrets"][0]["name"]
            return base64.b64decode(self._get(admin, "secret", name)["data"]["token"]).decode()

        return wait_for("service-account token", token, timeout=60)

    def _configure_metaflow(self, s3_url: str) -> None:
        sys.path.insert(0, str(REPO))
        from petseg.deploy import kubeconfig

        settings = kubeconfig.metaflow_config(
            s3_root=f"s3://{BUCKET}/metaflow",
            namespace=NAMESPACE,
            image=IMAGE,
            endpoint_url=s3_url,
            secrets=["petseg-s3"],  # the name in k8s/base/s3-secret.template.yaml
            service_account=SERVICE_ACCOUNT,
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
    args = parser.parse_args(argv)
    args.dir.mkdir(parents=True, exist_ok=True)
    for stale in ("env.sh", "env.json"):
        (args.dir / stale).unlink(missing_ok=True)
    stopping = []
    signal.signal(signal.SIGTERM, lambda *_: stopping.append(True))
    signal.signal(signal.SIGINT, lambda *_: stopping.append(True))
    cluster = LocalCluster(args.dir)
    try:
        cluster.start()
        print(f"cluster ready: source {args.dir / 'env.sh'}", flush=True)
        while not stopping and all(proc.poll() is None for _, proc in cluster.procs):
            time.sleep(0.5)
        for name, proc in cluster.procs:
            if proc.poll() is not None:
                print(f"{name} exited with {proc.returncode}; see {args.dir / 'logs' / (name + '.log')}", flush=True)
    finally:
        cluster.stop()
        (args.dir / "env.sh").unlink(missing_ok=True)
    return 0 if stopping else 1


if __name__ == "__main__":
    sys.exit(main())
