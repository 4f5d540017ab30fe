"""Stop benchmark (root; every packet stays inside namespaces made here).

How long the node agent takes from SIGTERM to exit, and where that time
goes, for this tree's code (the candidate) against a baseline ref's code
(``--base-ref``, default ``main``: ``git archive <ref> src`` unpacked into a
temporary directory) measured in the same run, alternating which goes first
in each round so that load drift hits both.

Per combination of ``--store`` (sqlite, etcd: etcd runs in a control-plane
namespace on the underlay) and ``--backend`` (vxlan, wireguard: wireguard-go
when the kernel has no module), one node namespace (``zz-stop-<hex>-n1``)
runs an agent with flow logs on (the default); after ``--settle`` seconds
(every loop is then in its steady wait: the repair thread in a netlink
``select``, the watch in its long poll on the store) it gets SIGTERM and
the script times its exit. ``--load`` adds two busy-loop processes (no
network) for the whole run: the 2-core machine then has more runnable
threads than cores, as under CI.

Per phase: the agent runs under this script's probe (``python stop.py
--probe -- <agent args>``), which wraps, without changing them, the steps
of ``Agent.shutdown`` and every ``Thread.join`` and prints one JSON line on
stderr with CLOCK_MONOTONIC stamps (the same clock as this script's):
signal -> handler, handler -> ``shutdown`` starts, each step's seconds,
``shutdown`` returns -> the interpreter is done (non-daemon threads joined,
or ``os._exit``), and -> the process is reaped (the interpreter's teardown,
unless the agent skips it). Both trees run under the same probe.

Printed: per combination, the median SIGTERM -> exit of each tree with
min-max, the ratio candidate / baseline (below 1: faster), the load average,
and the median of each phase for both trees.

Usage: .venv/bin/python bench/stop.py [--runs 3] [--store sqlite,etcd]
       [--backend vxlan,wireguard] [--load] [--base-ref main]
"""

from __future__ import annotations

import argparse
import atexit
import faulthandler
import functools
import importlib
import json
import os
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
PROBE_TAG = "STOP-PROBE "

# ----- the probe (runs inside the agent's process) ----------------------------------------------

_marks: dict[str, Any] = {"steps": [], "joins": []}


def _wrap(module: str, path: str, label: str) -> None:
    """Time every call of ``module.path`` (``Class.method``) as step ``label``; absent: skipped."""
    try:
        owner: Any = importlib.import_module(module)
    except ImportError:
        return
    *outer, name = path.split(".")
    for part in outer:
        owner = getattr(owner, part, None)
        if owner is None:
            return
    fn = getattr(owner, name, None)
    if fn is None:
        return

    @functools.wraps(fn)
    def timed(*args: Any, **kw: Any) -> Any:
        t0 = time.monotonic()
        try:
            return fn(*args, **kw)
        finally:
            if _marks.get("shutdown_start") is not None:
                _marks["steps"].append((label, t0, time.monotonic()))

    setattr(owner, name, timed)


