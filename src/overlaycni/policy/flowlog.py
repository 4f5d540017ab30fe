"""Flow logs in the policy table: the log rules ``policy.render`` adds when
flow logging is on, their prefixes, and the map back to policies (pure).

Design note
-----------
The verdicts are captured where they are decided: each decision of the
table ends in a small *log chain* that logs the packet to an NFLOG group
(``log group N prefix P``, read by ``dataplane.linux.nflog``) and then
gives the same verdict the decision gave before. With logging on, and only
then, the render changes in three places:

- a policy rule's alternatives end in ``goto fl-<in|eg>-<digest>`` instead
  of ``accept``; the chain's prefix ``ocni:allow:<in|eg>:<digest>`` names
  the policy and rule (``rule_index`` maps the digest back: it depends on
  ``ns/name``, direction and rule index only, so a record logged under the
  previous render still resolves);
- a namespace chain's default deny is ``goto fl-<in|eg>-deny`` instead of
  ``drop`` (prefix ``ocni:deny:<in|eg>``); the agent names the policies
  that isolate the pod from its inventory (``engine.selecting``);
- the verdict maps also hold this node's pods that are *not* isolated, each
  jumping to ``fl-<in|eg>-default`` (prefix ``ocni:allow:<in|eg>:default``),
  so every new flow of a local pod is reported once per direction, at the
  node of the pod it concerns: egress at the source's node, ingress at the
  destination's. Other nodes' pods still have no element and pass untouched.

A log chain (``log_chain``) runs only for packets that are not
``established,related`` (the base chains accept those first, so allowed
established traffic never reaches it):

1. ``ct state != new`` -> the verdict, unlogged (invalid, untracked);
2. allow only: ``ct mark & <direction bit> != 0`` -> the verdict, unlogged:
   this flow was already logged in this direction (a UDP stream without
   replies stays ``new`` for conntrack on every packet);
3. ``update @flowlog-rl { ip saddr limit rate over R/second burst B }``
   -> count in ``flowlog-ratelimited``, the verdict, unlogged (a per-source
   token bucket in a dynamic set with a timeout and a size bound; when the
   set is full, a new source falls through to the node cap);
4. ``limit name "flowlog-cap"`` (over C/second, all sources of the node)
   -> count, the verdict, unlogged;
5. allow only: ``ct mark set ct mark | <bit>``; then ``log group N prefix
   P`` and the verdict.

A denied packet's conntrack entry is never confirmed, so every denied
attempt (a retransmitted SYN too) is a new flow and logged, within the
limits. Cost: established packets pay nothing; a new flow pays one extra
chain of at most five rules, and one NFLOG message when logged.

Rejected: a second rule with the same matches before each ``accept`` (the
matches, set lookups included, evaluated twice per new flow); the policy
name in the prefix (NFLOG prefixes stop at 127 bytes, policy names do not);
packet marks to carry the rule to one shared chain (``meta mark`` reaches
routing and other software); the agent recomputing the deciding rule from
the oracle (racy against policy changes, and not what the kernel did).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import Any

from ..dataplane import nftables as nft
from ..dataplane.nflog import RATE_SET, RATE_SET_V6, RATELIMITED_COUNTER
from ..families import IPFamily
from .model import NetworkPolicy

PREFIX = "ocni"
CAP_LIMIT = "flowlog-cap"
TAGS = {"Ingress": "in", "Egress": "eg"}
DIRECTIONS = {"in": "ingress", "eg": "egress"}
DEFAULT = "default"


@dataclass(frozen=True)
class FlowLogSpec:
    """How the log rules are rendered: the NFLOG group, the per-source rate
    (packets logged per second and burst, per source address), the cap for
    all sources of the node, and the conntrack mark bits that remember a
    flow was logged (one per direction; other mark bits are kept)."""

    group: int = 161
    rate: int = 100
    burst: int = 200
    cap: int = 1000
    sources: int = 65536  # distinct sources the rate set tracks at once
    source_timeout: int = 60  # seconds a quiet source stays in the rate set
    mark_ingress: int = 0x00100000
    mark_egress: int = 0x00200000
    ipv6: bool = False  # a table of both families: IPv6 sources get their own rate set (``for_families``)

    def for_families(self, families: Iterable[IPFamily]) -> FlowLogSpec:
        """This spec for a table of ``families`` (the render and the
        incremental state both take it this way, so they agree)."""
        ipv6 = IPFamily.ipv6 in tuple(families)
        return self if ipv6 == self.ipv6 else replace(self, ipv6=ipv6)

    def mark(self, direction: str) -> int:
        return self.mark_ingress if direction == "Ingress" else self.mark_egress


@dataclass(frozen=True)
class RuleRef:
    """One rule of one policy in one direction; its digest names its log
    chain and prefix (and depends on these three values only)."""

    policy: str  # ns/name
    direction: str  # Ingress | Egress
    rule: int

    @property
    def name(self) -> str:
        return f"{self.direction.lower()}[{self.rule}]"

    @property
    def digest(self) -> str:
        return hashlib.sha256(f"{self.policy} {self.direction} {self.rule}".encode()).hexdigest()[:12]

    @property
    def chain(self) -> str:
        return f"fl-{TAGS[self.direction]}-{self.digest}"

    @property
    def prefix(self) -> str:
        return f"{PREFIX}:allow:{TAGS[self.direction]}:{self.digest}"


@dataclass(frozen=True)
class LogTag:
    """A decoded log prefix: direction (``ingress``/``egress``), verdict
    (``allow``/``deny``), and for an allow the rule digest (None: the pod
    is not isolated in that direction)."""

    direction: str
    verdict: str
    digest: str | None = None


def rule_index(policies: Iterable[NetworkPolicy]) -> dict[str, RuleRef]:
    """digest -> the policy rule it names, for every rule of ``policies``."""
    refs = (
        RuleRef(pol.key, direction, i)
        for pol in policies
        for direction in ("Ingress", "Egress")
        if pol.affects(direction)
        for i in range(len(pol.rules(direction)))
    )
    return {ref.digest: ref for ref in refs}


def parse_prefix(text: str) -> LogTag | None:
    """The tag of one of our prefixes; None for anything else."""
    parts = text.split(":")
    if len(parts) < 3 or parts[0] != PREFIX or parts[2] not in DIRECTIONS:
        return None
    direction = DIRECTIONS[parts[2]]
    if parts[1] == "deny" and len(parts) == 3:
        return LogTag(direction, "deny")
    if parts[1] == "allow" and len(parts) == 4 and parts[3]:
        return LogTag(direction, "allow", None if parts[3] == DEFAULT else parts[3])
    return None


# ----- rendering ------------------------------------------------------------------------


def deny_chain(direction: str) -> str:
    return f"fl-{TAGS[direction]}-deny"


def default_chain(direction: str) -> str:
    return f"fl-{TAGS[direction]}-{DEFAULT}"


def objects(spec: FlowLogSpec, t: dict[str, str]) -> list[dict[str, Any]]:
    """The counter, the node-wide limit and the per-source rate set."""
    return [
        {"add": {"counter": {**t, "name": RATELIMITED_COUNTER}}},
        {"add": {"limit": {**t, "name": CAP_LIMIT, "rate": spec.cap, "per": "second", "burst": spec.cap,
                           "unit": "packets", "inv": True}}},
        *({"add": {"set": {**t, "name": name, "type": kind, "flags": ["timeout"],
                           "timeout": spec.source_timeout, "size": spec.sources}}}
          for name, kind, _ in _rate_sets(spec)),
    ]  # fmt: skip


def _rate_sets(spec: FlowLogSpec) -> list[tuple[str, str, str]]:
    """(set, element type, payload protocol) of each per-source rate set."""
    return [(RATE_SET, "ipv4_addr", "ip"), *([(RATE_SET_V6, "ipv6_addr", "ip6")] if spec.ipv6 else [])]


def log_chains(spec: FlowLogSpec, allows: Iterable[RuleRef]) -> dict[str, list[dict[str, Any]]]:
    """Every log chain of a render: one per allowing rule in ``allows``,
    and per direction the deny and the default chain."""
    chains: dict[str, list[dict[str, Any]]] = {}
    for direction, tag in TAGS.items():
        chains[deny_chain(direction)] = log_chain(spec, f"{PREFIX}:deny:{tag}", verdict="drop", mark=None)
        chains[default_chain(direction)] = log_chain(
            spec, f"{PREFIX}:allow:{tag}:{DEFAULT}", verdict="accept", mark=spec.mark(direction)
        )
    for ref in allows:
        chains[ref.chain] = log_chain(
            spec, ref.prefix, verdict="accept", mark=spec.mark(ref.direction), comment=f"{ref.policy} {ref.name}"
        )
    return chains


def log_chain(spec: FlowLogSpec, prefix: str, *, verdict: str, mark: int | None, comment: str = "") -> list[dict[str, Any]]:
    """The rules of one log chain ({expr, comment}), ending in ``verdict``."""
    v = {verdict: None}
    ct_mark = {"ct": {"key": "mark"}}
    rules = [{"expr": [nft.match({"ct": {"key": "state"}}, "new", "!="), v], "comment": "not a new flow: not logged"}]
    if mark is not None:
        rules.append({"expr": [nft.match({"&": [ct_mark, mark]}, 0, "!="), v], "comment": "flow already logged"})
    limit = {"limit": {"rate": spec.rate, "burst": spec.burst, "per": "second", "inv": True}}
    for name, _, protocol in _rate_sets(spec):  # a packet of the other family does not match
        update = {"set": {"op": "update", "elem": nft.payload(protocol, "saddr"), "set": f"@{name}", "stmt": [limit]}}
        rules.append({"expr": [update, {"counter": RATELIMITED_COUNTER}, v], "comment": "source over its log rate"})
    rules.append({"expr": [{"limit": CAP_LIMIT}, {"counter": RATELIMITED_COUNTER}, v], "comment": "node over its log cap"})
    last: list[dict[str, Any]] = []
    if mark is not None:
        last.append({"mangle": {"key": ct_mark, "value": {"|": [ct_mark, mark]}}})
    last += [{"log": {"prefix": prefix, "group": spec.group}}, v]
    rules.append({"expr": last, "comment": comment or prefix})
    return rules
