"""The data plane: ports (Protocols), a pure model, an in-memory fake and the
Linux implementation (imported lazily: ``from overlaycni.dataplane.linux
import LinuxDataplane`` pulls in pyroute2)."""

from __future__ import annotations

from typing import Any

from ..families import PodAddress
from .model import (
    VXLAN_IFNAME,
    NodeInfo,
    NodeState,
    Peer,
    PeerProblem,
    PodAttachment,
    PodEndpoint,
    PodInterface,
    ReconcileReport,
    admit_peers,
    backend_overhead,
    host_veth_name,
    vtep_mac,
)
from .ports import Dataplane

__all__ = [
    "VXLAN_IFNAME",
    "Dataplane",
    "FakeDataplane",
    "LinuxDataplane",
    "NodeInfo",
    "NodeState",
    "Peer",
    "PeerProblem",
    "PodAddress",
    "PodEndpoint",
    "PodAttachment",
    "PodInterface",
    "ReconcileReport",
    "admit_peers",
    "backend_overhead",
    "host_veth_name",
    "vtep_mac",
]


def __getattr__(name: str) -> Any:
    if name == "LinuxDataplane":
        from .linux import LinuxDataplane

        return LinuxDataplane
    if name == "FakeDataplane":
        from .fake import FakeDataplane

        return FakeDataplane
    raise AttributeError(name)
