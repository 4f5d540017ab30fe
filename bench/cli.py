"""How fast the ``overlaycni`` command line answers: this tree against a baseline.

Each case runs the console script's entry point (``overlaycni.cli.main:main``)
in a fresh interpreter, the way a script or a runtime calling ``overlaycni``
in a loop pays it: the interpreter, typer, and whatever the command imports.
The baseline is another revision's ``src`` (``git archive REF src``, default
``main``), run with PYTHONPATH from a temporary copy, in the same run:
baseline and candidate alternate, run by run, so that the load of a shared
machine falls on both alike.

Printed per case: wall time (median, min-max) and peak RSS (median) of each,
and the ratio baseline/candidate of the medians (> 1: the candidate is
faster), with the load average before and after. The two must print the
same output (checked once per case, before timing).

``agent status`` talks to a stand-in agent: a Unix socket in a temporary
directory that answers AGENT_STATUS as the agent's CNI socket does.
``agent args`` parses a node agent's command line (what the agent process
pays, and keeps resident, before it starts its work).

    .venv/bin/python bench/cli.py [--runs 7] [--base main] [--case 'agent status' ...]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
ENTRY = "import sys; from overlaycni.cli.main import main; sys.argv[0] = 'overlaycni'; main()"
STATUS = {"ready": True, "node": "node-1", "cluster": "prod", "block": "10.244.1.0/24", "peers": 2}


def serve_status(path: str, status: dict | None = None) -> socket.socket:
    """A stand-in agent socket: one JSON line in, ``status`` (default ``STATUS``) out."""
    answer = json.dumps({"result": STATUS if status is None else status}).encode() + b"\n"
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(path)
    srv.listen(16)

    def loop() -> None:
        while True:
            try:
                conn, _ = srv.accept()
            except OSError:
                return
            with conn:
                buf = b""
                while not buf.endswith(b"\n"):
                    chunk = conn.recv(4096)
                    if not chunk:
                        break
                    buf += chunk
                conn.sendall(answer)

    threading.Thread(target=loop, daemon=True).start()
    return srv


def run_once(src: Path, args: list[str]) -> tuple[float, int, int, bytes]:
    """(wall seconds, peak RSS KiB, exit status, stdout) of one call."""
    env = {**os.environ, "PYTHONPATH": str(src), "COLUMNS": "100", "TERM": "dumb"}
    env.pop("OVERLAYCNI_DATASTORE", None)
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", ENTRY, *args], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env)
    out = proc.stdout.read() if proc.stdout else b""
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.stdout:
        proc.stdout.close()
    return wall, usage.ru_maxrss, proc.returncode, out


def loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=7, help="runs per case and side (median, min-max)")
    ap.add_argument("--base", default="main", help="git revision of the baseline (its src/)")
    ap.add_argument("--case", action="append", help="only this case (repeatable), e.g. 'agent status'")
    opts = ap.parse_args()

    with tempfile.TemporaryDirectory(prefix="overlaycni-bench-cli-") as tmp:
        base = Path(tmp) / "base"
        base.mkdir()
        archive = subprocess.run(["git", "-C", str(REPO), "archive", opts.base, "src"], capture_output=True, check=True)
        subprocess.run(["tar", "-x", "-C", str(base)], input=archive.stdout, check=True)
        sides = {"base": base / "src", "cand": REPO / "src"}
        sock = str(Path(tmp) / "agent.sock")
        srv = serve_status(sock)
        cases = {
            "--help": ["--help"],
            "ipam --help": ["ipam", "--help"],
            "lab --help": ["lab", "--help"],
            "agent status": ["agent", "status", "--socket", sock, "-o", "json"],
            "plan -o json": ["plan", "--output", "json"],
            # the agent's arguments, parsed in full; then --node-ip is refused (exit 2) before the agent starts
            "agent args": ["agent", "--cluster", "c", "--node", "n", "--node-ip", "bad", "--lease-ttl", "20", "--no-flow-logs"],
        }
        print(f"bench/cli.py: base {opts.base} vs this tree; {opts.runs} runs each, interleaved; load {loadavg()}")
        print(f"{'case':14} {'base s (min-max)':>24} {'cand s (min-max)':>24} {'ratio':>6} {'base MiB':>9} {'cand MiB':>9}")
        for name, args in cases.items():
            if opts.case and name not in opts.case:
                continue
            firsts = {side: run_once(src, args) for side, src in sides.items()}
            if firsts["base"][2:] != firsts["cand"][2:]:
                print(f"{name}: base and candidate differ (exit {firsts['base'][2]} vs {firsts['cand'][2]})", file=sys.stderr)
                return 1
            walls: dict[str, list[float]] = {s: [] for s in sides}
            rss: dict[str, list[int]] = {s: [] for s in sides}
            for _ in range(opts.runs):
                for side, src in sides.items():
                    w, r, _, _ = run_once(src, args)
                    walls[side].append(w)
                    rss[side].append(r)
            med = {s: statistics.median(walls[s]) for s in sides}
            cols = [f"{med[s]:.3f} ({min(walls[s]):.3f}-{max(walls[s]):.3f})" for s in sides]
            mib = [f"{statistics.median(rss[s]) / 1024:.1f}" for s in sides]
            print(f"{name:14} {cols[0]:>24} {cols[1]:>24} {med['base'] / med['cand']:5.2f}x {mib[0]:>9} {mib[1]:>9}", flush=True)
        srv.close()
        print(f"load after: {loadavg()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
