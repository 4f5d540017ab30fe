"""WireGuard key rotation requests: the CLI asks, the node's agent acts.

A node's private key never leaves the node, so nobody but its agent can
replace it. ``overlaycni node rotate-key`` therefore writes a request,
``wgrotate/<node>`` (an id and the time), in the datastore; the node's agent
watches that key, generates a new key pair on the node, programs it, writes
its node record with the new public key (peers pick it up from their watch)
and then deletes the request, compared on its revision, so that a request
written meanwhile is not lost. A pending request survives an agent restart
and is acted on at the next start. The requester learns the outcome by
watching the node record's public key change.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass

from ..datastore import KV, Store
from ..datastore.keys import wgrotate_key
from ..errors import ConfigError, FieldError
from .clusters import get_cluster
from .model import check_name
from .nodes import get_node


@dataclass(frozen=True)
class RotationRequest:
    node: str
    id: str
    requested_at: float
    revision: int

    @classmethod
    def from_kv(cls, node: str, kv: KV) -> RotationRequest:
        try:
            data = json.loads(kv.value)
            return cls(node, str(data["id"]), float(data["requested_at"]), kv.revision)
        except (ValueError, KeyError, TypeError):  # a bad record is still a request: act on it once
            return cls(node, "unreadable", 0.0, kv.revision)


def request_key_rotation(store: Store, cluster: str, node: str) -> RotationRequest:
    """Ask ``node``'s agent for a new WireGuard key (the node must be live)."""
    check_name("cluster", cluster)
    check_name("name", node)
    net = get_cluster(store, cluster)
    if net.backend != "wireguard":
        raise ConfigError(FieldError(
            "backend", f"cluster {cluster!r} uses backend {net.backend}; WireGuard keys exist only with --backend wireguard"
        ))  # fmt: skip
    get_node(store, cluster, node)  # NotFound for an unknown or dead node
    ident, now = uuid.uuid4().hex, time.time()
    rev = store.put(wgrotate_key(cluster, node), json.dumps({"id": ident, "requested_at": now}))
    return RotationRequest(node, ident, now, rev)


def pending_key_rotation(store: Store, cluster: str, node: str) -> RotationRequest | None:
    kv = store.get(wgrotate_key(cluster, node))
    return RotationRequest.from_kv(node, kv) if kv is not None else None


def finish_key_rotation(store: Store, cluster: str, request: RotationRequest) -> bool:
    """Delete the request if it is still the one acted on (False: a newer one waits)."""
    return store.txn(compare=[(wgrotate_key(cluster, request.node), request.revision)], delete=[wgrotate_key(cluster, request.node)])
