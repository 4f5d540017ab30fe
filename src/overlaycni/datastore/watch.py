"""One resumable watch: list, then watch from the listing's revision on.

Every reader that follows a key range (the agent's node watch, its policy
controller) runs this loop:

1. take the store's revision R, then call ``on_relist`` (the reader lists
   what it needs: everything up to R is in that listing, perhaps more);
2. watch the prefix from R + 1 and hand each event to ``on_event`` (events
   the listing already showed come again: handlers are idempotent);
3. ``WatchCompacted`` (the store no longer has R + 1): back to 1 at once;
   any other ``OverlayCNIError`` (connection lost, store down, a handler
   that failed): back to 1 after a backoff that doubles up to ``max_delay``
   and resets when events flow again;
4. return when ``stop`` is set: no handler is called after that (an event
   or a listing that arrives meanwhile is dropped), and the wait for the
   next event is the store's (``Store.watch`` checks ``stop`` at every
   poll: SQLite every ``POLL_INTERVAL``, etcd every ``WATCH_POLL``).

A caller that has just listed passes ``start_revision`` to skip the first
listing. Rejected: resuming after an error without re-listing (an error in
a handler, or a gap in the stream, would be lost until the next periodic
pass).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from ..errors import OverlayCNIError, WatchCompacted
from .base import Event, Store

log = logging.getLogger(__name__)


def watch_loop(
    store: Store,
    prefix: str,
    *,
    stop: threading.Event,
    on_event: Callable[[Event], None],
    on_relist: Callable[[], None],
    start_revision: int | None = None,
    on_error: Callable[[OverlayCNIError], None] | None = None,
    delay: float = 0.5,
    max_delay: float = 10.0,
) -> None:
    """Run until ``stop`` is set (see the module note)."""
    rev = start_revision
    wait = delay
    while not stop.is_set():
        try:
            if rev is None:
                rev = store.revision()
                if stop.is_set():
                    return
                on_relist()
            for ev in store.watch(prefix, start_revision=rev + 1, stop=stop):
                if stop.is_set():
                    return  # no handler runs after the stop (the reader is closing what it programs)
                rev = max(rev, ev.revision)
                wait = delay
                on_event(ev)
        except WatchCompacted as exc:
            log.info("watch of %s: %s; re-listing", prefix, exc.message)
            rev = None
        except OverlayCNIError as exc:
            if on_error is not None:
                on_error(exc)
            log.warning("watch of %s interrupted (%s); re-listing in %.1f s", prefix, exc, wait)
            rev = None
            if stop.wait(wait):
                return
            wait = min(wait * 2, max_delay)
