"""Give the C heap's free pages back to the kernel after a full reconcile; fewer malloc arenas.

Design note. A full reconcile of thousands of peers builds large transient
structures (the datastore's records, the desired state, netlink dumps of
every route, FDB entry and neighbour). CPython frees them, but glibc's
malloc keeps the freed pages of its heap and of every thread's arena
mapped, so the agent's RSS stays at the reconcile's high-water mark:
measured by ``bench/peers.py`` (issue 14 item 6), about 116 MiB at 5,000
peers and 250 pods, 102 MiB once the free pages are handed back.
``malloc_trim(3)`` (glibc 2.8+: every arena, free pages in the middle of a
heap too) does that; it is called outside the node's locks after the first
reconcile, once per periodic reconcile, and after a peer selection that
changed ``node.TRIM_AFTER_PEERS`` peers or more (a burst of joins programs
them one by one, each with its own transient copies). On a C library
without it (musl) this is a no-op. It cannot return CPython's own object
arenas (1 MiB each, given back only when empty): what keeps those low is
allocating fewer long-lived objects among transient ones (``node.keep_view``).

Malloc arenas. glibc gives each thread that meets a locked arena one of
its own, up to 8 per core, and each keeps the free space of its peak: the
agent has ~19 threads (CNI request pool, data plane worker, watches,
loops). Its threads run Python, which allocates under the GIL, so they
hardly ever contend for an arena; ``limit_arenas`` (``mallopt(M_ARENA_MAX,
2)``, what ``MALLOC_ARENA_MAX=2`` does) is called once at agent start,
before any thread. ``bench/peers.py`` (a lab agent with 250 pods and 5,000
peers, same run, 2 rounds): VmRSS between resyncs 87.9 / 93.4 MiB with /
without, VmHWM 101.7 / 107.9 (an earlier in-process agent with 2,000 peers and no
CNI traffic showed no difference, 45.8 / 45.6 MiB: the arenas come with
the request threads).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
from collections.abc import Callable

log = logging.getLogger(__name__)


def _load() -> Callable[[int], int] | None:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        fn = ctypes.CDLL(name).malloc_trim
    except (OSError, AttributeError):
        return None
    fn.argtypes, fn.restype = [ctypes.c_size_t], ctypes.c_int
    return fn


_TRIM = _load()
M_ARENA_MAX = -8  # mallopt(3) parameter (glibc malloc.h)
ARENAS = 2


def limit_arenas(count: int = ARENAS) -> bool:
    """At most ``count`` malloc arenas (see the module note); True if the C
    library took it. Call before starting threads."""
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        fn = ctypes.CDLL(name).mallopt
    except (OSError, AttributeError):
        return False
    fn.argtypes, fn.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    try:
        return bool(fn(M_ARENA_MAX, count) == 1)
    except OSError as exc:  # never fatal: it only saves memory
        log.debug("mallopt(M_ARENA_MAX) failed: %s", exc)
        return False


def release_free_memory() -> bool:
    """Return the C heap's free pages to the kernel; True if any was returned."""
    if _TRIM is None:
        return False
    try:
        return bool(_TRIM(0))
    except OSError as exc:  # never fatal: it only saves memory
        log.debug("malloc_trim failed: %s", exc)
        return False
