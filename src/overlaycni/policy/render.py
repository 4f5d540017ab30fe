"""Render NetworkPolicy for one node as an ``nft -j`` document (pure).

Design note
-----------
One table, ``inet overlaycni`` (the data plane's ``ip overlaycni`` NAT /
anti-spoofing table is a different table and never touched here). Pods hang
off host veths with /32 routes, so every pod packet this node must judge —
same node or cross node, VXLAN-decapsulated or routed — crosses the FORWARD
hook. Matching is by address only, never by interface.

Objects, all derived from the *policies* alone (so pods and labels never
change the structure):
- base chain ``egress`` (forward, priority 0) then base chain ``ingress``
  (forward, priority 1). Each starts with ``ct state established,related
  accept``, so replies of allowed connections always pass. An ``accept`` in
  ``egress`` only ends that base chain; the packet still meets ``ingress``,
  so both directions must allow a new connection. Policy ``accept``.
- verdict maps ``egress-pods`` (key ip saddr) and ``ingress-pods`` (key ip
  daddr) hold *this node's* pods that are isolated in that direction and
  jump to the chain of the pod's namespace. Pods of other nodes and
  non-isolated pods have no element and pass: egress is enforced at the
  source's node, ingress at the destination's.
- per namespace and direction, chain ``eg-ns-<ns>`` / ``in-ns-<ns>``: one
  ``ip saddr|daddr @<target set> jump <policy chain>`` per policy of that
  namespace, then ``drop`` (default deny: only isolated pods get here).
- per policy and direction, chain ``eg-<hash>`` / ``in-<hash>``: one rule per
  (peer, port group) of each rule, ``accept`` on match; the comment names
  ``ns/policy ingress[i]``.
- named sets ``sel-<hash>`` of pod IPs, one per distinct selection
  (namespace or namespaceSelector, podSelector), shared by every policy that
  uses it, cluster wide; named sets ``np-<proto>-<port name>`` of
  ``ip . port`` for named ports, matched with ``ip daddr . <proto> dport``,
  so a name resolves on the destination pod.

Scaling: rules grow with the policies' rules (x peers x port groups), not
with pods; set elements grow with pods x the selections that pick them; a
new pod or a label change only adds or deletes set / map elements
(``diff_render``), a policy change re-renders the table atomically. A
connection costs its first packet one map lookup plus, per policy of the
namespace, one set lookup; later packets stop at the conntrack rule.

Families. The ``inet`` table sees IPv4 and IPv6 packets alike; what is
per family is the address match. A dual-stack render (``families`` IPv4 and
IPv6) keeps every IPv4 object above and adds its IPv6 twin beside it, named
with ``-v6``: ``sel-<hash>-v6`` (``ipv6_addr``), ``np-<proto>-<name>-v6``
(``ipv6_addr . inet_service``) and the maps ``egress-pods-v6`` /
``ingress-pods-v6``, which hold the IPv6 address of each isolated local pod
and jump to the same namespace chain as its IPv4 address. Every rule that
matches an address is rendered once per family (``ip saddr @sel-X`` and
``ip6 saddr @sel-X-v6``); a rule without one (ports only, or no
conditions) once, for both. An ipBlock is one family's, as in Kubernetes:
an IPv6 block (with its ``except``) becomes ``ip6`` matches only, and an
IPv4 block never admits IPv6 traffic. An IPv4-only render (``families``
IPv4, or not given and no pod has an IPv6 address) is exactly the
table above, without a single IPv6 object; IPv6 packets then meet no
verdict map and pass (single-stack pods send none beyond their link).

Flow logs (``flow_log``, off by default): each decision ends in a log
chain instead of its bare verdict, and the verdict maps also send this
node's non-isolated pods to a logging chain; ``policy.flowlog`` has the
design. Without ``flow_log`` the table is exactly the one described above.

Rejected: per-pod chains (pods x policies jumps); one chain per node walked
by every packet (cost grows with all policies); iptables-style
interface matches (VXLAN and direct backends arrive on different devices);
one set of both families (an nft set has one key type; ``inet`` sets do not
mix ``ipv4_addr`` and ``ipv6_addr``).
"""

from __future__ import annotations

