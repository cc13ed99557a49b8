"""The test cluster's control plane: etcd, kube-apiserver, kube-scheduler, kube-controller-manager.

The Kubernetes programs are 1.20, built from Debian's ``kubernetes`` source
by ``build.sh``; etcd is Debian's. Each program's flags are here, with why.
"""

from __future__ import annotations

import secrets
import ssl
import urllib.request
from pathlib import Path

import network
from pki import write_kubeconfig
from processes import Processes, free_port, wait_for

ADMISSION = "NamespaceLifecycle,ServiceAccount,NodeRestriction"
ADMISSION_OFF = (
    # Everything else 1.20 enables by default: the cluster has no storage,
    # quotas or webhooks, so those plugins would only add noise.
    "LimitRanger,TaintNodesByCondition,Priority,DefaultTolerationSeconds,DefaultStorageClass,"
    "StorageObjectInUseProtection,PersistentVolumeClaimResize,RuntimeClass,CertificateApproval,"
    "CertificateSigning,CertificateSubjectRestriction,DefaultIngressClass,MutatingAdmissionWebhook,"
    "ValidatingAdmissionWebhook,ResourceQuota"
)
CONTROLLERS = ",".join([
    "job", "deployment", "replicaset", "endpoint", "endpointslice", "serviceaccount", "serviceaccount-token",
    "namespace", "garbagecollector", "ttl-after-finished", "podgc",
    # Without it the node's not-ready taint is never lifted and every pod stays Pending.
    "nodelifecycle",
])


class ControlPlane:
    """Start the control plane; it serves on ``host``, the pod bridge's gateway, so that pods reach it too.

    Args:
        processes: Where the processes are tracked.
        directory: For etcd's data, keys and kubeconfigs.
        pki: The directory of ``pki.make_pki``.
        bin_dir: The Kubernetes binaries.
        host: The address to serve on.
        node: The node's name, whose kubelet gets a token of its own.
    """

    def __init__(self, processes: Processes, *, directory: Path, pki: Path, bin_dir: Path, host: str,
                 node: str) -> None:
        self.processes, self.dir, self.pki, self.bin, self.host = processes, directory, pki, bin_dir, host
        self.admin_token = secrets.token_hex(16)
        self.node_token = secrets.token_hex(16)
        self.proxy_token = secrets.token_hex(16)
        self.node = node
        self.server = ""

    def start(self) -> None:
        etcd_url = self._etcd()
        self._apiserver(etcd_url)
        self.admin = self.dir / "admin.kubeconfig"
        write_kubeconfig(self.admin, server=self.server, ca_file=self.pki / "ca.crt", user="admin",
                         token=self.admin_token)
        self.node_kubeconfig = self.dir / "node.kubeconfig"
        write_kubeconfig(self.node_kubeconfig, server=self.server, ca_file=self.pki / "ca.crt",
                         user=f"system:node:{self.node}", token=self.node_token)
        self.proxy_kubeconfig = self.dir / "kube-proxy.kubeconfig"
        write_kubeconfig(self.proxy_kubeconfig, server=self.server, ca_file=self.pki / "ca.crt",
                         user="system:kube-proxy", token=self.proxy_token)
        self._scheduler()
        self._controller_manager()

    def _etcd(self) -> str:
        client, peer = (f"http://127.0.0.1:{free_port()}" for _ in range(2))
        etcd = self.processes.spawn("etcd", [
            "etcd", "--name=petseg-test", f"--data-dir={self.dir / 'etcd'}",
            f"--listen-client-urls={client}", f"--advertise-client-urls={client}",
            f"--listen-peer-urls={peer}", f"--initial-advertise-peer-urls={peer}",
            f"--initial-cluster=petseg-test={peer}",
        ])
        wait_for("etcd", lambda: urllib.request.urlopen(client + "/health", timeout=2).status == 200,
                 timeout=60, proc=etcd, log=self.processes.log("etcd"))
        return client

    def _apiserver(self, etcd_url: str) -> None:
        pki = self.pki
        (pki / "tokens.csv").write_text(
            f"{self.admin_token},admin,admin,system:masters\n"
            f'{self.node_token},system:node:{self.node},{self.node},"system:nodes"\n'
            # Bound to system:node-proxier by the bootstrap policy: Services, Endpoints, Nodes, read-only.
            f"{self.proxy_token},system:kube-proxy,kube-proxy\n")
        (pki / "tokens.csv").chmod(0o600)
        port = free_port(self.host)
        self.server = f"https://{self.host}:{port}"
        apiserver = self.processes.spawn("kube-apiserver", [
            str(self.bin / "kube-apiserver"),
            f"--etcd-servers={etcd_url}",
            f"--bind-address={self.host}", f"--advertise-address={self.host}",
            f"--secure-port={port}", "--insecure-port=0",
            f"--tls-cert-file={pki / 'apiserver.crt'}", f"--tls-private-key-file={pki / 'apiserver.key'}",
            f"--client-ca-file={pki / 'ca.crt'}",
            f"--token-auth-file={pki / 'tokens.csv'}",
            # The kubelet's credentials reach only what its own pods need.
            "--authorization-mode=Node,RBAC",
            f"--service-account-key-file={pki / 'sa.pub'}",
            f"--service-account-signing-key-file={pki / 'sa.key'}",
            "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
            f"--service-cluster-ip-range={network.SERVICES}",
            f"--enable-admission-plugins={ADMISSION}", f"--disable-admission-plugins={ADMISSION_OFF}",
            "--feature-gates=TTLAfterFinished=true",
            # Logs and exec go to the kubelet at the node's address (no DNS here), with a certificate it trusts.
            "--kubelet-preferred-address-types=InternalIP",
            f"--kubelet-client-certificate={pki / 'apiserver-kubelet-client.crt'}",
            f"--kubelet-client-key={pki / 'apiserver-kubelet-client.key'}",
            f"--cert-dir={pki}",
        ])
        context = ssl.create_default_context(cafile=str(pki / "ca.crt"))

        def ready() -> bool:
            request = urllib.request.Request(self.server + "/readyz",
                                             headers={"Authorization": f"Bearer {self.admin_token}"})
            return urllib.request.urlopen(request, context=context, timeout=5).status == 200

        wait_for("kube-apiserver", ready, timeout=180, proc=apiserver, log=self.processes.log("kube-apiserver"))

    def _scheduler(self) -> None:
        self.processes.spawn("kube-scheduler", [
            str(self.bin / "kube-scheduler"), f"--kubeconfig={self.admin}", "--leader-elect=false",
            "--port=0", "--secure-port=0",
        ])

    def _controller_manager(self) -> None:
        self.processes.spawn("kube-controller-manager", [
            str(self.bin / "kube-controller-manager"),
            f"--kubeconfig={self.admin}",
            f"--controllers={CONTROLLERS}",
            f"--service-account-private-key-file={self.pki / 'sa.key'}",
            f"--root-ca-file={self.pki / 'ca.crt'}",
            "--feature-gates=TTLAfterFinished=true",
            "--leader-elect=false", "--port=0", "--secure-port=0",
            "--use-service-account-credentials=false",
            # A node that stops reporting is noticed within a minute, not five.
            "--node-monitor-grace-period=40s", "--pod-eviction-timeout=1m",
        ])
