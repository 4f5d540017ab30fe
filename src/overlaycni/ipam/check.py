"""Consistency check of a cluster's IPAM records (pure over one listing).

Finds: records that do not decode (``bad-record``, each named by its key);
duplicate blocks, addresses or node IPs (two node records with one IP);
node records whose block is not their claim; leaks (half-written pairs: a claim
without its reverse index, an address without its handle, a handle without
its address, addresses on a node that has no block); addresses outside
their node's block or on a reserved address (network, gateway, broadcast);
and, given the valid attachments, allocations nobody uses any more.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network
from itertools import pairwise
from typing import Any

from ..datastore import Store
from ..datastore.keys import cluster_root, config_key, ip_part
from ..errors import BadRecord
from . import addresses
from .clusters import not_found
from .model import Allocation, NodeRecord, check_name
from .records import decode_allocation, decode_block, decode_cluster, decode_liveness, decode_node

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

    claims: dict[IPv4Network, str] = {}
    node_blocks: dict[str, IPv4Network] = {}
    ips: dict[tuple[str, IPv4Address], Allocation] = {}
    handles: dict[tuple[str, str], tuple[str, IPv4Address]] = {}
    live_nodes: set[str] = set()
    records: dict[str, NodeRecord] = {}
    for rel, kv in kvs.items():
        kind, _, rest = rel.partition("/")
        try:
            if kind == "blocks":
                claim = decode_block(kv)
                claims[claim.block] = claim.node
            elif kind == "nodeblocks":
                node_blocks[rest] = decode_block(kv).block
            elif kind == "ips":
                held = decode_allocation(kv)
                ips[(held.node, held.ip.ip)] = held
            elif kind == "handles":
                held = decode_allocation(kv)
                handles[(held.container_id, held.ifname)] = (held.node, held.ip.ip)
            elif kind == "nodes":
                live_nodes.add(rest)  # a record (counted even if it does not decode)
                records[rest] = decode_node(kv)
            elif kind == "leases":
                decode_liveness(kv)
        except BadRecord as exc:
            problems.append(Problem("bad-record", f"{exc.kind} record: {exc.problem}", kv.key))

    # blocks: one per node, one node per block, inside the pod CIDR, no overlap
    by_block: dict[IPv4Network, list[str]] = defaultdict(list)
    for node, block in node_blocks.items():
        by_block[block].append(node)
        if claims.get(block) != node:
            add("leak", f"node {node!r} points at block {block}, but that block is claimed by {claims.get(block)!r}",
                f"nodeblocks/{node}")
        if addresses.block_index(net.pod_cidr, block) is None:
            add("outside-block", f"block {block} of node {node!r} is outside the pod CIDR {net.pod_cidr}",
                f"nodeblocks/{node}")
    for block, nodes in by_block.items():
        if len(nodes) > 1:
            add("duplicate", f"block {block} is held by several nodes: {', '.join(sorted(nodes))}",
                f"blocks/{block.network_address}-{block.prefixlen}")
    for block, node in claims.items():
        if node_blocks.get(node) != block:
            add("leak", f"block {block} is claimed by {node!r}, which does not point back at it",
                f"blocks/{block.network_address}-{block.prefixlen}")
    ordered = sorted(claims, key=lambda b: int(b.network_address))
    for a, b in pairwise(ordered):
        if a.overlaps(b):
            add("duplicate", f"blocks {a} and {b} overlap", f"blocks/{b.network_address}-{b.prefixlen}")
    for node in sorted(live_nodes - set(node_blocks)):
        add("leak", f"node record {node!r} has no block claim", f"nodes/{node}")
    by_ip: dict[IPv4Address, list[str]] = defaultdict(list)
    for node, rec in sorted(records.items()):
        by_ip[rec.node_ip].append(node)
        if node in node_blocks and node_blocks[node] != rec.block:
            add("duplicate", f"node record {node!r} says block {rec.block}, but it claims {node_blocks[node]}; "
                "peers leave it out", f"nodes/{node}")
    for ip, names in by_ip.items():
        if len(names) > 1:
            add("duplicate", f"node IP {ip} is in several node records: {', '.join(names)}; peers program one of them",
                f"nodes/{names[1]}")

    # addresses
    owners: dict[IPv4Address, list[str]] = defaultdict(list)
    for (node, ip), alloc in ips.items():
        owners[ip].append(node)
        key = f"ips/{node}/{ip_part(ip)}"
        node_block = node_blocks.get(node)
        if node_block is None:
            add("leak", f"address {ip} is allocated on node {node!r}, which has no block", key)
        elif ip not in node_block:
            add("outside-block", f"address {ip} on node {node!r} is outside its block {node_block}", key)
        elif addresses.is_reserved(node_block, ip):
            add("reserved", f"address {ip} on node {node!r} is the network, gateway or broadcast address of {node_block}", key)
        attachment = (alloc.container_id, alloc.ifname)
        if handles.get(attachment) != (node, ip):
            add("leak", f"address {ip} on node {node!r} ({attachment[0]} {attachment[1]}) has no matching handle", key)
    for ip, nodes in owners.items():
        if len(nodes) > 1:
            add("duplicate", f"address {ip} is allocated on several nodes: {', '.join(sorted(nodes))}", f"ips/{nodes[0]}/{ip_part(ip)}")
    for (cid, ifname), (node, ip) in handles.items():
        owner = ips.get((node, ip))
        if owner is None or (owner.container_id, owner.ifname) != (cid, ifname):
            add("leak", f"handle {cid} {ifname} points at {ip} on node {node!r}, which is not allocated to it",
                f"handles/{cid}/{ifname}")

    if valid is not None:
        keep = {(c, i) for c, i in valid}
        for (node, ip), alloc in sorted(ips.items(), key=lambda item: (item[0][0], int(item[0][1]))):
            if (alloc.container_id, alloc.ifname) not in keep:
                add("unreferenced", f"address {ip} on node {node!r} belongs to {alloc.container_id} "
                    f"{alloc.ifname}, which is not a valid attachment", f"ips/{node}/{ip_part(ip)}")

    return CheckReport(cluster, len(live_nodes), len(claims), len(ips), tuple(problems))
