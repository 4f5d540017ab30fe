"""Cluster records: create (idempotent), read, list, delete, expand the pod
CIDR. Pure logic over a ``Store``; every write is one transaction."""

from __future__ import annotations

import logging

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
        old, new = existing.to_dict(), net.to_dict()
        diff = [f"--{k} {old[k]} (asked {new[k]})" for k in old if old[k] != new.get(k)]
        raise AlreadyExists(
            f"cluster {name!r} already exists with different settings: {', '.join(diff)}",
            details="delete it first, or use `overlaycni cluster expand-pod-cidr` to grow its pod CIDR",
        )
    raise Conflict(f"cluster {name!r}: too many concurrent changes, try again")


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
