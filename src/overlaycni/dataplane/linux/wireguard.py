"""The WireGuard port on Linux: wireguard-go supervised over its UAPI socket,
or the kernel module through netlink (``wgkernel.py``), chosen per node.

Design note. Per node there is one device, ``ocni.wg``, with one WireGuard
peer per other node (public key, endpoint ``<node IP>:<port>``, allowed IPs
= that node's block) and one route per peer block through the device
(``wireguard.py`` in the data plane programs both, peer before route,
removal in reverse). The device has MTU = underlay - 60 and the address
``<block>.0/32`` (host-originated traffic to remote pods gets a source the
peer's allowed IPs accept). Nothing else is per peer: WireGuard keeps its
own endpoint and session state, so 5,000 peers are one UAPI transaction of
5,000 sections (about 0.7 MB of text) plus 5,000 routes.

Kernel or userspace. ``auto`` (the default) uses an existing device as it
finds it (kind ``wireguard``: the module; kind ``tun`` with a live
wireguard-go: userspace), else tries to create a kernel device and falls
back to wireguard-go when the kernel answers "not supported" (the machines
here have no module). The kernel path is small and untested here.

wireguard-go. The agent starts ``wireguard-go -f ocni.wg`` from the data
plane's worker thread, so it is born in the node's network namespace and
creates its TUN device there; it opens its UAPI socket at
``<dir>/ocni.wg.sock``. wireguard-go hard-codes that directory
(``/var/run/wireguard``, a compile-time variable) and, even when handed a
listening socket through ``WG_UAPI_FD``, insists on watching
``/var/run/wireguard/<ifname>.sock`` (ipc/uapi_linux.go) - a path shared by
every network namespace of the machine, so two lab nodes each with an
``ocni.wg`` would collide. With a socket dir other than the default the
agent therefore starts it under ``unshare --mount`` with the node's own
directory bind-mounted over ``/var/run/wireguard`` in a private mount
namespace: the interface keeps its fixed name, each node has its own
socket, and the host's mount table is never touched. Rejected: a unique
interface name per node (routes and filters then name a device nobody can
predict), renaming the TUN after start (wireguard-go caches the name and
its MTU queries then fail), passing ``WG_UAPI_FD`` (the inotify watch on
the shared path remains).

Supervision and adoption. The process runs in its own session with its
output in ``<dir>/ocni.wg.log``; its pid and start time go to
``<dir>/ocni.wg.pid``. The agent finds the process that serves the socket
with ``SO_PEERCRED`` and checks that it lives in the node's network
namespace; a restarted (even SIGKILLed) agent adopts it, its peers and its
sessions: the tunnel keeps carrying traffic. A recorded process that no
longer answers is stopped and replaced. A ``pidfd`` per process wakes a
watcher thread the moment wireguard-go exits; ``LinuxDataplane`` then
reconciles the last desired state again (new process, key, peers, routes),
with a growing pause if it keeps dying. Stopping the agent leaves
wireguard-go running, like every other kernel object of the node.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from ...errors import DataplaneError
from ..uapi import GET, UapiError, check_errno, decode_get, encode_keepalive, encode_set
from ..wgmodel import WgDevice, WgPeer, WireGuardSpec
from .links import get_link_msg, nl_error, to_link
from .procwatch import ProcessWatcher

DEFAULT_SOCKET_DIR = "/var/run/wireguard"
MODES = ("auto", "kernel", "userspace")
START_TIMEOUT = 10.0
STOP_TIMEOUT = 5.0
UAPI_TIMEOUT = 10.0
KICK_KEEPALIVE = 25  # seconds; on for one transaction only (see start_handshakes)
_WRAP = 'mkdir -p /var/run/wireguard && mount --bind "$1" /var/run/wireguard && exec "$2" -f "$3"'


@dataclass(frozen=True)
class WireGuardSettings:
    mode: str = "auto"  # auto | kernel | userspace
    socket_dir: str = DEFAULT_SOCKET_DIR
    binary: str = "wireguard-go"


# --- the UAPI socket ------------------------------------------------------------------------


def uapi_request(path: Path, text: str, *, timeout: float = UAPI_TIMEOUT) -> str:
    """Send one request, return the answer (up to and including the empty line)."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    s.settimeout(timeout)
    try:
        s.connect(str(path))
        s.sendall(text.encode())
        data = b""
        while not data.endswith(b"\n\n"):
            chunk = s.recv(1 << 16)
            if not chunk:
                break
            data += chunk
    except OSError as exc:
        raise DataplaneError(f"wireguard: UAPI socket {path}: {exc.strerror or exc}") from None
    finally:
        s.close()
    return data.decode(errors="replace")


