"""The kernel WireGuard device (netlink), and the choice between it and wireguard-go.

Design note. Where the ``wireguard`` module exists, ``ocni.wg`` is a link of
kind ``wireguard`` (rtnetlink) configured through the ``wireguard`` generic
netlink family with pyroute2's ``WireGuard`` socket: one ``set`` per peer
(pyroute2 sends one peer per message), ``info`` to read it back. The same
objects and order as wireguard-go (see ``wireguard.py``); only the transport
differs. This path cannot run on the machines this project is tested on
(no module), so it is kept small and behind the same port as the tested
userspace path; ``AutoWireGuard`` is the one code path above that choice.
"""

from __future__ import annotations

import errno
from base64 import b64encode
from collections.abc import Sequence
from ipaddress import IPv4Address, ip_network
from typing import Any

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from ...errors import DataplaneError
from ..wgmodel import WgDevice, WgPeer, WgPeerStatus, WireGuardSpec
from .links import delete_link, get_link_msg, nl_error, to_link
from .procwatch import ProcessWatcher
from .wireguard import UserspaceWireGuard, WireGuardSettings, link_mtu_up

NOT_SUPPORTED = (errno.EOPNOTSUPP, errno.EAFNOSUPPORT)  # "Unknown device type": no wireguard module


class KernelUnsupported(DataplaneError):
    """The kernel cannot create a WireGuard device."""


def _text(value: Any) -> str:
    value = value.get("value", value) if isinstance(value, dict) else value
    return value.decode() if isinstance(value, bytes) else str(value)


class KernelWireGuard:
    implementation = "kernel"

    def __init__(self, ipr: IPRoute) -> None:
        self.ipr = ipr
        self._wg: Any = None

    def _genl(self) -> Any:
        if self._wg is None:
            from pyroute2 import WireGuard

            self._wg = WireGuard()
        return self._wg

    def create(self, name: str) -> None:
        try:
            self.ipr.link("add", ifname=name, kind="wireguard")
        except NetlinkError as exc:
            if exc.code in NOT_SUPPORTED:
                raise KernelUnsupported(f"link {name}: this kernel has no WireGuard module") from None
            raise nl_error(f"link {name} (kind wireguard)", exc) from None

    def ensure_device(self, spec: WireGuardSpec) -> list[str]:
        changes: list[str] = []
        msg = get_link_msg(self.ipr, spec.name)
        if msg is not None and to_link(msg).kind != "wireguard":
            self.ipr.link("del", index=msg["index"])
            changes.append(f"link {spec.name} deleted (kind {to_link(msg).kind or 'unknown'} vs wireguard)")
            msg = None
        if msg is None:
            self.create(spec.name)
            changes.append(f"link {spec.name} created (kind wireguard)")
        dev = self.get_device(spec.name)
        if dev is None or dev.public_key != spec.key.public or dev.listen_port != spec.listen_port:
            self._genl().set(spec.name, private_key=b64encode(spec.key.raw).decode(), listen_port=spec.listen_port)
            changes.append(f"wireguard {spec.name} key/port set (public key {spec.key.public}, port {spec.listen_port})")
        return changes + link_mtu_up(self.ipr, spec.name, spec.mtu)

    def get_device(self, name: str) -> WgDevice | None:
        if get_link_msg(self.ipr, name) is None:
            return None
        public, port, peers = None, None, []
        for msg in self._genl().info(name):
            if msg.get_attr("WGDEVICE_A_PUBLIC_KEY") is not None:
                public = _text(msg.get_attr("WGDEVICE_A_PUBLIC_KEY"))
            port = msg.get_attr("WGDEVICE_A_LISTEN_PORT") or port
            for p in msg.get_attr("WGDEVICE_A_PEERS") or []:
                ep = p.get_attr("WGPEER_A_ENDPOINT")
                endpoint = (IPv4Address(ep["addr"]), int(ep["port"])) if ep and "." in str(ep.get("addr", "")) else None
                nets = tuple(ip_network(a["addr"]) for a in p.get_attr("WGPEER_A_ALLOWEDIPS") or [] if "addr" in a)
                hs = p.get_attr("WGPEER_A_LAST_HANDSHAKE_TIME")
                peer = WgPeer(_text(p.get_attr("WGPEER_A_PUBLIC_KEY")), endpoint, nets)
                peers.append(WgPeerStatus(peer, float(hs["tv_sec"]) if hs and hs["tv_sec"] else None,
                                          p.get_attr("WGPEER_A_RX_BYTES") or 0, p.get_attr("WGPEER_A_TX_BYTES") or 0))  # fmt: skip
        return WgDevice(name, public, port, tuple(peers), implementation=self.implementation)

    def apply_peers(self, name: str, *, replace: Sequence[WgPeer] = (), remove: Sequence[str] = ()) -> None:
        wg = self._genl()
        for key in remove:
            wg.set(name, peer={"public_key": key, "remove": True})
        for p in replace:
            peer: dict[str, Any] = {"public_key": p.public_key, "replace_allowed_ips": True,
                                    "allowed_ips": [str(n) for n in p.allowed_ips]}  # fmt: skip
            if p.endpoint is not None:
                peer.update(endpoint_addr=str(p.endpoint[0]), endpoint_port=p.endpoint[1])
            wg.set(name, peer=peer)

    def start_handshakes(self, name: str, keys: Sequence[str]) -> None:
        wg = self._genl()
        for seconds in (25, 0):  # the kernel, too, sends a keepalive when it is switched on
            for key in keys:
                wg.set(name, peer={"public_key": key, "update_only": True, "persistent_keepalive": seconds})

    def delete_device(self, name: str) -> bool:
        return delete_link(self.ipr, name)

    def close(self) -> None:
        if self._wg is not None:
            self._wg.close()


