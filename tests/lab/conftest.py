"""Fixtures for lab tests: run the real CLI, give each lab a unique name and
its own lab dir, and always tear down."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

OC = str(Path(sys.executable).parent / "overlaycni")
_counter = iter(range(1000))


def unique_name(tag: str) -> str:
    return f"t{os.getpid() % 10000}{tag}{next(_counter)}"[:12]


@dataclass
class Lab:
    name: str
    root: Path

    @property
    def env(self) -> dict[str, str]:
        return {**os.environ, "OVERLAYCNI_LAB_DIR": str(self.root)}

    def oc(self, *args: str, check: bool = True, timeout: float = 240) -> subprocess.CompletedProcess[str]:
        """Run ``overlaycni lab ARGS --name <lab>``."""
        args_ = list(args)
        cut = args_.index("--") if "--" in args_ else len(args_)
        argv = [OC, "lab", *args_[:cut], "--name", self.name, *args_[cut:]]
        proc = subprocess.run(argv, capture_output=True, text=True, env=self.env, timeout=timeout)
        if check and proc.returncode != 0:
            raise AssertionError(f"{' '.join(argv)} exited {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}")
        return proc

    def json(self, *args: str, check: bool = True) -> Any:
        return json.loads(self.oc(*args, "--output", "json", check=check).stdout)

    def status(self) -> dict[str, Any]:
        return self.json("status")

    def ns(self, netns: str, *argv: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(["ip", "netns", "exec", netns, *argv], capture_output=True, text=True, timeout=timeout)
        if check and proc.returncode != 0:
            raise AssertionError(f"in {netns}: {' '.join(argv)} exited {proc.returncode}: {proc.stderr}")
        return proc

    def ip_j(self, netns: str, *args: str) -> Any:
        return json.loads(subprocess.run(["ip", "-n", netns, "-j", *args], capture_output=True, text=True, check=True).stdout or "[]")

    def pings(self, src_netns: str, dst_ip: str) -> bool:
        return self.ns(src_netns, "ping", "-n", "-q", "-c", "3", "-i", "0.2", "-W", "2", dst_ip, check=False).returncode == 0


def wait_for(check, timeout: float, interval: float = 0.25) -> bool:
    """Poll ``check`` until it holds or ``timeout`` seconds pass (then one last try)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(interval)
    return check()


def lab_namespaces(name: str) -> list[str]:
    try:
        return sorted(n for n in os.listdir("/var/run/netns") if n.startswith(f"ocl-{name}."))
    except FileNotFoundError:
        return []


def pid_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        return False


def _lab_maker(tmp_path_factory) -> Iterator[Any]:
    made: list[Lab] = []

    def _make(tag: str, *up_args: str) -> Lab:
        lab = Lab(unique_name(tag), tmp_path_factory.mktemp("labs"))
        made.append(lab)
        lab.oc("up", *up_args, timeout=600)
        return lab

    try:
        yield _make
    finally:
        for lab in made:
            subprocess.run([OC, "lab", "down", "--name", lab.name], env=lab.env, capture_output=True, timeout=120)


@pytest.fixture(scope="module")
def make_lab(tmp_path_factory) -> Iterator[Any]:
    """``make_lab(tag, *up_args)`` brings a lab up; every lab made is torn
    down at the end of the module, even on failure. For a lab the module's
    tests share (under xdist the module's users of it run on one worker:
    tests/conftest.py)."""
    yield from _lab_maker(tmp_path_factory)


@pytest.fixture
def new_lab(tmp_path_factory) -> Iterator[Any]:
    """``new_lab(tag, *up_args)``: like ``make_lab``, for a lab that only
    this test uses; torn down at the end of the test, even on failure (so
    such tests run on any xdist worker and hold no lab while others run)."""
    yield from _lab_maker(tmp_path_factory)
