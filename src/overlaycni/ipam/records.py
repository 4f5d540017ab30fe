"""IPAM's datastore records: their JSON values and the one decoder per kind (pure).

Kinds (keys: ``datastore.keys``): ``cluster`` (the ClusterNetwork),
``node`` (a node record, and its liveness record ``leases/<node>``),
``block`` (a claim ``blocks/<cidr>`` -> node, and its reverse index
``nodeblocks/<node>`` -> the node's block, or in a dual-stack cluster
``<IPv4 block>,<IPv6 block>``) and ``allocation`` (an address
``ips/<node>/<ip>``, one per family, and the attachment's handle
``handles/<cid>/<ifname>``, which names every address it holds).

Old and new records decode alike: a node record or reverse index without
an IPv6 block is a single-stack one (or one written before dual-stack), a
handle without ``ip_v6`` holds an IPv4 address only.
Each decoder validates what it reads and raises ``BadRecord`` naming the
key and the problem, so a corrupt record is a clear, skippable error rather
than a traceback in whichever loop met it first. Agent and CLI use the same
decoders.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Interface, IPv4Network, IPv6Address, IPv6Interface, IPv6Network, ip_network
from typing import Any, TypeVar

from ..config import ClusterNetwork, parse_network
from ..dataplane.wgmodel import check_public_key
from ..datastore.keys import Record, ip_from_part, json_object, split_key
from ..errors import BadRecord, ConfigError
from ..families import pod_gateway
from .model import Allocation, Liveness, NodeRecord, check_container_id, check_ifname, check_mac, check_mtu, check_name

T = TypeVar("T")


def _bad(kv: Record, kind: str, problem: str) -> BadRecord:
    return BadRecord(key=kv.key, kind=kind, problem=problem, revision=kv.revision)


def _field(kv: Record, kind: str, data: dict[str, Any], name: str, parse: Callable[[Any], T]) -> T:
    if data.get(name) is None:
        raise _bad(kv, kind, f"{name}: missing")
    try:
        return parse(data[name])
    except (ValueError, TypeError, ConfigError) as exc:
        raise _bad(kv, kind, f"{name}: {_why(exc)}") from None


def _why(exc: Exception) -> str:
    """The problem in words (a ConfigError's own text names a CLI flag)."""
    if isinstance(exc, ConfigError):
        return "; ".join(e.message for e in exc.errors)
    return str(exc)


def _str(value: Any) -> str:
    if not isinstance(value, str):
        raise TypeError("not a string")
    return value


def _optional_str(data: dict[str, Any], name: str) -> str | None:
    value = data.get(name)
    return value if isinstance(value, str) and value else None


def _key_tail(kv: Record, kind: str, part: str, length: int) -> tuple[str, ...]:
    parts = split_key(kv.key)
    if parts is None or parts.part != part or len(parts.rest) != length or not all(parts.rest):
        raise _bad(kv, kind, f"the key is not a {part}/ key of this layout")
    return parts.rest


# ----- cluster ---------------------------------------------------------------------------


def decode_cluster(kv: Record) -> ClusterNetwork:
    data = json_object(kv, "cluster")
    try:
        return parse_network(data)
    except ConfigError as exc:
        raise _bad(kv, "cluster", exc.message) from None


# ----- node --------------------------------------------------------------------------------


def decode_node(kv: Record) -> NodeRecord:
    """A node record (a ``KV`` or a watch put; written by ``NodeRecord.to_json``);
    its name must be its key's."""
    data = json_object(kv, "node")
    (key_name,) = _key_tail(kv, "node", "nodes", 1)
    name = _field(kv, "node", data, "name", _str)
    if name != key_name:
        raise _bad(kv, "node", f"name: {name!r} is not the key's node name {key_name!r}")
    return NodeRecord(
        name=name,
        node_ip=_field(kv, "node", data, "node_ip", IPv4Address),
        block=_field(kv, "node", data, "block", IPv4Network),
        vtep_mac=_field(kv, "node", data, "vtep_mac", check_mac) if data.get("vtep_mac") is not None else None,
        wireguard_public_key=_field(kv, "node", data, "wireguard_public_key", check_public_key)
        if data.get("wireguard_public_key") is not None else None,
        wireguard_endpoint=_field(kv, "node", data, "wireguard_endpoint", _endpoint)
        if data.get("wireguard_endpoint") is not None else None,
        mtu=_field(kv, "node", data, "mtu", check_mtu) if data.get("mtu") is not None else None,
        block_v6=_field(kv, "node", data, "block_v6", IPv6Network) if data.get("block_v6") is not None else None,
        node_ip_v6=_field(kv, "node", data, "node_ip_v6", IPv6Address) if data.get("node_ip_v6") is not None else None,
    )


def _endpoint(value: Any) -> str:
    """``<IPv4 address>:<port>``, as the wireguard backend publishes it."""
    host, sep, port = _str(value).rpartition(":")
    IPv4Address(host)
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{value!r} is not ADDRESS:PORT")
    return f"{host}:{int(port)}"


def decode_liveness(kv: Record) -> Liveness:
    """A liveness record ``leases/<name>`` (value: the node IP of the agent holding it)."""
    data = json_object(kv, "node")
    (name,) = _key_tail(kv, "node", "leases", 1)
    node = _field(kv, "node", data, "node", _str)
    if node != name:
        raise _bad(kv, "node", f"node: {node!r} is not the key's node name {name!r}")
    return Liveness(node=name, node_ip=_field(kv, "node", data, "node_ip", IPv4Address), lease=getattr(kv, "lease", None))


# ----- block -------------------------------------------------------------------------------


@dataclass(frozen=True)
class BlockClaim:
    """A claim ``blocks/<cidr>`` (``block``: the claimed block, either
    family), or a reverse index ``nodeblocks/<node>`` (``block``: the node's
    IPv4 block, ``block_v6``: its IPv6 block in a dual-stack cluster)."""

    block: IPv4Network | IPv6Network
    node: str
    block_v6: IPv6Network | None = None

    @property
    def blocks(self) -> tuple[IPv4Network | IPv6Network, ...]:
        return (self.block,) if self.block_v6 is None else (self.block, self.block_v6)

    @property
    def block_v4(self) -> IPv4Network:
        """The IPv4 block of a reverse index (the decoder guarantees it)."""
        if not isinstance(self.block, IPv4Network):
            raise TypeError(f"{self.block} is not an IPv4 block")
        return self.block


def nodeblock_value(block: IPv4Network, block_v6: IPv6Network | None = None) -> str:
    """The value of ``nodeblocks/<node>``: ``<IPv4 block>[,<IPv6 block>]``."""
    return str(block) if block_v6 is None else f"{block},{block_v6}"


def _node_blocks(value: str) -> tuple[IPv4Network, IPv6Network | None]:
    first, sep, second = value.partition(",")
    block = IPv4Network(first)
    if not sep:
        return block, None
    return block, IPv6Network(second)


def decode_block(kv: Record) -> BlockClaim:
    """A claim ``blocks/<address-len>`` (value: the node) or its reverse
    index ``nodeblocks/<node>`` (value: ``<IPv4 block>[,<IPv6 block>]``)."""
    parts = split_key(kv.key)
    try:
        if parts is not None and parts.part == "blocks" and len(parts.rest) == 1:
            addr, _, plen = parts.rest[0].partition("-")
            return BlockClaim(ip_network(f"{addr}/{plen}"), check_name("node", kv.value or ""))
        if parts is not None and parts.part == "nodeblocks" and len(parts.rest) == 1:
            block, block_v6 = _node_blocks(kv.value or "")
            return BlockClaim(block, check_name("node", parts.rest[0]), block_v6)
    except (ValueError, TypeError, ConfigError) as exc:
        raise _bad(kv, "block", f"{kv.value!r}: {_why(exc)}") from None
    raise _bad(kv, "block", "the key is not a blocks/ or nodeblocks/ key of this layout")


def decode_cursor(kv: Record | None) -> IPv4Address | IPv4Network | IPv6Address | None:
    """A cursor (``blockcursor``: a block; ``cursor/<node>``: an IPv4
    address; ``cursor6/<node>``: an IPv6 address), a hint only: one that does
    not parse counts as absent."""
    if kv is None or not kv.value:
        return None
    try:
        if "/" in kv.value:
            return IPv4Network(kv.value)
        return IPv6Address(kv.value) if ":" in kv.value else IPv4Address(kv.value)
    except ValueError:
        return None


# ----- allocation --------------------------------------------------------------------------


def address_value(container_id: str, ifname: str, pod: tuple[str, str] | None) -> str:
    """The value of ``ips/<node>/<ip>``."""
    ns, name = pod if pod else (None, None)
    return json.dumps({"container_id": container_id, "ifname": ifname, "pod_namespace": ns, "pod_name": name})


def handle_value(
    node: str,
    ip: IPv4Address,
    block: IPv4Network,
    pod: tuple[str, str] | None = None,
    *,
    ip_v6: IPv6Address | None = None,
    block_v6: IPv6Network | None = None,
) -> str:
    """The value of ``handles/<cid>/<ifname>`` (it carries the whole
    allocation; ``ip_v6``/``block_v6`` only when it holds an IPv6 address)."""
    ns, name = pod if pod else (None, None)
    data: dict[str, Any] = {"node": node, "ip": str(ip), "block": str(block), "pod_namespace": ns, "pod_name": name}
    if ip_v6 is not None and block_v6 is not None:
        data |= {"ip_v6": str(ip_v6), "block_v6": str(block_v6)}
    return json.dumps(data)


@dataclass(frozen=True)
class AddressRecord:
    """One address record ``ips/<node>/<ip>`` (either family)."""

    node: str
    ip: IPv4Address | IPv6Address
    container_id: str
    ifname: str
    pod_namespace: str | None = None
    pod_name: str | None = None

    @property
    def attachment(self) -> tuple[str, str]:
        return self.container_id, self.ifname


def decode_address(kv: Record) -> AddressRecord:
    """An address record ``ips/<node>/<ip>`` of either family."""
    data = json_object(kv, "allocation")
    node, ip_text = _key_tail(kv, "allocation", "ips", 2)
    try:
        ip = ip_from_part(ip_text)
        check_name("node", node)
    except (ValueError, ConfigError) as exc:
        raise _bad(kv, "allocation", _why(exc)) from None
    return AddressRecord(
        node=node,
        ip=ip,
        container_id=_field(kv, "allocation", data, "container_id", check_container_id),
        ifname=_field(kv, "allocation", data, "ifname", check_ifname),
        pod_namespace=_optional_str(data, "pod_namespace"),
        pod_name=_optional_str(data, "pod_name"),
    )


def allocation_of(
    v4: AddressRecord, v6: AddressRecord | None = None, *, block: IPv4Network | None = None,
    block_v6: IPv6Network | None = None,
) -> Allocation:
    """The allocation of an attachment from its address records (``block``,
    ``block_v6``: the node's, for prefix lengths and gateways)."""
    if not isinstance(v4.ip, IPv4Address):
        raise TypeError(f"{v4.ip} is not an IPv4 address")
    ip6 = v6.ip if v6 is not None else None
    if ip6 is not None and not isinstance(ip6, IPv6Address):
        raise TypeError(f"{ip6} is not an IPv6 address")
    return build_allocation(
        v4.node, v4.ip, block, container_id=v4.container_id, ifname=v4.ifname,
        pod=(v4.pod_namespace, v4.pod_name), ip_v6=ip6, block_v6=block_v6,
    )


def build_allocation(
    node: str,
    ip: IPv4Address,
    block: IPv4Network | None,
    *,
    container_id: str,
    ifname: str,
    pod: tuple[str | None, str | None],
    ip_v6: IPv6Address | None = None,
    block_v6: IPv6Network | None = None,
) -> Allocation:
    net = block if block is not None and ip in block else IPv4Network(f"{ip}/32")
    v6: IPv6Interface | None = None
    if ip_v6 is not None:
        net6 = block_v6 if block_v6 is not None and ip_v6 in block_v6 else IPv6Network(f"{ip_v6}/128")
        v6 = IPv6Interface(f"{ip_v6}/{net6.prefixlen}")
    return Allocation(
        ip=IPv4Interface(f"{ip}/{net.prefixlen}"),
        gateway=net.network_address + 1,
        container_id=container_id,
        ifname=ifname,
        node=node,
        pod_namespace=pod[0],
        pod_name=pod[1],
        ip_v6=v6,
        gateway_v6=IPv6Address(pod_gateway(v6.network)) if v6 is not None else None,
    )


def decode_allocation(kv: Record, *, block: IPv4Network | None = None) -> Allocation:
    """An allocation from its handle ``handles/<cid>/<ifname>`` (every
    address it holds), or from an IPv4 address record ``ips/<node>/<ip>``
    (``block``: the node's, for the prefix length and gateway; that address
    only: ``decode_address`` reads records of either family)."""
    parts = split_key(kv.key)
    data = json_object(kv, "allocation")
    if parts is None or parts.part != "handles":
        rec = decode_address(kv)
        if not isinstance(rec.ip, IPv4Address):
            raise _bad(kv, "allocation", f"{rec.ip} is an IPv6 address record; its attachment's handle holds both")
        return allocation_of(rec, block=block)
    container_id, ifname = _key_tail(kv, "allocation", "handles", 2)
    node = _field(kv, "allocation", data, "node", lambda v: check_name("node", v))
    ip = _field(kv, "allocation", data, "ip", IPv4Address)
    if data.get("block") is not None:
        block = _field(kv, "allocation", data, "block", IPv4Network)
        if ip not in block:
            raise _bad(kv, "allocation", f"ip: {ip} is outside its block {block}")
    ip_v6 = block_v6 = None
    if data.get("ip_v6") is not None:
        ip_v6 = _field(kv, "allocation", data, "ip_v6", IPv6Address)
        block_v6 = _field(kv, "allocation", data, "block_v6", IPv6Network)
        if ip_v6 not in block_v6:
            raise _bad(kv, "allocation", f"ip_v6: {ip_v6} is outside its block {block_v6}")
    return build_allocation(
        node, ip, block, container_id=container_id, ifname=ifname,
        pod=(_optional_str(data, "pod_namespace"), _optional_str(data, "pod_name")), ip_v6=ip_v6, block_v6=block_v6,
    )
