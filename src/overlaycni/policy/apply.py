"""Apply a policy render (or an incremental diff) with ``nft -j -f -``.

The one place this package runs a subprocess. The whole table is one nft
transaction: the kernel applies all of it or none of it. ``netns`` names a
network namespace (``ip netns exec NAME``); None means the caller's own
namespace (the agent already runs inside its node's namespace). nft's
failures are mapped here, once, to errors.py exceptions.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Iterable
from typing import Any

from ..errors import NetnsNotFound, PermissionDenied, PolicyApplyError
from .model import NamespaceInfo, NetworkPolicy, PodInfo
from .render import FAMILY, TABLE, diff_render, render_node


def _argv(netns: str | None, *nft_args: str) -> list[str]:
    nft = shutil.which("nft") or "/usr/sbin/nft"
    base = [nft, *nft_args]
    if netns is None:
        return base
    ip = shutil.which("ip") or "/usr/sbin/ip"
    return [ip, "netns", "exec", netns, *base]


def _run(argv: list[str], *, stdin: str | None, netns: str | None, what: str) -> str:
    try:
        proc = subprocess.run(argv, input=stdin, capture_output=True, text=True, timeout=120)
    except FileNotFoundError as exc:
        raise PolicyApplyError(f"{what}: {exc.filename} is not installed") from None
    except subprocess.TimeoutExpired:
        raise PolicyApplyError(f"{what}: nft did not finish in 120 s") from None
    if proc.returncode != 0:
        err = proc.stderr.strip()
        if netns is not None and ("Cannot open network namespace" in err or "No such file" in err and "netns" in err):
            raise NetnsNotFound(f"network namespace {netns!r} does not exist", details=err)
        if "Operation not permitted" in err:
            raise PermissionDenied(f"{what}: needs root (CAP_NET_ADMIN)", details=err)
        raise PolicyApplyError(f"{what}: nft refused the ruleset", details=err)
    return proc.stdout


def apply_document(doc: dict[str, Any], *, netns: str | None = None) -> None:
    """Run one ``nft -j`` document as a single atomic transaction."""
    if not doc.get("nftables"):
        return
    where = f"in netns {netns}" if netns else "in this namespace"
    _run(_argv(netns, "-j", "-f", "-"), stdin=json.dumps(doc), netns=netns, what=f"apply policy table {where}")


def apply_update(old: dict[str, Any] | None, new: dict[str, Any], *, netns: str | None = None) -> str:
    """Bring the kernel from the applied render ``old`` to ``new``: only set
    and map elements when the chains are unchanged, else the whole table.
    Returns "none", "elements" or "full". If the incremental update is
    refused (the kernel drifted from ``old``), the full table is applied."""
    diff = diff_render(old, new) if old is not None else None
    if diff is not None:
        if not diff["nftables"]:
            return "none"
        try:
            apply_document(diff, netns=netns)
            return "elements"
        except PolicyApplyError:
            pass
    apply_document(new, netns=netns)
    return "full"


def delete_table(*, netns: str | None = None) -> None:
    """Remove the policy table; "already gone" is success."""
    doc = {
        "nftables": [
            {"add": {"table": {"family": FAMILY, "name": TABLE}}},
            {"delete": {"table": {"family": FAMILY, "name": TABLE}}},
        ]
    }
    apply_document(doc, netns=netns)


def list_table(*, netns: str | None = None) -> dict[str, Any]:
    """The kernel's view of the policy table (``nft -j list table``)."""
    out = _run(_argv(netns, "-j", "list", "table", FAMILY, TABLE), stdin=None, netns=netns, what="list policy table")
    return json.loads(out)


class NodePolicyTable:
    """One node's policy table kept in step with the cluster (for the agent).

    ``sync`` renders the whole model and applies only the set / map element
    changes since the last sync when the policies are the same, else the
    whole table atomically. The first sync after start (or ``reset``) applies
    the whole table, which also adopts whatever a previous agent left.
    """

    def __init__(self, node: str, *, netns: str | None = None) -> None:
        self.node = node
        self.netns = netns
        self.applied: dict[str, Any] | None = None

    def sync(
        self, *, pods: Iterable[PodInfo], namespaces: Iterable[NamespaceInfo], policies: Iterable[NetworkPolicy]
    ) -> str:
        """Returns "none", "elements" or "full" (what reached the kernel)."""
        new = render_node(self.node, pods=pods, namespaces=namespaces, policies=policies)
        try:
            how = apply_update(self.applied, new, netns=self.netns)
        except Exception:
            self.applied = None  # unknown kernel state: the next sync applies everything
            raise
        self.applied = new
        return how

    def reset(self) -> None:
        self.applied = None

    def remove(self) -> None:
        delete_table(netns=self.netns)
        self.applied = None