class AutoWireGuard:
    """The WireGuard port the engine sees: kernel or wireguard-go, decided per
    device from what exists and what the kernel supports (``settings.mode``)."""

    def __init__(self, ipr: IPRoute, settings: WireGuardSettings, *, watcher: ProcessWatcher | None = None) -> None:
        self.mode = settings.mode
        self.kernel = KernelWireGuard(ipr)
        self.userspace = UserspaceWireGuard(ipr, settings, watcher=watcher)
        self.ipr = ipr
        self._chosen: KernelWireGuard | UserspaceWireGuard | None = None

    def _existing(self, name: str) -> KernelWireGuard | UserspaceWireGuard | None:
        msg = get_link_msg(self.ipr, name)
        if msg is not None and to_link(msg).kind == "wireguard":
            return self.kernel
        if self.userspace.serving_pid(name) is not None:
            return self.userspace
        return None

    def _choose(self, name: str) -> KernelWireGuard | UserspaceWireGuard:
        if self.mode == "kernel":
            return self.kernel
        if self.mode == "userspace":
            return self.userspace
        found = self._existing(name)
        if found is not None:
            return found
        try:
            self.kernel.create(name)
            return self.kernel
        except KernelUnsupported:
            return self.userspace

    def ensure_device(self, spec: WireGuardSpec) -> list[str]:
        impl = self._existing(spec.name) if self.mode == "auto" else None
        if impl is None:
            impl = self._chosen if self._chosen is not None else self._choose(spec.name)
        self._chosen = impl
        return impl.ensure_device(spec)

    def _impl(self, name: str) -> KernelWireGuard | UserspaceWireGuard | None:
        return self._chosen or self._existing(name)

    def get_device(self, name: str) -> WgDevice | None:
        impl = self._impl(name)
        return impl.get_device(name) if impl is not None else None

    def apply_peers(self, name: str, *, replace: Sequence[WgPeer] = (), remove: Sequence[str] = ()) -> None:
        impl = self._impl(name)
        if impl is None:
            raise DataplaneError(f"wireguard: device {name} does not exist")
        impl.apply_peers(name, replace=replace, remove=remove)

    def start_handshakes(self, name: str, keys: Sequence[str]) -> None:
        impl = self._impl(name)
        if impl is not None:
            impl.start_handshakes(name, keys)

    def delete_device(self, name: str) -> bool:
        done = self.userspace.delete_device(name)
        msg = get_link_msg(self.ipr, name)
        if msg is not None and to_link(msg).kind in ("wireguard", "tun"):
            done = self.kernel.delete_device(name) or done
        self._chosen = None
        return done

    def close(self) -> None:
        self.kernel.close()
