"""agent/heap.py: malloc_trim after a full reconcile (issue 14 item 6)."""

from __future__ import annotations

import pytest

from overlaycni.agent import heap


def rss_anon_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1])
    raise AssertionError("no RssAnon in /proc/self/status")


@pytest.mark.skipif(heap._TRIM is None, reason="this C library has no malloc_trim")
def test_free_pages_in_the_middle_of_the_heap_go_back():
    # 16 MiB of written 64 KiB chunks (malloc, under the mmap threshold), every other one freed: each
    # hole lies between two live chunks, so glibc's own top-of-heap trimming never returns it.
    page = bytes(range(256)) * 256
    chunks = [bytearray(page) for _ in range(512)]
    keep = chunks[1::2]
    del chunks
    before = rss_anon_kib()
    assert heap.release_free_memory() is True
    assert before - rss_anon_kib() >= 8 << 10  # at least half of the holes went back
    assert len(keep) == 256


def test_without_malloc_trim_it_does_nothing(monkeypatch):
    monkeypatch.setattr(heap, "_TRIM", None)
    assert heap.release_free_memory() is False


def test_a_failing_trim_is_not_fatal(monkeypatch):
    def boom(_pad: int) -> int:
        raise OSError("no")

    monkeypatch.setattr(heap, "_TRIM", boom)
    assert heap.release_free_memory() is False


ARENA_PROBE = """
import ctypes, ctypes.util, sys, threading
from overlaycni.agent import heap
if sys.argv[1] == "limit":
    assert heap.limit_arenas()
libc = ctypes.CDLL(ctypes.util.find_library("c"))
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
def churn():
    for _ in range(20000):
        libc.free(libc.malloc(256))  # ctypes releases the GIL: the threads meet in malloc
threads = [threading.Thread(target=churn) for _ in range(8)]
for t in threads:
    t.start()
for t in threads:
    t.join()
libc.malloc_stats()  # one "Arena N:" block per arena, on stderr
"""


def arenas(mode: str) -> int:
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", ARENA_PROBE, mode], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return sum(line.startswith("Arena ") for line in proc.stderr.splitlines())


@pytest.mark.skipif(heap._TRIM is None, reason="not glibc")
def test_limit_arenas_caps_the_threads_arenas():
    assert arenas("limit") <= heap.ARENAS
    assert arenas("none") > heap.ARENAS  # control: eight threads meeting in malloc make more without the limit


def test_limit_arenas_without_mallopt_does_nothing(monkeypatch):
    monkeypatch.setattr(heap.ctypes.util, "find_library", lambda _name: None)
    assert heap.limit_arenas() is False