def socket_peer_pid(path: Path) -> int | None:
    """The pid of the process listening on ``path`` (SO_PEERCRED), None if nobody answers."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    s.settimeout(2.0)
    try:
        s.connect(str(path))
        pid, _uid, _gid = struct.unpack("3i", s.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
        return pid
    except OSError:
        return None
    finally:
        s.close()


def _start_time(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return None if fields[0] in ("Z", "X") else int(fields[19])


def _same_netns(pid: int) -> bool:
    try:
        theirs, ours = os.stat(f"/proc/{pid}/ns/net"), os.stat("/proc/thread-self/ns/net")
    except OSError:
        return False
    return (theirs.st_dev, theirs.st_ino) == (ours.st_dev, ours.st_ino)


def link_mtu_up(ipr: IPRoute, name: str, mtu: int) -> list[str]:
    """Set the device's MTU and bring it up (the TUN starts down)."""
    msg = get_link_msg(ipr, name)
    if msg is None:
        raise DataplaneError(f"wireguard: device {name} vanished while being configured")
    link, changes = to_link(msg), []
    try:
        if link.mtu != mtu:
            ipr.link("set", index=link.index, mtu=mtu)
            changes.append(f"link {name} mtu {link.mtu} -> {mtu}")
        if not link.up:
            ipr.link("set", index=link.index, state="up")
            changes.append(f"link {name} up")
    except NetlinkError as exc:
        raise nl_error(f"link {name}", exc) from None
    return changes


# --- wireguard-go ------------------------------------------------------------------------------


