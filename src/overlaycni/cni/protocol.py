"""CNI requests and results as the agent sees them (pure).

The shim has already checked the environment; the agent parses the request
again into a typed ``CNIRequest`` (it must not trust its socket blindly) and
renders results in the cniVersion the runtime asked for:

* 1.0.0 / 1.1.0: ``ips[]`` without ``version``; 1.1.0 interfaces carry ``mtu``.
* 0.3.x / 0.4.0: ``ips[]`` entries carry ``"version": "4"``.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Interface
from typing import Any

from ..errors import CNI_INVALID_CONFIG, CNI_INVALID_ENV, CNIError

SUPPORTED_VERSIONS = ("0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0")
COMMANDS = ("ADD", "DEL", "CHECK", "STATUS", "GC", "AGENT_STATUS")


@dataclass(frozen=True)
class CNIRequest:
    command: str
    version: str
    config: Mapping[str, Any]
    container_id: str = ""
    ifname: str = ""
    netns: str = ""
    args: Mapping[str, str] = field(default_factory=dict)

    @property
    def pod(self) -> tuple[str, str] | None:
        ns, name = self.args.get("K8S_POD_NAMESPACE"), self.args.get("K8S_POD_NAME")
        return (ns, name) if ns and name else None

    @property
    def requested_ip(self) -> IPv4Address | None:
        """The CNI ``ips`` capability: ``runtimeConfig.ips`` (first IPv4), or
        the legacy ``CNI_ARGS`` ``IP=``."""
        runtime = self.config.get("runtimeConfig") or {}
        candidates = list(runtime.get("ips") or []) if isinstance(runtime, Mapping) else []
        if self.args.get("IP"):
            candidates.append(self.args["IP"])
        for raw in candidates:
            try:
                ip = ipaddress.ip_interface(str(raw)).ip
            except ValueError:
                raise CNIError(CNI_INVALID_CONFIG, f"runtimeConfig.ips: {raw!r} is not an IP address") from None
            if ip.version == 4:
                return ip
        return None

    @property
    def prev_result(self) -> Mapping[str, Any] | None:
        prev = self.config.get("prevResult")
        return prev if isinstance(prev, Mapping) else None

    @property
    def valid_attachments(self) -> list[tuple[str, str]]:
        raw = self.config.get("cni.dev/valid-attachments")
        if raw is None:
            raw = self.config.get("cni.dev/attachments")
        if raw is None:
            raise CNIError(CNI_INVALID_CONFIG, "GC needs cni.dev/valid-attachments in the network config")
        if not isinstance(raw, list):
            raise CNIError(CNI_INVALID_CONFIG, "cni.dev/valid-attachments must be a list")
        out = []
        for i, item in enumerate(raw):
            if not isinstance(item, Mapping) or not item.get("containerID") or not item.get("ifname"):
                raise CNIError(
                    CNI_INVALID_CONFIG, f"cni.dev/valid-attachments[{i}] needs containerID and ifname"
                )
            out.append((str(item["containerID"]), str(item["ifname"])))
        return out


def parse_request(doc: Any) -> CNIRequest:
    if not isinstance(doc, Mapping):
        raise CNIError(CNI_INVALID_CONFIG, "request must be a JSON object")
    command = doc.get("command")
    if command not in COMMANDS:
        raise CNIError(CNI_INVALID_ENV, f"unknown command {command!r}")
    config = doc.get("config") or {}
    if not isinstance(config, Mapping):
        raise CNIError(CNI_INVALID_CONFIG, "config must be a JSON object")
    version = str(config.get("cniVersion") or "1.1.0")
    req = CNIRequest(
        command=command,
        version=version,
        config=config,
        container_id=str(doc.get("container_id") or ""),
        ifname=str(doc.get("ifname") or ""),
        netns=str(doc.get("netns") or ""),
        args={str(k): str(v) for k, v in (doc.get("args") or {}).items()},
    )
    if command in ("ADD", "DEL", "CHECK") and not (req.container_id and req.ifname):
        raise CNIError(CNI_INVALID_ENV, "CNI_CONTAINERID and CNI_IFNAME are required")
    if command in ("ADD", "CHECK") and not req.netns:
        raise CNIError(CNI_INVALID_ENV, f"CNI_NETNS is required for {command}")
    return req


def add_result(
    version: str,
    *,
    host_veth: str,
    host_mac: str,
    ifname: str,
    mac: str,
    mtu: int,
    sandbox: str,
    ip: IPv4Interface,
    gateway: IPv4Address,
    dns: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The ADD result in the requested version."""
    legacy = not version.startswith("1.")
    host: dict[str, Any] = {"name": host_veth, "mac": host_mac}
    pod: dict[str, Any] = {"name": ifname, "mac": mac, "sandbox": sandbox}
    if version == "1.1.0":
        host["mtu"] = mtu
        pod["mtu"] = mtu
    ip_entry: dict[str, Any] = {"address": str(ip), "gateway": str(gateway), "interface": 1}
    if legacy:
        ip_entry = {"version": "4", **ip_entry}
    result: dict[str, Any] = {
        "cniVersion": version,
        "interfaces": [host, pod],
        "ips": [ip_entry],
        "routes": [{"dst": "0.0.0.0/0", "gw": str(gateway)}],
        "dns": dict(dns or {}),
    }
    return result


def prev_result_ip(prev: Mapping[str, Any]) -> tuple[IPv4Interface, IPv4Address | None] | None:
    """The first IPv4 address (and gateway) of a prevResult, or None."""
    for entry in prev.get("ips") or []:
        try:
            ip = ipaddress.ip_interface(entry["address"])
        except (KeyError, TypeError, ValueError):
            continue
        if ip.version == 4:
            gw = entry.get("gateway")
            return ip, (ipaddress.IPv4Address(gw) if gw else None)
    return None
