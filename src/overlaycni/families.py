"""IP families of the cluster network: IPv4, and IPv6 next to it (pure).

Part of the network model (``config`` re-exports it): the one place that
knows what differs between the families. Everything else asks the model:
``ClusterNetwork.families`` gives one ``FamilyNetwork`` per family, IPv4
first, with its ranges, its node block size and the block arithmetic, and
``IPFamily`` says what a family's headers, default route and reserved block
addresses are. No other module branches on "is this IPv6?" itself. The
dual-stack flags and AKS's rules for them are in ``dualstack``.

How AKS carves IPv6 per node, and why /80 is our default: each node owns
one /80 of the IPv6 pod CIDR at the same index as its IPv4 /24. Node 1 owns
``10.244.1.0/24`` and ``fd12:3456:789a:0:1::/80`` and its pods get
``10.244.1.2`` and ``fd12:3456:789a:0:1::2`` (the ``kubectl get nodes`` and
``kubectl get pods`` output in
https://learn.microsoft.com/azure/aks/configure-kubenet-dual-stack and in the
dual-stack section of https://learn.microsoft.com/azure/aks/azure-cni-overlay).
Bits 64..79 of the address are the node index, so AKS's default /64 pod CIDR
holds 65,536 node blocks, more than the 5,000-node AKS limit (an IPv4 /16
holds 256 /24 blocks), and each block still has 2^48 addresses for at most
250 pods. A /64 per node (Kubernetes' default ``--node-cidr-mask-size-ipv6``)
would need a pod CIDR of /51 or larger for 5,000 nodes and buys nothing here:
pods get addresses from IPAM, never by SLAAC. ``--node-cidr-size-v6``
changes the size; ``dualstack`` checks that a block fits in the IPv6 pod
CIDR and holds max pods, and the cluster's node limit is the smaller of the
families' block counts (``ClusterNetwork.max_nodes``).

Addresses of a block no pod gets: IPv4 reserves the network address, the
gateway (``.1``) and the broadcast address; IPv6 has no broadcast, so it
reserves the first address (the subnet-router anycast address, RFC 4291
section 2.6.1) and ``::1``, kept for the node (as ``.1`` is in IPv4).

The pods' gateway (``pod_gateway``): ``<block>.1`` in IPv4, a local
address of the node answered on each host veth by proxy ARP; in IPv6 the
link-local ``fe80::1``, which the node holds on each host veth, as Calico
and Cilium give pods a link-local gateway (why: ``dataplane/linux/pods.py``).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from ipaddress import IPv4Interface, IPv4Network, IPv6Address, IPv6Interface, IPv6Network

from .cidr import IPAddress, IPNetwork, count_blocks


class IPFamily(StrEnum):
    """An IP family, spelled as AKS's ``--ip-families`` spells it."""

    ipv4 = "ipv4"
    ipv6 = "ipv6"

    @property
    def version(self) -> int:
        return 4 if self is IPFamily.ipv4 else 6

    @property
    def label(self) -> str:
        """``IPv4`` / ``IPv6``, for messages and tables."""
        return "IPv4" if self is IPFamily.ipv4 else "IPv6"

    @property
    def bits(self) -> int:
        return 32 if self is IPFamily.ipv4 else 128

    @property
    def ip_header_bytes(self) -> int:
        """Bytes of a plain IP header (an outer header when this family is
        the underlay)."""
        return 20 if self is IPFamily.ipv4 else 40

    @property
    def default_route(self) -> IPNetwork:
        return IPv4Network("0.0.0.0/0") if self is IPFamily.ipv4 else IPv6Network("::/0")

    @property
    def reserved_per_block(self) -> int:
        """Addresses of a node block no pod gets (see the module note)."""
        return 3 if self is IPFamily.ipv4 else 2

    @classmethod
    def of(cls, value: IPAddress | IPNetwork | IPv4Interface | IPv6Interface) -> IPFamily:
        """The family of an address, network or interface."""
        return cls.ipv4 if value.version == 4 else cls.ipv6


# The IPv6 gateway of every pod: link-local, held by the node on each host veth.
POD_GATEWAY_V6 = IPv6Address("fe80::1")


def pod_gateway(block: IPNetwork) -> IPAddress:
    """The gateway of the pods of node block ``block``: its ``.1`` (IPv4),
    ``fe80::1`` (IPv6; see the module note)."""
    return block.network_address + 1 if block.version == 4 else POD_GATEWAY_V6


