"""One NetworkPolicy compiled for a node's policy table, on its own (pure).

The incremental table (``policy.incremental``) compiles each policy once,
when it appears or changes, and keeps the result: the policy's own chain
per direction (one rule per alternative of each of its rules), its jump
rule in its namespace's chain, the pods it isolates, the selections its
rules match (each one set, shared by every policy using it) and the named
ports it resolves. The compile is the render's own (``render._Builder``,
same order, same expressions), so a table assembled from the parts is the
one ``render_node`` renders.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..dataplane import nftables as nft
from ..families import SINGLE_STACK, IPFamily
from . import flowlog
from .engine import Cluster
from .flowlog import FlowLogSpec
from .model import NetworkPolicy
from .render import _DIR, Selection, _addr, _Builder, _digest, policy_rules


@dataclass(frozen=True)
class Side:
    """One direction of one compiled policy."""

    target: Selection  # the pods it isolates
    chain: str  # its own chain (present only with a body)
    body: tuple[dict, ...]  # {"expr", "comment"} rules; empty: no chain, no jump
    jumps: tuple[dict, ...]  # its rules in the namespace chain (one per address family); empty without a body


@dataclass(frozen=True)
class Part:
    """What one policy contributes to the table (a pure function of it)."""

    sides: dict[str, Side]  # direction -> side, for the directions it affects
    sets: dict[str, Selection]  # set name (of its IPv4 set) -> selection
    named_ports: frozenset[tuple[str, str]]  # (proto, name)
    log_chains: dict[str, tuple[dict, ...]]  # flow logs: the log chain of each of its allowing rules


def policy_chain(key: str, direction: str) -> str:
    """The name of a policy's own chain in ``direction``."""
    return f"{_DIR[direction][0]}-{_digest(key)}"


def namespace_chain(namespace: str, direction: str) -> str:
    return f"{_DIR[direction][0]}-ns-{namespace}"


def compile_policy(
    pol: NetworkPolicy, flow_log: FlowLogSpec | None = None, families: tuple[IPFamily, ...] = SINGLE_STACK
) -> Part:
    """The render's compile of one policy for a table of ``families`` (same
    builder, same order); with ``flow_log``, its rules end in their log
    chains, which it brings along."""
    b = _Builder(Cluster.of((), ()), [], families)
    sides = {}
    allows: list[flowlog.RuleRef] = []
    for direction, (_, own_field, peer_field, _) in _DIR.items():
        if not pol.affects(direction):
            continue
        target = Selection(pol.namespace, None, pol.pod_selector)
        chain = policy_chain(pol.key, direction)
        body = policy_rules(b, pol, direction, peer_field, flow_log=flow_log, allows=allows)
        jumps: tuple[dict, ...] = ()
        if body:
            jumps = tuple(
                {"expr": [nft.match(_addr(own_field, f), b.selection_set(target, f)), nft.jump(chain)], "comment": pol.key}
                for f in families
            )
        sides[direction] = Side(target, chain, tuple(body), jumps)
    logs = {} if flow_log is None else {ref.chain: tuple(flowlog.log_chains(flow_log, [ref])[ref.chain]) for ref in allows}
    return Part(sides, dict(b.sets), frozenset(b.named_ports), logs)