def _probe(argv: list[str]) -> int:
    faulthandler.register(signal.SIGUSR1, all_threads=True)  # the bench's watchdog asks for every stack first
    real_join = threading.Thread.join

    def join(self: threading.Thread, timeout: float | None = None) -> None:
        t0 = time.monotonic()
        real_join(self, timeout)
        if _marks.get("shutdown_start") is not None and _marks.get("shutdown_end") is None:
            _marks["joins"].append((self.name, t0, time.monotonic(), self.is_alive()))

    threading.Thread.join = join  # type: ignore[method-assign]
    real_signal = signal.signal

    def install(sig: int, handler: Any) -> Any:
        if sig == signal.SIGTERM and callable(handler):
            inner = handler

            def handler(*a: Any) -> Any:  # noqa: F811 - the wrapped handler
                _marks.setdefault("handler", time.monotonic())
                return inner(*a)

        return real_signal(sig, handler)

    signal.signal = install  # type: ignore[assignment]
    from overlaycni.agent import daemon

    real_shutdown = daemon.Agent.shutdown

    def shutdown(self: Any) -> None:
        _marks.setdefault("shutdown_start", time.monotonic())
        try:
            real_shutdown(self)
        finally:
            _marks["shutdown_end"] = time.monotonic()

    daemon.Agent.shutdown = shutdown  # type: ignore[method-assign]
    for module, path, label in (
        ("overlaycni.agent.server", "CNISocketServer.shutdown", "cni socket"),
        ("overlaycni.agent.batch", "Batcher.close", "batcher"),
        ("socketserver", "BaseServer.shutdown", "http"),
        ("overlaycni.agent.metrics", "AgentHTTPServer.shutdown", "http"),
        ("overlaycni.dataplane.linux.monitor", "KernelMonitor.close", "kernel events"),
        ("overlaycni.datastore.sqlite", "SQLiteStore.revoke_lease", "lease revoke"),
        ("overlaycni.datastore.etcd", "EtcdStore.revoke_lease", "lease revoke"),
        ("overlaycni.dataplane.linux", "LinuxDataplane.close", "dataplane close"),
        ("overlaycni.datastore.sqlite", "SQLiteStore.close", "store close"),
        ("overlaycni.datastore.etcd", "EtcdStore.close", "store close"),
    ):
        _wrap(module, path, label)

    def report() -> None:  # atexit (after non-daemon threads are joined), or the agent's own os._exit
        if "exit" in _marks:
            return
        _marks["exit"] = time.monotonic()
        _marks["alive"] = sorted(t.name for t in threading.enumerate() if t is not threading.main_thread())
        sys.stderr.write(PROBE_TAG + json.dumps(_marks) + "\n")
        sys.stderr.flush()

    atexit.register(report)
    real_exit = os._exit

    def _exit(code: int) -> None:
        report()
        real_exit(code)

    os._exit = _exit  # type: ignore[assignment]
    from overlaycni.cli.main import main as cli_main

    sys.argv = ["overlaycni", *argv]
    return int(cli_main() or 0)


# ----- the bench (runs as root, drives the agents) ----------------------------------------------


def phases(probe: dict[str, Any], signalled: float, reaped: float) -> dict[str, float]:
    """Seconds per phase from a probe report (``signalled``/``reaped``: this script's stamps)."""
    out: dict[str, float] = {}
    start, end = probe.get("shutdown_start"), probe.get("shutdown_end")
    if probe.get("handler") is not None:
        out["signal -> handler"] = probe["handler"] - signalled
        if start is not None:
            out["handler -> shutdown"] = start - probe["handler"]
    for label, t0, t1 in probe["steps"]:
        out[label] = out.get(label, 0.0) + (t1 - t0)
    joins = [j for j in probe["joins"] if j[0] not in ("cni-batch", "cni-socket")]  # those are in their steps
    if joins:
        out["thread joins"] = max(j[2] for j in joins) - min(j[1] for j in joins)
    if start is not None and end is not None:
        out["shutdown total"] = end - start
        out["shutdown -> interpreter done"] = probe["exit"] - end
    out["interpreter done -> reaped"] = reaped - probe["exit"]
    return out


