"""The policy inventory of a stored cluster, as the agents see it.

Pods come from the IPAM allocations (addresses, both families of a
dual-stack attachment, and node: the truth for addresses, so a pod counts
even before, or without, a metadata record) joined with the pod records
(labels, named ports); namespaces from their records plus every namespace a
pod uses. The agents render their tables from this join
(``agent.policy``); ``policy explain/render --cluster/--lab`` read it the
same way, so what they print is what the agents enforce.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable
from typing import Any

from ..datastore import KV, Store
from ..datastore.keys import (
    BadRecordHandler,
    config_key,
    decode_all,
    ips_prefix,
    namespaces_prefix,
    nodeblocks_prefix,
    pods_prefix,
    policies_prefix,
)
from ..ipam import Allocation, list_allocations
from ..ipam.clusters import not_found
from ..ipam.pods import pair_addresses
from ..ipam.records import AddressRecord, BlockClaim, allocation_of, decode_address, decode_block
from .inventory import Inventory
from .model import NamedPort, NamespaceInfo, NetworkPolicy, PodInfo
from .records import decode_namespace, decode_pod, decode_policy, load_namespaces, load_pods, load_policies


def join_inventory(
    allocations: Iterable[Allocation], pod_records: Iterable[PodInfo], ns_records: Iterable[NamespaceInfo]
) -> tuple[list[PodInfo], list[NamespaceInfo]]:
    """Join allocations (addresses, node) with pod metadata (labels, ports) (pure)."""
    meta: dict[tuple[str, str], tuple[dict[str, str], tuple[NamedPort, ...]]] = {}
    for rec in pod_records:
        meta[(rec.namespace, rec.name)] = (dict(rec.labels), rec.ports)
    pods = []
    for a in allocations:
        if not a.pod_namespace or not a.pod_name:
            continue  # not a Kubernetes pod (no K8S_POD_* args): no policy applies
        labels, ports = meta.get((a.pod_namespace, a.pod_name), ({}, ()))
        v6 = getattr(a, "ip_v6", None)  # a dual-stack allocation's IPv6 interface (None: single-stack)
        pods.append(PodInfo(a.pod_namespace, a.pod_name, a.ip.ip, a.node, labels, ports, ip_v6=v6.ip if v6 else None))
    namespaces = {ns.name: ns for ns in ns_records}
    for p in pods:
        namespaces.setdefault(p.namespace, NamespaceInfo(p.namespace, {}))
    return pods, list(namespaces.values())


def inventory_from_store(store: Store, cluster: str, *, on_bad: BadRecordHandler | None = None) -> Inventory:
    """Pods, namespaces and policies of ``cluster`` (NotFound for an unknown
    cluster). A record that does not decode raises ``BadRecord``, or with
    ``on_bad`` is reported and skipped, as the agents skip it."""
    allocations = list_allocations(store, cluster, on_bad=on_bad)
    pod_records = load_pods(store, cluster, on_bad=on_bad)
    pods, namespaces = join_inventory(allocations, pod_records, load_namespaces(store, cluster, on_bad=on_bad))
    return Inventory(tuple(namespaces), tuple(pods), tuple(load_policies(store, cluster, on_bad=on_bad)))


class InventoryCache:
    """``inventory_from_store`` for an agent that reads the inventory on
    every policy pass: one read of every record at one store revision, and a
    record whose revision is the one already decoded keeps its decoded
    object (a pod, namespace or policy object stays the same object while
    its records are unchanged). Decoding was most of a pass at scale (2,000
    pods and 500 policies: ~150 ms of ~160 ms); ``policy.incremental`` then
    tells an unchanged object by identity. A bad record is decoded (and
    reported) again on every read."""

    def __init__(self) -> None:
        self._records: dict[str, tuple[int, Any, Any]] = {}  # key -> (revision, extra, decoded)
        self._pods: dict[tuple[str, str], tuple[Allocation, PodInfo | None, PodInfo]] = {}
        self._allocs: dict[tuple[str, str, str], tuple[AddressRecord, AddressRecord | None, Any, Allocation]] = {}

    def load(
        self, store: Store, cluster: str, *, on_bad: BadRecordHandler | None = None
    ) -> tuple[list[PodInfo], list[NamespaceInfo], list[NetworkPolicy]]:
        """(pods, namespaces, policies) as ``inventory_from_store`` has them."""
        prefixes = [nodeblocks_prefix(cluster), ips_prefix(cluster), pods_prefix(cluster)]
        prefixes += [namespaces_prefix(cluster), policies_prefix(cluster)]
        snap = store.read([config_key(cluster)], prefixes)
        if snap.get(config_key(cluster)) is None:
            raise not_found(cluster)
        by_prefix: dict[str, list[KV]] = {p: [] for p in prefixes}
        for kv in snap.kvs:
            for p in prefixes:
                if kv.key.startswith(p):
                    by_prefix[p].append(kv)
                    break
        seen: dict[str, tuple[int, Any, Any]] = {}

        def decoded(kvs: list[KV], decode: Callable[[KV, Any], Any], extra: Callable[[KV], Any] = lambda kv: None) -> list:
            out = []
            for kv in kvs:
                x = extra(kv)
                hit = self._records.get(kv.key)
                if hit is not None and hit[0] == kv.revision and hit[1] is x:
                    obj = hit[2]
                else:
                    got = decode_all([kv], functools.partial(_with, decode, extra=x), on_bad=on_bad)
                    if not got:
                        continue
                    obj = got[0]
                seen[kv.key] = (kv.revision, x, obj)
                out.append(obj)
            return out

        claims = {c.node: c for c in decoded(by_prefix[prefixes[0]], lambda kv, _: decode_block(kv))}
        addresses = decoded(by_prefix[prefixes[1]], lambda kv, _: decode_address(kv))
        revisions = {kv.key: kv.revision for kv in by_prefix[prefixes[1]]}
        allocations = self._allocations(pair_addresses(cluster, addresses, revisions, on_bad=on_bad), claims)
        pod_records = decoded(by_prefix[prefixes[2]], lambda kv, _: decode_pod(kv))
        ns_records = decoded(by_prefix[prefixes[3]], lambda kv, _: decode_namespace(kv))
        policies = decoded(by_prefix[prefixes[4]], lambda kv, _: decode_policy(kv))
        self._records = seen
        return self._join(allocations, pod_records, ns_records) + (policies,)

    def _allocations(
        self, pairs: list[tuple[AddressRecord, AddressRecord | None]], claims: dict[str, BlockClaim]
    ) -> list[Allocation]:
        """An allocation per attachment (its IPv4 and IPv6 address records, its
        node's claim), the same object while those are the same objects."""
        kept: dict[tuple[str, str, str], tuple[AddressRecord, AddressRecord | None, Any, Allocation]] = {}
        out = []
        for v4, v6 in pairs:
            key = (v4.node, *v4.attachment)
            claim = claims.get(v4.node)
            hit = self._allocs.get(key)
            if hit is not None and hit[0] is v4 and hit[1] is v6 and hit[2] is claim:
                alloc = hit[3]
            else:
                alloc = allocation_of(v4, v6, block=claim.block_v4 if claim else None,
                                      block_v6=claim.block_v6 if claim else None)  # fmt: skip
            kept[key] = (v4, v6, claim, alloc)
            out.append(alloc)
        self._allocs = kept
        return out

    def _join(
        self, allocations: list[Allocation], pod_records: list[PodInfo], ns_records: list[NamespaceInfo]
    ) -> tuple[list[PodInfo], list[NamespaceInfo]]:
        """``join_inventory``, each pod joined again only when its allocation or record changed."""
        records = {(r.namespace, r.name): r for r in pod_records}
        pods: list[PodInfo] = []
        kept: dict[tuple[str, str], tuple[Allocation, PodInfo | None, PodInfo]] = {}
        for a in sorted(allocations, key=lambda a: (a.node, int(a.ip))):
            who = (a.pod_namespace or "", a.pod_name or "")
            rec = records.get(who)
            hit = self._pods.get(who)
            if hit is not None and hit[0] is a and hit[1] is rec:
                pod = hit[2]
            else:
                joined, _ = join_inventory([a], [rec] if rec is not None else [], [])
                if not joined:
                    continue
                pod = joined[0]
            kept[who] = (a, rec, pod)
            pods.append(pod)
        self._pods = kept
        _, namespaces = join_inventory([], [], ns_records)
        names = {n.name for n in namespaces}
        namespaces += [NamespaceInfo(ns, {}) for ns in dict.fromkeys(p.namespace for p in pods) if ns not in names]
        return pods, namespaces


def _with(decode: Callable[[KV, Any], Any], kv: KV, *, extra: Any) -> Any:
    return decode(kv, extra)
