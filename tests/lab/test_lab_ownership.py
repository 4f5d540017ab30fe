"""`lab up` and `lab down` touch only the lab's own directory (issue 10
item 10): a directory of the lab's name that is not a lab (user data, no
marker), a symbolic link or a directory of another owner is refused with a
clear error and nothing in it is deleted; the state and lock files are 0600
in a 0700 directory. Each refusal has its control: a real (marked) lab
directory is used or removed.

These make no lab: `lab down` of a lab with no namespaces and `lab up`
refused before its first namespace. They need root only for `lab down`'s
privilege check; the lab module (test_lab_faults.py) does the same against
a running lab.
"""

from __future__ import annotations

import os
import stat
import subprocess
from dataclasses import replace
from ipaddress import IPv4Interface
from pathlib import Path

import pytest

from overlaycni.errors import UsageError
from overlaycni.lab import state as st

from .conftest import OC, lab_namespaces

pytestmark = pytest.mark.kernel


def _lab(root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OVERLAYCNI_LAB_DIR": str(root), "COLUMNS": "1000"}
    return subprocess.run([OC, "lab", *args], env=env, capture_output=True, text=True, timeout=120)


def _user_data(d: Path) -> dict[str, str]:
    d.mkdir(parents=True)
    (d / "thesis.tex").write_text("years of work")
    (d / "sub").mkdir()
    (d / "sub" / "data.csv").write_text("1,2,3")
    return {str(p.relative_to(d)): p.read_text() for p in d.rglob("*") if p.is_file()}


def _files(d: Path) -> dict[str, str]:
    return {str(p.relative_to(d)): p.read_text() for p in d.rglob("*") if p.is_file()}


def _state(root: Path, name: str) -> st.LabState:
    return st.LabState(
        name=name, lab_dir=str(root / name), backend="vxlan", store="sqlite", datastore="sqlite:///x",
        network={}, vnet_netns=f"ocl-{name}.vnet", external_netns=f"ocl-{name}.ext",
        external_ip=IPv4Interface("10.224.255.253/16"),
    )  # fmt: skip


def _mode(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def test_down_against_a_directory_that_is_not_a_lab_deletes_nothing(tmp_path):
    before = _user_data(tmp_path / "victim")
    proc = _lab(tmp_path, "down", "--name", "victim", "--lab-dir", str(tmp_path))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "not an overlaycni lab directory" in proc.stderr and ".overlaycni-lab" in proc.stderr
    assert "nothing there was read, changed or deleted" in proc.stderr
    assert _files(tmp_path / "victim") == before
    # control: a real lab directory of the same shape is removed
    d = st.create_lab_dir("real", str(tmp_path))
    (d / "agent.log").write_text("x")
    proc = _lab(tmp_path, "down", "--name", "real", "--lab-dir", str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    assert f"removed {d}" in proc.stdout and not d.exists()


def test_up_over_an_existing_directory_that_is_not_a_lab_is_an_error(tmp_path):
    name = f"hu{os.getpid() % 10000}"
    before = _user_data(tmp_path / name)
    proc = _lab(tmp_path, "up", "--name", name, "--nodes", "1", "--pods-per-node", "0")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "not an overlaycni lab directory" in proc.stderr
    assert _files(tmp_path / name) == before and lab_namespaces(name) == []
    # control: test_lab_faults.py brings its lab up over a lab's own leftovers
    # (a marked directory without state file): that `up` succeeds


def test_a_symlinked_lab_dir_is_refused(tmp_path):
    real = st.create_lab_dir("real", str(tmp_path / "elsewhere"))
    st.save(_state(tmp_path / "elsewhere", "real"))
    (tmp_path / "labs").mkdir()
    link = tmp_path / "labs" / "real"
    link.symlink_to(real)
    proc = _lab(tmp_path / "labs", "down", "--name", "real")
    assert proc.returncode == 2 and "is a symbolic link" in proc.stderr
    assert sorted(os.listdir(real)) == sorted([st.MARKER_FILE, st.STATE_FILE]) and link.is_symlink()
    with pytest.raises(UsageError, match="is a symbolic link"):
        st.load("real", str(tmp_path / "labs"))
    proc = _lab(tmp_path / "labs", "status", "--name", "real")
    assert proc.returncode == 2 and "is a symbolic link" in proc.stderr
    # control: through its real path the same lab loads
    assert st.load("real", str(tmp_path / "elsewhere")).name == "real"


def test_a_lab_dir_of_another_owner_or_writable_by_others_is_refused(tmp_path):
    d = st.create_lab_dir("t", str(tmp_path))
    st.save(_state(tmp_path, "t"))
    assert st.load("t", str(tmp_path)).name == "t"  # control
    os.chmod(d, 0o777)
    with pytest.raises(UsageError, match="writable by group or others"):
        st.load("t", str(tmp_path))
    os.chmod(d, 0o700)
    os.chown(d, 65534, -1)
    try:
        with pytest.raises(UsageError, match="owned by uid 65534"):
            st.load("t", str(tmp_path))
        proc = _lab(tmp_path, "down", "--name", "t")
        assert proc.returncode == 2 and "owned by uid 65534" in proc.stderr and (d / st.STATE_FILE).exists()
    finally:
        os.chown(d, os.geteuid(), -1)


def test_marker_must_name_this_lab(tmp_path):
    a = st.create_lab_dir("a", str(tmp_path))
    os.rename(a, tmp_path / "b")  # a lab directory under another lab's name is not that lab
    with pytest.raises(UsageError, match="no .overlaycni-lab marker naming lab 'b'"):
        st.load("b", str(tmp_path))
    assert not st.is_lab_dir(tmp_path / "b") and st.list_labs(str(tmp_path)) == []


def test_state_and_lock_files_are_private_and_never_followed(tmp_path):
    d = st.create_lab_dir("t", str(tmp_path))
    s = _state(tmp_path, "t")
    st.save(s)
    with st.locked(d):
        pass
    assert _mode(d) == 0o700
    assert {n: _mode(d / n) for n in os.listdir(d)} == {st.MARKER_FILE: 0o600, st.STATE_FILE: 0o600, st.LOCK_FILE: 0o600}
    # a symbolic link planted as the state file or the lock file is not followed
    target = tmp_path / "target"
    target.write_text("precious")
    (d / st.STATE_FILE).unlink()
    (d / st.STATE_FILE).symlink_to(target)
    assert st.try_load("t", str(tmp_path)) is None
    st.save(replace(s, lease_ttl=9))  # replaces the link itself (rename), never writes through it
    assert target.read_text() == "precious" and not (d / st.STATE_FILE).is_symlink()
    assert st.load("t", str(tmp_path)).lease_ttl == 9
    (d / st.LOCK_FILE).unlink()
    (d / st.LOCK_FILE).symlink_to(target)
    with pytest.raises(UsageError, match="lock file .lock that is a symbolic link"), st.locked(d):
        pass
    assert target.read_text() == "precious"


def test_a_world_writable_labs_root_without_sticky_bit_is_refused(tmp_path):
    root = tmp_path / "open"
    root.mkdir()
    os.chmod(root, 0o777)
    with pytest.raises(UsageError, match="writable by everyone and not sticky"):
        st.create_lab_dir("t", str(root))
    assert os.listdir(root) == []
    os.chmod(root, 0o1777)  # control: sticky, like /tmp
    assert st.is_lab_dir(st.create_lab_dir("t", str(root)))


# --- processes: pid + start time + lab namespace ------------------------------------------------


@pytest.fixture
def lab_netns():
    ns = f"ocl-hp{os.getpid() % 10000}.n1"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        yield ns
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=False)


def test_a_recorded_pid_that_is_another_process_is_not_signalled(lab_netns, tmp_path):
    from overlaycni.lab import procs

    # an unrelated process outside the lab, recorded with its true pid and
    # start time (what a reboot can make of a state file on disk)
    other = subprocess.Popen(["sleep", "300"])
    try:
        start = procs.start_time(other.pid)
        assert start is not None
        rec = st.Proc(pid=other.pid, start_time=start, netns=lab_netns)
        assert not procs.alive(rec)
        assert procs.stop(rec, timeout=1) is False
        procs.kill(rec)
        assert other.poll() is None  # still running: never signalled
        # a record without a namespace (older state files) is never signalled either
        assert procs.stop(st.Proc(pid=other.pid, start_time=start), timeout=1) is False and other.poll() is None
    finally:
        other.kill()
        other.wait()
    # control: the lab's own process, started in its namespace, is stopped
    ours = procs.spawn(lab_netns, ["sleep", "300"], log=tmp_path / "sleep.log")
    assert ours.netns == lab_netns and procs.alive(ours)
    assert procs.stop(ours, timeout=5) is True and not procs.alive(ours)
    # and a stray in a lab namespace is killed by the sweep, nothing else
    stray = procs.spawn(lab_netns, ["sleep", "300"], log=tmp_path / "sleep.log")
    outside = subprocess.Popen(["sleep", "300"])
    try:
        assert procs.kill_strays(lab_netns) == [stray.pid]
        assert outside.poll() is None
    finally:
        outside.kill()
        outside.wait()
