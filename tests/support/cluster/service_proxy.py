"""Service addresses on the test node: kube-proxy (1.20, built by ``build.sh``) in iptables mode.

kube-proxy turns each Service's cluster address (in ``network.SERVICES``)
into iptables rules that send its connections to the Service's ready pods,
and moves them as Endpoints change. The range is routed to the pod bridge on
this machine and, through the bridge's gateway, in every pod, so a Service
address never leaves the bridge even before a rule exists. NodePorts are
opened on the gateway address alone.

It authenticates as ``system:kube-proxy`` (its own token), whom the API
server's bootstrap policy binds to ``system:node-proxier``: it reads
Services, Endpoints and Nodes, nothing else. On stop its rules are removed
(``kube-proxy --cleanup``) and the one setting it changes on this machine,
``route_localnet``, is put back.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import network
from processes import Processes, free_port, wait_for

ROUTE_LOCALNET = Path("/proc/sys/net/ipv4/conf/all/route_localnet")


class ServiceProxy:
    """kube-proxy for ``node``, with the credentials of ``kubeconfig``.

    Args:
        processes: Where the process is tracked.
        bin_dir: The Kubernetes binaries (``kube-proxy``).
        kubeconfig: Credentials of ``system:kube-proxy``.
        node: The node's name.
    """

    def __init__(self, processes: Processes, *, bin_dir: Path, kubeconfig: Path, node: str) -> None:
        self.processes, self.bin, self.kubeconfig, self.node = processes, bin_dir, kubeconfig, node
        self.route_localnet = ROUTE_LOCALNET.read_text().strip()

    def start(self) -> None:
        """Start kube-proxy and wait until the API server's own Service has its rules."""
        proc = self.processes.spawn("kube-proxy", [
            str(self.bin / "kube-proxy"),
            f"--kubeconfig={self.kubeconfig}", f"--hostname-override={self.node}",
            "--proxy-mode=iptables", f"--cluster-cidr={network.SUBNET}",
            f"--nodeport-addresses={network.GATEWAY}/32",
            # Leave this machine's connection-tracking limits as they are.
            "--conntrack-max-per-core=0", "--conntrack-tcp-timeout-established=0",
            "--conntrack-tcp-timeout-close-wait=0",
            f"--healthz-bind-address=127.0.0.1:{free_port()}", f"--metrics-bind-address=127.0.0.1:{free_port()}",
        ])
        wait_for("kube-proxy's rules for the kubernetes Service", self._has_rules, timeout=120, proc=proc,
                 log=self.processes.log("kube-proxy"))

    def _has_rules(self) -> bool:
        rules = subprocess.run(["iptables-save", "-t", "nat"], capture_output=True, text=True).stdout
        return f"-d {network.KUBERNETES_SERVICE}/32" in rules and "default/kubernetes:https" in rules

    def stop(self) -> None:
        """After the process stopped: remove its rules and restore ``route_localnet``."""
        subprocess.run([str(self.bin / "kube-proxy"), "--cleanup"], capture_output=True)
        ROUTE_LOCALNET.write_text(self.route_localnet)
