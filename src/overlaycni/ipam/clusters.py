"""Cluster records: create (idempotent), read, list, delete, expand the pod
CIDR. Pure logic over a ``Store``; every write is one transaction."""

from __future__ import annotations

import json

from ..config import ClusterNetwork, parse_network, validate_expansion
from ..datastore import KV, Store
from ..errors import AlreadyExists, Conflict, NotFound
from .model import INDEX, check_name, config_key, index_key, root

_CAS_ATTEMPTS = 16


def network_from_kv(kv: KV) -> ClusterNetwork:
    return parse_network(json.loads(kv.value))


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
            return net
        kv = store.get(config_key(name))
        if kv is None:
            continue  # deleted meanwhile: try again
        existing = network_from_kv(kv)
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
    return network_from_kv(kv)


def list_clusters(store: Store) -> list[tuple[str, ClusterNetwork]]:
    names = [kv.key[len(INDEX):] for kv in store.list(INDEX)]
    if not names:
        return []
    snap = store.read([config_key(n) for n in names])
    out = []
    for n in names:
        kv = snap.get(config_key(n))
        if kv is not None:
            out.append((n, network_from_kv(kv)))
    return out


def delete_cluster(store: Store, name: str) -> None:
    """Delete the cluster and everything under it. Not-found is success."""
    check_name("cluster", name)
    store.transact(compare=[], delete=[index_key(name)], delete_prefix=[root(name)])


def expand_pod_cidr(store: Store, name: str, new_pod_cidr: str) -> ClusterNetwork:
    """Grow the pod CIDR to a contiguous superset; existing blocks keep their
    place (claims are stored as CIDRs)."""
    check_name("cluster", name)
    for _ in range(_CAS_ATTEMPTS):
        kv = store.get(config_key(name))
        if kv is None:
            raise not_found(name)
        new = validate_expansion(network_from_kv(kv), new_pod_cidr)
        if store.txn(compare=[(kv.key, kv.revision)], put=[(kv.key, new.to_json(), None)]):
            return new
    raise Conflict(f"cluster {name!r}: too many concurrent changes, try again")
