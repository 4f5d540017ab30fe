"""The policy inventory of a stored cluster, as the agents see it.

Pods come from the IPAM allocations (IP and node: the truth for addresses,
so a pod counts even before, or without, a metadata record) joined with the
pod records (labels, named ports); namespaces from their records plus every
namespace a pod uses. The agents render their tables from this join
(``agent.policy``); ``policy explain/render --cluster/--lab`` read it the
same way, so what they print is what the agents enforce.
"""

from __future__ import annotations

from collections.abc import Iterable

from ..datastore import Store
from ..datastore.keys import BadRecordHandler
from ..ipam import Allocation, list_allocations
from .inventory import Inventory
from .model import NamedPort, NamespaceInfo, PodInfo
from .records import load_namespaces, load_pods, load_policies


def join_inventory(
    allocations: Iterable[Allocation], pod_records: Iterable[PodInfo], ns_records: Iterable[NamespaceInfo]
) -> tuple[list[PodInfo], list[NamespaceInfo]]:
    """Join allocations (IP, node) with pod metadata (labels, ports) (pure)."""
    meta: dict[tuple[str, str], tuple[dict[str, str], tuple[NamedPort, ...]]] = {}
    for rec in pod_records:
        meta[(rec.namespace, rec.name)] = (dict(rec.labels), rec.ports)
    pods = []
    for a in allocations:
        if not a.pod_namespace or not a.pod_name:
            continue  # not a Kubernetes pod (no K8S_POD_* args): no policy applies
        labels, ports = meta.get((a.pod_namespace, a.pod_name), ({}, ()))
        pods.append(PodInfo(a.pod_namespace, a.pod_name, a.ip.ip, a.node, labels, ports))
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
