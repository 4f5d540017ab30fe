"""CNI requests and results as the agent sees them (pure).

The shim has already checked the environment; the agent parses the request
again into a typed ``CNIRequest`` (it must not trust its socket blindly) and
renders results in the cniVersion the runtime asked for:

* 1.0.0 / 1.1.0: ``ips[]`` without ``version``; 1.1.0 interfaces carry ``mtu``.
* 0.3.x / 0.4.0: ``ips[]`` entries carry ``"version": "4"`` (or ``"6"``).

A pod has one address per family of its cluster: ``ips[]`` lists them
IPv4 first, each with its gateway, and ``routes[]`` holds one default route
per family (``0.0.0.0/0``, ``::/0``; CNI spec, "Success" result:
https://github.com/containernetworking/cni/blob/main/SPEC.md). The ``ips``
capability (``runtimeConfig.ips``, CONVENTIONS.md) asks for at most one
address per family.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Interface, IPv6Interface
from typing import Any

from ..cidr import IPAddress
from ..errors import CNI_INVALID_CONFIG, CNI_INVALID_ENV, CNIError
from ..families import IPFamily, PodAddress

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
    def requested_ips(self) -> tuple[IPAddress, ...]:
        """The CNI ``ips`` capability: ``runtimeConfig.ips``, and the legacy
        ``CNI_ARGS`` ``IP=``; at most one address per family (IPv4 first).
        Whether the cluster has the family is the agent's to check."""
        runtime = self.config.get("runtimeConfig") or {}
        raw_ips = runtime.get("ips") if isinstance(runtime, Mapping) else None
        if raw_ips is not None and not isinstance(raw_ips, list):
            raise CNIError(CNI_INVALID_CONFIG, f"runtimeConfig.ips: {raw_ips!r} is not a list of IP addresses")
        candidates = [("runtimeConfig.ips", raw) for raw in raw_ips or []]
        if self.args.get("IP"):
            candidates += [("CNI_ARGS IP", raw) for raw in self.args["IP"].split(",")]
        found: dict[int, IPAddress] = {}
        for where, raw in candidates:
            try:
                ip = ipaddress.ip_interface(str(raw).strip()).ip
            except ValueError:
                raise CNIError(CNI_INVALID_CONFIG, f"{where}: {raw!r} is not an IP address") from None
            if ip.version in found and found[ip.version] != ip:
                raise CNIError(
                    CNI_INVALID_CONFIG,
                    f"{where}: {found[ip.version]} and {ip} are both {IPFamily.of(ip).label} addresses; "
                    "ask for at most one address per family",
                )
            found[ip.version] = ip
        return tuple(found[v] for v in sorted(found))

    @property
    def requested_ip(self) -> IPv4Address | None:
        """The requested IPv4 address, if any (``requested_ips`` has every family)."""
        return next((ip for ip in self.requested_ips if isinstance(ip, IPv4Address)), None)

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
    addresses: Sequence[PodAddress],
    dns: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The ADD result in the requested version: one ``ips`` entry and one
    default route per address (IPv4 first)."""
    legacy = not version.startswith("1.")
    host: dict[str, Any] = {"name": host_veth, "mac": host_mac}
    pod: dict[str, Any] = {"name": ifname, "mac": mac, "sandbox": sandbox}
    if version == "1.1.0":
        host["mtu"] = mtu
        pod["mtu"] = mtu
    ips: list[dict[str, Any]] = []
    for a in addresses:
        entry: dict[str, Any] = {"address": str(a.ip), "gateway": str(a.gateway), "interface": 1}
        ips.append({"version": str(a.ip.version), **entry} if legacy else entry)
    result: dict[str, Any] = {
        "cniVersion": version,
        "interfaces": [host, pod],
        "ips": ips,
        "routes": [{"dst": str(a.default_route), "gw": str(a.gateway)} for a in addresses],
        "dns": dict(dns or {}),
    }
    return result


def prev_result_ips(prev: Mapping[str, Any]) -> list[tuple[IPv4Interface | IPv6Interface, IPAddress | None]]:
    """The addresses (and gateways) of a prevResult, in its order; entries
    that do not parse are left out (the comparison then finds them missing)."""
    out: list[tuple[IPv4Interface | IPv6Interface, IPAddress | None]] = []
    for entry in prev.get("ips") or []:
        try:
            ip = ipaddress.ip_interface(entry["address"])
            gw = entry.get("gateway")
            out.append((ip, ipaddress.ip_address(gw) if gw else None))
        except (KeyError, TypeError, ValueError):
            continue
    return out


def prev_result_problems(prev: Mapping[str, Any], addresses: Sequence[PodAddress]) -> list[str]:
    """How a prevResult's ``ips`` differ from the attachment's addresses (one
    per family): a missing, changed or extra address, or another gateway."""
    have = prev_result_ips(prev)
    problems: list[str] = []
    for a in addresses:
        same = [(ip, gw) for ip, gw in have if ip.version == a.ip.version]
        if not same:
            problems.append(f"prevResult has no {a.family.label} address; the reservation is {a.ip}")
        elif same[0][0] != a.ip:
            problems.append(f"prevResult address {same[0][0]} does not match the reservation {a.ip}")
        elif same[0][1] is not None and same[0][1] != a.gateway:
            problems.append(f"prevResult gateway {same[0][1]} of {a.ip} is not {a.gateway}")
    families = {a.ip.version for a in addresses}
    problems += [f"prevResult address {ip} is not one of this attachment's" for ip, _ in have if ip.version not in families]
    return problems
