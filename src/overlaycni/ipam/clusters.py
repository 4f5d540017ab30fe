"""Cluster records: create (idempotent), read, list, delete, expand the pod
CIDR. Pure logic over a ``Store``; every write is one transaction.

The record is ``ClusterNetwork.to_json()``. A single-stack network stores the
keys it always stored; a dual-stack one adds ``ip-families``, the per-family
lists (``vnet-cidrs``, ``node-subnet-cidrs``, ``pod-cidrs``,
``service-cidrs``; their IPv4 entries equal the single-family keys) and
``node-cidr-size-v6``, and may list IPv6 ``non-masquerade-cidrs``. A record
without them reads as single-stack."""

from __future__ import annotations

import logging
from typing import Any

from ..config import ClusterNetwork, validate_expansion
from ..datastore import Store
from ..datastore.keys import INDEX, BadRecordHandler, cluster_root, config_key, decode_all, index_key
from ..errors import AlreadyExists, Conflict, NotFound
from .model import check_name
from .records import decode_cluster

_CAS_ATTEMPTS = 16
log = logging.getLogger(__name__)


def not_found(name: str) -> NotFound:
    return NotFound(
        f"cluster {name!r} not found in the datastore",
        details="create it with `overlaycni cluster create --name NAME`, or list them with `overlaycni cluster list`",
    )


def create_cluster(store: Store, name: str, net: ClusterNetwork) -> ClusterNetwork:
    """Create cluster ``name``. The same settings again return them; other
    settings raise ``AlreadyExists`` naming the differing fields."""
    check_name("name", name)
    for _ in range(_CAS_ATTEMPTS):
        if store.txn(
            compare=[(config_key(name), 0)],
            put=[(config_key(name), net.to_json(), None), (index_key(name), "", None)],
        ):
            log.debug("cluster %s created", name)
            return net
        kv = store.get(config_key(name))
        if kv is None:
            continue  # deleted meanwhile: try again
        existing = decode_cluster(kv)
        if existing == net:
            return existing
        raise AlreadyExists(
            f"cluster {name!r} already exists with different settings: {_differences(existing, net)}",
            details="delete it first, or use `overlaycni cluster expand-pod-cidr` to grow its pod CIDR",
        )
    raise Conflict(f"cluster {name!r}: too many concurrent changes, try again")


def _differences(old: ClusterNetwork, new: ClusterNetwork) -> str:
    """The settings two networks give differently, as flags. The IPv6 keys
    of a dual-stack record follow from ``ip-families``, which is named."""

    def settings(net: ClusterNetwork) -> dict[str, Any]:
        return {"ip-families": [str(f) for f in net.ip_families], **net.to_dict()}

    def show(value: Any) -> str:
        return ",".join(str(v) for v in value) if isinstance(value, list) else str(value)

    a, b = settings(old), settings(new)
    diff = [f"--{k} {show(a[k])} (asked {show(b[k])})" for k in a if k in b and a[k] != b[k]]
    return ", ".join(diff) or "settings the flags do not show"


def get_cluster(store: Store, name: str) -> ClusterNetwork:
    check_name("cluster", name)
    kv = store.get(config_key(name))
    if kv is None:
        raise not_found(name)
    return decode_cluster(kv)


def list_clusters(store: Store, *, on_bad: BadRecordHandler | None = None) -> list[tuple[str, ClusterNetwork]]:
    """Every cluster; a bad config raises ``BadRecord`` or, with ``on_bad``, is reported and skipped."""
    names = [kv.key[len(INDEX):] for kv in store.list(INDEX)]
    if not names:
        return []
    snap = store.read([config_key(n) for n in names])
    out = []
    for n in names:
        kv = snap.get(config_key(n))
        for net in decode_all([kv] if kv is not None else [], decode_cluster, on_bad=on_bad):
            out.append((n, net))
    return out


def delete_cluster(store: Store, name: str) -> None:
    """Delete the cluster and everything under it. Not-found is success."""
    check_name("cluster", name)
    store.transact(compare=[], delete=[index_key(name)], delete_prefix=[cluster_root(name)])


def expand_pod_cidr(store: Store, name: str, new_pod_cidr: str) -> ClusterNetwork:
    """Grow the pod CIDR to a contiguous superset; existing blocks keep their
    place (claims are stored as CIDRs)."""
    check_name("cluster", name)
    for _ in range(_CAS_ATTEMPTS):
        kv = store.get(config_key(name))
        if kv is None:
            raise not_found(name)
        new = validate_expansion(decode_cluster(kv), new_pod_cidr)
        if store.txn(compare=[(kv.key, kv.revision)], put=[(kv.key, new.to_json(), None)]):
            return new
    raise Conflict(f"cluster {name!r}: too many concurrent changes, try again")