def _run(*cmd: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(list(cmd), capture_output=True, text=True, check=check, timeout=60)


class Bench:
    def __init__(self, args: argparse.Namespace, base_src: Path) -> None:
        self.args = args
        self.base_src = base_src
        self.work = Path(tempfile.mkdtemp(prefix="ocni-bench-stop-"))
        self.prefix = "zz-stop-" + secrets.token_hex(2)
        self.namespaces: list[str] = []
        self.procs: list[subprocess.Popen] = []

    # namespaces (all named zz-stop-*; nothing in the root namespace)
    def netns(self, role: str, ip: str | None = None, *, vnet: str = "") -> str:
        ns = f"{self.prefix}-{role}"
        _run("ip", "netns", "add", ns)
        self.namespaces.append(ns)
        _run("ip", "-n", ns, "link", "set", "lo", "up")
        if ip is not None:
            port = f"p{len(self.namespaces)}"
            _run("ip", "-n", vnet, "link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", ns)
            _run("ip", "-n", vnet, "link", "set", port, "master", "br0", "up")
            _run("ip", "-n", ns, "link", "set", "eth0", "up")
            _run("ip", "-n", ns, "addr", "add", ip, "dev", "eth0")
        return ns

    def cleanup(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
                p.wait(10)
        for ns in reversed(self.namespaces):  # wireguard-go outlives its agent by design: stop it here
            pids = _run("ip", "netns", "pids", ns, check=False).stdout.split()
            for pid in pids:
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except ProcessLookupError:
                    pass
            _run("ip", "netns", "del", ns, check=False)
        shutil.rmtree(self.work, ignore_errors=True)

    def cli(self, store: str, ctl: str | None, *args: str) -> None:
        cmd = [str(Path(sys.executable).with_name("overlaycni")), "--datastore", store, *args]
        if ctl is not None:
            cmd = ["ip", "netns", "exec", ctl, *cmd]
        _run(*cmd)

    def combination(self, store_kind: str, backend: str) -> dict[str, Any]:
        tag = f"{store_kind[0]}{backend[0]}"
        vnet = self.netns(f"{tag}vnet")
        _run("ip", "-n", vnet, "link", "add", "br0", "type", "bridge")
        _run("ip", "-n", vnet, "link", "set", "br0", "up")
        ctl = None
        d = self.work / tag
        d.mkdir()
        if store_kind == "etcd":
            ctl = self.netns(f"{tag}ctl", "10.224.0.250/16", vnet=vnet)
            store = "etcd://10.224.0.250:2379"
            log = open(d / "etcd.log", "w")  # noqa: SIM115 - etcd keeps its own copy
            u = "http://10.224.0.250"
            self.procs.append(subprocess.Popen(
                ["ip", "netns", "exec", ctl, "etcd", "--name", "ctl", "--data-dir", str(d / "etcd"),
                 "--listen-client-urls", f"{u}:2379", "--advertise-client-urls", f"{u}:2379",
                 "--listen-peer-urls", f"{u}:2380", "--initial-advertise-peer-urls", f"{u}:2380",
                 "--initial-cluster", f"ctl={u}:2380"], stdout=log, stderr=log))  # fmt: skip
            for _ in range(150):
                try:
                    self.cli(store, ctl, "cluster", "list")
                    break
                except subprocess.CalledProcessError:
                    time.sleep(0.2)
        else:
            store = f"sqlite://{d}/state.db"
        self.cli(store, ctl, "cluster", "create", "--name", "t", "--network-plugin", "azure", "--network-plugin-mode",
                 "overlay", "--pod-cidr", "10.244.0.0/16", "--service-cidr", "10.0.0.0/16", "--dns-service-ip",
                 "10.0.0.10", "--backend", backend)  # fmt: skip
        node = self.netns(f"{tag}n1", "10.224.0.4/16", vnet=vnet)
        trees = {"base": self.base_src, "cand": ROOT / "src"}
        runs: dict[str, list[dict[str, float]]] = {"base": [], "cand": []}
        loads = []
        for r in range(self.args.runs):
            order = ["base", "cand"] if r % 2 == 0 else ["cand", "base"]
            for which in order:
                total, ph = self.one(which, trees[which], node, store, d)
                runs[which].append({"SIGTERM -> exit": total, **ph})
                loads.append(os.getloadavg()[0])
        return {"combination": f"{store_kind}+{backend}", "runs": runs, "load": statistics.median(loads)}

    def one(self, which: str, src: Path, node: str, store: str, d: Path) -> tuple[float, dict[str, float]]:
        env = {**os.environ, "PYTHONPATH": str(src), "OVERLAYCNI_LOG_LEVEL": "INFO"}
        err_path = d / f"{which}.log"
        argv = [sys.executable, str(Path(__file__).resolve()), "--probe", "--", "--datastore", store, "agent",
                "--cluster", "t", "--node", "n1", "--node-ip", "10.224.0.4", "--socket", str(d / "a.sock"),
                "--metrics-addr", "127.0.0.1:0", "--lease-ttl", "6", "--resync-interval", "5",
                "--wireguard-key", str(d / "wg.key"), "--wireguard-socket-dir", str(d)]  # fmt: skip
        with open(err_path, "w") as err:
            proc = subprocess.Popen(["ip", "netns", "exec", node, *argv], stdout=subprocess.PIPE, stderr=err, text=True, env=env)
        self.procs.append(proc)
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if not line:
            raise SystemExit(f"{which} agent did not start: {err_path.read_text()[-3000:]}")
        time.sleep(self.args.settle)
        signalled = time.monotonic()
        def hung() -> None:
            proc.send_signal(signal.SIGUSR1)  # every thread's stack into the log
            time.sleep(1)
            proc.kill()

        watchdog = threading.Timer(self.args.timeout, hung)  # a blocking wait (waitpid) stamps the exit exactly
        watchdog.start()
        proc.send_signal(signal.SIGTERM)
        proc.wait()
        reaped = time.monotonic()
        watchdog.cancel()
        self.procs.remove(proc)
        text = err_path.read_text()
        found = [ln for ln in text.splitlines() if ln.startswith(PROBE_TAG)]
        if proc.returncode != 0 or not found:
            raise SystemExit(f"{which} agent: exit {proc.returncode}: {text[-12000:]}")
        probe = json.loads(found[-1][len(PROBE_TAG):])
        if probe["alive"]:
            print(f"  {which}: threads alive at exit: {', '.join(probe['alive'])}", flush=True)
        for name, _t0, _t1, alive in probe["joins"]:
            if alive:
                print(f"  {which}: join of {name} timed out", flush=True)
        return reaped - signalled, phases(probe, signalled, reaped)


def summary(result: dict[str, Any]) -> None:
    runs = result["runs"]
    print(f"\n{result['combination']} (load average {result['load']:.2f})")
    base = [r["SIGTERM -> exit"] for r in runs["base"]]
    cand = [r["SIGTERM -> exit"] for r in runs["cand"]]
    ratios = [c / b for c, b in zip(cand, base, strict=True)]
    print(f"  SIGTERM -> exit  base {statistics.median(base):6.3f} s ({min(base):.3f}-{max(base):.3f})"
          f"  cand {statistics.median(cand):6.3f} s ({min(cand):.3f}-{max(cand):.3f})"
          f"  ratio {statistics.median(ratios):.2f} ({min(ratios):.2f}-{max(ratios):.2f})")  # fmt: skip
    labels = list(dict.fromkeys(k for which in ("base", "cand") for r in runs[which] for k in r))
    print(f"  {'phase':32} {'base median s':>14} {'cand median s':>14}")
    for label in labels:
        if label == "SIGTERM -> exit":
            continue
        cells = []
        for which in ("base", "cand"):
            vals = [r[label] for r in runs[which] if label in r]
            cells.append(f"{statistics.median(vals):14.3f}" if vals else f"{'-':>14}")
        print(f"  {label:32} {cells[0]} {cells[1]}")


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--probe":
        return _probe(sys.argv[3:] if sys.argv[2:3] == ["--"] else sys.argv[2:])
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--store", default="sqlite,etcd")
    ap.add_argument("--backend", default="vxlan,wireguard")
    ap.add_argument("--load", action="store_true", help="two busy-loop processes for the whole run")
    ap.add_argument("--settle", type=float, default=3.0, help="seconds between ready and SIGTERM")
    ap.add_argument("--base-ref", default="main")
    ap.add_argument("--timeout", type=float, default=60.0, help="seconds after SIGTERM before the stacks are dumped and the agent killed")
    args = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("run as root (network namespaces)")
    base = Path(tempfile.mkdtemp(prefix="ocni-stop-base-"))
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", args.base_ref, "src"], capture_output=True, check=True)
    subprocess.run(["tar", "-x", "-C", str(base)], input=archive.stdout, check=True)
    busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(2 if args.load else 0)]
    bench = Bench(args, base / "src")
    results = []
    try:
        for store in args.store.split(","):
            for backend in args.backend.split(","):
                print(f"{store}+{backend}: {args.runs} rounds ...", flush=True)
                results.append(bench.combination(store, backend))
                summary(results[-1])
    finally:
        for p in busy:
            p.kill()
            p.wait()
        bench.cleanup()
        shutil.rmtree(base, ignore_errors=True)
    print(f"\nbase: {args.base_ref}; cand: {ROOT}; load: {'2 busy loops' if args.load else 'none added'}; "
          f"loadavg now {open('/proc/loadavg').read().split()[0]}")  # noqa: SIM115
    return 0


if __name__ == "__main__":
    sys.exit(main())
