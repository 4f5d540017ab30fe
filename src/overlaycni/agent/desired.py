"""The agent's desired-state computation (pure).

From the datastore's view (cluster network, this node's record, every node
record with the live ones and the block claims, this node's pod
allocations) to the ``NodeState`` the data plane reconciles the kernel to.
Nothing here touches the kernel or a socket.

Peers are chosen one by one (``select_peers``), never all or nothing: a
node record whose block is not claimed by that node (``blocks/<cidr>``), or
that collides with this node or a peer chosen before it (the same node IP or
VTEP MAC, an overlapping block: ``dataplane.admit_peers``), is left out with
a problem naming both nodes, and every other peer is programmed. Priority,
the same on every node: records whose block claim matches, then live nodes
(their agent holds its lease), then by name. Whether a peer is live does not
decide whether it is programmed: a node whose agent lost the datastore still
forwards its pods' traffic, so its routes stay while its block is its own.

The pod MTU is the cluster's ``mtu`` when set; otherwise the smallest
underlay MTU that this node and its peers publish, minus the backend's
overhead, so that nodes with different underlays agree on one size.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from ipaddress import IPv6Network

from ..cidr import IPNetwork
from ..config import ClusterNetwork, IPFamily
from ..dataplane import NodeState, Peer, PeerProblem, PodEndpoint, admit_peers, backend_overhead, host_veth_name, vtep_mac
from ..dataplane.wgmodel import PrivateKey
from ..ipam import Allocation, NodeRecord

MIN_POD_MTU = 576  # what validate_state accepts


def peer_of(record: NodeRecord) -> Peer:
    return Peer(
        name=record.name,
        node_ip=record.node_ip,
        block=record.block,
        vtep_mac=record.vtep_mac or vtep_mac(record.node_ip),
        wg_public_key=record.wireguard_public_key,
        wg_port=record.wireguard_port,
        block_v6=record.block_v6,
        node_ip_v6=record.node_ip_v6,
    )


@dataclass(frozen=True)
class PeerSelection:
    """The peers to program (sorted by name), the records left out and why,
    and which programmed peers are not live."""

    records: tuple[NodeRecord, ...]
    problems: tuple[PeerProblem, ...] = ()
    not_live: tuple[str, ...] = ()

    @property
    def peers(self) -> tuple[Peer, ...]:
        return tuple(peer_of(r) for r in self.records)


def select_peers(
    net: ClusterNetwork,
    me: NodeRecord,
    records: Iterable[NodeRecord],
    *,
    live: Iterable[str] | None = None,
    claims: Mapping[IPNetwork, str] | None = None,
) -> PeerSelection:
    """The peers of node ``me`` among ``records`` (see the module note).
    ``live``: names of live nodes (None: all count as live); ``claims``: block
    -> claiming node (None: not checked)."""
    live_set = set(live) if live is not None else None
    candidates: list[NodeRecord] = []
    problems: list[PeerProblem] = []
    for r in records:
        if r.name == me.name:
            continue
        unclaimed = next((b for b in r.blocks if claims is not None and claims.get(b) != r.name), None)
        if claims is not None and unclaimed is not None:
            holder = claims.get(unclaimed)
            why = f"is claimed by node {holder}" if holder is not None else "is not claimed by it (no block claim)"
            what = "IPv6 block" if unclaimed.version == 6 else "block"
            problems.append(PeerProblem(r.name, f"peer {r.name}: {what} {unclaimed} {why}", holder))
            continue
        if net.mtu is None and r.mtu is not None and r.mtu - backend_overhead(net.backend) < MIN_POD_MTU:
            problems.append(PeerProblem(
                r.name, f"peer {r.name}: underlay MTU {r.mtu} leaves less than {MIN_POD_MTU} bytes for pods ({net.backend})"
            ))
            continue
        candidates.append(r)
    candidates.sort(key=lambda r: (live_set is not None and r.name not in live_set, r.name))
    by_name = {r.name: r for r in candidates}
    v6 = net.family(IPFamily.ipv6)  # None: single-stack
    probe = NodeState(
        node_ip=me.node_ip, block=me.block, pod_cidr=net.pod_cidr, backend=net.backend,
        peers=tuple(peer_of(r) for r in candidates),
        block_v6=me.block_v6, node_ip_v6=me.node_ip_v6,
        pod_cidr_v6=IPv6Network(v6.pod_cidr) if v6 is not None and me.block_v6 is not None else None,
    )  # fmt: skip
    admitted, collisions = admit_peers(probe)
    chosen = tuple(sorted((by_name[p.name] for p in admitted), key=lambda r: r.name))
    not_live = tuple(r.name for r in chosen if live_set is not None and r.name not in live_set)
    all_problems = tuple(sorted((*problems, *collisions), key=lambda p: p.peer))
    return PeerSelection(records=chosen, problems=all_problems, not_live=not_live)


def pod_mtu(net: ClusterNetwork, me: NodeRecord, peers: Iterable[NodeRecord]) -> int | None:
    """The cluster's pod MTU: its setting, else the smallest published
    underlay MTU minus the backend's overhead (None: nobody published one,
    the local underlay decides)."""
    if net.mtu is not None:
        return net.mtu
    published = [r.mtu for r in (me, *peers) if r.mtu is not None]
    return min(published) - backend_overhead(net.backend) if published else None


def node_state(
    net: ClusterNetwork,
    me: NodeRecord,
    peers: Iterable[NodeRecord],
    allocations: Iterable[Allocation],
    *,
    present_veths: Iterable[str] | None = None,
    wireguard_key: PrivateKey | None = None,
) -> NodeState:
    """Desired state of node ``me`` with the chosen ``peers``. Pods whose host
    veth is not in ``present_veths`` (an ADD in flight, or a leak for GC to
    clear) are left out so that reconcile never routes to a missing device."""
    present = set(present_veths) if present_veths is not None else None
    v6 = net.family(IPFamily.ipv6)  # None: single-stack
    peer_records = list(peers)
    pods = []
    for a in allocations:
        if a.node != me.name:
            continue
        veth = host_veth_name(a.container_id, a.ifname)
        if present is not None and veth not in present:
            continue
        pods.append(PodEndpoint(ip=a.ip.ip, host_veth=veth, ip_v6=a.ip_v6.ip if a.ip_v6 is not None else None))
    return NodeState(
        node_ip=me.node_ip,
        block=me.block,
        block_v6=me.block_v6,
        pod_cidr=net.pod_cidr,
        backend=net.backend,
        vni=net.vni,
        vxlan_port=net.vxlan_port,
        mtu=pod_mtu(net, me, peer_records),
        peers=tuple(sorted((peer_of(r) for r in peer_records if r.name != me.name), key=lambda p: p.name)),
        pods=tuple(sorted(pods, key=lambda p: int(p.ip))),
        non_masquerade_cidrs=net.non_masquerade_cidrs,
        wireguard_port=net.wireguard_port,
        wireguard_key=wireguard_key,
        pod_cidr_v6=IPv6Network(v6.pod_cidr) if v6 is not None and me.block_v6 is not None else None,
        node_ip_v6=me.node_ip_v6,
        non_masquerade_cidrs_v6=net.non_masquerade_cidrs_v6,
    )


def with_peers(state: NodeState, peers: Iterable[Peer]) -> NodeState:
    return replace(state, peers=tuple(sorted(peers, key=lambda p: p.name)))
