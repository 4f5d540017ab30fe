"""``install-cni``: put the plugin shim and a conflist where the runtime looks.

Two builds of the same plugin (tests/unit/test_cni_shim.py runs every test
against both):

* native: ``build/overlaycni-shim``, compiled from ``cni/shim.c`` by
  ``make`` with Debian's gcc; starts in about a millisecond, like the
  reference Go plugins. Nodes get the binary, not a compiler.
* python: ``cni/shim.py`` copied verbatim behind a ``#!<python> -IS`` line
  (isolated mode, no site packages: it needs only the standard library);
  starts in 6-9 ms, the floor of a pod ADD. The fallback.

``auto`` (the default) takes the native one when it is built, up to date
with its source and built for this machine (ELF class, byte order and
machine of the running interpreter, and it answers VERSION), else python,
and says why. Files are written to a temporary name and renamed, so a
runtime never sees half a plugin or half a config.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from ..errors import UsageError

PLUGIN_NAME = "overlaycni"
CONFLIST_NAME = "10-overlaycni.conflist"
CHAINABLE = ("portmap", "tuning", "bandwidth", "firewall")
CONF_VERSIONS = ("0.3.1", "0.4.0", "1.0.0", "1.1.0")


# Where `make` builds the native plugin: the repository's build dir (this
# file is <repo>/src/overlaycni/cni/install.py).
NATIVE_SHIM = Path(__file__).resolve().parents[3] / "build" / "overlaycni-shim"
NATIVE_SOURCE = Path(__file__).with_name("shim.c")


class Shim(StrEnum):
    auto = "auto"
    native = "native"
    python = "python"


@dataclass(frozen=True)
class Installed:
    plugin: Path
    conflist: Path
    config: dict
    shim: Shim  # native or python: what was installed
    shim_reason: str  # why that one


def _atomic_write(path: Path, data: str | bytes, mode: int) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    if isinstance(data, bytes):
        tmp.write_bytes(data)
    else:
        tmp.write_text(data)
    os.chmod(tmp, mode)
    os.replace(tmp, path)


def _elf_target(path: Path) -> tuple[int, int, int] | None:
    """(class, byte order, machine) of an ELF file, or None if it is not one."""
    try:
        with open(path, "rb") as f:
            head = f.read(20)
    except OSError:
        return None
    if len(head) < 20 or head[:4] != b"\x7fELF":
        return None
    return head[4], head[5], int.from_bytes(head[18:20], "little" if head[5] == 1 else "big")


def native_shim_problem(binary: Path = NATIVE_SHIM, *, source: Path = NATIVE_SOURCE) -> str | None:
    """Why ``binary`` cannot serve as this machine's plugin; None if it can."""
    if not binary.is_file():
        return f"{binary} is not built (run `make deps`)"
    if source.is_file() and source.stat().st_mtime > binary.stat().st_mtime:
        return f"{binary} is older than {source.name} (run `make deps`)"
    target = _elf_target(binary)
    if target is None:
        return f"{binary} is not an ELF executable"
    if target != _elf_target(Path("/proc/self/exe")):
        return f"{binary} is built for another machine (ELF class, byte order, machine {target})"
    try:
        p = subprocess.run(
            [str(binary)], input='{"cniVersion": "1.1.0"}', env={"CNI_COMMAND": "VERSION"},
            capture_output=True, text=True, timeout=10,
        )  # fmt: skip
        answer = json.loads(p.stdout) if p.returncode == 0 else None
    except (OSError, ValueError, subprocess.TimeoutExpired) as exc:
        return f"{binary} does not run here: {exc}"
    if not isinstance(answer, dict) or not answer.get("supportedVersions"):
        return f"{binary} does not answer VERSION (exit {p.returncode}: {p.stdout.strip() or p.stderr.strip()})"
    return None


def choose_shim(shim: Shim, *, binary: Path = NATIVE_SHIM) -> tuple[Shim, str]:
    """(native or python, why)."""
    try:
        shim = Shim(shim)
    except ValueError:
        raise UsageError(f"{shim!r} is not a shim (choose from {', '.join(Shim)})", field="shim") from None
    if shim is Shim.python:
        return Shim.python, "asked for (--shim python)"
    problem = native_shim_problem(binary)
    if problem is None:
        return Shim.native, f"{binary} is built for this machine"
    if shim is Shim.native:
        raise UsageError(f"cannot install the native plugin: {problem}", field="shim")
    return Shim.python, f"the native plugin is not usable: {problem}"


SYSTEM_PYTHON = "/usr/bin/python3"


def plugin_interpreter() -> str:
    """The shim needs only the standard library, so the distribution's
    python3 serves (Debian's optimised build starts ~1 ms faster than a
    --enable-shared one); fall back to the interpreter running us."""
    if os.access(SYSTEM_PYTHON, os.X_OK):
        return SYSTEM_PYTHON
    return os.path.realpath(sys.executable)


def shim_source(python: str | None = None) -> str:
    interpreter = python or plugin_interpreter()
    body = (Path(__file__).with_name("shim.py")).read_text()
    lines = body.splitlines(keepends=True)
    if lines and lines[0].startswith("#!"):
        lines = lines[1:]
    return f"#!{interpreter} -IS\n" + "".join(lines)


def conflist(*, cluster: str, socket: str, cni_version: str = "1.0.0", chain: tuple[str, ...] = ()) -> dict:
    if cni_version not in CONF_VERSIONS:
        raise UsageError(f"{cni_version} is not supported (choose from {', '.join(CONF_VERSIONS)})", field="cni-version")
    # "ips": the runtime may request a pod address (runtimeConfig.ips), e.g. for a static pod IP
    plugins: list[dict] = [{"type": PLUGIN_NAME, "cluster": cluster, "socket": socket, "capabilities": {"ips": True}}]
    for name in chain:
        if name not in CHAINABLE:
            raise UsageError(f"{name} is not a supported chained plugin (choose from {', '.join(CHAINABLE)})", field="chain")
        entry: dict = {"type": name}
        if name == "portmap":
            entry["capabilities"] = {"portMappings": True}
        elif name == "bandwidth":
            entry["capabilities"] = {"bandwidth": True}
        plugins.append(entry)
    return {"cniVersion": cni_version, "name": PLUGIN_NAME, "plugins": plugins}


def install_cni(
    *,
    cluster: str,
    bin_dir: str,
    conf_dir: str,
    socket: str,
    cni_version: str = "1.0.0",
    chain: tuple[str, ...] = (),
    shim: Shim = Shim.auto,
    native_binary: Path = NATIVE_SHIM,
) -> Installed:
    doc = conflist(cluster=cluster, socket=socket, cni_version=cni_version, chain=chain)
    kind, reason = choose_shim(shim, binary=native_binary)
    bdir, cdir = Path(bin_dir), Path(conf_dir)
    for d, flag in ((bdir, "bin-dir"), (cdir, "conf-dir")):
        try:
            d.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UsageError(f"{d}: cannot create directory ({exc.strerror})", field=flag) from None
    plugin = bdir / PLUGIN_NAME
    conf = cdir / CONFLIST_NAME
    try:
        _atomic_write(plugin, native_binary.read_bytes() if kind is Shim.native else shim_source(), 0o755)
        _atomic_write(conf, json.dumps(doc, indent=2) + "\n", 0o644)
    except OSError as exc:
        raise UsageError(f"cannot write the plugin: {exc}") from None
    return Installed(plugin=plugin, conflist=conf, config=doc, shim=kind, shim_reason=reason)
