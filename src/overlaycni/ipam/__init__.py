"""IPAM: node blocks from the pod CIDR, pod addresses from a node's block.

Pure logic over a ``datastore.Store`` (no kernel, no sockets of its own);
every write is one compare-and-swap transaction, so a crashed process never
leaves a half-written record. Key layout: ``datastore.keys``; record values
and their decoders: ``ipam.records``.
"""

from __future__ import annotations

from ..datastore.keys import nodes_prefix
from .check import CheckReport, Problem, check
from .clusters import create_cluster, delete_cluster, expand_pod_cidr, get_cluster, list_clusters
from .model import Allocation, ClusterNodes, Liveness, NodeRecord, parse_pod
from .nodes import cluster_nodes, delete_node, get_node, list_blocks, list_claims, list_nodes, register_node, renew_liveness
from .podbatch import Reservation, get_allocations, release_many, reserve_many
from .pods import allocate, gc, get_allocation, list_allocations, release, reserve
from .records import (
    AddressRecord,
    BlockClaim,
    decode_address,
    decode_allocation,
    decode_block,
    decode_cluster,
    decode_liveness,
    decode_node,
)

node_from_kv = decode_node  # the old name (callers outside ipam may still use it)

__all__ = [
    "AddressRecord",
    "Allocation",
    "BlockClaim",
    "CheckReport",
    "ClusterNodes",
    "Liveness",
    "NodeRecord",
    "Problem",
    "Reservation",
    "allocate",
    "check",
    "cluster_nodes",
    "create_cluster",
    "decode_address",
    "decode_allocation",
    "decode_block",
    "decode_cluster",
    "decode_liveness",
    "decode_node",
    "delete_cluster",
    "delete_node",
    "expand_pod_cidr",
    "gc",
    "get_allocation",
    "get_allocations",
    "get_cluster",
    "get_node",
    "list_allocations",
    "list_blocks",
    "list_claims",
    "list_clusters",
    "list_nodes",
    "node_from_kv",
    "nodes_prefix",
    "parse_pod",
    "register_node",
    "release",
    "release_many",
    "renew_liveness",
    "reserve",
    "reserve_many",
]
