"""The pod network of the test node: one closed bridge on this machine.

Pods get their addresses from the CNI ``bridge`` plugin with ``host-local``
addresses in ``SUBNET``. The bridge is made here before anything starts, with
``GATEWAY`` as this machine's address on it, so that the servers the pods
need (S3, the API server) can listen on that address before the first pod
exists. It is closed: no masquerade, no default route in the pods, no
forwarding, so pods reach this machine's address on the bridge and each
other, and nothing else. Service addresses (``SERVICES``, kube-proxy's, see
``service_proxy.py``) are routed to the bridge too: on this machine
directly, in pods through the gateway. Tests send traffic only to loopback
and to this bridge.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

BRIDGE = "petseg0"
SUBNET = "10.213.0.0/24"
GATEWAY = "10.213.0.1"
PREFIX = 24
SERVICES = "10.213.1.0/24"
"""The Services' cluster addresses (the API server's ``--service-cluster-ip-range``)."""
KUBERNETES_SERVICE = "10.213.1.1"
"""The first of them: the API server's own Service, which pods' in-cluster configuration names."""
# Debian's containernetworking-plugins install here, not in /opt/cni/bin.
CNI_BIN = "/usr/lib/cni"


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check)


def up(directory: Path) -> Path:
    """Make the bridge and write the CNI configuration; return its directory (containerd's ``conf_dir``).

    Args:
        directory: Where the configuration and the address allocations live.
    """
    down()
    _ip("link", "add", BRIDGE, "type", "bridge")
    _ip("addr", "add", f"{GATEWAY}/{PREFIX}", "dev", BRIDGE)
    _ip("link", "set", BRIDGE, "up")
    # A Service address kube-proxy has no rule for yet stays on the bridge, never the default route.
    _ip("route", "add", SERVICES, "dev", BRIDGE, "src", GATEWAY)
    conf_dir = directory / "net.d"
    conf_dir.mkdir(parents=True, exist_ok=True)
    config = {
        "cniVersion": "0.4.0",
        "name": "petseg",
        "plugins": [{
            "type": "bridge",
            "bridge": BRIDGE,
            # The bridge already has the gateway's address; pods get no default route, only the Services'.
            "isGateway": False,
            "ipMasq": False,
            "hairpinMode": True,
            "ipam": {
                "type": "host-local",
                "ranges": [[{"subnet": SUBNET, "rangeStart": "10.213.0.10", "gateway": GATEWAY}]],
                "routes": [{"dst": SERVICES, "gw": GATEWAY}],
                "dataDir": str(directory / "ipam"),
            },
        }],
    }
    (conf_dir / "10-petseg.conflist").write_text(json.dumps(config, indent=2))
    return conf_dir


def down() -> None:
    """Remove the bridge (and with it any address on it), if there is one."""
    _ip("link", "del", BRIDGE, check=False)