import hashlib
import json
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from ..cidr import IPAddress
from ..dataplane import nftables as nft
from ..dataplane.policytable import FAMILY, TABLE
from ..families import SINGLE_STACK, IPFamily
from . import flowlog
from .engine import Cluster
from .flowlog import FlowLogSpec
from .gcpause import collector_held
from .model import NamespaceInfo, NetworkPolicy, PodInfo, PolicyPeer, PolicyPort, Rule
from .selectors import EVERYTHING, LabelSelector

EGRESS_PRIORITY = 0
INGRESS_PRIORITY = 1
_T = {"family": FAMILY, "table": TABLE}
_DIR = {"Ingress": ("in", "daddr", "saddr", "ingress"), "Egress": ("eg", "saddr", "daddr", "egress")}
# per family: the nft payload protocol of its header, its address type, the suffix of its objects' names
_PROTO = {IPFamily.ipv4: "ip", IPFamily.ipv6: "ip6"}
_ADDR_TYPE = {IPFamily.ipv4: "ipv4_addr", IPFamily.ipv6: "ipv6_addr"}
_SUFFIX = {IPFamily.ipv4: "", IPFamily.ipv6: "-v6"}

Alternative = tuple[IPFamily | None, list[dict]]  # the family it is for (None: both) and its matches


@dataclass(frozen=True)
class Selection:
    """Pods in ``namespace`` (or in namespaces matching ``namespace_selector``)
    whose labels match ``pod_selector``; equal selections share one set."""

    namespace: str | None
    namespace_selector: LabelSelector | None
    pod_selector: LabelSelector = EVERYTHING

    @property
    def set_name(self) -> str:
        """The name of its IPv4 set (``set_name + "-v6"``: the IPv6 set)."""
        return "sel-" + _digest(repr(self))

    def describe(self) -> str:
        where = f"ns={self.namespace}" if self.namespace is not None else f"ns~{self.namespace_selector.describe()}"  # type: ignore[union-attr]
        return f"{where} pods~{self.pod_selector.describe()}"


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def _addr(field: str, family: IPFamily = IPFamily.ipv4) -> dict:
    return nft.payload(_PROTO[family], field)


