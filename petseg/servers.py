"""The model servers a release runs on, by name: the protocol clients speak to each, where it runs, and the
Kubernetes kind of an endpoint served by it.

- ``seldon``: the Seldon Core v1 microservice (``serving/PetSegModel.py``), the Seldon Core v1 protocol;
  on this machine, or on Kubernetes as a ``SeldonDeployment``;
- ``mlserver``: MLServer with petseg's runtime, the Open Inference Protocol (KServe v2); on this machine,
  or on Kubernetes as a KServe ``InferenceService``;
- ``seldon-v2``: Seldon Core v2 (MLServer with petseg's runtime), the Open Inference Protocol; on
  Kubernetes only, an ``Experiment`` between the releases' ``Model`` objects.
"""

from __future__ import annotations

import dataclasses

from petseg.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class Server:
    """A model server: its name, the protocol clients speak, whether it runs on this machine, and the kind of an
    endpoint's object on Kubernetes."""

    name: str
    protocol: str
    local: bool
    kind: str


SERVERS = {server.name: server for server in (
    Server("seldon", protocol="seldon", local=True, kind="SeldonDeployment"),
    Server("mlserver", protocol="v2", local=True, kind="InferenceService"),
    Server("seldon-v2", protocol="v2", local=False, kind="Experiment"),
)}
"""Every server by name."""
NAMES = tuple(SERVERS)
"""Every server's name (a Kubernetes rollout takes any)."""
LOCAL = tuple(name for name, server in SERVERS.items() if server.local)
"""The servers that also run as a process on this machine (a run's ``--server``, ``petseg serve``)."""
PROTOCOLS = tuple(dict.fromkeys(server.protocol for server in SERVERS.values()))
"""What clients speak: ``seldon`` (Seldon Core v1) and ``v2`` (the Open Inference Protocol)."""
KINDS = tuple(dict.fromkeys(server.kind for server in SERVERS.values()))
"""The kinds of an endpoint's object on Kubernetes."""


def get(name: str, *, among: tuple[str, ...] = NAMES) -> Server:
    """The server of that name, once it is one of ``among``.

    Raises:
        ConfigError: naming the value and what is accepted.
    """
    if name not in among:
        raise ConfigError(f"server {name!r} is unknown: expected one of {', '.join(among)}")
    return SERVERS[name]
