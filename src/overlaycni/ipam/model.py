"""IPAM's value types and input validation (pure).

The key layout of the datastore is ``datastore.keys``; the records' JSON
values and their decoders are ``ipam.records``.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Interface, IPv4Network, IPv6Address, IPv6Interface, IPv6Network, ip_address

from ..cidr import IPNetwork
from ..errors import ConfigError, FieldError
from ..families import PodAddress, pod_gateway

_NAME = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9._-]{0,251}[A-Za-z0-9])?$")
_CONTAINER_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,1023}$")
_IFNAME_BAD = re.compile(r"[/:\s%]")
_MAC = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")


MIN_MTU, MAX_MTU = 576, 65535  # IPv4's minimum datagram a host must accept (RFC 791); the largest IPv4 packet


@dataclass(frozen=True, slots=True)  # one per peer (or pod): thousands
class NodeRecord:
    """A node as every peer sees it (``nodes/<name>``): it stays until ``node
    delete``, whether or not the node's agent is live (``leases/<name>``)."""

    name: str
    node_ip: IPv4Address
    block: IPv4Network
    vtep_mac: str | None = None
    wireguard_public_key: str | None = None  # backend wireguard: published by the node's agent
    wireguard_endpoint: str | None = None  # "<node IP>:<port>"
    mtu: int | None = None  # the node's underlay MTU (None: not published, an older agent)
    block_v6: IPv6Network | None = None  # dual-stack: the IPv6 block (same index as ``block``)
    node_ip_v6: IPv6Address | None = None  # dual-stack: the node's IPv6 underlay address (if it has one)

    @property
    def blocks(self) -> tuple[IPv4Network | IPv6Network, ...]:
        """The node's blocks, one per family of the cluster, IPv4 first."""
        return (self.block,) if self.block_v6 is None else (self.block, self.block_v6)

    def to_json(self) -> str:
        """The value of its ``nodes/<name>`` record (records of other backends
        carry no WireGuard keys at all, single-stack ones no ``block_v6``
        nor ``node_ip_v6``: they stay what older versions wrote)."""
        data = self.to_dict()
        if self.wireguard_public_key is None:
            del data["wireguard_public_key"], data["wireguard_endpoint"]
        if self.block_v6 is None:
            del data["block_v6"]
        if self.node_ip_v6 is None:
            del data["node_ip_v6"]
        return json.dumps(data, sort_keys=True)

    def to_dict(self) -> dict[str, str | int | None]:
        return {
            "name": self.name, "node_ip": str(self.node_ip), "block": str(self.block),
            "block_v6": str(self.block_v6) if self.block_v6 is not None else None,
            "node_ip_v6": str(self.node_ip_v6) if self.node_ip_v6 is not None else None, "vtep_mac": self.vtep_mac,
            "wireguard_public_key": self.wireguard_public_key, "wireguard_endpoint": self.wireguard_endpoint,
            "mtu": self.mtu,
        }  # fmt: skip

    @property
    def wireguard_port(self) -> int | None:
        """The port of ``wireguard_endpoint`` (None when absent or malformed)."""
        if not self.wireguard_endpoint:
            return None
        port = self.wireguard_endpoint.rpartition(":")[2]
        return int(port) if port.isdigit() and 0 < int(port) < 65536 else None


@dataclass(frozen=True, slots=True)  # one per peer (or pod): thousands
class Liveness:
    """``leases/<name>``: the node's agent holds a lease (it renewed it within
    the TTL), from the machine with ``node_ip``."""

    node: str
    node_ip: IPv4Address
    lease: int | None = None

    def to_json(self) -> str:
        return json.dumps({"node": self.node, "node_ip": str(self.node_ip)}, sort_keys=True)


@dataclass(frozen=True)
class ClusterNodes:
    """Every node record, which nodes are live and who claims which block, read
    at one revision (``ipam.cluster_nodes``)."""

    records: tuple[NodeRecord, ...]
    live: dict[str, Liveness]  # node name -> its liveness record
    claims: dict[IPNetwork, str]  # block (of either family) -> the node that claimed it
    revision: int = 0

    def record(self, name: str) -> NodeRecord | None:
        return next((r for r in self.records if r.name == name), None)


