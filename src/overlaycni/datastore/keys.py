"""Where overlaycni keeps what: the one key layout of the datastore (pure).

Everything lives under ``ROOT``. Per cluster ``C``:

=====================================================  =============================================
``/overlaycni/index/clusters/C``                        (empty) lists clusters without reading them
``/overlaycni/clusters/C/config``                       the ClusterNetwork (JSON, flag names as keys)
``.../C/blocks/10.244.3.0-24``                          block claim -> node name (until node delete)
``.../C/blocks/fd12:3456:789a:0:3::-80``                an IPv6 block claim (dual-stack) -> node name
``.../C/nodeblocks/<node>``                             node -> its block(s), ``v4[,v6]`` (same transaction)
``.../C/blockcursor``                                   the block claimed last (claims move forward)
``.../C/nodes/<node>``                                  node record (JSON): IP, block, VTEP MAC, MTU (until node delete)
``.../C/leases/<node>``                                 liveness (JSON: the node IP), under the agent's lease
``.../C/ips/<node>/010.244.003.002``                    pod address -> {container_id, ifname, pod}
``.../C/ips/<node>/fd12:3456:789a:0000:0003:...:0002``  its IPv6 address (dual-stack; exploded), same value
``.../C/handles/<cid>/<ifname>``                        (containerID, ifname) -> {node, ip, block, pod, ip_v6, block_v6}
``.../C/cursor/<node>``                                 the IPv4 address allocated last on that node
``.../C/cursor6/<node>``                                the IPv6 address allocated last on that node
``.../C/wgrotate/<node>``                               key rotation request (wireguard)
``.../C/policies/<ns>/<name>``                          a NetworkPolicy (defaulted manifest, JSON)
``.../C/pods/<ns>/<name>``                              pod labels and named ports (JSON)
``.../C/namespaces/<ns>``                               namespace labels (JSON)
=====================================================  =============================================

Addresses in keys are zero-padded so that key order is address order:
IPv4 as ``010.244.003.002``, IPv6 fully exploded (32 hex digits in 8
groups, ``fd12:3456:789a:0000:0003:0000:0000:0002``; 128-bit keys, never
compressed). Both families share ``ips/<node>/`` without interleaving: an
IPv4 key has ``.`` as its fourth character, an IPv6 key a hex digit, so a
range scan between two keys of one family never meets the other's.

The decoders of the records sit beside their models (``ipam.records``:
cluster, node, block, allocation; ``policy.records``: pod, namespace,
policy); each raises ``BadRecord`` naming the key, the kind of record and
the problem, and ``decode_all`` lets a caller skip and report a bad record
instead of failing on it.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from typing import Any, Protocol, TypeVar

from ..errors import BadRecord

ROOT = "/overlaycni/"
CLUSTERS = ROOT + "clusters/"
INDEX = ROOT + "index/clusters/"

# record kinds (BadRecord.kind, the ``kind`` label of overlaycni_bad_records_total)
KINDS = ("cluster", "node", "block", "allocation", "pod", "namespace", "policy")
# first key part under a cluster -> record kind
_KIND_OF_PART = {
    "config": "cluster",
    "nodes": "node",
    "leases": "node",
    "blocks": "block",
    "nodeblocks": "block",
    "blockcursor": "block",
    "ips": "allocation",
    "handles": "allocation",
    "cursor": "allocation",
    "cursor6": "allocation",
    "wgrotate": "node",
    "policies": "policy",
    "pods": "pod",
    "namespaces": "namespace",
}


def cluster_root(cluster: str) -> str:
    return f"{CLUSTERS}{cluster}/"


def config_key(cluster: str) -> str:
    return cluster_root(cluster) + "config"


def index_key(cluster: str) -> str:
    return INDEX + cluster


def nodes_prefix(cluster: str) -> str:
    """Key prefix of the node records (watch it for node changes)."""
    return cluster_root(cluster) + "nodes/"


def node_key(cluster: str, node: str) -> str:
    return nodes_prefix(cluster) + node


def leases_prefix(cluster: str) -> str:
    """Key prefix of the liveness records (one per node whose agent holds its lease)."""
    return cluster_root(cluster) + "leases/"


def lease_key(cluster: str, node: str) -> str:
    return leases_prefix(cluster) + node


def blocks_prefix(cluster: str) -> str:
    return cluster_root(cluster) + "blocks/"


def block_key(cluster: str, block: IPv4Network | IPv6Network) -> str:
    return blocks_prefix(cluster) + f"{block.network_address}-{block.prefixlen}"


def nodeblocks_prefix(cluster: str) -> str:
    return cluster_root(cluster) + "nodeblocks/"


def nodeblock_key(cluster: str, node: str) -> str:
    return nodeblocks_prefix(cluster) + node


def blockcursor_key(cluster: str) -> str:
    return cluster_root(cluster) + "blockcursor"


def ips_prefix(cluster: str, node: str | None = None) -> str:
    return cluster_root(cluster) + "ips/" + (f"{node}/" if node is not None else "")


def ip_part(ip: IPv4Address | IPv6Address | int) -> str:
    """An address as a key part that sorts in address order (an ``int`` is
    an IPv4 address)."""
    if isinstance(ip, IPv6Address):
        return ip.exploded
    n = int(ip)
    return f"{n >> 24:03d}.{(n >> 16) & 255:03d}.{(n >> 8) & 255:03d}.{n & 255:03d}"


_HEX = frozenset("0123456789abcdef")


def ip_from_part(text: str) -> IPv4Address | IPv6Address:
    """Inverse of ``ip_part`` (ValueError when ``text`` is not one: only the
    exact form ``ip_part`` writes, so one address has one key)."""
    if ":" in text:
        groups = text.split(":")
        if len(groups) != 8 or not all(len(g) == 4 and set(g) <= _HEX for g in groups):
            raise ValueError(f"{text!r} is not an address key part (e.g. fd12:3456:789a:0000:0003:0000:0000:0002)")
        return IPv6Address(text)
    parts = text.split(".")
    if len(parts) != 4 or not all(p.isdigit() and len(p) <= 3 and int(p) < 256 for p in parts):
        raise ValueError(f"{text!r} is not an address key part (e.g. 010.244.003.002)")
    a, b, c, d = (int(p) for p in parts)
    return IPv4Address((a << 24) | (b << 16) | (c << 8) | d)


def ip_key(cluster: str, node: str, ip: IPv4Address | IPv6Address | int) -> str:
    return ips_prefix(cluster, node) + ip_part(ip)


def handles_prefix(cluster: str) -> str:
    return cluster_root(cluster) + "handles/"


def handle_key(cluster: str, container_id: str, ifname: str) -> str:
    return handles_prefix(cluster) + f"{container_id}/{ifname}"


def cursor_key(cluster: str, node: str, *, version: int = 4) -> str:
    """The allocation cursor of ``node`` for one IP version (IPv4 ``cursor/``,
    IPv6 ``cursor6/``: the families move independently)."""
    return cluster_root(cluster) + ("cursor/" if version == 4 else "cursor6/") + node


def wgrotate_key(cluster: str, node: str) -> str:
    """A key-rotation request for ``node`` (``ipam.rotation``)."""
    return cluster_root(cluster) + "wgrotate/" + node


def policies_prefix(cluster: str) -> str:
    return cluster_root(cluster) + "policies/"


def policy_key(cluster: str, *, namespace: str, name: str) -> str:
    return f"{policies_prefix(cluster)}{namespace}/{name}"


def pods_prefix(cluster: str) -> str:
    return cluster_root(cluster) + "pods/"


def pod_key(cluster: str, *, namespace: str, name: str) -> str:
    return f"{pods_prefix(cluster)}{namespace}/{name}"


def namespaces_prefix(cluster: str) -> str:
    return cluster_root(cluster) + "namespaces/"


def namespace_key(cluster: str, *, namespace: str) -> str:
    return namespaces_prefix(cluster) + namespace


@dataclass(frozen=True)
class KeyParts:
    """A key of the layout taken apart: ``nodes/n1`` of cluster ``c1`` is
    ``KeyParts("c1", "nodes", ("n1",))``."""

    cluster: str
    part: str  # config, nodes, leases, blocks, nodeblocks, blockcursor, ips, handles, cursor(6), policies, pods, namespaces
    rest: tuple[str, ...]

    @property
    def kind(self) -> str | None:
        """The record kind (one of ``KINDS``), None for a key outside the layout."""
        return _KIND_OF_PART.get(self.part)


def split_key(key: str) -> KeyParts | None:
    """The parts of a cluster key; None for a key outside ``CLUSTERS``."""
    if not key.startswith(CLUSTERS):
        return None
    cluster, _, rel = key[len(CLUSTERS):].partition("/")
    part, _, rest = rel.partition("/")
    return KeyParts(cluster, part, tuple(rest.split("/")) if rest else ())


# ----- decoding, shared by every record kind ------------------------------------------------


class Record(Protocol):
    """A ``KV`` or a watch ``Event`` (a put)."""

    @property
    def key(self) -> str: ...
    @property
    def value(self) -> str | None: ...
    @property
    def revision(self) -> int: ...


def json_object(kv: Record, kind: str) -> dict[str, Any]:
    """The record's value as a JSON object, or ``BadRecord``."""
    if kv.value is None:
        raise BadRecord(key=kv.key, kind=kind, problem="no value (a delete carries no record)", revision=kv.revision)
    try:
        value = json.loads(kv.value)
    except ValueError as exc:
        raise BadRecord(key=kv.key, kind=kind, problem=f"not valid JSON ({exc})", revision=kv.revision) from None
    if not isinstance(value, dict):
        raise BadRecord(key=kv.key, kind=kind, problem="not a JSON object", revision=kv.revision)
    return value


T = TypeVar("T")
R = TypeVar("R", bound=Record)
BadRecordHandler = Callable[[BadRecord], None]


def decode_all(records: Iterable[R], decode: Callable[[R], T], *, on_bad: BadRecordHandler | None = None) -> list[T]:
    """Every record decoded. A bad one raises, or, with ``on_bad``, is handed
    to it and skipped: one bad record never hides the good ones."""
    out: list[T] = []
    for kv in records:
        try:
            out.append(decode(kv))
        except BadRecord as exc:
            if on_bad is None:
                raise
            on_bad(exc)
    return out