def is_reserved(ip: IPAddress, block: IPNetwork) -> bool:
    """Whether ``ip`` is one of node block ``block``'s addresses no pod gets
    (see the module note)."""
    reserved: tuple[IPAddress, ...] = (block.network_address, block.network_address + 1)
    if block.version == 4:
        reserved += (block.broadcast_address,)
    return ip in reserved


def pod_range(block: IPNetwork) -> tuple[IPAddress, IPAddress]:
    """The first and last address a pod in node block ``block`` may get."""
    last = block.broadcast_address - (1 if block.version == 4 else 0)
    return block.network_address + 2, last


@dataclass(frozen=True)
class PodAddress:
    """One of a pod's addresses (with its node block's prefix length) and
    the gateway it routes through; a pod has one per family, IPv4 first."""

    ip: IPv4Interface | IPv6Interface
    gateway: IPAddress

    @property
    def family(self) -> IPFamily:
        return IPFamily.of(self.ip)

    @property
    def default_route(self) -> IPNetwork:
        return self.family.default_route

    @property
    def gateway_on_host_veth(self) -> bool:
        """Whether the node holds the gateway on the pod's host veth (a
        link-local gateway: IPv6's ``fe80::1``) rather than as a node
        address answered by proxy ARP (IPv4's ``<block>.1``)."""
        return self.gateway.is_link_local

    def __str__(self) -> str:
        return f"{self.ip} via {self.gateway}"


SINGLE_STACK = (IPFamily.ipv4,)
DUAL_STACK = (IPFamily.ipv4, IPFamily.ipv6)

DEFAULT_VNET_CIDR_V6 = "fd00:10:224::/48"
DEFAULT_NODE_SUBNET_CIDR_V6 = "fd00:10:224::/64"
DEFAULT_POD_CIDR_V6 = "fd12:3456:789a::/64"
DEFAULT_SERVICE_CIDR_V6 = "fd12:3456:789a:1::/108"
DEFAULT_NODE_CIDR_SIZE_V6 = 80


@dataclass(frozen=True)
class FamilyNetwork:
    """One family's side of a cluster network: its ranges, its node block
    size and the block arithmetic IPAM, the data plane and policy use.

    Node ``i`` owns ``block_at(i)`` in every family (the same index)."""

    family: IPFamily
    vnet_cidr: IPNetwork
    node_subnet_cidr: IPNetwork
    pod_cidr: IPNetwork
    service_cidr: IPNetwork
    node_cidr_size: int
    non_masquerade_cidrs: tuple[IPNetwork, ...] = ()

    @property
    def version(self) -> int:
        return self.family.version

    @property
    def block_count(self) -> int:
        """Node blocks in the pod CIDR."""
        return count_blocks(self.pod_cidr, self.node_cidr_size)

    @property
    def block_addresses(self) -> int:
        """Addresses in one node block."""
        return 1 << (self.family.bits - self.node_cidr_size)

    @property
    def pods_per_block(self) -> int:
        """Addresses of a block that pods may get (all but the reserved)."""
        return self.block_addresses - self.family.reserved_per_block

    def block_at(self, index: int) -> IPNetwork:
        """The node block number ``index`` (0-based) of the pod CIDR."""
        if not 0 <= index < self.block_count:
            raise IndexError(f"block {index} is outside {self.pod_cidr} ({self.block_count} x /{self.node_cidr_size})")
        first = int(self.pod_cidr.network_address) + index * self.block_addresses
        return type(self.pod_cidr)((first, self.node_cidr_size))

    def block_index(self, block: IPNetwork) -> int | None:
        """The number of ``block`` in the pod CIDR; None when it is not one
        of its node blocks (other family, other size, or outside)."""
        if block.version != self.version or block.prefixlen != self.node_cidr_size:
            return None
        if not block.subnet_of(self.pod_cidr):  # type: ignore[arg-type]
            return None
        return (int(block.network_address) - int(self.pod_cidr.network_address)) // self.block_addresses

    def block_of(self, ip: IPAddress) -> IPNetwork | None:
        """The node block holding ``ip``; None outside the pod CIDR."""
        if ip.version != self.version or ip not in self.pod_cidr:
            return None
        return type(self.pod_cidr)((int(ip), self.node_cidr_size), strict=False)

    def gateway(self, block: IPNetwork) -> IPAddress:
        """The gateway of the pods in ``block`` (``pod_gateway``)."""
        return pod_gateway(block)

    def is_reserved(self, ip: IPAddress, block: IPNetwork) -> bool:
        """Whether ``ip`` is one of ``block``'s addresses no pod gets."""
        return is_reserved(ip, block)

    def pod_range(self, block: IPNetwork) -> tuple[IPAddress, IPAddress]:
        """The first and last address a pod in ``block`` may get."""
        return pod_range(block)
