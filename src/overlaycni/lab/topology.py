"""The lab's topology: names and addresses (pure).

A lab is one Linux machine pretending to be an AKS cluster:

* ``ocl-<lab>.vnet``  the VNet: a bridge ``br0`` and nothing else;
* ``ocl-<lab>.<node>`` one namespace per node ("VM"): underlay ``eth0`` with
  the node IP, plugged into the VNet bridge; the agent runs inside it;
* ``ocl-<lab>.ext``   another VM of the VNet (the "external host");
* ``ocl-<lab>.ctl``   the control plane (etcd), only with ``--store etcd``;
* ``ocl-<lab>.pod.<namespace>.<pod>`` one namespace per pod, wired by the
  real plugin (pod names are unique per Kubernetes namespace, so both are in
  the name: ``x/a`` and ``y/a`` get ``...pod.x.a`` and ``...pod.y.a``).

Lab, node, namespace and pod names are ``[a-z0-9-]`` and never contain a dot,
so ``ocl-<lab>.`` is a prefix no other lab shares (``lab down`` can find a
lab's namespaces even when its state file is lost) and a pod's netns name
cannot be another pod's or a node's (``pod`` is not a node name). The longest
name, 4 + 12 + 1 + 4 + 40 + 1 + 40 = 102 bytes, is far below the 255 a file
name in /var/run/netns may have. Link names only have to be unique inside the VNet
namespace (``u-<node>``, ``x-ext``, ``c-ctl``), so several labs coexist
without ever touching the root namespace.

Addresses come from the node subnet the way Azure hands them out: the first
four and the broadcast address are reserved, so node ``i`` (1-based) gets
``network + 3 + i`` (``.4`` first). The external host takes the last usable
address, the control plane the one before it.

Dual-stack (``--ip-families ipv4,ipv6``): Azure gives each VM an IPv6 address
of the subnet's IPv6 range as well (a /64, ``--node-subnet-cidrs``; default
the ULA ``fd00:10:224::/64``, RFC 4193). The lab keeps one host number per
VM for both families: the VM whose IPv4 address is ``network + k`` gets
IPv6 ``network_v6 + k`` (node 1: ``10.224.0.4`` and ``fd00:10:224::4``; the
external host ``10.224.255.254`` and ``fd00:10:224::fffe``), so the two
addresses of one VM read alike. Every lab address stays inside the lab's
own namespaces; nothing of it is routed in the root namespace.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Interface, IPv4Network, IPv6Interface, IPv6Network

from ..config import ClusterNetwork
from ..errors import UsageError

NETNS_PREFIX = "ocl-"
MAX_LAB_NAME = 12
MAX_NODE_NAME = 12
MAX_POD_NAME = 40
AZURE_FIRST_HOST_OFFSET = 4  # .0 network, .1 gateway, .2/.3 Azure DNS
BRIDGE = "br0"
UNDERLAY_IF = "eth0"
ETCD_CLIENT_PORT = 2379
ETCD_PEER_PORT = 2380

_LAB_RE = re.compile(r"^[a-z0-9]([a-z0-9-]*[a-z0-9])?$")
_DNS_LABEL_RE = re.compile(r"^[a-z0-9]([a-z0-9-]*[a-z0-9])?$")


def validate_lab_name(name: str) -> str:
    """A lab name: 1..12 characters of [a-z0-9-], starting and ending with a
    letter or digit. Returns it; raises ``UsageError`` naming the problem."""
    if not name:
        raise UsageError("the lab name is empty", field="name")
    if len(name) > MAX_LAB_NAME:
        raise UsageError(f"{name!r} is {len(name)} characters long; at most {MAX_LAB_NAME} are allowed", field="name")
    if not _LAB_RE.match(name):
        raise UsageError(
            f"--name: {name!r} may only hold lowercase letters, digits and '-' (not at either end)"
        )
    return name


def validate_node_name(name: str) -> str:
    if not name or len(name) > MAX_NODE_NAME or not _DNS_LABEL_RE.match(name):
        raise UsageError(
            f"NODE: {name!r} is not a valid node name (1..{MAX_NODE_NAME} characters of [a-z0-9-], "
            "starting and ending with a letter or digit)"
        )
    if name in ("vnet", "ext", "ctl", "pod"):
        raise UsageError(f"NODE: {name!r} is reserved for the lab's own namespaces")
    return name


def validate_pod_name(name: str, *, field: str = "POD") -> str:
    if not name or len(name) > MAX_POD_NAME or not _DNS_LABEL_RE.match(name):
        raise UsageError(
            f"{field}: {name!r} is not a valid name (1..{MAX_POD_NAME} characters of [a-z0-9-], "
            "starting and ending with a letter or digit)"
        )
    return name


def parse_labels(text: str | None) -> tuple[tuple[str, str], ...]:
    """``k=v,k2=v2`` -> sorted pairs. Raises ``UsageError`` on a bad item."""
    if not text:
        return ()
    out: dict[str, str] = {}
    for item in text.split(","):
        item = item.strip()
        if not item:
            continue
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UsageError(f"--labels: {item!r} is not key=value")
        out[key.strip()] = value.strip()
    return tuple(sorted(out.items()))


def netns_prefix(lab: str) -> str:
    return f"{NETNS_PREFIX}{lab}."


def vnet_netns(lab: str) -> str:
    return f"{netns_prefix(lab)}vnet"


def ext_netns(lab: str) -> str:
    return f"{netns_prefix(lab)}ext"


def ctl_netns(lab: str) -> str:
    return f"{netns_prefix(lab)}ctl"


def node_netns(lab: str, node: str) -> str:
    return f"{netns_prefix(lab)}{node}"


def pod_netns(lab: str, namespace: str, pod: str) -> str:
    return f"{netns_prefix(lab)}pod.{namespace}.{pod}"


def node_port(node: str) -> str:
    """The VNet-side veth of a node (unique inside the VNet namespace)."""
    return f"u-{node}"


EXT_PORT = "x-ext"
CTL_PORT = "c-ctl"


def node_name(index: int) -> str:
    return f"node{index}"


def pod_name(node_index: int, pod_index: int) -> str:
    return f"pod-{node_index}-{pod_index}"


def container_id(lab: str, namespace: str, pod: str) -> str:
    """A runtime-style container ID, stable for (lab, namespace, pod)."""
    return hashlib.sha256(f"{lab}/{namespace}/{pod}".encode()).hexdigest()[:32]


@dataclass(frozen=True)
class Addressing:
    """Where the lab's VMs sit on the node subnet (and, dual-stack, on its
    IPv6 range ``subnet_v6``)."""

    subnet: IPv4Network
    subnet_v6: IPv6Network | None = None

    @property
    def max_nodes(self) -> int:
        # usable: .4 .. broadcast-1, minus the external host and the control plane
        return max(0, self.subnet.num_addresses - AZURE_FIRST_HOST_OFFSET - 1 - 2)

    def node_ip(self, index: int) -> IPv4Interface:
        if not 1 <= index <= self.max_nodes:
            raise UsageError(
                f"--nodes: node {index} does not fit the node subnet {self.subnet} "
                f"(room for {self.max_nodes} nodes next to the external host and control plane)"
            )
        ip = self.subnet.network_address + AZURE_FIRST_HOST_OFFSET - 1 + index
        return IPv4Interface(f"{ip}/{self.subnet.prefixlen}")

    @property
    def external_ip(self) -> IPv4Interface:
        return IPv4Interface(f"{self.subnet.broadcast_address - 1}/{self.subnet.prefixlen}")

    @property
    def control_ip(self) -> IPv4Interface:
        return IPv4Interface(f"{self.subnet.broadcast_address - 2}/{self.subnet.prefixlen}")

    def v6_of(self, ip: IPv4Interface) -> IPv6Interface | None:
        """The IPv6 address with ``ip``'s host number (None: single-stack)."""
        if self.subnet_v6 is None:
            return None
        host = int(ip.ip) - int(self.subnet.network_address)
        return IPv6Interface(f"{self.subnet_v6.network_address + host}/{self.subnet_v6.prefixlen}")


