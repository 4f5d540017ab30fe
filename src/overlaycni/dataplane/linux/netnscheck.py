"""Is CNI_NETNS a network namespace a pod may be given? (checked before any kernel work)

Design note. CNI_NETNS is a path chosen by whoever talks to the agent's
socket. Opened naively (``open(path, O_RDONLY)``) a FIFO blocks the opener
until a writer appears, and a device file runs its driver's ``open`` (a
watchdog device arms itself); handed to ``setns`` the node's own namespace
would turn the node itself into the "pod". So the path is resolved once and
every check runs on the descriptor of the step before, never on the path
again (no time-of-check/time-of-use gap):

1. ``open(path, O_PATH | O_CLOEXEC)``: resolves the path (symlinks and
   ``/proc/<pid>/ns/net`` magic links included) without opening the file
   itself: no driver ``open``, no FIFO wait, no read (open(2), O_PATH).
2. ``fstat``: an nsfs inode is a regular file; a FIFO, device, directory or
   socket is refused here, named by its type.
3. ``fstatfs``: the file system is nsfs (``NSFS_MAGIC`` 0x6e736673,
   statfs(2)), so a regular file elsewhere is refused.
4. ``open("/proc/self/fd/N", O_RDONLY | O_NONBLOCK | O_CLOEXEC)``: the same
   inode as a real open file (``setns`` and ``ioctl`` refuse O_PATH
   descriptors); its (st_dev, st_ino) must equal step 2's.
5. ``ioctl(NS_GET_NSTYPE)`` must answer ``CLONE_NEWNET`` (ioctl_ns(2)): a
   uts, mount or pid namespace file is refused, named by its kind.
6. The namespace (st_dev, st_ino) must not be one of ``forbidden``: the
   agent's own namespace, the node namespace its data plane works in and
   the host's initial namespace (``/proc/1/ns/net``), as the agent sees
   them when it starts (``namespace_identity``).

The caller keeps the returned descriptor open and hands it to the data
plane, which enters the namespace with ``setns(fd)``: the namespace that was
checked is the one that is configured, even if the path is replaced
meanwhile. Errors: a path that does not exist is ``NetnsNotFound`` (CNI code
3, the container is unknown); any other refusal is ``NetnsRefused`` (CNI
code 4, "invalid environment variable"), naming CNI_NETNS, the path and
the problem. Cost: four system calls and one open, ~20 us.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import stat
from collections.abc import Mapping

from ...errors import NetnsNotFound, NetnsRefused, PermissionDenied

NSFS_MAGIC = 0x6E736673
NS_GET_NSTYPE = 0xB703  # _IO(0xb7, 0x3), ioctl_ns(2)
CLONE_NEWNET = 0x40000000
NS_KINDS = {
    0x00020000: "mount",
    0x02000000: "cgroup",
    0x04000000: "uts",
    0x08000000: "ipc",
    0x10000000: "user",
    0x20000000: "pid",
    0x00000080: "time",
}
Identity = tuple[int, int]  # (st_dev, st_ino) of a namespace

_libc = ctypes.CDLL(None, use_errno=True)


def _fstatfs_type(fd: int) -> int:
    """``f_type`` of ``fstatfs(fd)``: the first member of struct statfs (a long)."""
    buf = ctypes.create_string_buffer(256)  # larger than struct statfs on every Linux ABI
    if _libc.fstatfs(fd, buf) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return ctypes.c_long.from_buffer(buf).value


def _kind(mode: int) -> str:
    for test, name in (
        (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
        (stat.S_ISDIR, "a directory"), (stat.S_ISSOCK, "a socket"), (stat.S_ISLNK, "a symbolic link"),
    ):
        if test(mode):
            return name
    return "not a regular file"


def namespace_identity(path: str) -> Identity | None:
    """(st_dev, st_ino) of the namespace at ``path`` (``/proc/self/ns/net``,
    ``/proc/1/ns/net``): a stat, nothing else. None if it cannot be read."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def open_pod_netns(path: str, *, forbidden: Mapping[Identity, str]) -> int:
    """Open ``path`` as a pod's network namespace: a validated ``O_RDONLY``
    descriptor the caller must close. ``forbidden`` maps namespaces that are
    never a pod's to the words that say why ("the agent's own network
    namespace")."""
    def refuse(problem: str) -> NetnsRefused:
        return NetnsRefused(f"CNI_NETNS {path}: {problem}")

    if not path.startswith("/"):
        raise refuse("is not an absolute path")
    try:
        opath = os.open(path, os.O_PATH | os.O_CLOEXEC)
    except FileNotFoundError:
        raise NetnsNotFound(f"CNI_NETNS {path}: the network namespace does not exist") from None
    except PermissionError:
        raise PermissionDenied(f"CNI_NETNS {path}: cannot open it (needs root)") from None
    except OSError as exc:
        raise refuse(f"cannot be resolved ({exc.strerror})") from None
    try:
        st = os.fstat(opath)
        if not stat.S_ISREG(st.st_mode):
            raise refuse(f"is {_kind(st.st_mode)}, not a network namespace")
        if _fstatfs_type(opath) != NSFS_MAGIC:
            raise refuse("is a regular file, not a network namespace (not on nsfs)")
        fd = os.open(f"/proc/self/fd/{opath}", os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)
    except OSError as exc:
        raise refuse(f"cannot be opened ({exc.strerror})") from None
    finally:
        os.close(opath)
    try:
        again = os.fstat(fd)
        if (again.st_dev, again.st_ino) != (st.st_dev, st.st_ino):
            raise refuse("changed while it was being opened")
        try:
            nstype = fcntl.ioctl(fd, NS_GET_NSTYPE)
        except OSError as exc:
            if exc.errno in (errno.ENOTTY, errno.EINVAL):
                raise refuse("is not a namespace file") from None
            raise refuse(f"cannot tell its namespace type ({exc.strerror})") from None
        if nstype != CLONE_NEWNET:
            raise refuse(f"is a {NS_KINDS.get(nstype, hex(nstype))} namespace, not a network namespace")
        why = forbidden.get((st.st_dev, st.st_ino))
        if why is not None:
            raise refuse(f"is {why}; a pod never gets it")
    except BaseException:
        os.close(fd)
        raise
    return fd

