"""The lab state file: one JSON document in the lab directory.

It records exactly what a lab made (namespaces, processes by pid and start
time, pods) so that ``lab down`` undoes exactly that. Writes are atomic
(temp file + rename) and serialised by a lock file, so concurrent ``pod add``
commands do not lose each other's records.

Pods are named as in Kubernetes: a name is unique within its namespace, not
within the lab (``x/a`` and ``y/a`` coexist). Commands take ``NAMESPACE/NAME``
or, when only one pod has that name, the bare ``NAME`` (``LabState.pod``);
output names a pod the same way (``LabState.ref``: the bare name unless
another namespace has a pod of that name). State files written before pods
were keyed by namespace (version 1, no ``version`` key) are not read: take
such a lab down with ``lab down`` (which finds it by its namespaces).
A dual-stack lab's IPv6 side (``ip_v6``/``block_v6`` of nodes, ``ip_v6``
of pods, ``external_ip_v6``) adds optional keys to version 2: a file
without them is a single-stack lab, and ``lab status`` shows them as null.

The lab directory is private and marked. ``lab up`` makes it (0700) and
writes ``.overlaycni-lab`` into it; every later read or write goes through
``open_lab_dir``, which refuses a directory that is a symbolic link, is not
ours, is writable by others or carries no marker for this lab: ``lab
down`` deletes nothing else, whatever ``--name``/``--lab-dir`` point at.
The state and lock files are 0600 and opened relative to that checked
directory without following symbolic links (``O_NOFOLLOW``).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import shutil
import stat
import threading
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, replace
from ipaddress import IPv4Address, IPv4Interface, IPv4Network, IPv6Address, IPv6Interface, IPv6Network
from pathlib import Path
from typing import Any

from ..errors import NotFound, OverlayCNIError, UsageError

STATE_FILE = "lab.json"
MARKER_FILE = ".overlaycni-lab"  # written by `lab up` into the directory it made: the only kind `lab down` deletes
LOCK_FILE = ".lock"
STATE_VERSION = 2  # 2: pods keyed by (namespace, name), netns ocl-<lab>.pod.<ns>.<name>
DEFAULT_ROOTS = ("/run/overlaycni/labs", "/var/lib/overlaycni/labs")
ENV_LAB_DIR = "OVERLAYCNI_LAB_DIR"


@dataclass(frozen=True)
class Proc:
    """A process the lab started: pid plus its kernel start time and the lab
    namespace it runs in, so a recycled pid is never mistaken for ours
    (``procs`` signals only a process that matches all three)."""

    pid: int
    start_time: int
    log: str = ""
    netns: str = ""


@dataclass(frozen=True)
class LabNode:
    """A node VM of the lab (not the data plane's ``NodeState``)."""

    name: str
    index: int
    netns: str
    ip: IPv4Interface
    block: IPv4Network | None = None
    agent: Proc | None = None
    socket: str = ""
    conf_dir: str = ""
    ip_v6: IPv6Interface | None = None  # dual-stack: the node's IPv6 address on the VNet
    block_v6: IPv6Network | None = None  # dual-stack: its IPv6 block (from the agent's ready line)


@dataclass(frozen=True)
class LabPod:
    name: str
    namespace: str
    node: str
    netns: str
    container_id: str
    ip: IPv4Interface | None = None
    labels: tuple[tuple[str, str], ...] = ()
    ports: tuple[str, ...] = ()  # named container ports, NAME=PORT/PROTO
    ip_v6: IPv6Interface | None = None  # dual-stack: the pod's IPv6 address (from the CNI result)

    def address(self, version: int) -> IPv4Address | IPv6Address | None:
        """The pod's address of IP version 4 or 6 (None: it has none)."""
        iface = self.ip if version == 4 else self.ip_v6
        return iface.ip if iface is not None else None

    @property
    def key(self) -> str:
        """``NAMESPACE/NAME``: unique in the lab."""
        return f"{self.namespace}/{self.name}"


@dataclass(frozen=True)
class LabState:
    name: str
    lab_dir: str
    backend: str
    store: str
    datastore: str
    network: dict[str, Any]  # ClusterNetwork.to_dict(), round-trips via parse_network
    vnet_netns: str
    external_netns: str
    external_ip: IPv4Interface
    control_netns: str | None = None
    control_ip: IPv4Interface | None = None
    etcd: Proc | None = None
    lease_ttl: int = 6
    nodes: tuple[LabNode, ...] = ()
    pods: tuple[LabPod, ...] = ()
    namespaces: tuple[str, ...] = field(default_factory=tuple)  # every netns made, in order
    external_ip_v6: IPv6Interface | None = None  # dual-stack: the external host's IPv6 address on the VNet

    @property
    def dual_stack(self) -> bool:
        return self.external_ip_v6 is not None

    @property
    def versions(self) -> tuple[int, ...]:
        """The lab's IP versions, IPv4 first: (4,) or (4, 6)."""
        return (4, 6) if self.dual_stack else (4,)

    def external_address(self, version: int) -> IPv4Address | IPv6Address | None:
        iface = self.external_ip if version == 4 else self.external_ip_v6
        return iface.ip if iface is not None else None

    def pod_cidr(self, version: int) -> IPv4Network | IPv6Network | None:
        """The pod CIDR of IP version 4 or 6 (None: the lab has no such family)."""
        if version == 4:
            return IPv4Network(self.network["pod-cidr"])
        cidrs = self.network.get("pod-cidrs") or []
        return IPv6Network(cidrs[1]) if self.dual_stack and len(cidrs) > 1 else None

    # --- lookups -----------------------------------------------------------
    def node(self, name: str) -> LabNode:
        for n in self.nodes:
            if n.name == name:
                return n
        raise NotFound(f"lab {self.name}: no node {name!r} (nodes: {', '.join(n.name for n in self.nodes) or 'none'})")

    def find_pod(self, ref: str, *, field: str = "POD") -> LabPod | None:
        """The pod ``NAMESPACE/NAME`` or, if exactly one pod has it, ``NAME``
        (None if there is none). An ambiguous bare name is a ``UsageError``
        naming ``field`` and listing the candidates."""
        namespace, sep, name = ref.rpartition("/")
        found = [p for p in self.pods if p.name == name and (not sep or p.namespace == namespace)]
        if len(found) > 1:
            raise UsageError(
                f"pod {ref!r} is ambiguous in lab {self.name}: {', '.join(sorted(p.key for p in found))}; give NAMESPACE/NAME",
                field=field,
            )
        return found[0] if found else None

    def pod(self, ref: str, *, field: str = "POD") -> LabPod:
        """``find_pod``, with ``NotFound`` naming the lab's pods."""
        found = self.find_pod(ref, field=field)
        if found is None:
            raise NotFound(f"{field}: lab {self.name} has no pod {ref!r} (pods: {', '.join(self.refs().values()) or 'none'})")
        return found

    def ref(self, pod: LabPod) -> str:
        """How output names ``pod``: its bare name unless another pod of the
        lab has that name too, then ``NAMESPACE/NAME``."""
        same = sum(1 for p in self.pods if p.name == pod.name)
        return pod.name if same <= 1 else pod.key

    def refs(self) -> dict[str, str]:
        """``ref`` of every pod, by key (for loops over many pods)."""
        count = Counter(p.name for p in self.pods)
        return {p.key: p.name if count[p.name] <= 1 else p.key for p in self.pods}

    def pods_on(self, node: str) -> tuple[LabPod, ...]:
        return tuple(p for p in self.pods if p.node == node)

    # --- updates (return new states) ------------------------------------------
    def with_node(self, node: LabNode) -> LabState:
        nodes = [n for n in self.nodes if n.name != node.name] + [node]
        return replace(self, nodes=tuple(sorted(nodes, key=lambda n: n.index)))

    def without_node(self, name: str) -> LabState:
        return replace(self, nodes=tuple(n for n in self.nodes if n.name != name))

    def with_pod(self, pod: LabPod) -> LabState:
        pods = [p for p in self.pods if p.key != pod.key] + [pod]
        return replace(self, pods=tuple(pods))

    def without_pod(self, pod: LabPod) -> LabState:
        return replace(self, pods=tuple(p for p in self.pods if p.key != pod.key))

    def with_namespace(self, ns: str) -> LabState:
        if ns in self.namespaces:
            return self
        return replace(self, namespaces=self.namespaces + (ns,))

    def without_namespace(self, ns: str) -> LabState:
        return replace(self, namespaces=tuple(n for n in self.namespaces if n != ns))

    # --- the public JSON of ``lab status`` --------------------------------------
    def status_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "backend": self.backend,
            "store": self.store,
            "datastore": self.datastore,
            "pod_cidr": self.network.get("pod-cidr"),
            "lab_dir": self.lab_dir,
            "nodes": [
                {
                    "name": n.name,
                    "netns": n.netns,
                    "ip": str(n.ip.ip),
                    "block": str(n.block) if n.block else None,
                    "ipv6": str(n.ip_v6.ip) if n.ip_v6 else None,
                    "block_v6": str(n.block_v6) if n.block_v6 else None,
                    "agent_pid": n.agent.pid if n.agent else None,
                }
                for n in self.nodes
            ],
            "pods": [
                {
                    "name": p.name,
                    "namespace": p.namespace,
                    "node": p.node,
                    "netns": p.netns,
                    "ip": str(p.ip.ip) if p.ip else None,
                    "ipv6": str(p.ip_v6.ip) if p.ip_v6 else None,
                    "labels": dict(p.labels),
                    "ports": list(p.ports),
                }
                for p in self.pods
            ],
            "external": {
                "netns": self.external_netns,
                "ip": str(self.external_ip.ip),
                "ipv6": str(self.external_ip_v6.ip) if self.external_ip_v6 else None,
            },
        }