class _Builder:
    def __init__(self, cluster: Cluster, pods: list[PodInfo], families: tuple[IPFamily, ...]) -> None:
        self.cluster = cluster
        self.pods = pods
        self.families = families
        self.sets: dict[str, Selection] = {}
        self.named_ports: set[tuple[str, str]] = set()
        self.chains: dict[str, list[dict]] = {}
        self.by_ns: dict[str, list[PodInfo]] = defaultdict(list)
        self._members: dict[Selection, list[PodInfo]] = {}
        for p in pods:
            self.by_ns[p.namespace].append(p)
        self._spaces: dict[LabelSelector, list[str]] = {}  # namespaceSelector -> namespaces with pods it matches
        self._by_label: dict[tuple[str, str], list[str]] | None = None  # label pair -> namespaces with pods

    def selection_set(self, sel: Selection, family: IPFamily = IPFamily.ipv4) -> str:
        self.sets.setdefault(sel.set_name, sel)
        return "@" + sel.set_name + _SUFFIX[family]

    def members(self, sel: Selection) -> list[PodInfo]:
        if sel not in self._members:
            self._members[sel] = self._select(sel)
        return self._members[sel]

    def _namespaces(self, nsel: LabelSelector) -> list[str]:
        """The namespaces (with pods) that ``nsel`` matches, once per selector.
        A selector with ``matchLabels`` tries only the namespaces carrying its
        first pair (an index), so many selectors each naming one namespace
        cost the namespaces once, not once per selector."""
        got = self._spaces.get(nsel)
        if got is None:
            if nsel.match_labels:
                if self._by_label is None:
                    self._by_label = defaultdict(list)
                    for ns in self.by_ns:
                        for pair in self.cluster.namespace_labels(ns).items():
                            self._by_label[pair].append(ns)
                tried: Iterable[str] = self._by_label.get(nsel.match_labels[0], [])
            else:
                tried = self.by_ns
            got = self._spaces[nsel] = [ns for ns in tried if nsel.matches(self.cluster.namespace_labels(ns))]
        return got

    def _select(self, sel: Selection) -> list[PodInfo]:
        if sel.namespace is not None:
            candidates = self.by_ns.get(sel.namespace, [])
        else:
            candidates = [p for ns in self._namespaces(sel.namespace_selector) for p in self.by_ns[ns]]  # type: ignore[arg-type]
        return [p for p in candidates if sel.pod_selector.matches(p.labels)]

    def peer_alternatives(self, peer: PolicyPeer, policy_ns: str, field: str) -> list[Alternative]:
        if peer.ip_block is not None:
            block = peer.ip_block
            fam = block.family
            if fam not in self.families:
                return []
            exprs = [nft.match(_addr(field, fam), nft.prefix(block.cidr))]
            if block.except_:
                exprs.append(nft.match(_addr(field, fam), {"set": [nft.prefix(e) for e in block.except_]}, "!="))
            return [(fam, exprs)]
        pods = peer.pod_selector if peer.pod_selector is not None else EVERYTHING
        if peer.namespace_selector is None:
            sel = Selection(policy_ns, None, pods)
        else:
            sel = Selection(None, peer.namespace_selector, pods)
        return [(f, [nft.match(_addr(field, f), self.selection_set(sel, f))]) for f in self.families]

    def port_alternatives(self, ports: tuple[PolicyPort, ...]) -> list[Alternative]:
        whole: set[str] = set()
        numbers: dict[str, list[Any]] = defaultdict(list)
        named: list[tuple[str, str]] = []
        for pp in ports:
            proto = pp.protocol.lower()
            if pp.port is None:
                whole.add(proto)
            elif isinstance(pp.port, str):
                named.append((proto, pp.port))
            elif pp.end_port is not None and pp.end_port != pp.port:
                numbers[proto].append({"range": [pp.port, pp.end_port]})
            else:
                numbers[proto].append(pp.port)
        out: list[Alternative] = []
        for proto in sorted(set(numbers) | whole):
            if proto in whole:
                out.append((None, [nft.match(nft.meta("l4proto"), proto)]))
                continue
            values = sorted(dict.fromkeys(json.dumps(v) for v in numbers[proto]))
            items = [json.loads(v) for v in values]
            right = items[0] if len(items) == 1 else {"set": items}
            out.append((None, [nft.match(nft.payload(proto, "dport"), right)]))
        for proto, name in sorted(set(named)):
            if proto in whole:
                continue
            self.named_ports.add((proto, name))
            for f in self.families:  # a name resolves on the destination's address of the packet's family
                left = {"concat": [_addr("daddr", f), nft.payload(proto, "dport")]}
                out.append((f, [nft.match(left, f"@np-{proto}-{name}{_SUFFIX[f]}")]))
        return out

    def rule_exprs(self, rule: Rule, policy_ns: str, peer_field: str) -> list[list[dict]]:
        """One list of matches per alternative of ``rule``: each peer
        alternative with each port alternative of a compatible family (an
        IPv6 peer never pairs with an IPv4 named-port set)."""
        if rule.peers:
            peers = [alt for p in rule.peers for alt in self.peer_alternatives(p, policy_ns, peer_field)]
        else:
            peers = [(None, [])]
        ports = self.port_alternatives(rule.ports) if rule.ports else [(None, [])]
        return [pe + po for pf, pe in peers for qf, po in ports if pf is None or qf is None or pf is qf]


def render_families(pods: Iterable[PodInfo], families: Iterable[IPFamily] | None = None) -> tuple[IPFamily, ...]:
    """The families a render covers: ``families`` (the cluster's, IPv4
    first) when given, else IPv4 plus IPv6 when any pod has an IPv6 address."""
    if families is not None:
        return tuple(f for f in (IPFamily.ipv4, IPFamily.ipv6) if f in tuple(families))
    return SINGLE_STACK + ((IPFamily.ipv6,) if any(p.ip_v6 is not None for p in pods) else ())


def policy_rules(
    b: _Builder,
    pol: NetworkPolicy,
    direction: str,
    peer_field: str,
    *,
    flow_log: FlowLogSpec | None,
    allows: list[flowlog.RuleRef],
) -> list[dict]:
    """The body of a policy's chain in one direction: one rule per peer
    alternative, each accepting (or, with flow logs, going to its rule's log
    chain, appended to ``allows``)."""
    body: list[dict] = []
    for i, rule in enumerate(pol.rules(direction)):
        comment = f"{pol.key} {direction.lower()}[{i}]"
        ref = flowlog.RuleRef(pol.key, direction, i)
        verdict: dict = {"accept": None} if flow_log is None else {"goto": {"target": ref.chain}}
        for exprs in b.rule_exprs(rule, pol.namespace, peer_field):
            body.append({"expr": exprs + [verdict], "comment": comment})
            if flow_log is not None and (not allows or allows[-1] != ref):
                allows.append(ref)
    return body


