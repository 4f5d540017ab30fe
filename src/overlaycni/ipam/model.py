"""IPAM records, their key layout in the datastore and input validation (pure).

Keys of a cluster ``C`` live under ``/overlaycni/clusters/C/``:

==========================  =====================================================
``config``                  the ClusterNetwork (JSON, flag names as keys)
``blocks/10.244.3.0-24``    block claim -> node name (permanent until node delete)
``nodeblocks/<node>``       node name -> its block (same transaction as the claim)
``blockcursor``             the block claimed last (claims move forward from it)
``nodes/<node>``            live node record (JSON), under the agent's lease
``ips/<node>/010.244.003.002``  pod address -> {container_id, ifname, pod}
``handles/<cid>/<ifname>``  (containerID, ifname) -> {node, ip}
``cursor/<node>``           the address allocated last on that node
==========================  =====================================================

Addresses in keys are zero-padded (``010.244.003.002``) so that key order is
address order: an allocator reads a short window of used addresses after a
candidate instead of the whole block. Plus ``/overlaycni/index/clusters/C`` so clusters are listed without reading
their data. A claim and its reverse index, and an address and its handle, are
always written and deleted in one transaction, with the same revision.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Interface, IPv4Network

from ..datastore import KV, Event
from ..errors import ConfigError, FieldError
from .addresses import ip_to_int

ROOT = "/overlaycni/clusters/"
INDEX = "/overlaycni/index/clusters/"

_NAME = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9._-]{0,251}[A-Za-z0-9])?$")
_CONTAINER_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,1023}$")
_IFNAME_BAD = re.compile(r"[/:\s%]")
_MAC = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")


@dataclass(frozen=True)
class NodeRecord:
    name: str
    node_ip: IPv4Address
    block: IPv4Network
    vtep_mac: str | None = None

    def to_json(self) -> str:
        return json.dumps(
            {"name": self.name, "node_ip": str(self.node_ip), "block": str(self.block), "vtep_mac": self.vtep_mac},
            sort_keys=True,
        )

    def to_dict(self) -> dict[str, str | None]:
        return {"name": self.name, "node_ip": str(self.node_ip), "block": str(self.block), "vtep_mac": self.vtep_mac}


@dataclass(frozen=True)
class Allocation:
    ip: IPv4Interface
    gateway: IPv4Address
    container_id: str
    ifname: str
    node: str
    pod_namespace: str | None = None
    pod_name: str | None = None

    def to_dict(self) -> dict[str, str | None]:
        return {
            "ip": str(self.ip),
            "gateway": str(self.gateway),
            "container_id": self.container_id,
            "ifname": self.ifname,
            "node": self.node,
            "pod": f"{self.pod_namespace}/{self.pod_name}" if self.pod_name else None,
        }


# ----- keys ---------------------------------------------------------------------


def root(cluster: str) -> str:
    return f"{ROOT}{cluster}/"


def config_key(cluster: str) -> str:
    return root(cluster) + "config"


def index_key(cluster: str) -> str:
    return INDEX + cluster


def nodes_prefix(cluster: str) -> str:
    """Key prefix of the live node records (watch it for node changes)."""
    return root(cluster) + "nodes/"


def node_key(cluster: str, node: str) -> str:
    return nodes_prefix(cluster) + node


def blocks_prefix(cluster: str) -> str:
    return root(cluster) + "blocks/"


def block_key(cluster: str, block: IPv4Network) -> str:
    return blocks_prefix(cluster) + f"{block.network_address}-{block.prefixlen}"


def block_from_key(key: str) -> IPv4Network:
    addr, _, plen = key.rsplit("/", 1)[-1].partition("-")
    return IPv4Network(f"{addr}/{plen}")


def nodeblocks_prefix(cluster: str) -> str:
    return root(cluster) + "nodeblocks/"


def nodeblock_key(cluster: str, node: str) -> str:
    return nodeblocks_prefix(cluster) + node


def blockcursor_key(cluster: str) -> str:
    return root(cluster) + "blockcursor"


def ips_prefix(cluster: str, node: str | None = None) -> str:
    return root(cluster) + "ips/" + (f"{node}/" if node is not None else "")


def ip_part(ip: IPv4Address | int) -> str:
    """An address as a key part that sorts in address order."""
    n = int(ip)
    return f"{n >> 24:03d}.{(n >> 16) & 255:03d}.{(n >> 8) & 255:03d}.{n & 255:03d}"


def ip_from_part(text: str) -> IPv4Address:
    return IPv4Address(ip_to_int(text))


def ip_key(cluster: str, node: str, ip: IPv4Address | int) -> str:
    return ips_prefix(cluster, node) + ip_part(ip)


def handles_prefix(cluster: str) -> str:
    return root(cluster) + "handles/"


def handle_key(cluster: str, container_id: str, ifname: str) -> str:
    return handles_prefix(cluster) + f"{container_id}/{ifname}"


def cursor_key(cluster: str, node: str) -> str:
    return root(cluster) + "cursor/" + node


# ----- record (de)serialisation ----------------------------------------------------


def node_from_kv(kv: KV | Event) -> NodeRecord:
    """Parse a node record from a KV or a watch ``put`` event."""
    if kv.value is None:
        raise ValueError(f"{kv.key}: no value (a delete event carries no node record)")
    data = json.loads(kv.value)
    return NodeRecord(
        name=data["name"],
        node_ip=IPv4Address(data["node_ip"]),
        block=IPv4Network(data["block"]),
        vtep_mac=data.get("vtep_mac"),
    )


def ip_value(container_id: str, ifname: str, pod: tuple[str, str] | None) -> str:
    ns, name = pod if pod else (None, None)
    return json.dumps({"container_id": container_id, "ifname": ifname, "pod_namespace": ns, "pod_name": name})


def handle_value(node: str, ip: IPv4Address, block: IPv4Network, pod: tuple[str, str] | None = None) -> str:
    ns, name = pod if pod else (None, None)
    return json.dumps({"node": node, "ip": str(ip), "block": str(block), "pod_namespace": ns, "pod_name": name})


def allocation_from_handle(container_id: str, ifname: str, value: str) -> Allocation:
    """The allocation a handle describes (it carries everything a caller needs)."""
    data = json.loads(value)
    block = IPv4Network(data.get("block") or f"{data['ip']}/32")
    return Allocation(
        ip=IPv4Interface(f"{data['ip']}/{block.prefixlen}"),
        gateway=block.network_address + 1,
        container_id=container_id,
        ifname=ifname,
        node=data["node"],
        pod_namespace=data.get("pod_namespace"),
        pod_name=data.get("pod_name"),
    )


def allocation_from(node: str, ip: IPv4Address, block: IPv4Network, value: str) -> Allocation:
    data = json.loads(value)
    return Allocation(
        ip=IPv4Interface(f"{ip}/{block.prefixlen}"),
        gateway=block.network_address + 1,
        container_id=data["container_id"],
        ifname=data["ifname"],
        node=node,
        pod_namespace=data.get("pod_namespace"),
        pod_name=data.get("pod_name"),
    )


# ----- validation (field-named errors) -------------------------------------------


def check_name(field: str, value: str) -> str:
    if not isinstance(value, str) or not _NAME.match(value):
        raise ConfigError(
            FieldError(field, f"{value!r} is not a valid name (letters, digits, '.', '_', '-'; starts and ends alphanumeric)")
        )
    return value


def check_container_id(value: str) -> str:
    if not isinstance(value, str) or not _CONTAINER_ID.match(value):
        raise ConfigError(
            FieldError("container-id", f"{value!r} is not a valid container ID (letters, digits, '_', '.', '-')")
        )
    return value


def check_ifname(value: str) -> str:
    if not isinstance(value, str) or not 0 < len(value) <= 15 or value in (".", "..") or _IFNAME_BAD.search(value):
        raise ConfigError(FieldError("ifname", f"{value!r} is not a valid interface name (1..15 chars, no '/', ':' or spaces)"))
    return value


def check_pod(pod: tuple[str, str] | None) -> tuple[str, str] | None:
    if pod is None:
        return None
    ns, name = pod
    if not ns or not name or "/" in ns or "/" in name:
        raise ConfigError(FieldError("pod", f"{ns}/{name} is not NAMESPACE/NAME"))
    return ns, name


def parse_pod(text: str | None) -> tuple[str, str] | None:
    if text is None:
        return None
    ns, sep, name = text.partition("/")
    if not sep:
        raise ConfigError(FieldError("pod", f"{text!r} is not NAMESPACE/NAME (e.g. default/web-0)"))
    return check_pod((ns, name))


def check_mac(value: str | None) -> str | None:
    if value is None:
        return None
    mac = value.strip().lower()
    if not _MAC.match(mac):
        raise ConfigError(FieldError("vtep-mac", f"{value!r} is not a MAC address (aa:bb:cc:dd:ee:ff)"))
    return mac


def parse_ip(field: str, value: object) -> IPv4Address:
    if isinstance(value, IPv4Address):
        return value
    try:
        return IPv4Address(str(value).strip())
    except ValueError:
        raise ConfigError(FieldError(field, f"{value!r} is not a valid IPv4 address")) from None
