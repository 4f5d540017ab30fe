"""The agent's desired-state computation (pure).

From the datastore's view (cluster network, this node's record, every live
node record, this node's pod allocations) to the ``NodeState`` the data plane
reconciles the kernel to. Nothing here touches the kernel or a socket.
"""

from __future__ import annotations

from collections.abc import Iterable

from ..config import ClusterNetwork
from ..dataplane import NodeState, Peer, PodEndpoint, host_veth_name, vtep_mac
from ..dataplane.wgmodel import PrivateKey
from ..ipam import Allocation, NodeRecord


def peer_of(record: NodeRecord) -> Peer:
    return Peer(
        name=record.name,
        node_ip=record.node_ip,
        block=record.block,
        vtep_mac=record.vtep_mac or vtep_mac(record.node_ip),
        wg_public_key=record.wireguard_public_key,
        wg_port=record.wireguard_port,
    )


def node_state(
    net: ClusterNetwork,
    me: NodeRecord,
    nodes: Iterable[NodeRecord],
    allocations: Iterable[Allocation],
    *,
    present_veths: Iterable[str] | None = None,
    wireguard_key: PrivateKey | None = None,
) -> NodeState:
    """Desired state of node ``me``. Pods whose host veth is not in
    ``present_veths`` (an ADD in flight, or a leak for GC to clear) are left
    out so that reconcile never routes to a missing device."""
    present = set(present_veths) if present_veths is not None else None
    peers = tuple(sorted((peer_of(n) for n in nodes if n.name != me.name), key=lambda p: p.name))
    pods = []
    for a in allocations:
        if a.node != me.name:
            continue
        veth = host_veth_name(a.container_id, a.ifname)
        if present is not None and veth not in present:
            continue
        pods.append(PodEndpoint(ip=a.ip.ip, host_veth=veth))
    return NodeState(
        node_ip=me.node_ip,
        block=me.block,
        pod_cidr=net.pod_cidr,
        backend=net.backend,
        vni=net.vni,
        vxlan_port=net.vxlan_port,
        mtu=net.mtu,
        peers=peers,
        pods=tuple(sorted(pods, key=lambda p: int(p.ip))),
        non_masquerade_cidrs=net.non_masquerade_cidrs,
        wireguard_port=net.wireguard_port,
        wireguard_key=wireguard_key,
    )
