"""IPAM: node blocks from the pod CIDR, pod addresses from a node's block.

Pure logic over a ``datastore.Store`` (no kernel, no sockets of its own);
every write is one compare-and-swap transaction, so a crashed process never
leaves a half-written record. Key layout: ``ipam.model``.
"""

from __future__ import annotations

from .check import CheckReport, Problem, check
from .clusters import create_cluster, delete_cluster, expand_pod_cidr, get_cluster, list_clusters
from .model import Allocation, NodeRecord, node_from_kv, nodes_prefix, parse_pod
from .nodes import delete_node, get_node, list_blocks, list_nodes, register_node
from .pods import allocate, gc, get_allocation, list_allocations, release

__all__ = [
    "Allocation",
    "CheckReport",
    "NodeRecord",
    "Problem",
    "allocate",
    "check",
    "create_cluster",
    "delete_cluster",
    "delete_node",
    "expand_pod_cidr",
    "gc",
    "get_allocation",
    "get_cluster",
    "get_node",
    "list_allocations",
    "list_blocks",
    "list_clusters",
    "list_nodes",
    "node_from_kv",
    "nodes_prefix",
    "parse_pod",
    "register_node",
    "release",
]
