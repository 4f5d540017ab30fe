"""The one place that enters network namespaces.

Design note. A ``LinuxDataplane`` owns one worker thread. For a named node
namespace the thread calls ``setns(2)`` once when it starts (``setns`` with
CLONE_NEWNET moves only the calling thread), so every netlink socket,
libnftables context and ``/proc/sys/net`` file it opens belongs to the node
namespace, and no fork is needed (pyroute2's own ``netns=`` argument forks a
helper per socket, ~7 ms). For ``netns=None`` the thread stays where the
process is (the agent is started inside the node namespace). All kernel work
of one data plane runs on that thread, which also serialises the kernel
calls of a multithreaded agent without locks in the adapters.

A pod's namespace is entered only for the few calls that configure the pod
side: ``pod_netns()`` switches the worker thread, yields, and switches back
(even on error). The agent hands it a descriptor it has already validated
(``netnscheck.open_pod_netns``, in the request's own thread), so no path
chosen by a caller is ever opened on the worker: a FIFO or a device cannot
stall it. Rejected: a long-lived thread per pod namespace (one thread per
pod), and ``ip netns exec`` (a fork per call).

Deadlines: ``call`` waits at most what is left of the caller's request
deadline (``overlaycni.deadline``) and then raises ``DeadlineExceeded``;
the work itself stays queued and runs in order (a thread cannot be
interrupted, and cancelling would make "did it run?" a guess). Because the
queue is first in, first out, a rollback the caller queues next always runs
after it.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import queue
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from typing import TypeVar

from ... import deadline, trace
from ...errors import DataplaneError, DeadlineExceeded, NetnsNotFound, PermissionDenied
from .netnscheck import Identity, namespace_identity, open_pod_netns

CLONE_NEWNET = 0x40000000
NETNS_RUN_DIR = "/var/run/netns"
T = TypeVar("T")

_libc = ctypes.CDLL(None, use_errno=True)
log = logging.getLogger(__name__)


def netns_path(netns: str) -> str:
    """A netns name (``oct-x``) or path (``/proc/1/ns/net``) as a path."""
    return netns if "/" in netns else os.path.join(NETNS_RUN_DIR, netns)


def open_netns(netns: str, *, field: str = "netns_path") -> int:
    path = netns_path(netns)
    try:
        return os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise NetnsNotFound(f"{field}: network namespace {path} does not exist") from None
    except PermissionError:
        raise PermissionDenied(f"{field}: cannot open {path} (needs root)") from None


def _setns(fd: int, what: str) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        if err == errno.EPERM:
            raise PermissionDenied(f"setns into {what}: needs CAP_SYS_ADMIN")
        if err == errno.EINVAL:
            raise NetnsNotFound(f"netns_path: {what} is not a network namespace")
        raise DataplaneError(f"setns into {what} failed: {os.strerror(err)}")


def forbidden_namespaces() -> dict[Identity, str]:
    """The namespaces a pod never gets, as the calling thread sees them: its
    own (the node's, for the worker), the process's and the host's initial one."""
    out: dict[Identity, str] = {}
    for path, why in (  # the last of equal namespaces names it
        ("/proc/thread-self/ns/net", "the node's network namespace, where the agent programs the node"),
        ("/proc/self/ns/net", "the agent's own network namespace (the node itself)"),
        ("/proc/1/ns/net", "the host's initial network namespace"),
    ):
        ident = namespace_identity(path)
        if ident is not None:
            out[ident] = why
    return out


@contextmanager
def pod_netns(path: str, *, fd: int | None = None, forbidden: dict[Identity, str] | None = None) -> Iterator[int]:
    """Run the body with the calling thread inside a pod's namespace: ``fd``
    (already validated, stays open) or else ``path``, validated here.

    Yields the namespace's fd (valid for the body only)."""
    target = fd if fd is not None else open_pod_netns(path, forbidden=forbidden or forbidden_namespaces())
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        _setns(target, path)
        try:
            yield target
        finally:
            _setns(home, "the node namespace")
    finally:
        os.close(home)
        if fd is None:
            os.close(target)


class NetnsWorker:
    """A thread inside one network namespace that runs submitted calls in order."""

    def __init__(self, netns: str | None) -> None:
        self.netns = netns
        self._closed = False
        self._jobs: queue.SimpleQueue[tuple[Callable[[], object], Future] | None] = queue.SimpleQueue()
        started: Future = Future()
        self._thread = threading.Thread(target=self._run, args=(started,), name=f"ocni-dp-{netns or 'self'}", daemon=True)
        self._thread.start()
        started.result()  # re-raises NetnsNotFound / PermissionDenied

    def _run(self, started: Future) -> None:
        try:
            if self.netns is not None:
                fd = open_netns(self.netns, field="netns")
                try:
                    _setns(fd, netns_path(self.netns))
                finally:
                    os.close(fd)
                log.debug("data plane worker entered %s", netns_path(self.netns))
        except BaseException as exc:  # noqa: BLE001 - handed to the constructor
            started.set_exception(exc)
            return
        started.set_result(None)
        while (job := self._jobs.get()) is not None:
            fn, fut = job
            if not fut.set_running_or_notify_cancel():
                continue
            try:
                fut.set_result(fn())
            except BaseException as exc:  # noqa: BLE001 - re-raised in the caller
                fut.set_exception(exc)

    def call(self, fn: Callable[[], T]) -> T:
        if threading.current_thread() is self._thread:
            return fn()
        if self._closed:
            raise DataplaneError("the data plane is closed")
        fut: Future = Future()
        into = trace.current()  # the kernel steps time themselves into the caller's trace
        self._jobs.put(((lambda: trace.run_under(into, fn)) if into is not None else fn, fut))
        try:
            return fut.result(deadline.remaining())
        except TimeoutError:
            if fut.done():  # finished just now (or fn itself raised TimeoutError)
                return fut.result()
            raise DeadlineExceeded(
                f"data plane of {self.netns or 'this namespace'}: kernel work did not finish before the request's "
                "deadline (the worker is busy); it stays queued and runs in order"
            ) from None

    def close(self) -> None:
        self._closed = True
        if self._thread.is_alive():
            self._jobs.put(None)
            self._thread.join(timeout=10)