def render_node(
    node: str,
    *,
    pods: Iterable[PodInfo],
    namespaces: Iterable[NamespaceInfo],
    policies: Iterable[NetworkPolicy],
    flow_log: FlowLogSpec | None = None,
    families: Iterable[IPFamily] | None = None,
) -> dict:
    """The whole ``inet overlaycni`` table for ``node`` as one atomic
    ``nft -j`` transaction (add + delete + add the table, then its content).
    ``flow_log``: add the log rules (``policy.flowlog``); None renders the
    table without them. ``families``: the cluster's IP families
    (``render_families``). The cyclic collector is held meanwhile
    (``gcpause``: it made the render quadratic)."""
    with collector_held():
        return _render_node(node, pods=pods, namespaces=namespaces, policies=policies, flow_log=flow_log,
                            families=families)  # fmt: skip


def _render_node(
    node: str,
    *,
    pods: Iterable[PodInfo],
    namespaces: Iterable[NamespaceInfo],
    policies: Iterable[NetworkPolicy],
    flow_log: FlowLogSpec | None,
    families: Iterable[IPFamily] | None,
) -> dict:
    pods = sorted(pods, key=lambda p: (p.namespace, p.name))
    fams = render_families(pods, families)
    if flow_log is not None:
        flow_log = flow_log.for_families(fams)
    cluster = Cluster.of(pods, namespaces)
    policies = sorted(policies, key=lambda p: p.key)
    b = _Builder(cluster, pods, fams)
    isolated: dict[str, dict[IPAddress, str]] = {"Ingress": {}, "Egress": {}}  # pod address -> namespace (or flow log) chain
    ns_chains: dict[str, list[dict]] = {}
    allows: list[flowlog.RuleRef] = []  # the rules with an allow rendered

    for direction, (tag, own_field, peer_field, _) in _DIR.items():
        for pol in (p for p in policies if p.affects(direction)):
            ns_chain = f"{tag}-ns-{pol.namespace}"
            ns_rules = ns_chains.setdefault(ns_chain, [])
            target = Selection(pol.namespace, None, pol.pod_selector)
            for pod in b.members(target):
                if pod.node == node:
                    for ip in pod.ips:
                        isolated[direction][ip] = ns_chain
            pol_chain = f"{tag}-{_digest(pol.key)}"
            body = policy_rules(b, pol, direction, peer_field, flow_log=flow_log, allows=allows)
            if body:
                b.chains[pol_chain] = body
                for f in fams:
                    ns_rules.append(
                        {
                            "expr": [nft.match(_addr(own_field, f), b.selection_set(target, f)), nft.jump(pol_chain)],
                            "comment": pol.key,
                        }
                    )
    for name, rules in ns_chains.items():
        direction = "ingress" if name.startswith("in-") else "egress"
        deny: dict = {"drop": None}
        if flow_log is not None:
            deny = {"goto": {"target": flowlog.deny_chain(direction.capitalize())}}
        rules.append({"expr": [deny], "comment": f"default deny: isolated for {direction}"})
        b.chains[name] = rules
    if flow_log is not None:
        b.chains.update(flowlog.log_chains(flow_log, allows))
        for direction in ("Ingress", "Egress"):  # local pods not isolated: logged, then allowed
            for p in pods:
                if p.node == node:
                    for ip in p.ips:
                        if any(ip.version == f.version for f in fams):
                            isolated[direction].setdefault(ip, flowlog.default_chain(direction))

    texts: dict[IPAddress, str] = {}  # each address is written once, however many sets hold it

    def text(ip: IPAddress) -> str:
        out = texts.get(ip)
        if out is None:
            out = texts[ip] = str(ip)
        return out

    cmds: list[dict] = nft.replace_table(FAMILY, TABLE)
    for direction, prio in (("Egress", EGRESS_PRIORITY), ("Ingress", INGRESS_PRIORITY)):
        base = _DIR[direction][3]
        cmds.append(
            {"add": {"chain": {**_T, "name": base, "type": "filter", "hook": "forward", "prio": prio, "policy": "accept"}}}
        )
    if flow_log is not None:
        cmds += flowlog.objects(flow_log, _T)
    for name in sorted(b.chains):
        cmds.append({"add": {"chain": {**_T, "name": name}}})
    for name in sorted(b.sets):
        members = b.members(b.sets[name])
        for f in fams:
            elem = [text(a) for a in _addresses(members, f)]
            cmds.append({"add": {"set": _with_elem({**_T, "name": name + _SUFFIX[f], "type": _ADDR_TYPE[f]}, elem)}})
    for proto, pname in sorted(b.named_ports):
        for f in fams:
            ports_elem = sorted(
                {
                    (a, n)
                    for p in pods
                    if (n := p.named_port(pname, proto.upper())) is not None and (a := p.address(f)) is not None
                },
                key=_numeric_pair,
            )
            cmds.append(
                {
                    "add": {
                        "set": _with_elem(
                            {**_T, "name": f"np-{proto}-{pname}{_SUFFIX[f]}", "type": [_ADDR_TYPE[f], "inet_service"]},
                            [{"concat": [text(a), n]} for a, n in ports_elem],
                        )
                    }
                }
            )
    for direction in ("Egress", "Ingress"):
        base = _DIR[direction][3]
        for f in fams:
            chosen = sorted(((ip, chain) for ip, chain in isolated[direction].items() if ip.version == f.version),
                            key=_numeric_pair)  # fmt: skip
            map_elem = [[text(ip), nft.jump(chain)] for ip, chain in chosen]
            spec = {**_T, "name": f"{base}-pods{_SUFFIX[f]}", "type": _ADDR_TYPE[f], "map": "verdict"}
            cmds.append({"add": {"map": _with_elem(spec, map_elem)}})
    for direction in ("Egress", "Ingress"):
        _, own_field, _, base = _DIR[direction]
        cmds.append(_rule(base, [nft.match({"ct": {"key": "state"}}, ["established", "related"], "in"), {"accept": None}], "replies of allowed connections"))
        for f in fams:
            vmap = {"vmap": {"key": _addr(own_field, f), "data": f"@{base}-pods{_SUFFIX[f]}"}}
            cmds.append(_rule(base, [vmap], f"this node's pods isolated for {base}"))
    for name in sorted(b.chains):
        for r in b.chains[name]:
            cmds.append(_rule(name, r["expr"], r["comment"]))
    return {"nftables": cmds}


