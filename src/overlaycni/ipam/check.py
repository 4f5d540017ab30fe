"""Consistency check of a cluster's IPAM records (pure over one listing).

Finds, in both families: records that do not decode (``bad-record``, each
named by its key); duplicate blocks, addresses or node IPs (two node records
with one IP); node records whose blocks are not their claim; leaks
(half-written sets: a claim without its reverse index, an address without
its handle, a handle without one of its addresses, such as half a
dual-stack allocation; addresses on a node that has no block); addresses
outside their node's block of their family or on a reserved address
(network, gateway, broadcast; IPv6: the first address and ``::1``); and,
given the valid attachments, allocations nobody uses any more.
``allocations`` counts attachments (one per address in a single-stack
cluster).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from itertools import pairwise
from typing import Any

from ..cidr import IPAddress, IPNetwork
from ..datastore import Store
from ..datastore.keys import cluster_root, config_key, ip_part
from ..errors import BadRecord
from ..families import IPFamily
from . import addresses
from .clusters import not_found
from .model import NodeRecord, check_name
from .records import AddressRecord, decode_address, decode_allocation, decode_block, decode_cluster, decode_liveness, decode_node

KINDS = ("bad-record", "duplicate", "leak", "outside-block", "reserved", "unreferenced")


@dataclass(frozen=True)
class Problem:
    kind: str  # one of KINDS
    message: str
    key: str = ""

    def to_dict(self) -> dict[str, str]:
        return {"kind": self.kind, "message": self.message, "key": self.key}


@dataclass(frozen=True)
class CheckReport:
    cluster: str
    nodes: int
    blocks: int
    allocations: int
    problems: tuple[Problem, ...] = field(default_factory=tuple)

    @property
    def ok(self) -> bool:
        return not self.problems

    def of_kind(self, kind: str) -> list[Problem]:
        return [p for p in self.problems if p.kind == kind]

    def to_dict(self) -> dict[str, Any]:
        return {
            "cluster": self.cluster,
            "ok": self.ok,
            "nodes": self.nodes,
            "blocks": self.blocks,
            "allocations": self.allocations,
            "problems": [p.to_dict() for p in self.problems],
        }


def check(store: Store, cluster: str, *, valid: Iterable[tuple[str, str]] | None = None) -> CheckReport:
    check_name("cluster", cluster)
    base = cluster_root(cluster)
    kvs = {kv.key[len(base):]: kv for kv in store.list(base)}
    cfg = kvs.get("config")
    if cfg is None or cfg.key != config_key(cluster):
        raise not_found(cluster)
    net = decode_cluster(cfg)
    problems: list[Problem] = []

    def add(kind: str, message: str, key: str) -> None:
        problems.append(Problem(kind, message, base + key))

    claims: dict[IPNetwork, str] = {}
    node_blocks: dict[str, tuple[IPNetwork, ...]] = {}
    ips: dict[tuple[str, IPAddress], AddressRecord] = {}
    handles: dict[tuple[str, str], tuple[str, tuple[IPAddress, ...]]] = {}
    live_nodes: set[str] = set()
    records: dict[str, NodeRecord] = {}
    for rel, kv in kvs.items():
        kind, _, rest = rel.partition("/")
        try:
            if kind == "blocks":
                claim = decode_block(kv)
                claims[claim.block] = claim.node
            elif kind == "nodeblocks":
                node_blocks[rest] = decode_block(kv).blocks
            elif kind == "ips":
                rec = decode_address(kv)
                ips[(rec.node, rec.ip)] = rec
            elif kind == "handles":
                held = decode_allocation(kv)
                handles[(held.container_id, held.ifname)] = (held.node, held.ips)
            elif kind == "nodes":
                live_nodes.add(rest)  # a record (counted even if it does not decode)
                records[rest] = decode_node(kv)
            elif kind == "leases":
                decode_liveness(kv)
        except BadRecord as exc:
            problems.append(Problem("bad-record", f"{exc.kind} record: {exc.problem}", kv.key))

    # blocks: one per node and family, one node per block, inside the pod CIDR, no overlap
    by_block: dict[IPNetwork, list[str]] = defaultdict(list)
    for node, blocks in node_blocks.items():
        for block in blocks:
            by_block[block].append(node)
            if claims.get(block) != node:
                add("leak", f"node {node!r} points at block {block}, but that block is claimed by {claims.get(block)!r}",
                    f"nodeblocks/{node}")
            side = net.family(block.version)
            if side is None or side.block_index(block) is None:
                add("outside-block", f"block {block} of node {node!r} is outside the "
                    f"{side.family.label if side else IPFamily.of(block).label} pod CIDR "
                    f"{side.pod_cidr if side else '(none: the cluster is IPv4 single-stack)'}", f"nodeblocks/{node}")
    for block, nodes in by_block.items():
        if len(nodes) > 1:
            add("duplicate", f"block {block} is held by several nodes: {', '.join(sorted(nodes))}",
                f"blocks/{block.network_address}-{block.prefixlen}")
    for block, node in claims.items():
        if block not in node_blocks.get(node, ()):
            add("leak", f"block {block} is claimed by {node!r}, which does not point back at it",
                f"blocks/{block.network_address}-{block.prefixlen}")
    for version in (4, 6):
        ordered = sorted((b for b in claims if b.version == version), key=lambda b: int(b.network_address))
        for a, b in pairwise(ordered):
            if a.overlaps(b):
                add("duplicate", f"blocks {a} and {b} overlap", f"blocks/{b.network_address}-{b.prefixlen}")
    for node in sorted(live_nodes - set(node_blocks)):
        add("leak", f"node record {node!r} has no block claim", f"nodes/{node}")
    by_ip: dict[IPAddress, list[str]] = defaultdict(list)
    for node, nrec in sorted(records.items()):
        by_ip[nrec.node_ip].append(node)
        if node in node_blocks and not set(nrec.blocks) <= set(node_blocks[node]):
            says = ", ".join(map(str, nrec.blocks))
            add("duplicate", f"node record {node!r} says block {says}, but it claims {', '.join(map(str, node_blocks[node]))}; "
                "peers leave it out", f"nodes/{node}")
    for ip, names in by_ip.items():
        if len(names) > 1:
            add("duplicate", f"node IP {ip} is in several node records: {', '.join(names)}; peers program one of them",
                f"nodes/{names[1]}")

    # addresses
    owners: dict[IPAddress, list[str]] = defaultdict(list)
    for (node, ip), rec in ips.items():
        owners[ip].append(node)
        key = f"ips/{node}/{ip_part(ip)}"
        held_blocks = node_blocks.get(node)
        node_block = next((b for b in held_blocks or () if b.version == ip.version), None)
        if held_blocks is None:
            add("leak", f"address {ip} is allocated on node {node!r}, which has no block", key)
        elif node_block is None:
            add("outside-block", f"address {ip} on node {node!r}: the node has no {IPFamily.of(ip).label} block", key)
        elif ip not in node_block:
            add("outside-block", f"address {ip} on node {node!r} is outside its block {node_block}", key)
        elif addresses.is_reserved(node_block, ip):
            add("reserved", f"address {ip} on node {node!r} is a reserved address of {node_block} "
                "(network, gateway or broadcast)", key)
        handle = handles.get(rec.attachment)
        if handle is None or handle[0] != node or ip not in handle[1]:
            add("leak", f"address {ip} on node {node!r} ({rec.container_id} {rec.ifname}) has no matching handle", key)
    for ip, nodes in owners.items():
        if len(nodes) > 1:
            add("duplicate", f"address {ip} is allocated on several nodes: {', '.join(sorted(nodes))}", f"ips/{nodes[0]}/{ip_part(ip)}")
    for (cid, ifname), (node, held_ips) in handles.items():
        for ip in held_ips:
            owner = ips.get((node, ip))
            if owner is None or owner.attachment != (cid, ifname):
                add("leak", f"handle {cid} {ifname} points at {ip} on node {node!r}, which is not allocated to it",
                    f"handles/{cid}/{ifname}")

    attachments = {(node, rec.attachment) for (node, _), rec in ips.items()}
    if valid is not None:
        keep = {(c, i) for c, i in valid}
        for (node, ip), rec in sorted(ips.items(), key=lambda item: (item[0][0], item[0][1].version, int(item[0][1]))):
            if rec.attachment not in keep:
                add("unreferenced", f"address {ip} on node {node!r} belongs to {rec.container_id} "
                    f"{rec.ifname}, which is not a valid attachment", f"ips/{node}/{ip_part(ip)}")

    return CheckReport(cluster, len(live_nodes), len(claims), len(attachments), tuple(problems))