def addressing(net: ClusterNetwork) -> Addressing:
    return Addressing(net.node_subnet_cidr, net.node_subnet_cidr_v6 if net.is_dual_stack else None)


def check_capacity(net: ClusterNetwork, *, nodes: int, pods_per_node: int) -> None:
    """Fail with a clear message if the lab does not fit the network."""
    if nodes < 1:
        raise UsageError(f"{nodes} is too few; a lab needs at least one node", field="nodes")
    room = min(addressing(net).max_nodes, net.max_nodes)
    if nodes > room:
        raise UsageError(
            f"--nodes: {nodes} nodes do not fit: the node subnet {net.node_subnet_cidr} and pod CIDR "
            f"{net.pod_cidr} (/{net.node_cidr_size} blocks) leave room for {room}"
        )
    if pods_per_node < 0:
        raise UsageError(f"{pods_per_node} is negative", field="pods-per-node")
    if pods_per_node > net.max_pods:
        raise UsageError(f"{pods_per_node} is more than --max-pods {net.max_pods}", field="pods-per-node")


def datastore_url(store: str, *, lab_dir: str, control_ip: IPv4Address, tls: bool = True) -> str:
    if store == "sqlite":
        return f"sqlite:///{lab_dir.rstrip('/')}/state.db"
    if store == "etcd":
        return f"{'etcds' if tls else 'etcd'}://{control_ip}:{ETCD_CLIENT_PORT}"
    raise UsageError(f"{store!r} is not one of: sqlite, etcd", field="store")


def next_free_index(used: set[int]) -> int:
    i = 1
    while i in used:
        i += 1
    return i


def default_pods(nodes: list[tuple[int, str]], pods_per_node: int) -> list[tuple[str, str]]:
    """(pod name, node name) for ``pods_per_node`` pods on each (index, node)."""
    return [(pod_name(i, k), node) for i, node in nodes for k in range(1, pods_per_node + 1)]