class UserspaceWireGuard:
    """The WireGuard port over wireguard-go (a TUN device and a UAPI socket)."""

    implementation = "wireguard-go"

    def __init__(self, ipr: IPRoute, settings: WireGuardSettings, *, watcher: ProcessWatcher | None = None) -> None:
        self.ipr = ipr
        self.dir = Path(settings.socket_dir)
        self.binary = settings.binary
        self.watcher = watcher
        self._children: dict[str, subprocess.Popen[bytes]] = {}
        self._adopted: set[int] = set()

    def _path(self, name: str, suffix: str) -> Path:
        return self.dir / f"{name}.{suffix}"

    def serving_pid(self, name: str) -> int | None:
        """The wireguard-go serving ``name`` in this network namespace, if any."""
        child = self._children.get(name)
        if child is not None and child.poll() is not None:
            del self._children[name]  # reaped
        pid = socket_peer_pid(self._path(name, "sock"))
        if pid is None:
            return None
        if not _same_netns(pid):
            raise DataplaneError(
                f"wireguard: {self._path(name, 'sock')} is served by pid {pid} in another network namespace; "
                "give each node its own --wireguard-socket-dir"
            )
        return pid

    def _recorded(self, name: str) -> int | None:
        """The recorded pid if that very process (same start time) still runs."""
        try:
            rec = json.loads(self._path(name, "pid").read_text())
            pid, started = int(rec["pid"]), int(rec["start_time"])
        except (OSError, ValueError, KeyError, TypeError):
            return None
        return pid if _start_time(pid) == started else None

    def _record(self, name: str, pid: int) -> None:
        path = self._path(name, "pid")
        tmp = path.with_suffix(".pid.tmp")
        tmp.write_text(json.dumps({"pid": pid, "start_time": _start_time(pid), "binary": self.binary}) + "\n")
        os.replace(tmp, path)

    def ensure_device(self, spec: WireGuardSpec) -> list[str]:
        name, changes = spec.name, []
        pid = self.serving_pid(name)
        if pid is not None and get_link_msg(self.ipr, name) is None:
            changes.append(f"wireguard-go pid {pid} serves {name} but the device is gone: restarted")
            self._stop(name, pid)
            pid = None
        if pid is None:
            stale = self._recorded(name)
            if stale is not None:
                self._stop(name, stale)
                changes.append(f"wireguard-go pid {stale} did not answer on its UAPI socket: stopped")
            pid = self._start(name)
            changes.append(f"wireguard-go started for {name} (pid {pid}, socket {self._path(name, 'sock')})")
        elif pid not in self._adopted and name not in self._children:
            changes.append(f"wireguard-go pid {pid} adopted for {name}")
        self._adopted.add(pid)
        if self._recorded(name) != pid:
            self._record(name, pid)
        if self.watcher is not None:
            self.watcher.watch(pid)
        dev = self.get_device(name)
        if dev is None:
            raise DataplaneError(f"wireguard: wireguard-go for {name} exited while being configured: {_tail(self._path(name, 'log'))}")
        key = spec.key if dev.public_key != spec.key.public else None
        port = spec.listen_port if dev.listen_port != spec.listen_port else None
        if key is not None or port is not None:
            self._set(name, encode_set(private_key=key, listen_port=port), what=f"listen port {spec.listen_port}")
            if key is not None:
                changes.append(f"wireguard {name} private key set (public key {spec.key.public})")
            if port is not None:
                changes.append(f"wireguard {name} listen port {dev.listen_port} -> {spec.listen_port}")
        return changes + link_mtu_up(self.ipr, name, spec.mtu)

    def _set(self, name: str, text: str, *, what: str) -> None:
        try:
            check_errno(uapi_request(self._path(name, "sock"), text))
        except UapiError as exc:
            hint = f" ({what} in use?)" if exc.code == errno.EADDRINUSE else ""
            raise DataplaneError(f"wireguard {name}: {exc.message}{hint}") from None

    def get_device(self, name: str) -> WgDevice | None:
        pid = self.serving_pid(name)
        if pid is None:
            return None
        dev = decode_get(uapi_request(self._path(name, "sock"), GET), name=name)
        return WgDevice(dev.name, dev.public_key, dev.listen_port, dev.peers, implementation=self.implementation, pid=pid)

    def apply_peers(self, name: str, *, replace: Sequence[WgPeer] = (), remove: Sequence[str] = ()) -> None:
        if not replace and not remove:
            return
        if self.serving_pid(name) is None:
            raise DataplaneError(f"wireguard: device {name} is not running (no wireguard-go answers)")
        self._set(name, encode_set(peers=replace, remove=remove), what="peers")

    def start_handshakes(self, name: str, keys: Sequence[str]) -> None:
        """Switch persistent keepalive on (wireguard-go sends one keepalive at
        once, starting a handshake) and off again: no periodic keepalives."""
        if keys:
            self._set(name, encode_keepalive(keys, KICK_KEEPALIVE), what="keepalive")
            self._set(name, encode_keepalive(keys, 0), what="keepalive")

    def delete_device(self, name: str) -> bool:
        pid = self.serving_pid(name) or self._recorded(name)
        if pid is not None:
            self._stop(name, pid)
        self._path(name, "pid").unlink(missing_ok=True)
        return pid is not None

    # --- the process -------------------------------------------------------------------------

    def _argv(self, binary: str, name: str) -> list[str]:
        if os.path.realpath(self.dir) == os.path.realpath(DEFAULT_SOCKET_DIR):
            return [binary, "-f", name]
        unshare = shutil.which("unshare") or "unshare"
        return [unshare, "--mount", "--propagation", "private", "--", "sh", "-c", _WRAP, "sh", str(self.dir), binary, name]

    def _start(self, name: str) -> int:
        binary = shutil.which(self.binary)
        if binary is None:
            raise DataplaneError(
                f"wireguard: {self.binary} is not installed (Debian package wireguard-go) and the kernel "
                "has no WireGuard module"
            )
        if not os.path.exists("/dev/net/tun"):
            raise DataplaneError("wireguard: /dev/net/tun is missing (wireguard-go needs the tun module)")
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        log = self._path(name, "log")
        env = {k: v for k, v in os.environ.items() if not k.startswith("WG_")}
        with open(log, "ab") as out:
            proc = subprocess.Popen(
                self._argv(binary, name), stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                start_new_session=True, close_fds=True, env=env,
            )  # fmt: skip
        self._children[name] = proc
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            code = proc.poll()
            if code is not None:
                del self._children[name]
                raise DataplaneError(f"wireguard: wireguard-go for {name} exited with status {code}: {_tail(log)}")
            if socket_peer_pid(self._path(name, "sock")) == proc.pid and get_link_msg(self.ipr, name) is not None:
                return proc.pid
            if time.monotonic() > deadline:
                self._stop(name, proc.pid)
                raise DataplaneError(f"wireguard: wireguard-go for {name} did not open its UAPI socket within "
                                     f"{START_TIMEOUT:.0f}s: {_tail(log)}")  # fmt: skip
            time.sleep(0.02)

    def _stop(self, name: str, pid: int) -> None:
        """SIGTERM, then SIGKILL; reap it if it is our child."""
        started = _start_time(pid)
        for sig, wait in ((signal.SIGTERM, STOP_TIMEOUT), (signal.SIGKILL, 2.0)):
            if started is None or _start_time(pid) != started:
                break
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                break
            deadline = time.monotonic() + wait
            while time.monotonic() < deadline and _start_time(pid) == started:
                self._reap(name, pid)
                time.sleep(0.02)
        self._reap(name, pid)
        self._adopted.discard(pid)

    def _reap(self, name: str, pid: int) -> None:
        child = self._children.get(name)
        if child is not None and child.pid == pid and child.poll() is not None:
            del self._children[name]


def _tail(path: Path, lines: int = 5) -> str:
    try:
        text = path.read_text(errors="replace").strip()
    except OSError:
        return "(no log)"
    useful = [line for line in text.splitlines() if line.strip() and not set(line.strip()) <= set("│┌┐└┘─ ")]
    return " | ".join(useful[-lines:]) or "(empty log)"