# --- (de)serialisation --------------------------------------------------------------


def _enc(v: Any) -> Any:
    if isinstance(v, (IPv4Address, IPv4Interface, IPv4Network, IPv6Address, IPv6Interface, IPv6Network)):
        return str(v)
    if isinstance(v, dict):
        return {k: _enc(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_enc(x) for x in v]
    return v


def to_json(state: LabState) -> str:
    return json.dumps({"version": STATE_VERSION, **_enc(asdict(state))}, indent=2)


class StateVersionError(ValueError):
    """A state file of another format version (an older overlaycni wrote it)."""

    def __init__(self, version: Any) -> None:
        super().__init__(f"state file version {version}; this overlaycni reads version {STATE_VERSION}")
        self.version = version


def _proc(d: dict[str, Any] | None) -> Proc | None:
    return Proc(**d) if d else None


def from_json(text: str) -> LabState:
    d = json.loads(text)
    if d.get("version") != STATE_VERSION:
        raise StateVersionError(d.get("version", 1))
    nodes = tuple(
        LabNode(
            name=n["name"],
            index=n["index"],
            netns=n["netns"],
            ip=IPv4Interface(n["ip"]),
            block=IPv4Network(n["block"]) if n.get("block") else None,
            agent=_proc(n.get("agent")),
            socket=n.get("socket", ""),
            conf_dir=n.get("conf_dir", ""),
            ip_v6=IPv6Interface(n["ip_v6"]) if n.get("ip_v6") else None,
            block_v6=IPv6Network(n["block_v6"]) if n.get("block_v6") else None,
        )
        for n in d.get("nodes", [])
    )
    pods = tuple(
        LabPod(
            name=p["name"],
            namespace=p["namespace"],
            node=p["node"],
            netns=p["netns"],
            container_id=p["container_id"],
            ip=IPv4Interface(p["ip"]) if p.get("ip") else None,
            labels=tuple(tuple(x) for x in p.get("labels", [])),
            ports=tuple(p.get("ports", [])),
            ip_v6=IPv6Interface(p["ip_v6"]) if p.get("ip_v6") else None,
        )
        for p in d.get("pods", [])
    )
    return LabState(
        name=d["name"],
        lab_dir=d["lab_dir"],
        backend=d["backend"],
        store=d["store"],
        datastore=d["datastore"],
        network=d["network"],
        vnet_netns=d["vnet_netns"],
        external_netns=d["external_netns"],
        external_ip=IPv4Interface(d["external_ip"]),
        control_netns=d.get("control_netns"),
        control_ip=IPv4Interface(d["control_ip"]) if d.get("control_ip") else None,
        etcd=_proc(d.get("etcd")),
        lease_ttl=d.get("lease_ttl", 6),
        nodes=nodes,
        pods=pods,
        namespaces=tuple(d.get("namespaces", [])),
        external_ip_v6=IPv6Interface(d["external_ip_v6"]) if d.get("external_ip_v6") else None,
    )


# --- where labs live ----------------------------------------------------------------------


def labs_root(override: str | None = None) -> Path:
    """The directory holding one sub-directory per lab: ``--lab-dir``, else
    ``$OVERLAYCNI_LAB_DIR``, else /run/overlaycni/labs (tmpfs: a reboot
    forgets labs, as it forgets their namespaces)."""
    chosen = override or os.environ.get(ENV_LAB_DIR)
    if chosen:
        return Path(chosen)
    run = Path(DEFAULT_ROOTS[0])
    if run.parent.parent.is_dir():
        return run
    return Path(DEFAULT_ROOTS[1])


def lab_dir(name: str, root: str | None = None) -> Path:
    return labs_root(root) / name


# --- the lab directory: made by ``lab up``, marked, private ---------------------------


def _refusal(path: Path, problem: str) -> UsageError:
    return UsageError(f"{path} {problem}; nothing there was read, changed or deleted", field="--lab-dir")


def _check_dir(path: Path) -> os.stat_result:
    """``lstat`` of a lab directory that is a real directory (not a
    symbolic link), ours, and writable by nobody else."""
    info = os.lstat(path)  # FileNotFoundError: the caller decides
    if stat.S_ISLNK(info.st_mode):
        raise _refusal(path, "is a symbolic link; a lab directory is never followed through one")
    if not stat.S_ISDIR(info.st_mode):
        raise _refusal(path, "is not a directory, so it is not a lab")
    if info.st_uid != os.geteuid():
        raise _refusal(path, f"is owned by uid {info.st_uid}, not by us (uid {os.geteuid()}), so it is not our lab")
    if info.st_mode & 0o022:
        raise _refusal(path, f"is writable by group or others (mode {stat.S_IMODE(info.st_mode):04o}); a lab directory is 0700")
    return info


def _read_marker(dir_fd: int) -> str | None:
    """The lab name in the marker file (None: no marker, or not ours)."""
    try:
        fd = os.open(MARKER_FILE, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
    except OSError:
        return None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_uid != os.geteuid():
            return None
        data = json.loads(os.read(fd, 4096) or b"{}")
    except ValueError:
        return None
    finally:
        os.close(fd)
    lab = data.get("lab") if isinstance(data, dict) else None
    return lab if isinstance(lab, str) else None


@contextlib.contextmanager
def open_lab_dir(path: Path) -> Iterator[int]:
    """A file descriptor of lab directory ``path`` for ``dir_fd`` calls,
    after checking that it is a lab: a real directory (``O_NOFOLLOW``), ours,
    not writable by others, holding the marker that ``lab up`` wrote into it
    naming this lab. Raises ``UsageError`` naming the problem;
    ``FileNotFoundError`` when there is no such directory."""
    info = _check_dir(path)
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        now = os.fstat(fd)
        if (now.st_dev, now.st_ino) != (info.st_dev, info.st_ino):
            raise _refusal(path, "changed while it was being checked")
        if _read_marker(fd) != path.name:
            raise _refusal(
                path,
                f"is not an overlaycni lab directory: it has no {MARKER_FILE} marker naming lab {path.name!r} "
                "(`lab up` writes one into each directory it makes)",
            )
        yield fd
    finally:
        os.close(fd)


def is_lab_dir(path: Path) -> bool:
    try:
        with open_lab_dir(path):
            return True
    except (OSError, UsageError):
        return False


def create_lab_dir(name: str, root: str | None = None) -> Path:
    """Make the lab's directory (0700) and write its marker. The directory
    must not exist: ``FileExistsError`` otherwise (the caller says whether
    it is a lab or something else). The labs root is made 0700 if missing;
    an existing one must not be writable by others unless sticky (as /tmp
    is), or anyone could swap a lab directory for their own."""
    base = labs_root(root)
    base.mkdir(mode=0o700, parents=True, exist_ok=True)
    info = os.stat(base)
    if info.st_mode & 0o002 and not info.st_mode & stat.S_ISVTX:
        raise UsageError(f"{base} is writable by everyone and not sticky; choose another --lab-dir", field="--lab-dir")
    d = base / name
    os.mkdir(d, 0o700)
    dfd = os.open(d, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        fd = os.open(MARKER_FILE, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=dfd)
        with os.fdopen(fd, "w") as fh:
            fh.write(json.dumps({"lab": name, "made_by": "overlaycni lab up"}) + "\n")
    finally:
        os.close(dfd)
    return d


def remove_lab_dir(path: Path) -> bool:
    """Delete lab directory ``path`` with everything in it, only after
    ``open_lab_dir``'s checks (``UsageError`` otherwise); False if there
    is none. ``rmtree`` works through directory descriptors, never
    following a symbolic link inside."""
    try:
        with open_lab_dir(path):
            pass
    except FileNotFoundError:
        return False
    parent = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        shutil.rmtree(path.name, dir_fd=parent)
    finally:
        os.close(parent)
    return True


def load(name: str, root: str | None = None) -> LabState:
    d = lab_dir(name, root)
    path = d / STATE_FILE
    try:
        with open_lab_dir(d) as dfd:
            fd = os.open(STATE_FILE, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dfd)
            with os.fdopen(fd) as fh:
                text = fh.read()
        return from_json(text)
    except FileNotFoundError:
        raise NotFound(f"no lab named {name!r} (looked in {path.parent}); start one with: overlaycni lab up --name {name}") from None
    except StateVersionError as exc:
        raise OverlayCNIError(
            f"lab {name}: the state file {path} was written by another overlaycni version ({exc}); "
            f"take the lab down with `overlaycni lab down --name {name}` and bring it up again"
        ) from None
    except (ValueError, KeyError, TypeError, OSError) as exc:
        raise OverlayCNIError(f"lab {name}: the state file {path} is damaged ({exc}); `overlaycni lab down --name {name}` still cleans up") from None


def try_load(name: str, root: str | None = None) -> LabState | None:
    try:
        return load(name, root)
    except OverlayCNIError:
        return None


def save(state: LabState) -> None:
    """Write the state file atomically (a 0600 temporary file, renamed),
    inside the checked lab directory, following no symbolic link."""
    with open_lab_dir(Path(state.lab_dir)) as dfd:
        tmp = f"{STATE_FILE}.{os.getpid()}.{threading.get_ident()}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=dfd)
        try:
            with os.fdopen(fd, "w") as fh:
                fh.write(to_json(state))
            os.replace(tmp, STATE_FILE, src_dir_fd=dfd, dst_dir_fd=dfd)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp, dir_fd=dfd)
            raise


@contextlib.contextmanager
def locked(lab_path: Path) -> Iterator[None]:
    """Serialise state updates of one lab across processes (an ``flock`` on
    the lab's 0600 lock file, in the checked lab directory)."""
    with open_lab_dir(lab_path) as dfd:
        try:
            fd = os.open(LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=dfd)
        except OSError as exc:
            problem = "is a symbolic link" if exc.errno == errno.ELOOP else f"cannot be opened: {exc.strerror}"
            raise _refusal(lab_path, f"holds a lock file {LOCK_FILE} that {problem}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # drops the lock


def list_labs(root: str | None = None) -> list[str]:
    base = labs_root(root)
    if not base.is_dir():
        return []
    return sorted(p.name for p in base.iterdir() if (p / STATE_FILE).is_file() and is_lab_dir(p))
