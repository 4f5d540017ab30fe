"""Hold CPython's cyclic garbage collector while a whole table is built.

Design note. A full render (``render.render_node``) or a full build of the
incremental state (``incremental.NodePolicy``) allocates hundreds of
thousands of small containers (the ``nft -j`` document's dicts and lists,
tuples of addresses) and keeps most of them: they are the result. Each 700
net allocations start a young collection, and once the survivors pass a
quarter of the long-lived heap CPython (3.11, ``Modules/gcmodule.c``) runs
a full collection, which walks every tracked object of the process: the
inventory, the document built so far, and in the agent everything else.
The number of full collections per render grows with the size of the
render and each walks a larger heap, so the render's cost was quadratic:
``bench/policy.py`` measured CPU time per render, with the collector on
and held, of 82 / 67 ms at 1,000 pods and 250 policies, 191 / 131 ms at
2,000 / 500, 421 / 264 ms at 4,000 / 1,000, 1,176 / 505 ms at 8,000 /
2,000 (the held figures double with the size, the others do not).

The builders create no reference cycles (their results are trees of dicts,
lists, strings and frozen dataclasses), so nothing they make needs the
collector; what other threads make meanwhile is collected at the next
collection once it runs again (reference counting frees everything
acyclic at once, held or not). Holding it is counted, so two threads
rendering at once keep it held until both are done, and a collector that
was off before stays off. Rejected: ``gc.freeze()`` of the inventory
before a render (876 ms at 8,000 pods: the document itself is what the
full collections walk) and larger thresholds (process wide, for every
other thread, for a cost that is only the render's).
"""

from __future__ import annotations

import gc
import threading
from collections.abc import Iterator
from contextlib import contextmanager

_lock = threading.Lock()
_holders = 0
_was_enabled = False


@contextmanager
def collector_held() -> Iterator[None]:
    """No cyclic garbage collection inside the block (reference counting
    still frees everything acyclic); the collector's earlier state after the
    last of the nested or concurrent blocks ends."""
    global _holders, _was_enabled
    with _lock:
        if _holders == 0:
            _was_enabled = gc.isenabled()
            gc.disable()
        _holders += 1
    try:
        yield
    finally:
        with _lock:
            _holders -= 1
            if _holders == 0 and _was_enabled:
                gc.enable()
