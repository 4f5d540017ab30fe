"""Processes the lab starts (agents, etcd), tracked by pid + start time + netns.

A daemon is started with ``ip netns exec NS CMD`` (which execs, so the pid we
record is the daemon's own), in a new session, output to a log file in the
lab directory. The record (``state.Proc``) holds its pid, its kernel start
time and the lab namespace it was started in.

Signals go only to what the lab recorded, and race-free: ``stop``/``kill``
open a pidfd for the pid first, then check through /proc that the process
behind it still has the recorded start time *and* lives in the recorded lab
namespace (same namespace inode as ``/var/run/netns/NS``), and only then
signal through the pidfd (pidfd_send_signal(2)): a pid recycled between the
check and the signal cannot be hit, because the pidfd pins the process that
was checked. A recorded pid that now belongs to another process (after a
reboot, with a lab dir on disk: small pids and start times come back) is in
no lab namespace and is left alone. ``kill_strays`` kills what runs inside a
lab namespace (a ``lab exec`` left running, an agent whose record was lost)
with the same check against that namespace. A record without a namespace
(a state file from before it was recorded) is never signalled: the strays
sweep of the lab's namespaces still stops that process.
"""

from __future__ import annotations

import functools
import json
import os
import signal
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ..errors import AgentUnavailable, DataplaneError
from .netns import NETNS_DIR, in_ns, lab_ns, netns_pids
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


def _netns_id(path: str) -> tuple[int, int] | None:
    """(device, inode) of a network namespace file (None if unreadable)."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def in_lab_netns(pid: int, ns: str) -> bool:
    """Whether process ``pid`` lives in lab namespace ``ns`` (its
    /proc/PID/ns/net is the namespace /var/run/netns/NS names)."""
    want = _netns_id(os.path.join(NETNS_DIR, lab_ns(ns))) if ns else None
    return want is not None and _netns_id(f"/proc/{pid}/ns/net") == want


def alive(proc: Proc | None) -> bool:
    """Running (not a zombie) and still the process we started (same start
    time and, when recorded, still in its lab namespace)."""
    if proc is None:
        return False
    st = start_time(proc.pid)
    if st != proc.start_time or _state(proc.pid) in (None, "Z", "X"):
        return False
    return not proc.netns or in_lab_netns(proc.pid, proc.netns)


def _ours(proc: Proc) -> bool:
    """The recorded process, checked as ``stop`` and ``kill`` need it: the
    start time matches and it is inside the lab namespace it was started in."""
    return bool(proc.netns) and start_time(proc.pid) == proc.start_time and in_lab_netns(proc.pid, proc.netns)


def _signal_checked(pid: int, sig: int, check: Callable[[], bool]) -> bool:
    """Send ``sig`` to ``pid`` only if ``check()`` holds for the process a
    pidfd pins (so a pid recycled after the check is never hit). False if
    the process is gone or fails the check."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return False
    try:
        if not check():
            return False
        signal.pidfd_send_signal(fd, sig)
        return True
    except ProcessLookupError:
        return False
    finally:
        os.close(fd)


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
    # `ip netns exec` enters the namespace, then execs: wait for the first,
    # so that ``alive`` (which checks the namespace) is true from here on
    wait_until(lambda: in_lab_netns(p.pid, ns) or p.poll() is not None, timeout=10, interval=0.005)
    if st is None or p.returncode is not None or not in_lab_netns(p.pid, ns):
        raise DataplaneError(f"{argv[0]} exited at once; see {log}")
    # Popen would reap it in its destructor bookkeeping only; keep it from
    # warning and let ``stop`` reap it when it is our child.
    p.returncode = 0
    return Proc(pid=p.pid, start_time=st, log=str(log), netns=ns)


def _reap(pid: int) -> None:
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


def stop(proc: Proc | None, *, timeout: float = 5.0) -> bool:
    """SIGTERM, then SIGKILL after ``timeout``. Returns True if it was running.
    A process that is gone, or that is not the recorded one any more (pid
    recycled, outside its lab namespace), counts as stopped and is not
    signalled."""
    if proc is None:
        return False
    was_alive = alive(proc)
    if not _signal_checked(proc.pid, signal.SIGTERM, lambda: _ours(proc)):
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
    """Send ``sig`` to our process (if it is still ours, as ``stop``
    checks) and reap it."""
    if proc is None or not _signal_checked(proc.pid, sig, lambda: _ours(proc)):
        return
    if sig == signal.SIGKILL:
        for _ in range(100):
            _reap(proc.pid)
            if not alive(proc):
                return
            time.sleep(0.02)


def kill_strays(ns: str) -> list[int]:
    """SIGKILL every process inside lab namespace ``ns`` (each checked to
    be in it through its pidfd, as ``stop`` checks); returns their pids."""
    killed = []
    for pid in netns_pids(ns):
        if _signal_checked(pid, signal.SIGKILL, functools.partial(in_lab_netns, pid, ns)):
            killed.append(pid)
    # SIGKILL is delivered asynchronously: wait (briefly) until each one is
    # gone or a zombie, so that "lab down" returns with nothing running.
    deadline = time.monotonic() + 2.0
    for pid in killed:
        while True:
            _reap(pid)
            if _state(pid) in (None, "Z", "X") or time.monotonic() > deadline:
                break
            time.sleep(0.01)
    return killed


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