@dataclass(frozen=True, slots=True)  # one per peer (or pod): thousands
class Allocation:
    """The addresses of one attachment (containerID, ifname): its IPv4
    address, and in a dual-stack cluster its IPv6 address, both from the
    node's blocks and written in one transaction (``addresses`` iterates
    over them, IPv4 first)."""

    ip: IPv4Interface
    gateway: IPv4Address
    container_id: str
    ifname: str
    node: str
    pod_namespace: str | None = None
    pod_name: str | None = None
    ip_v6: IPv6Interface | None = None
    gateway_v6: IPv6Address | None = None

    @property
    def addresses(self) -> tuple[PodAddress, ...]:
        """One ``PodAddress`` per family, IPv4 first."""
        v4 = PodAddress(self.ip, self.gateway)
        if self.ip_v6 is None:
            return (v4,)
        return v4, PodAddress(self.ip_v6, self.gateway_v6 or pod_gateway(self.ip_v6.network))

    @property
    def ips(self) -> tuple[IPv4Address | IPv6Address, ...]:
        """The bare addresses, IPv4 first."""
        return tuple(a.ip.ip for a in self.addresses)

    def to_dict(self) -> dict[str, str | None]:
        return {
            "ip": str(self.ip),
            "gateway": str(self.gateway),
            "ip_v6": str(self.ip_v6) if self.ip_v6 is not None else None,
            "gateway_v6": str(self.gateway_v6) if self.gateway_v6 is not None else None,
            "container_id": self.container_id,
            "ifname": self.ifname,
            "node": self.node,
            "pod": f"{self.pod_namespace}/{self.pod_name}" if self.pod_name else None,
        }


# ----- validation (field-named errors) -------------------------------------------


def check_name(field: str, value: str) -> str:
    if not isinstance(value, str) or not _NAME.match(value):
        raise ConfigError(
            FieldError(field, f"{value!r} is not a valid name (letters, digits, '.', '_', '-'; starts and ends alphanumeric)")
        )
    return value


def check_container_id(value: str) -> str:
    if not isinstance(value, str) or not _CONTAINER_ID.match(value):
        raise ConfigError(
            FieldError("container-id", f"{value!r} is not a valid container ID (letters, digits, '_', '.', '-')")
        )
    return value


def check_ifname(value: str) -> str:
    if not isinstance(value, str) or not 0 < len(value) <= 15 or value in (".", "..") or _IFNAME_BAD.search(value):
        raise ConfigError(FieldError("ifname", f"{value!r} is not a valid interface name (1..15 chars, no '/', ':' or spaces)"))
    return value


def check_pod(pod: tuple[str, str] | None) -> tuple[str, str] | None:
    if pod is None:
        return None
    ns, name = pod
    if not ns or not name or "/" in ns or "/" in name:
        raise ConfigError(FieldError("pod", f"{ns}/{name} is not NAMESPACE/NAME"))
    return ns, name


def parse_pod(text: str | None) -> tuple[str, str] | None:
    if text is None:
        return None
    ns, sep, name = text.partition("/")
    if not sep:
        raise ConfigError(FieldError("pod", f"{text!r} is not NAMESPACE/NAME (e.g. default/web-0)"))
    return check_pod((ns, name))


def check_mac(value: str | None) -> str | None:
    if value is None:
        return None
    mac = value.strip().lower()
    if not _MAC.match(mac):
        raise ConfigError(FieldError("vtep-mac", f"{value!r} is not a MAC address (aa:bb:cc:dd:ee:ff)"))
    return mac


def check_mtu(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not MIN_MTU <= value <= MAX_MTU:
        raise ConfigError(FieldError("mtu", f"{value!r} is not an MTU ({MIN_MTU}..{MAX_MTU})"))
    return value


def parse_ip(field: str, value: object) -> IPv4Address:
    if isinstance(value, IPv4Address):
        return value
    try:
        return IPv4Address(str(value).strip())
    except ValueError:
        raise ConfigError(FieldError(field, f"{value!r} is not a valid IPv4 address")) from None


def parse_any_ip(field: str, value: object) -> IPv4Address | IPv6Address:
    """An IPv4 or IPv6 address (a requested pod address)."""
    if isinstance(value, IPv4Address | IPv6Address):
        return value
    try:
        return ip_address(str(value).strip())
    except ValueError:
        raise ConfigError(FieldError(field, f"{value!r} is not a valid IP address")) from None
