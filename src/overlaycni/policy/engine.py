"""Who may talk to whom: the pure NetworkPolicy oracle.

A connection from SRC to DST on PORT/PROTO is allowed when both directions
allow it (upstream semantics):
- egress: if no policy in SRC's namespace with Egress in policyTypes selects
  SRC, SRC is not isolated for egress; otherwise some egress rule of one of
  those policies must match DST and the port;
- ingress: likewise with the policies of DST's namespace selecting DST, whose
  ingress rules must match SRC and the port.
A named port is resolved against the destination pod (name and protocol must
both match). ipBlock peers match pod IPs as well as outside addresses. An
address that is not a pod has no namespace: only ipBlock peers and "all
peers" rules match it, and it is never isolated itself. A pod's traffic to
itself never leaves its namespace and is always allowed (upstream ignores
loopback too).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from ipaddress import IPv4Address

from .model import NamespaceInfo, NetworkPolicy, PodInfo, PolicyPeer, PolicyPort, Rule


@dataclass(frozen=True)
class Decision:
    """The outcome in one direction (``Ingress`` or ``Egress``)."""

    direction: str
    allowed: bool
    isolated: bool
    policy: str | None = None  # ns/name of the policy that allowed it
    rule: int | None = None  # index of that rule in spec.ingress / spec.egress
    policies: tuple[str, ...] = ()  # every policy isolating the pod in this direction
    reason: str = ""


@dataclass(frozen=True)
class Verdict:
    allowed: bool
    ingress: Decision
    egress: Decision
    reason: str
    policy: str | None = None  # the deciding policy (None: a default)
    rule: str | None = None  # e.g. "ingress[0]"


@dataclass(frozen=True)
class Cluster:
    """Pods and namespaces indexed for lookups (build once, query often)."""

    pods_by_ip: Mapping[IPv4Address, PodInfo]
    namespaces: Mapping[str, NamespaceInfo]

    @classmethod
    def of(cls, pods: Iterable[PodInfo], namespaces: Iterable[NamespaceInfo]) -> Cluster:
        return cls({p.ip: p for p in pods}, {n.name: n for n in namespaces})

    def namespace_labels(self, name: str) -> Mapping[str, str]:
        ns = self.namespaces.get(name)
        return ns.labels if ns else NamespaceInfo(name).labels


Endpoint = PodInfo | IPv4Address


def peer_matches(peer: PolicyPeer, other: Endpoint, *, policy_ns: str, cluster: Cluster) -> bool:
    """Does ``peer`` (of a policy in ``policy_ns``) match the other end?"""
    ip = other.ip if isinstance(other, PodInfo) else other
    if peer.ip_block is not None:
        return peer.ip_block.contains(ip)
    if not isinstance(other, PodInfo):
        return False
    if peer.namespace_selector is None:
        if other.namespace != policy_ns:
            return False
    elif not peer.namespace_selector.matches(cluster.namespace_labels(other.namespace)):
        return False
    return peer.pod_selector is None or peer.pod_selector.matches(other.labels)


def port_matches(pp: PolicyPort, port: int, *, protocol: str, dst: Endpoint) -> bool:
    """Does a rule port match traffic to ``dst`` on ``port``/``protocol``?"""
    if pp.protocol != protocol:
        return False
    if pp.port is None:
        return True
    if isinstance(pp.port, str):
        return isinstance(dst, PodInfo) and dst.named_port(pp.port, protocol) == port
    if pp.end_port is not None:
        return pp.port <= port <= pp.end_port
    return pp.port == port


def rule_matches(
    rule: Rule, peer: Endpoint, *, policy_ns: str, dst: Endpoint, port: int, protocol: str, cluster: Cluster
) -> bool:
    if rule.ports and not any(port_matches(pp, port, protocol=protocol, dst=dst) for pp in rule.ports):
        return False
    return not rule.peers or any(peer_matches(p, peer, policy_ns=policy_ns, cluster=cluster) for p in rule.peers)


def selecting(pod: PodInfo, direction: str, *, policies: Iterable[NetworkPolicy]) -> list[NetworkPolicy]:
    """The policies that isolate ``pod`` in ``direction``, sorted by key."""
    return sorted(
        (
            p
            for p in policies
            if p.namespace == pod.namespace and p.affects(direction) and p.pod_selector.matches(pod.labels)
        ),
        key=lambda p: p.key,
    )


def decide(
    direction: str,
    subject: Endpoint,
    *,
    peer: Endpoint,
    port: int,
    protocol: str,
    dst: Endpoint,
    policies: Iterable[NetworkPolicy],
    cluster: Cluster,
) -> Decision:
    """The decision for ``subject`` (the pod whose policies apply) talking
    with ``peer`` in ``direction``; ``dst`` resolves named ports."""
    if not isinstance(subject, PodInfo):
        return Decision(direction, True, False, reason=f"{subject} is not a pod: no {direction.lower()} policy applies")
    chosen = selecting(subject, direction, policies=policies)
    keys = tuple(p.key for p in chosen)
    if not chosen:
        return Decision(direction, True, False, reason=f"{subject.key} is not isolated for {direction.lower()}")
    for pol in chosen:
        for i, rule in enumerate(pol.rules(direction)):
            if rule_matches(rule, peer, policy_ns=pol.namespace, dst=dst, port=port, protocol=protocol, cluster=cluster):
                return Decision(
                    direction, True, True, pol.key, i, keys, f"allowed by {pol.key} {direction.lower()}[{i}]"
                )
    return Decision(
        direction,
        False,
        True,
        policies=keys,
        reason=f"{subject.key} is isolated for {direction.lower()} by {', '.join(keys)} and no rule matches",
    )


def allowed(
    src: Endpoint,
    dst: Endpoint,
    port: int,
    protocol: str,
    *,
    pods: Iterable[PodInfo],
    namespaces: Iterable[NamespaceInfo],
    policies: Iterable[NetworkPolicy],
) -> Verdict:
    """May ``src`` open a connection to ``dst`` on ``port``/``protocol``?
    An address that belongs to a known pod is treated as that pod."""
    return evaluate(src, dst, port, protocol, policies=list(policies), cluster=Cluster.of(pods, namespaces))


def evaluate(
    src: Endpoint, dst: Endpoint, port: int, protocol: str, *, policies: list[NetworkPolicy], cluster: Cluster
) -> Verdict:
    """``allowed`` with a prebuilt Cluster index (for all-pairs matrices)."""
    protocol = protocol.upper()
    if isinstance(src, IPv4Address):
        src = cluster.pods_by_ip.get(src, src)
    if isinstance(dst, IPv4Address):
        dst = cluster.pods_by_ip.get(dst, dst)
    if isinstance(src, PodInfo) and isinstance(dst, PodInfo) and src.ip == dst.ip:
        d = Decision("Ingress", True, False, reason="loopback")
        e = Decision("Egress", True, False, reason="loopback")
        return Verdict(True, d, e, "a pod's traffic to itself never leaves its network namespace")
    egress = decide("Egress", src, peer=dst, port=port, protocol=protocol, dst=dst, policies=policies, cluster=cluster)
    ingress = decide("Ingress", dst, peer=src, port=port, protocol=protocol, dst=dst, policies=policies, cluster=cluster)
    if not egress.allowed:
        return Verdict(False, ingress, egress, f"egress denied: {egress.reason}")
    if not ingress.allowed:
        return Verdict(False, ingress, egress, f"ingress denied: {ingress.reason}")
    # Allowed: name the policy that admitted it at the destination, else at the source.
    for d in (ingress, egress):
        if d.policy is not None:
            return Verdict(True, ingress, egress, d.reason, d.policy, f"{d.direction.lower()}[{d.rule}]")
    return Verdict(True, ingress, egress, "neither end is isolated: allowed by default")


def matrix(
    pods: list[PodInfo], *, port: int, protocol: str, namespaces: Iterable[NamespaceInfo], policies: Iterable[NetworkPolicy]
) -> dict[tuple[str, str], bool]:
    """Reachability of every ordered pair of pods: {(src key, dst key): allowed}."""
    cluster = Cluster.of(pods, namespaces)
    pols = list(policies)
    return {
        (s.key, d.key): evaluate(s, d, port, protocol, policies=pols, cluster=cluster).allowed for s in pods for d in pods
    }
