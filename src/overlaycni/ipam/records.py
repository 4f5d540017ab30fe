"""IPAM's datastore records: their JSON values and the one decoder per kind (pure).

Kinds (keys: ``datastore.keys``): ``cluster`` (the ClusterNetwork),
``node`` (a node record, and its liveness record ``leases/<node>``), ``block`` (a claim ``blocks/<cidr>`` -> node,
and its reverse index ``nodeblocks/<node>`` -> block) and ``allocation``
(an address ``ips/<node>/<ip>`` and its handle ``handles/<cid>/<ifname>``).
Each decoder validates what it reads and raises ``BadRecord`` naming the
key and the problem, so a corrupt record is a clear, skippable error rather
than a traceback in whichever loop met it first. Agent and CLI use the same
decoders.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Interface, IPv4Network
from typing import Any, TypeVar

from ..config import ClusterNetwork, parse_network
from ..dataplane.wgmodel import check_public_key
from ..datastore.keys import Record, ip_from_part, json_object, split_key
from ..errors import BadRecord, ConfigError
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
    block: IPv4Network
    node: str


def decode_block(kv: Record) -> BlockClaim:
    """A claim ``blocks/<a.b.c.d-len>`` (value: the node) or its reverse
    index ``nodeblocks/<node>`` (value: the block)."""
    parts = split_key(kv.key)
    try:
        if parts is not None and parts.part == "blocks" and len(parts.rest) == 1:
            addr, _, plen = parts.rest[0].partition("-")
            return BlockClaim(IPv4Network(f"{addr}/{plen}"), check_name("node", kv.value or ""))
        if parts is not None and parts.part == "nodeblocks" and len(parts.rest) == 1:
            return BlockClaim(IPv4Network(kv.value or ""), check_name("node", parts.rest[0]))
    except (ValueError, TypeError, ConfigError) as exc:
        raise _bad(kv, "block", f"{kv.value!r}: {_why(exc)}") from None
    raise _bad(kv, "block", "the key is not a blocks/ or nodeblocks/ key of this layout")


def decode_cursor(kv: Record | None) -> IPv4Address | IPv4Network | None:
    """A cursor (``blockcursor``: a block; ``cursor/<node>``: an address), a
    hint only: one that does not parse counts as absent."""
    if kv is None or not kv.value:
        return None
    try:
        return IPv4Network(kv.value) if "/" in kv.value else IPv4Address(kv.value)
    except ValueError:
        return None


# ----- allocation --------------------------------------------------------------------------


def address_value(container_id: str, ifname: str, pod: tuple[str, str] | None) -> str:
    """The value of ``ips/<node>/<ip>``."""
    ns, name = pod if pod else (None, None)
    return json.dumps({"container_id": container_id, "ifname": ifname, "pod_namespace": ns, "pod_name": name})


def handle_value(node: str, ip: IPv4Address, block: IPv4Network, pod: tuple[str, str] | None = None) -> str:
    """The value of ``handles/<cid>/<ifname>`` (it carries the whole allocation)."""
    ns, name = pod if pod else (None, None)
    return json.dumps({"node": node, "ip": str(ip), "block": str(block), "pod_namespace": ns, "pod_name": name})


def decode_allocation(kv: Record, *, block: IPv4Network | None = None) -> Allocation:
    """An allocation from its address record ``ips/<node>/<ip>`` (``block``:
    the node's, for the prefix length and gateway) or from its handle
    ``handles/<cid>/<ifname>``."""
    parts = split_key(kv.key)
    data = json_object(kv, "allocation")
    if parts is not None and parts.part == "handles":
        container_id, ifname = _key_tail(kv, "allocation", "handles", 2)
        node = _field(kv, "allocation", data, "node", lambda v: check_name("node", v))
        ip = _field(kv, "allocation", data, "ip", IPv4Address)
        if data.get("block") is not None:
            block = _field(kv, "allocation", data, "block", IPv4Network)
            if ip not in block:
                raise _bad(kv, "allocation", f"ip: {ip} is outside its block {block}")
    else:
        node, ip_text = _key_tail(kv, "allocation", "ips", 2)
        try:
            ip = ip_from_part(ip_text)
        except ValueError as exc:
            raise _bad(kv, "allocation", str(exc)) from None
        container_id = _field(kv, "allocation", data, "container_id", check_container_id)
        ifname = _field(kv, "allocation", data, "ifname", check_ifname)
    net = block if block is not None and ip in block else IPv4Network(f"{ip}/32")
    return Allocation(
        ip=IPv4Interface(f"{ip}/{net.prefixlen}"),
        gateway=net.network_address + 1,
        container_id=container_id,
        ifname=ifname,
        node=node,
        pod_namespace=_optional_str(data, "pod_namespace"),
        pod_name=_optional_str(data, "pod_name"),
    )
