"""The wireguard backend's logic, written against the ports (no kernel access here).

``engine.NodeDataplane`` hands the backend-specific steps to this strategy
when ``state.backend == "wireguard"``; the generic steps (sysctls, gateway,
pod routes, nftables) stay in the engine and run unchanged on top.

Per peer node there are two objects: the WireGuard peer (public key,
endpoint ``<node IP>:<port>``, allowed IPs = the peer's block, both blocks
in a dual-stack cluster) and the route ``<peer block> dev ocni.wg scope
link proto 119`` (one per block). The tunnel runs over the IPv4 underlay
for both families, as VXLAN does (one pod MTU; ``linux/links.py``). Adding a peer programs
the WireGuard peer first and the route last (the route never points into
the tunnel before the tunnel knows where to send); removal runs in
reverse. WireGuard's cryptokey routing then does the rest: a packet from
the tunnel is accepted only if its inner source lies in the sending peer's
allowed IPs, so a node can inject traffic only from its own block.

A changed key (``node rotate-key``) with the same block is one UAPI
transaction: the old peer is removed and the new one added with the same
allowed IPs, while the route stays: no packet falls out of the tunnel in
between. After a peer is added or changed its handshake is started at
once (persistent keepalive switched on and off: WireGuard sends one
keepalive when it is switched on), so a new node's first packet and a
rotated key do not wait for traffic, or for the other side's 5 s handshake
retry. No periodic keepalives: idle pairs of a large cluster stay silent. A peer without a published public key is skipped and reported,
never fatal (its record may come from an older agent, or a node registered
by hand).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import TYPE_CHECKING

from ..cidr import IPNetwork
from ..errors import ConfigError, DataplaneError, OverlayCNIError
from .model import NodeInfo, NodeState, Peer, ReconcileReport
from .wgmodel import WG_IFNAME, WIREGUARD_OVERHEAD, WgPeer, WireGuardSpec, check_public_key

if TYPE_CHECKING:
    from .ports import WireGuard

SUMMARY_OVER = 20


def wg_peer(peer: Peer, *, port: int) -> WgPeer:
    """The WireGuard peer for ``peer`` (its key must be set and valid)."""
    assert peer.wg_public_key is not None
    return WgPeer(
        public_key=check_public_key(peer.wg_public_key, field_name=f"peer {peer.name} wireguard-public-key"),
        endpoint=(peer.node_ip, peer.wg_port or port),
        allowed_ips=peer.blocks,
    )


class WireGuardBackend:
    def __init__(self, port: WireGuard | None) -> None:
        self.port = port

    def _port(self) -> WireGuard:
        if self.port is None:
            raise DataplaneError("wireguard: this data plane has no WireGuard port (backend wireguard is not supported here)")
        return self.port

    # --- the device --------------------------------------------------------------------

    def setup_device(self, state: NodeState, info: NodeInfo, report: ReconcileReport) -> None:
        if state.wireguard_key is None:
            raise DataplaneError("wireguard: the node has no private key (the agent loads or generates it at start)")
        spec = WireGuardSpec(
            name=WG_IFNAME,
            listen_port=state.wireguard_port,
            key=state.wireguard_key,
            mtu=info.underlay_mtu - WIREGUARD_OVERHEAD,
        )
        report.changes.extend(self._port().ensure_device(spec))

    def teardown_device(self, report: ReconcileReport) -> None:
        """Another backend is configured: remove the device if it exists."""
        if self.port is not None and self.port.delete_device(WG_IFNAME):
            report.changes.append(f"wireguard device {WG_IFNAME} deleted (backend is not wireguard)")

    # --- peers ---------------------------------------------------------------------------

    def usable_peers(self, state: NodeState, report: ReconcileReport | None) -> list[Peer]:
        """Peers with a valid public key; the others are reported (or raise without a report)."""
        ok = []
        for peer in state.peers:
            try:
                if not peer.wg_public_key:
                    raise DataplaneError(
                        f"peer {peer.name}: no WireGuard public key in its node record yet "
                        "(its agent publishes one when it runs with backend wireguard); skipped"
                    )
                wg_peer(peer, port=state.wireguard_port)
                ok.append(peer)
            except (DataplaneError, ConfigError) as exc:
                if report is None:
                    raise
                report.errors.append(exc.message if isinstance(exc, DataplaneError) else str(exc))
        return ok

    def sync_peers(self, state: NodeState, peers: Sequence[Peer], report: ReconcileReport) -> list[str]:
        """Add or update the wanted WireGuard peers; return the keys to remove after the routes.

        Programmed before the routes are added: a new peer is known to the
        device before any route sends traffic into it."""
        port = self._port()
        device = port.get_device(WG_IFNAME)
        if device is None:
            raise DataplaneError(f"wireguard: device {WG_IFNAME} is missing")
        want = {p.public_key: p for p in (wg_peer(x, port=state.wireguard_port) for x in peers)}
        have = {s.peer.public_key: s.peer for s in device.peers}
        changed = [p for key, p in want.items() if have.get(key) != p]
        stale = sorted(key for key in have if key not in want)
        if changed:
            port.apply_peers(WG_IFNAME, replace=changed)
            _report(report, "replaced", changed)
            port.start_handshakes(WG_IFNAME, [p.public_key for p in changed])
        return stale

    def remove_peers(self, keys: Sequence[str], report: ReconcileReport) -> None:
        if keys:
            self._port().apply_peers(WG_IFNAME, remove=keys)
            _report(report, "removed", list(keys))

    def ensure_peer(self, state: NodeState, peer: Peer) -> None:
        """One peer, incrementally: a peer whose block is served by another key
        (a rotated key) is replaced in the same transaction."""
        failed = self.ensure_peers(state, [peer])
        if failed:
            raise failed[peer.name]

    def ensure_peers(self, state: NodeState, peers: Sequence[Peer]) -> dict[str, OverlayCNIError]:
        """Several peers in one UAPI transaction (the device read once); each
        one whose block another key serves replaces that key. A peer without
        a valid public key is skipped and returned (name -> why)."""
        port = self._port()
        failed: dict[str, OverlayCNIError] = {}
        wants: list[tuple[Peer, WgPeer]] = []
        for peer in peers:
            try:
                self.usable_peers(replace(state, peers=(peer,)), None)
                wants.append((peer, wg_peer(peer, port=state.wireguard_port)))
            except (DataplaneError, ConfigError) as exc:
                failed[peer.name] = exc
        if not wants:
            return failed
        device = port.get_device(WG_IFNAME)
        if device is None:
            raise DataplaneError(f"wireguard: device {WG_IFNAME} is missing")
        have = {s.peer.public_key: s.peer for s in device.peers}
        serving: dict[IPNetwork, list[str]] = {}  # allowed IP -> the keys that list it
        for s in device.peers:
            for net in s.peer.allowed_ips:
                serving.setdefault(net, []).append(s.peer.public_key)
        wanted_keys = {w.public_key for _, w in wants}
        changed: list[WgPeer] = []
        replaced: dict[str, None] = {}  # in order, once each
        for peer, want in wants:
            others = [k for k in serving.get(peer.block, ()) if k not in wanted_keys]
            if others or have.get(want.public_key) != want:
                changed.append(want)
                replaced.update(dict.fromkeys(others))
        if changed:
            port.apply_peers(WG_IFNAME, replace=changed, remove=list(replaced))
            port.start_handshakes(WG_IFNAME, [w.public_key for w in changed])
        return failed

    def delete_peer(self, peer: Peer) -> None:
        """Remove the WireGuard peer(s) serving ``peer``'s block (after its route is gone)."""
        self.delete_peers([peer])

    def delete_peers(self, peers: Sequence[Peer]) -> None:
        """Remove the WireGuard peers serving these peers' blocks, or holding their keys, in one transaction."""
        port = self._port()
        device = port.get_device(WG_IFNAME)
        if device is None:
            return
        blocks = {p.block for p in peers}
        held = {p.wg_public_key for p in peers if p.wg_public_key}
        keys = [s.peer.public_key for s in device.peers
                if s.peer.public_key in held or any(a in blocks for a in s.peer.allowed_ips)]  # fmt: skip
        if keys:
            port.apply_peers(WG_IFNAME, remove=keys)


def _report(report: ReconcileReport, verb: str, objs: list) -> None:
    if len(objs) > SUMMARY_OVER:
        report.changes.append(f"{len(objs)} wireguard peers {verb} ({'; '.join(map(str, objs[:3]))}; ...)")
    else:
        report.changes.extend(f"wireguard peer {o} {verb}" for o in objs)
