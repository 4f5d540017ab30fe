"""The lab's namespace plumbing, with plain ``ip`` commands (kernel edge).

Design note. Per lab: one VNet namespace holding bridge ``br0``; per VM
(node, external host, control plane) one veth pair, created *inside the VNet
namespace* with its peer end placed straight into the VM's namespace
(``ip -n VNET link add u-node1 type veth peer name eth0 netns NODE``), so no
link ever exists in the root namespace, not even for a moment. Addresses,
routes and sysctls are set with ``ip -n NS`` / ``ip netns exec NS`` only.
Every function takes the namespace explicitly and refuses an empty one: the
root namespace is never a target. Deleting a VM namespace deletes its veth
pair (the kernel removes both ends).

Dual-stack, a VM also gets its IPv6 address on ``eth0``, ``nodad``: the
VNet is the lab's own bridge, nothing else can hold the address, and
duplicate address detection would only delay the first packet by a second
or more (RFC 4862 section 5.4). Router advertisements are not accepted
(``accept_ra=0``): the lab's VNet has no router, and a VM's addresses and
routes are exactly what the lab configured.

Rejected: pyroute2 here. The lab's own plumbing is a handful of links per
node; ``ip`` is what a reader would type by hand, and the commands double as
documentation in the tour.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Sequence
from ipaddress import IPv4Interface, IPv6Interface

from ..errors import DataplaneError, PermissionDenied
from .topology import BRIDGE, NETNS_PREFIX, UNDERLAY_IF

NETNS_DIR = "/var/run/netns"
CAP_NET_ADMIN = 12
CAP_SYS_ADMIN = 21


def require_privileges() -> None:
    """Fail clearly without CAP_NET_ADMIN + CAP_SYS_ADMIN (setns), which
    root normally has (but not always: a container may drop them)."""
    caps = 0
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("CapEff:"):
                    caps = int(line.split()[1], 16)
    except OSError:
        pass
    if not (caps >> CAP_NET_ADMIN) & 1 or not (caps >> CAP_SYS_ADMIN) & 1:
        raise PermissionDenied(
            "the lab creates network namespaces and needs root (or CAP_NET_ADMIN and CAP_SYS_ADMIN)",
            details="run it as root, e.g. sudo overlaycni lab up",
        )


def run(argv: Sequence[str], *, check: bool = True, timeout: float = 60, input: str | None = None) -> subprocess.CompletedProcess[str]:
    """Run a command; map a failure to ``DataplaneError`` once, here."""
    try:
        proc = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout, input=input)
    except FileNotFoundError:
        raise DataplaneError(f"{argv[0]} is not installed (see deploy/debian-packages.txt)") from None
    except subprocess.TimeoutExpired:
        raise DataplaneError(f"{' '.join(argv)} did not finish within {timeout:.0f}s") from None
    if check and proc.returncode != 0:
        raise DataplaneError(f"{' '.join(argv)} failed: {proc.stderr.strip() or proc.stdout.strip()}")
    return proc


def lab_ns(ns: str) -> str:
    """``ns`` if it is a lab namespace; anything else (the root namespace
    above all) is refused with ``DataplaneError``."""
    if not ns or not ns.startswith(NETNS_PREFIX):
        raise DataplaneError(f"refusing to touch namespace {ns!r}: not a lab namespace")
    return ns


def in_ns(ns: str, argv: Sequence[str]) -> list[str]:
    """The argv that runs ``argv`` inside lab namespace ``ns``."""
    return ["ip", "netns", "exec", lab_ns(ns), *argv]


def ns_run(ns: str, argv: Sequence[str], *, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return run(in_ns(ns, argv), check=check, timeout=timeout)


def ip(ns: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return run(["ip", "-n", lab_ns(ns), *args], check=check)


def ip_batch(ns: str, commands: Sequence[str]) -> None:
    if commands:
        run(["ip", "-n", lab_ns(ns), "-batch", "-"], input="\n".join(commands) + "\n")


def list_netns(prefix: str = NETNS_PREFIX) -> list[str]:
    try:
        names = os.listdir(NETNS_DIR)
    except FileNotFoundError:
        return []
    return sorted(n for n in names if n.startswith(prefix))


def netns_exists(ns: str) -> bool:
    return os.path.exists(os.path.join(NETNS_DIR, ns))


def ensure_netns(ns: str) -> None:
    """Create the namespace (with loopback up); reuse it if it exists."""
    if not netns_exists(lab_ns(ns)):
        run(["ip", "netns", "add", ns])
    ip(ns, "link", "set", "lo", "up")


def delete_netns(ns: str) -> None:
    """Delete the namespace; already gone counts as success."""
    if netns_exists(lab_ns(ns)):
        proc = run(["ip", "netns", "del", ns], check=False)
        if proc.returncode != 0 and netns_exists(ns):
            raise DataplaneError(f"ip netns del {ns} failed: {proc.stderr.strip()}")


def netns_pids(ns: str) -> list[int]:
    if not netns_exists(lab_ns(ns)):
        return []
    proc = run(["ip", "netns", "pids", ns], check=False)
    return [int(x) for x in proc.stdout.split() if x.isdigit()]


def sysctl(ns: str, key: str, value: str) -> None:
    ns_run(ns, ["sysctl", "-q", "-w", f"{key}={value}"])


def setup_vnet(ns: str) -> None:
    """The VNet: a namespace with one bridge, up."""
    ensure_netns(ns)
    if ip(ns, "link", "show", BRIDGE, check=False).returncode != 0:
        ip(ns, "link", "add", BRIDGE, "type", "bridge")
    ip(ns, "link", "set", BRIDGE, "up")


def setup_vm(
    vnet_ns: str, vm_ns: str, *, port: str, address: IPv4Interface, forwarding: bool, address_v6: IPv6Interface | None = None
) -> None:
    """A VM on the VNet: its namespace, a veth pair (``port`` on the bridge,
    ``eth0`` in the VM) and the VM's address (and IPv6 address, when
    dual-stack). Idempotent."""
    ensure_netns(vm_ns)
    if address_v6 is not None:  # before eth0 exists: the new link inherits "default"
        sysctl(vm_ns, "net.ipv6.conf.default.accept_ra", "0")
        sysctl(vm_ns, "net.ipv6.conf.all.accept_ra", "0")
    if ip(vm_ns, "link", "show", UNDERLAY_IF, check=False).returncode != 0:
        ip(vnet_ns, "link", "del", port, check=False)  # a half-made pair from an earlier try
        ip(vnet_ns, "link", "add", port, "type", "veth", "peer", "name", UNDERLAY_IF, "netns", vm_ns)
    ip_batch(vnet_ns, [f"link set {port} master {BRIDGE}", f"link set {port} up"])
    v6 = [f"addr replace {address_v6} dev {UNDERLAY_IF} nodad"] if address_v6 is not None else []
    ip_batch(vm_ns, [f"addr replace {address} dev {UNDERLAY_IF}", *v6, f"link set {UNDERLAY_IF} up"])
    if forwarding:
        sysctl(vm_ns, "net.ipv4.ip_forward", "1")
