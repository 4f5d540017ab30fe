"""A container runtime's side of CNI, the way libcni does it.

``add`` runs every plugin of a conflist in order, feeding each the previous
one's result as ``prevResult``; ``delete`` runs them in reverse with the
cached ADD result. Each plugin gets its own config (``plugins[i]``) with the
list's ``name`` and ``cniVersion`` copied in, the CNI_* variables in its
environment, and is found by ``type`` on CNI_PATH. A failure is a
``CNIError`` carrying the plugin's code and message.

It sends no packets: plugins talk to the agent over its unix socket.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Interface, IPv6Interface, ip_address, ip_interface
from pathlib import Path
from typing import Any

from ..errors import CNI_INVALID_CONFIG, CNI_IO_FAILURE, CNI_TRY_AGAIN_LATER, CNIError, NetnsNotFound

NETNS_DIR = "/var/run/netns"


@dataclass(frozen=True)
class ConfList:
    name: str
    cni_version: str
    plugins: tuple[dict[str, Any], ...]

    def plugin_config(
        self, i: int, prev_result: dict[str, Any] | None = None, capability_args: Mapping[str, Any] | None = None
    ) -> dict[str, Any]:
        conf = dict(self.plugins[i])
        conf["name"] = self.name
        conf["cniVersion"] = self.cni_version
        # libcni: runtimeConfig carries only the capabilities the plugin declares
        declared = conf.get("capabilities") or {}
        runtime_config = {k: v for k, v in (capability_args or {}).items() if declared.get(k)}
        if runtime_config:
            conf["runtimeConfig"] = runtime_config
        if prev_result is not None:
            conf["prevResult"] = prev_result
        return conf


@dataclass(frozen=True)
class Attachment:
    """What a runtime knows about one pod interface."""

    container_id: str
    netns: str  # path, e.g. /var/run/netns/<name>
    ifname: str = "eth0"
    pod_namespace: str = "default"
    pod_name: str = ""
    # libcni's CapabilityArgs, e.g. {"ips": ["10.244.1.50"]} (the ``ips`` capability)
    capability_args: Mapping[str, Any] = field(default_factory=dict)

    def cni_args(self) -> str:
        parts = ["IgnoreUnknown=1", f"K8S_POD_NAMESPACE={self.pod_namespace}", f"K8S_POD_NAME={self.pod_name}"]
        parts.append(f"K8S_POD_INFRA_CONTAINER_ID={self.container_id}")
        return ";".join(parts)


@dataclass(frozen=True)
class AddResult:
    ips: tuple[IPv4Interface, ...]
    gateway: IPv4Address | None
    raw: dict[str, Any]
    ips_v6: tuple[IPv6Interface, ...] = ()  # a dual-stack result's IPv6 entries

    @property
    def ip_v6(self) -> IPv6Interface | None:
        return self.ips_v6[0] if self.ips_v6 else None

    @property
    def ip(self) -> IPv4Interface:
        if not self.ips:
            raise CNIError(CNI_INVALID_CONFIG, "the CNI result has no IP address")
        return self.ips[0]


def load_conflist(path: str | Path) -> ConfList:
    p = Path(path)
    if p.is_dir():
        found = sorted(p.glob("*.conflist"))
        if not found:
            raise CNIError(CNI_INVALID_CONFIG, f"no .conflist in {p}")
        p = found[0]
    try:
        data = json.loads(p.read_text())
    except (OSError, ValueError) as exc:
        raise CNIError(CNI_INVALID_CONFIG, f"cannot read CNI config {p}: {exc}") from None
    plugins = data.get("plugins")
    if not isinstance(plugins, list) or not plugins or "name" not in data:
        raise CNIError(CNI_INVALID_CONFIG, f"{p} is not a conflist (needs name and plugins)")
    return ConfList(name=data["name"], cni_version=data.get("cniVersion", "1.0.0"), plugins=tuple(plugins))


def netns_path(name: str) -> str:
    return os.path.join(NETNS_DIR, name)


def find_plugin(plugin_type: str, cni_path: Sequence[str]) -> str:
    for d in cni_path:
        candidate = os.path.join(d, plugin_type)
        if os.access(candidate, os.X_OK):
            return candidate
    raise CNIError(CNI_INVALID_CONFIG, f"plugin {plugin_type!r} not found on CNI_PATH {':'.join(cni_path)}")


def invoke(
    command: str, conf: dict[str, Any], att: Attachment, *, cni_path: Sequence[str], timeout: float = 60
) -> dict[str, Any] | None:
    """Run one plugin once; returns its parsed stdout (None if empty)."""
    binary = find_plugin(conf["type"], cni_path)
    env = {
        "PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
        "CNI_COMMAND": command,
        "CNI_CONTAINERID": att.container_id,
        "CNI_NETNS": att.netns,
        "CNI_IFNAME": att.ifname,
        "CNI_ARGS": att.cni_args(),
        "CNI_PATH": ":".join(cni_path),
    }
    try:
        proc = subprocess.run(
            [binary], input=json.dumps(conf), capture_output=True, text=True, env=env, timeout=timeout
        )
    except subprocess.TimeoutExpired:
        raise CNIError(CNI_IO_FAILURE, f"{conf['type']} {command} did not answer within {timeout:.0f}s") from None
    out = proc.stdout.strip()
    data: Any = None
    if out:
        try:
            data = json.loads(out)
        except ValueError:
            data = None
    if proc.returncode != 0:
        if isinstance(data, dict) and "code" in data:
            raise CNIError(int(data["code"]), f"{conf['type']} {command}: {data.get('msg', '')}", details=str(data.get("details", "")))
        raise CNIError(CNI_IO_FAILURE, f"{conf['type']} {command} exited {proc.returncode}", details=(proc.stderr or out).strip())
    if out and not isinstance(data, dict):
        raise CNIError(CNI_IO_FAILURE, f"{conf['type']} {command} printed something that is not JSON", details=out[:500])
    return data


def parse_result(raw: dict[str, Any]) -> AddResult:
    ips: list[IPv4Interface] = []
    ips_v6: list[IPv6Interface] = []
    gateway = None
    for entry in raw.get("ips", []):
        iface = ip_interface(entry["address"])
        if isinstance(iface, IPv6Interface):
            ips_v6.append(iface)
            continue
        ips.append(iface)
        if gateway is None and entry.get("gateway"):
            gateway = ip_address(entry["gateway"])
    return AddResult(ips=tuple(ips), gateway=gateway, raw=raw, ips_v6=tuple(ips_v6))  # type: ignore[arg-type]


ADD_ATTEMPTS = 4  # kubelet, too, retries a sandbox whose network setup failed


def add(conflist: ConfList, att: Attachment, *, cni_path: Sequence[str]) -> AddResult:
    """CNI ADD through the whole chain; on a failure, DEL what was added.

    A "try again later" answer (code 11: the agent's deadline passed, say on a
    loaded machine) is retried a few times after the DEL, with a growing
    pause, as kubelet retries a pod sandbox; every other error is final. So
    is a code 11 whose DEL failed too (the agent died in the middle, say):
    an ADD over a half-made attachment would only meet "eth0 already
    exists" (the spec's error for an existing interface); kubelet, too,
    retries a sandbox only once its teardown worked."""
    for attempt in range(1, ADD_ATTEMPTS + 1):
        result, error, undone = _add_once(conflist, att, cni_path=cni_path)
        if error is None:
            return result
        if error.cni_code != CNI_TRY_AGAIN_LATER or attempt == ADD_ATTEMPTS or not undone:
            raise error
        time.sleep(0.5 * attempt)
    raise AssertionError("unreachable")  # pragma: no cover


def _add_once(conflist: ConfList, att: Attachment, *, cni_path: Sequence[str]) -> tuple[Any, CNIError | None, bool]:
    """One ADD through the chain: (its result, None, True), or (None, the
    error, whether the DEL of what it added worked)."""
    if not os.path.exists(att.netns):
        raise NetnsNotFound(f"pod network namespace {att.netns} does not exist")
    prev: dict[str, Any] | None = None
    for i in range(len(conflist.plugins)):
        conf = conflist.plugin_config(i, prev, att.capability_args)
        try:
            prev = invoke("ADD", conf, att, cni_path=cni_path) or prev
        except CNIError as exc:
            undone = delete(conflist, att, cni_path=cni_path, prev_result=prev, upto=i + 1, best_effort=True)
            return None, exc, undone
    if prev is None:
        raise CNIError(CNI_INVALID_CONFIG, "the plugin chain returned no result")
    return parse_result(prev), None, True


def delete(
    conflist: ConfList,
    att: Attachment,
    *,
    cni_path: Sequence[str],
    prev_result: dict[str, Any] | None = None,
    upto: int | None = None,
    best_effort: bool = False,
) -> bool:
    """CNI DEL in reverse order. Keeps going past errors; raises the first
    one at the end unless ``best_effort`` (then: False when a DEL failed)."""
    n = len(conflist.plugins) if upto is None else upto
    first: CNIError | None = None
    for i in reversed(range(n)):
        try:
            invoke("DEL", conflist.plugin_config(i, prev_result, att.capability_args), att, cni_path=cni_path)
        except CNIError as exc:
            first = first or exc
    if first is not None and not best_effort:
        raise first
    return first is None


def check(conflist: ConfList, att: Attachment, *, cni_path: Sequence[str], prev_result: dict[str, Any]) -> None:
    for i in range(len(conflist.plugins)):
        invoke("CHECK", conflist.plugin_config(i, prev_result), att, cni_path=cni_path)
