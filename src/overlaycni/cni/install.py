"""``install-cni``: put the plugin shim and a conflist where the runtime looks.

The shim is copied verbatim from ``cni/shim.py`` with a ``#!<python> -IS``
line (isolated mode, no site packages: it needs only the standard library
and starts in a few milliseconds). Files are written to a temporary name and
renamed, so a runtime never sees half a plugin or half a config.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from ..errors import UsageError

PLUGIN_NAME = "overlaycni"
CONFLIST_NAME = "10-overlaycni.conflist"
CHAINABLE = ("portmap", "tuning", "bandwidth", "firewall")
CONF_VERSIONS = ("0.3.1", "0.4.0", "1.0.0", "1.1.0")


@dataclass(frozen=True)
class Installed:
    plugin: Path
    conflist: Path
    config: dict


def _atomic_write(path: Path, data: str, mode: int) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(data)
    os.chmod(tmp, mode)
    os.replace(tmp, path)


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
) -> Installed:
    doc = conflist(cluster=cluster, socket=socket, cni_version=cni_version, chain=chain)
    bdir, cdir = Path(bin_dir), Path(conf_dir)
    for d, flag in ((bdir, "bin-dir"), (cdir, "conf-dir")):
        try:
            d.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UsageError(f"{d}: cannot create directory ({exc.strerror})", field=flag) from None
    plugin = bdir / PLUGIN_NAME
    conf = cdir / CONFLIST_NAME
    try:
        _atomic_write(plugin, shim_source(), 0o755)
        _atomic_write(conf, json.dumps(doc, indent=2) + "\n", 0o644)
    except OSError as exc:
        raise UsageError(f"cannot write the plugin: {exc}") from None
    return Installed(plugin=plugin, conflist=conf, config=doc)
