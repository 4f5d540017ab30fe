"""Processes the lab starts (agents, etcd), tracked by pid + start time.

A daemon is started with ``ip netns exec NS CMD`` (which execs, so the pid we
record is the daemon's own), in a new session, output to a log file in the
lab directory. ``stop`` signals only a process whose kernel start time still
matches the record, so a recycled pid is never killed by mistake.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ..errors import AgentUnavailable, DataplaneError
from .netns import in_ns
from .state import Proc


def start_time(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (None if gone)."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            data = fh.read()
    except OSError:
        return None
    fields = data.rsplit(")", 1)[1].split()
    return int(fields[19])


def _state(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return None


def alive(proc: Proc | None) -> bool:
    """Running (not a zombie) and still the process we started."""
    if proc is None:
        return False
    st = start_time(proc.pid)
    return st == proc.start_time and _state(proc.pid) not in (None, "Z", "X")


def spawn(ns: str, argv: Sequence[str], *, log: Path, out: Path | None = None) -> Proc:
    """Start ``argv`` inside lab namespace ``ns`` as a detached daemon.
    stderr goes to ``log``; stdout to ``out`` (or ``log``)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as err_fh, open(out or log, "ab") as out_fh:
        p = subprocess.Popen(
            in_ns(ns, argv),
            stdin=subprocess.DEVNULL,
            stdout=out_fh,
            stderr=err_fh,
            start_new_session=True,
            close_fds=True,
        )
    st = start_time(p.pid)
    if st is None:
        raise DataplaneError(f"{argv[0]} exited at once; see {log}")
    # Popen would reap it in its destructor bookkeeping only; keep it from
    # warning and let ``stop`` reap it when it is our child.
    p.returncode = 0
    return Proc(pid=p.pid, start_time=st, log=str(log))


def _reap(pid: int) -> None:
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


def stop(proc: Proc | None, *, timeout: float = 5.0) -> bool:
    """SIGTERM, then SIGKILL after ``timeout``. Returns True if it was running.
    A process that is gone (or whose pid was recycled) counts as stopped."""
    if proc is None or start_time(proc.pid) != proc.start_time:
        return False
    was_alive = alive(proc)
    try:
        os.kill(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        return False
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        _reap(proc.pid)
        if not alive(proc):
            return was_alive
        time.sleep(0.05)
    kill(proc)
    return was_alive


def kill(proc: Proc | None, sig: int = signal.SIGKILL) -> None:
    """Send ``sig`` to our process (if it is still ours) and reap it."""
    if proc is None or start_time(proc.pid) != proc.start_time:
        return
    try:
        os.kill(proc.pid, sig)
    except ProcessLookupError:
        return
    if sig == signal.SIGKILL:
        for _ in range(100):
            _reap(proc.pid)
            if not alive(proc):
                return
            time.sleep(0.02)


def kill_pid(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return
    _reap(pid)


def wait_for_json_event(
    path: Path, event: str, *, proc: Proc, timeout: float, log: Path | None = None
) -> dict[str, Any]:
    """Wait until ``path`` holds a JSON line with ``"event": event`` (the
    agent's ready line). Fails early if the process dies."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            text = path.read_text()
        except FileNotFoundError:
            text = ""
        for line in text.splitlines():
            line = line.strip()
            if line.startswith("{"):
                try:
                    data = json.loads(line)
                except ValueError:
                    continue
                if isinstance(data, dict) and data.get("event") == event:
                    return data
        if not alive(proc):
            _reap(proc.pid)
            raise AgentUnavailable(f"process {proc.pid} exited before it was {event}", details=tail(log or path))
        if time.monotonic() > deadline:
            raise AgentUnavailable(f"process {proc.pid} was not {event} within {timeout:.0f}s", details=tail(log or path))
        time.sleep(0.05)


def wait_until(check: Callable[[], bool], *, timeout: float, interval: float = 0.1) -> bool:
    deadline = time.monotonic() + timeout
    while True:
        if check():
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(interval)


def tail(path: Path, lines: int = 15) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])