def _addresses(pods: Iterable[PodInfo], family: IPFamily) -> list[IPAddress]:
    """The pods' addresses of ``family``, in numeric order (by their
    integers: the same order as comparing the addresses of one family, in C
    rather than through ``ipaddress``'s Python comparisons)."""
    return sorted({a for p in pods if (a := p.address(family)) is not None}, key=int)


def _numeric_pair(item: tuple[IPAddress, Any]) -> tuple[int, Any]:
    """Sort key of (address, port or chain) pairs of one family: the
    address's integer, then the second item (what comparing the tuples does)."""
    return int(item[0]), item[1]


def _rule(chain: str, expr: list[dict], comment: str) -> dict:
    return {"add": {"rule": {**_T, "chain": chain, "expr": expr, "comment": comment[:128]}}}


def _with_elem(obj: dict, elem: list) -> dict:
    if elem:
        obj["elem"] = elem
    return obj


# ----- incremental updates and counts ------------------------------------------------------


def diff_render(old: dict, new: dict) -> dict | None:
    """An ``nft -j`` document of only element deletes and adds that turns the
    applied ``old`` into ``new``; None when chains or sets differ (a policy
    changed) and the whole table must be applied again. An empty command list
    means nothing changed. (The data plane's ``nftables.diff``.)"""
    commands = nft.diff(FAMILY, TABLE, nft.image(old), nft.image(new))
    return None if commands is None else {"nftables": commands}


def counts(render: dict) -> tuple[int, int]:
    """(rules, set and map elements) of a render or a diff."""
    rules = elements = 0
    for cmd in render["nftables"]:
        for verb in ("add", "delete"):
            obj = cmd.get(verb, {})
            if "rule" in obj:
                rules += 1
            for kind in ("set", "map", "element"):
                if kind in obj:
                    elements += len(obj[kind].get("elem", []))
    return rules, elements
