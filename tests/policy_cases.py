"""NetworkPolicy conformance cases over the upstream x/y/z x a/b/c model.

The model is the one of the upstream Kubernetes e2e NetworkPolicy tests
(kubernetes/kubernetes test/e2e/network/netpol): namespaces x, y, z labelled
``ns=<name>``; pods a, b, c in each labelled ``pod=<name>``; every pod serves
TCP and UDP on 80 and 81 with named ports ``serve-80-tcp``, ``serve-80-udp``,
``serve-81-tcp``, ``serve-81-udp``.

Each case is derived from an upstream e2e test or a cyclonus
(mattfenwick/cyclonus) generator case, named in ``source``. Its expectation
is a truth table written BY HAND from the upstream semantics (not computed by
our engine): rows are sources, columns destinations, in the order
x/a x/b x/c y/a y/b y/c z/a z/b z/c; ``.`` = connected, ``X`` = blocked.
Loopback (a pod to itself) is always ``.``: it never leaves the pod's
namespace (upstream ignores loopback for the same reason).

Policies may name pod IPs as ``{ip:y/b}`` and the pod CIDR as ``{pod_cidr}``;
``Case.manifest(model, pod_cidr=...)`` fills them in, so a lab with other
addresses can reuse the cases unchanged (``build_model(ips=..., nodes=...)``).

Dual-stack: ``build_model(dual=True)`` gives every pod an IPv6 address as
well, its IPv4 address's twin (``ipv6_twin``: the IPv4 address in the low 32
bits of ``fd12:3456:789a::/96``, so an IPv4 CIDR /n has the twin /96+n), and
``with_ipv6_twins`` adds to every IPv4 ipBlock peer of a policy its IPv6
twin. The hand-written tables then hold over IPv6 as they do over IPv4 (an
ipBlock only matches its own family, so without the twins they need not).
Policies may name a pod's IPv6 address as ``{ip6:y/b}``.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network

from overlaycni.policy.model import IPBlock, NamedPort, NamespaceInfo, NetworkPolicy, PodInfo, PolicyPeer, Rule

NAMESPACES = ("x", "y", "z")
POD_NAMES = ("a", "b", "c")
ORDER = tuple(f"{ns}/{p}" for ns in NAMESPACES for p in POD_NAMES)
NODES = ("node-1", "node-2", "node-3")
NAMED_PORTS = tuple(
    NamedPort(f"serve-{port}-{proto.lower()}", port, proto) for port in (80, 81) for proto in ("TCP", "UDP")
)


@dataclass(frozen=True)
class Model:
    namespaces: tuple[NamespaceInfo, ...]
    pods: tuple[PodInfo, ...]

    def pod(self, key: str) -> PodInfo:
        return next(p for p in self.pods if p.key == key)


def default_ip(ns_index: int, pod_index: int) -> IPv4Address:
    node = (ns_index + pod_index) % 3
    return IPv4Address(f"10.244.{node + 1}.{10 * (ns_index + 1) + pod_index}")


TWIN_PREFIX = IPv6Network("fd12:3456:789a::/96")


def ipv6_twin(ip: IPv4Address) -> IPv6Address:
    """The IPv6 address the dual-stack model gives the pod with IPv4 ``ip``."""
    return IPv6Address(int(TWIN_PREFIX.network_address) + int(ip))


def ipv6_twin_net(net: IPv4Network) -> IPv6Network:
    return IPv6Network((int(TWIN_PREFIX.network_address) + int(net.network_address), 96 + net.prefixlen))


def with_ipv6_twins(policies: Iterable[NetworkPolicy]) -> list[NetworkPolicy]:
    """``policies`` with each IPv4 ipBlock peer followed by its IPv6 twin."""

    def peers(ps: tuple[PolicyPeer, ...]) -> tuple[PolicyPeer, ...]:
        out: list[PolicyPeer] = []
        for p in ps:
            out.append(p)
            b = p.ip_block
            if b is not None and isinstance(b.cidr, IPv4Network):
                twin = IPBlock(ipv6_twin_net(b.cidr), tuple(ipv6_twin_net(e) for e in b.except_))
                out.append(PolicyPeer(ip_block=twin))
        return tuple(out)

    def rules(rs: tuple[Rule, ...]) -> tuple[Rule, ...]:
        return tuple(replace(r, peers=peers(r.peers)) for r in rs)

    return [replace(p, ingress=rules(p.ingress), egress=rules(p.egress)) for p in policies]


def build_model(
    *,
    ips: dict[str, IPv4Address] | None = None,
    nodes: dict[str, str] | None = None,
    pod_labels: dict[str, dict[str, str]] | None = None,
    namespace_labels: dict[str, dict[str, str]] | None = None,
    dual: bool = False,
) -> Model:
    """The x/y/z x a/b/c model. Pods spread over three nodes so that every
    namespace has pods on every node; ``ips``/``nodes`` override placement
    (keys ``ns/pod``); ``pod_labels``/``namespace_labels`` replace labels;
    ``dual`` gives every pod the IPv6 twin of its IPv4 address too."""
    ips, nodes = ips or {}, nodes or {}
    pod_labels, namespace_labels = pod_labels or {}, namespace_labels or {}
    namespaces = tuple(NamespaceInfo(ns, namespace_labels.get(ns, {"ns": ns})) for ns in NAMESPACES)
    pods = []
    for i, ns in enumerate(NAMESPACES):
        for j, name in enumerate(POD_NAMES):
            key = f"{ns}/{name}"
            ip = ips.get(key, default_ip(i, j))
            pods.append(
                PodInfo(
                    ns,
                    name,
                    ip,
                    nodes.get(key, NODES[(i + j) % 3]),
                    pod_labels.get(key, {"pod": name}),
                    NAMED_PORTS,
                    ip_v6=ipv6_twin(ip) if dual else None,
                )
            )
    return Model(namespaces, tuple(pods))


@dataclass(frozen=True)
class Case:
    name: str
    source: str
    policy: str  # YAML, one or more documents
    port: int
    protocol: str
    table: str  # 9 rows of 9 cells, see the module docstring
    pod_labels: dict[str, dict[str, str]] = field(default_factory=dict)
    namespace_labels: dict[str, dict[str, str]] = field(default_factory=dict)
    probe: bool = True  # False: not probeable here (SCTP)

    def model(self, **kw) -> Model:
        return build_model(pod_labels=self.pod_labels or None, namespace_labels=self.namespace_labels or None, **kw)

    def manifest(self, model: Model, *, pod_cidr: str = "10.244.0.0/16") -> str:
        """The policy YAML with ``{ip:ns/pod}`` and ``{pod_cidr}`` filled in."""
        text = self.policy.replace("{pod_cidr}", pod_cidr)
        for p in model.pods:
            text = text.replace("{ip:" + p.key + "}", str(p.ip))
            if p.ip_v6 is not None:
                text = text.replace("{ip6:" + p.key + "}", str(p.ip_v6))
        return text

    def expected(self) -> dict[tuple[str, str], bool]:
        rows = [r.split()[-1] for r in self.table.strip().splitlines()]
        assert len(rows) == 9 and all(len(r) == 9 and set(r) <= {".", "X"} for r in rows), self.name
        return {(ORDER[i], ORDER[j]): rows[i][j] == "." for i in range(9) for j in range(9)}


def np(ns: str, name: str, spec: str) -> str:
    """A NetworkPolicy document; ``spec`` is YAML indented by 2."""
    return f"apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata:\n  name: {name}\n  namespace: {ns}\nspec:\n{spec}"


ALL = """
xa .........
xb .........
xc .........
ya .........
yb .........
yc .........
za .........
zb .........
zc .........
"""
X_INGRESS_CLOSED = """
xa .XX......
xb X.X......
xc XX.......
ya XXX......
yb XXX......
yc XXX......
za XXX......
zb XXX......
zc XXX......
"""
X_EGRESS_CLOSED = """
xa .XXXXXXXX
xb X.XXXXXXX
xc XX.XXXXXX
ya .........
yb .........
yc .........
za .........
zb .........
zc .........
"""
XA_CLOSED = """
xa .........
xb X........
xc X........
ya X........
yb X........
yc X........
za X........
zb X........
zc X........
"""
XA_FROM_Y = """
xa .........
xb X........
xc X........
ya .........
yb .........
yc .........
za X........
zb X........
zc X........
"""
XA_FROM_XB = """
xa .........
xb .........
xc X........
ya X........
yb X........
yc X........
za X........
zb X........
zc X........
"""
XA_SENDS_NOTHING = """
xa .XXXXXXXX
xb .........
xc .........
ya .........
yb .........
yc .........
za .........
zb .........
zc .........
"""

SEL_XA = "  podSelector:\n    matchLabels:\n      pod: a\n"

CASES: list[Case] = [
    Case("no-policies", "baseline: every pair connects", "", 80, "TCP", ALL),
    Case(
        "default-deny-ingress",
        "e2e: should support a 'default-deny-ingress' policy (policyTypes defaulted)",
        np("x", "deny-ingress", "  podSelector: {}\n"),
        80, "TCP", X_INGRESS_CLOSED,
    ),
    Case(
        "default-deny-all",
        "e2e: should support a 'default-deny-all' policy",
        np("x", "deny-all", "  podSelector: {}\n  policyTypes: [Ingress, Egress]\n"),
        80, "TCP",
        """
        xa .XXXXXXXX
        xb X.XXXXXXX
        xc XX.XXXXXX
        ya XXX......
        yb XXX......
        yc XXX......
        za XXX......
        zb XXX......
        zc XXX......
        """,
    ),
    Case(
        "default-deny-egress",
        "e2e: should deny egress from all pods in a namespace",
        np("x", "deny-egress", "  podSelector: {}\n  policyTypes: [Egress]\n"),
        80, "UDP", X_EGRESS_CLOSED,
    ),
    Case(
        "ingress-from-pod-in-namespace",
        "e2e: should enforce policy to allow traffic from pods within server namespace based on PodSelector",
        np("x", "x-a-from-x-b", SEL_XA + "  ingress:\n  - from:\n    - podSelector:\n        matchLabels:\n          pod: b\n"),
        80, "TCP", XA_FROM_XB,
    ),
    Case(
        "ingress-from-all-namespaces",
        "e2e: should enforce policy to allow ingress traffic from pods in all namespaces",
        np("x", "x-a-from-all-ns", SEL_XA + "  ingress:\n  - from:\n    - namespaceSelector: {}\n"),
        80, "TCP", ALL,
    ),
    Case(
        "ingress-from-other-namespace",
        "e2e: should enforce policy to allow traffic only from a different namespace, based on NamespaceSelector",
        np("x", "x-a-from-ns-y", SEL_XA + "  ingress:\n  - from:\n    - namespaceSelector:\n        matchLabels:\n          ns: y\n"),
        80, "TCP", XA_FROM_Y,
    ),
    Case(
        "pod-match-expressions",
        "e2e: should enforce policy based on PodSelector with MatchExpressions",
        np(
            "x", "x-ab-from-not-c",
            "  podSelector:\n    matchExpressions:\n    - {key: pod, operator: In, values: [a, b]}\n"
            "  ingress:\n  - from:\n    - podSelector:\n        matchExpressions:\n        - {key: pod, operator: NotIn, values: [c]}\n",
        ),
        80, "TCP",
        """
        xa .........
        xb .........
        xc XX.......
        ya XX.......
        yb XX.......
        yc XX.......
        za XX.......
        zb XX.......
        zc XX.......
        """,
    ),
    Case(
        "namespace-match-expressions",
        "e2e: should enforce policy based on NamespaceSelector with MatchExpressions",
        np("x", "x-a-from-not-xy", SEL_XA + "  ingress:\n  - from:\n    - namespaceSelector:\n        matchExpressions:\n        - {key: ns, operator: NotIn, values: [x, y]}\n"),
        80, "TCP",
        """
        xa .........
        xb X........
        xc X........
        ya X........
        yb X........
        yc X........
        za .........
        zb .........
        zc .........
        """,
    ),
    Case(
        "pod-or-namespace",
        "e2e: should enforce policy based on PodSelector or NamespaceSelector (separate peers: OR)",
        np(
            "x", "x-a-pod-or-ns",
            SEL_XA + "  ingress:\n  - from:\n    - namespaceSelector:\n        matchExpressions:\n        - {key: ns, operator: In, values: [y]}\n"
            "    - podSelector:\n        matchLabels:\n          pod: b\n",
        ),
        80, "TCP",
        """
        xa .........
        xb .........
        xc X........
        ya .........
        yb .........
        yc .........
        za X........
        zb X........
        zc X........
        """,
    ),
    Case(
        "pod-and-namespace",
        "e2e: should enforce policy based on PodSelector and NamespaceSelector (one peer: AND)",
        np(
            "x", "x-a-pod-and-ns",
            SEL_XA + "  ingress:\n  - from:\n    - namespaceSelector:\n        matchExpressions:\n        - {key: ns, operator: In, values: [y, z]}\n"
            "      podSelector:\n        matchLabels:\n          pod: b\n",
        ),
        80, "TCP",
        """
        xa .........
        xb X........
        xc X........
        ya X........
        yb .........
        yc X........
        za X........
        zb .........
        zc X........
        """,
    ),
    Case(
        "multiple-pod-and-namespace-selectors",
        "e2e: should enforce policy based on Multiple PodSelectors and NamespaceSelectors",
        np(
            "x", "x-a-multi",
            SEL_XA + "  ingress:\n  - from:\n    - namespaceSelector:\n        matchExpressions:\n        - {key: ns, operator: NotIn, values: [x]}\n"
            "      podSelector:\n        matchExpressions:\n        - {key: pod, operator: In, values: [b, c]}\n",
        ),
        80, "TCP",
        """
        xa .........
        xb X........
        xc X........
        ya X........
        yb .........
        yc .........
        za X........
        zb .........
        zc .........
        """,
    ),
    Case(
        "any-pod-selectors",
        "e2e: should enforce policy based on any PodSelectors",
        np(
            "x", "x-a-from-b-or-c",
            SEL_XA + "  ingress:\n  - from:\n    - podSelector:\n        matchLabels: {pod: b}\n    - podSelector:\n        matchLabels: {pod: c}\n",
        ),
        80, "TCP",
        """
        xa .........
        xb .........
        xc .........
        ya X........
        yb X........
        yc X........
        za X........
        zb X........
        zc X........
        """,
    ),
    Case(
        "pod-in-other-namespace",
        "e2e: should enforce policy to allow traffic only from a pod in a different namespace based on PodSelector and NamespaceSelector",
        np("x", "x-a-from-y-a", SEL_XA + "  ingress:\n  - from:\n    - namespaceSelector:\n        matchLabels: {ns: y}\n      podSelector:\n        matchLabels: {pod: a}\n"),
        80, "TCP",
        """
        xa .........
        xb X........
        xc X........
        ya .........
        yb X........
        yc X........
        za X........
        zb X........
        zc X........
        """,
    ),
    Case(
        "port-81-only-probe-80",
        "e2e: should enforce policy based on Ports (port 80 probed)",
        np("x", "x-a-81-from-y", SEL_XA + "  ingress:\n  - from:\n    - namespaceSelector:\n        matchLabels: {ns: y}\n    ports:\n    - port: 81\n"),
        80, "TCP", XA_CLOSED,
    ),
    Case(
        "port-81-only-probe-81",
        "e2e: should enforce policy based on Ports (port 81 probed)",
        np("x", "x-a-81-from-y", SEL_XA + "  ingress:\n  - from:\n    - namespaceSelector:\n        matchLabels: {ns: y}\n    ports:\n    - port: 81\n"),
        81, "TCP", XA_FROM_Y,
    ),
    Case(
        "stacked-policies",
        "e2e: should enforce multiple, stacked policies with overlapping podSelectors (union)",
        np("x", "x-a-81-from-y", SEL_XA + "  ingress:\n  - from:\n    - namespaceSelector:\n        matchLabels: {ns: y}\n    ports:\n    - port: 81\n")
        + "---\n"
        + np("x", "x-a-80-from-z", SEL_XA + "  ingress:\n  - from:\n    - namespaceSelector:\n        matchLabels: {ns: z}\n    ports:\n    - port: 80\n"),
        80, "TCP",
        """
        xa .........
        xb X........
        xc X........
        ya X........
        yb X........
        yc X........
        za .........
        zb .........
        zc .........
        """,
    ),
    Case(
        "deny-all-plus-allow-all-for-a",
        "e2e: should enforce multiple ingress policies with ingress allow-all policy taking precedence",
        np("x", "deny-ingress", "  podSelector: {}\n  policyTypes: [Ingress]\n")
        + "---\n"
        + np("x", "x-a-allow-all", SEL_XA + "  ingress:\n  - {}\n"),
        80, "TCP",
        """
        xa .XX......
        xb ..X......
        xc .X.......
        ya .XX......
        yb .XX......
        yc .XX......
        za .XX......
        zb .XX......
        zc .XX......
        """,
    ),
    Case(
        "egress-port-81-only",
        "e2e: should enforce multiple egress policies with egress allow-all policy taking precedence (first policy only)",
        np("x", "x-a-egress-81", SEL_XA + "  policyTypes: [Egress]\n  egress:\n  - ports:\n    - port: 81\n"),
        80, "TCP", XA_SENDS_NOTHING,
    ),
    Case(
        "egress-allow-all-takes-precedence",
        "e2e: should enforce multiple egress policies with egress allow-all policy taking precedence",
        np("x", "x-a-egress-81", SEL_XA + "  policyTypes: [Egress]\n  egress:\n  - ports:\n    - port: 81\n")
        + "---\n"
        + np("x", "x-a-egress-all", SEL_XA + "  policyTypes: [Egress]\n  egress:\n  - {}\n"),
        80, "TCP", ALL,
    ),
    Case(
        "egress-without-policy-types-isolates-ingress-too",
        "API defaulting: spec.egress non-empty and no policyTypes gives [Ingress, Egress] (cyclonus)",
        np("x", "x-a-egress-81", SEL_XA + "  egress:\n  - ports:\n    - port: 81\n"),
        80, "TCP",
        """
        xa .XXXXXXXX
        xb X........
        xc X........
        ya X........
        yb X........
        yc X........
        za X........
        zb X........
        zc X........
        """,
    ),
    Case(
        "named-port-81-probe-81",
        "e2e: should allow ingress access on one named port",
        np("x", "x-named-81", "  podSelector: {}\n  ingress:\n  - ports:\n    - port: serve-81-tcp\n"),
        81, "TCP", ALL,
    ),
    Case(
        "named-port-81-probe-80",
        "e2e: should allow ingress access on one named port (other port blocked)",
        np("x", "x-named-81", "  podSelector: {}\n  ingress:\n  - ports:\n    - port: serve-81-tcp\n"),
        80, "TCP", X_INGRESS_CLOSED,
    ),
    Case(
        "named-port-from-namespace",
        "e2e: should allow ingress access from namespace on one named port",
        np("x", "x-80-from-y", "  podSelector: {}\n  ingress:\n  - from:\n    - namespaceSelector:\n        matchLabels: {ns: y}\n    ports:\n    - port: serve-80-tcp\n"),
        80, "TCP",
        """
        xa .XX......
        xb X.X......
        xc XX.......
        ya .........
        yb .........
        yc .........
        za XXX......
        zb XXX......
        zc XXX......
        """,
    ),
    Case(
        "egress-named-port-probe-81",
        "e2e: should allow egress access on one named port (other port blocked)",
        np("x", "x-egress-80", "  podSelector: {}\n  policyTypes: [Egress]\n  egress:\n  - ports:\n    - port: serve-80-tcp\n"),
        81, "TCP", X_EGRESS_CLOSED,
    ),
    Case(
        "egress-named-port-probe-80",
        "e2e: should allow egress access on one named port",
        np("x", "x-egress-80", "  podSelector: {}\n  policyTypes: [Egress]\n  egress:\n  - ports:\n    - port: serve-80-tcp\n"),
        80, "TCP", ALL,
    ),
    Case(
        "ingress-and-egress-together",
        "e2e: should work with Ingress, Egress specified together",
        np(
            "x", "x-a-both",
            SEL_XA + "  policyTypes: [Ingress, Egress]\n  ingress:\n  - from:\n    - podSelector:\n        matchLabels: {pod: b}\n"
            "  egress:\n  - to:\n    - namespaceSelector:\n        matchLabels: {ns: y}\n",
        ),
        80, "TCP",
        """
        xa .XX...XXX
        xb .........
        xc X........
        ya X........
        yb X........
        yc X........
        za X........
        zb X........
        zc X........
        """,
    ),
    Case(
        "egress-denied-even-if-server-allows",
        "e2e: should support denying of egress traffic on the client side (even if the server explicitly allows this traffic)",
        np("x", "x-a-deny-egress", SEL_XA + "  policyTypes: [Egress]\n")
        + "---\n"
        + np("y", "y-from-x-a", "  podSelector: {}\n  ingress:\n  - from:\n    - namespaceSelector:\n        matchLabels: {ns: x}\n      podSelector:\n        matchLabels: {pod: a}\n"),
        80, "TCP",
        """
        xa .XXXXXXXX
        xb ...XXX...
        xc ...XXX...
        ya ....XX...
        yb ...X.X...
        yc ...XX....
        za ...XXX...
        zb ...XXX...
        zc ...XXX...
        """,
    ),
    Case(
        "egress-to-pod-in-other-namespace",
        "e2e: should enforce egress policy allowing traffic to a server in a different namespace based on PodSelector and NamespaceSelector",
        np("x", "x-a-to-y-a", SEL_XA + "  policyTypes: [Egress]\n  egress:\n  - to:\n    - namespaceSelector:\n        matchLabels: {ns: y}\n      podSelector:\n        matchLabels: {pod: a}\n"),
        80, "UDP",
        """
        xa .XX.XXXXX
        xb .........
        xc .........
        ya .........
        yb .........
        yc .........
        za .........
        zb .........
        zc .........
        """,
    ),
    Case(
        "protocol-only-udp-probe-tcp",
        "e2e: should enforce ingress policy allowing any port traffic to a server on a specific protocol (TCP blocked)",
        np("x", "x-a-udp-any-port", SEL_XA + "  ingress:\n  - ports:\n    - protocol: UDP\n"),
        80, "TCP", XA_CLOSED,
    ),
    Case(
        "protocol-only-udp-probe-udp",
        "e2e: should enforce ingress policy allowing any port traffic to a server on a specific protocol",
        np("x", "x-a-udp-any-port", SEL_XA + "  ingress:\n  - ports:\n    - protocol: UDP\n"),
        81, "UDP", ALL,
    ),
    Case(
        "udp-81-only-probe-tcp-81",
        "e2e: should not allow access by TCP when a policy specifies only UDP",
        np("x", "x-a-udp-81", SEL_XA + "  ingress:\n  - ports:\n    - protocol: UDP\n      port: 81\n"),
        81, "TCP", XA_CLOSED,
    ),
    Case(
        "udp-81-only-probe-udp-80",
        "e2e: should not allow access by TCP when a policy specifies only UDP (other UDP port)",
        np("x", "x-a-udp-81", SEL_XA + "  ingress:\n  - ports:\n    - protocol: UDP\n      port: 81\n"),
        80, "UDP", XA_CLOSED,
    ),
    Case(
        "sctp-is-not-tcp",
        "e2e: should not mistakenly treat 'protocol: SCTP' as 'protocol: TCP', even if the plugin doesn't support SCTP",
        np("x", "x-a-sctp-80", SEL_XA + "  ingress:\n  - ports:\n    - protocol: SCTP\n      port: 80\n"),
        80, "TCP", XA_CLOSED,
    ),
    Case(
        "sctp-policy-isolates",
        "e2e: should properly isolate pods that are selected by a policy allowing SCTP, even if the plugin doesn't support SCTP",
        np("x", "x-sctp-81", "  podSelector: {}\n  ingress:\n  - ports:\n    - protocol: SCTP\n      port: 81\n"),
        81, "TCP", X_INGRESS_CLOSED,
    ),
    Case(
        "sctp-allowed",
        "cyclonus: SCTP port rule, SCTP probe (rendered and modelled; not probed: no SCTP in this kernel)",
        np("x", "x-sctp-81", "  podSelector: {}\n  ingress:\n  - ports:\n    - protocol: SCTP\n      port: 81\n"),
        81, "SCTP", ALL, probe=False,
    ),
    Case(
        "egress-to-cidr",
        "e2e: should allow egress access to server in CIDR block",
        np("x", "x-a-to-cidr", SEL_XA + "  policyTypes: [Egress]\n  egress:\n  - to:\n    - ipBlock:\n        cidr: '{ip:y/b}/32'\n"),
        80, "TCP",
        """
        xa .XXX.XXXX
        xb .........
        xc .........
        ya .........
        yb .........
        yc .........
        za .........
        zb .........
        zc .........
        """,
    ),
    Case(
        "egress-cidr-except",
        "e2e: should enforce except clause while egress access to server in CIDR block",
        np("x", "x-a-to-pods-except-y-b", SEL_XA + "  policyTypes: [Egress]\n  egress:\n  - to:\n    - ipBlock:\n        cidr: '{pod_cidr}'\n        except: ['{ip:y/b}/32']\n"),
        80, "TCP",
        """
        xa ....X....
        xb .........
        xc .........
        ya .........
        yb .........
        yc .........
        za .........
        zb .........
        zc .........
        """,
    ),
    Case(
        "egress-everything-except",
        "e2e: should ensure an IP overlapping both IPBlock.CIDR and IPBlock.Except is allowed (first policy alone)",
        np("x", "x-a-except-y-b", SEL_XA + "  policyTypes: [Egress]\n  egress:\n  - to:\n    - ipBlock:\n        cidr: 0.0.0.0/0\n        except: ['{ip:y/b}/32']\n"),
        81, "UDP",
        """
        xa ....X....
        xb .........
        xc .........
        ya .........
        yb .........
        yc .........
        za .........
        zb .........
        zc .........
        """,
    ),
    Case(
        "cidr-and-except-overlap-allowed",
        "e2e: should ensure an IP overlapping both IPBlock.CIDR and IPBlock.Except is allowed",
        np("x", "x-a-except-y-b", SEL_XA + "  policyTypes: [Egress]\n  egress:\n  - to:\n    - ipBlock:\n        cidr: 0.0.0.0/0\n        except: ['{ip:y/b}/32']\n")
        + "---\n"
        + np("x", "x-a-to-y-b", SEL_XA + "  policyTypes: [Egress]\n  egress:\n  - to:\n    - ipBlock:\n        cidr: '{ip:y/b}/32'\n"),
        81, "UDP", ALL,
    ),
    Case(
        "ingress-and-egress-independent",
        "e2e: should enforce policies to check ingress and egress policies can be controlled independently based on PodSelector",
        np("x", "x-a-deny-egress", SEL_XA + "  policyTypes: [Egress]\n")
        + "---\n"
        + np("x", "x-b-deny-ingress", "  podSelector:\n    matchLabels: {pod: b}\n  policyTypes: [Ingress]\n"),
        80, "TCP",
        """
        xa .XXXXXXXX
        xb .........
        xc .X.......
        ya .X.......
        yb .X.......
        yc .X.......
        za .X.......
        zb .X.......
        zc .X.......
        """,
    ),
    Case(
        "end-port-probe-below-range",
        "e2e [Feature:NetworkPolicyEndPort]: port range (endPort), port below the range",
        np("x", "x-81-to-82", "  podSelector: {}\n  ingress:\n  - ports:\n    - port: 81\n      endPort: 82\n"),
        80, "TCP", X_INGRESS_CLOSED,
    ),
    Case(
        "end-port-probe-in-range",
        "e2e [Feature:NetworkPolicyEndPort]: port range (endPort), port inside the range",
        np("x", "x-81-to-82", "  podSelector: {}\n  ingress:\n  - ports:\n    - port: 81\n      endPort: 82\n"),
        81, "UDP", X_INGRESS_CLOSED,  # the range is TCP (defaulted); UDP 81 stays blocked
    ),
    Case(
        "end-port-probe-in-range-tcp",
        "e2e [Feature:NetworkPolicyEndPort]: port range (endPort), TCP inside the range",
        np("x", "x-79-to-81", "  podSelector: {}\n  ingress:\n  - ports:\n    - port: 79\n      endPort: 81\n"),
        81, "TCP", ALL,
    ),
    Case(
        "updated-namespace-labels",
        "e2e: should allow ingress access from updated namespace (y gains ns2=updated)",
        np("x", "x-a-from-updated-ns", SEL_XA + "  ingress:\n  - from:\n    - namespaceSelector:\n        matchLabels: {ns2: updated}\n"),
        80, "TCP", XA_FROM_Y,
        namespace_labels={"y": {"ns": "y", "ns2": "updated"}},
    ),
    Case(
        "updated-pod-labels",
        "e2e: should allow ingress access from updated pod (x/b gains pod2=updated)",
        np("x", "x-a-from-updated-pod", SEL_XA + "  ingress:\n  - from:\n    - podSelector:\n        matchLabels: {pod2: updated}\n"),
        80, "TCP", XA_FROM_XB,
        pod_labels={"x/b": {"pod": "b", "pod2": "updated"}},
    ),
    Case(
        "deny-ingress-to-updated-pod",
        "e2e: should deny ingress access to updated pod (x/a gains target=isolated)",
        np("x", "deny-isolated", "  podSelector:\n    matchLabels: {target: isolated}\n  policyTypes: [Ingress]\n"),
        80, "TCP", XA_CLOSED,
        pod_labels={"x/a": {"pod": "a", "target": "isolated"}},
    ),
    Case(
        "default-namespace-label",
        "e2e: should enforce policy based on NamespaceSelector with MatchExpressions using default ns label",
        np("x", "x-a-not-from-y", SEL_XA + "  ingress:\n  - from:\n    - namespaceSelector:\n        matchExpressions:\n        - {key: kubernetes.io/metadata.name, operator: NotIn, values: [y]}\n"),
        80, "TCP",
        """
        xa .........
        xb .........
        xc .........
        ya X........
        yb X........
        yc X........
        za .........
        zb .........
        zc .........
        """,
    ),
    Case(
        "exists-and-notin",
        "cyclonus: namespaceSelector Exists AND podSelector NotIn, into all pods of x",
        np(
            "x", "x-from-not-a",
            "  podSelector:\n    matchExpressions:\n    - {key: pod, operator: Exists}\n"
            "  ingress:\n  - from:\n    - namespaceSelector:\n        matchExpressions:\n        - {key: ns, operator: Exists}\n"
            "      podSelector:\n        matchExpressions:\n        - {key: pod, operator: NotIn, values: [a]}\n",
        ),
        80, "TCP",
        """
        xa .XX......
        xb .........
        xc .........
        ya XXX......
        yb .........
        yc .........
        za XXX......
        zb .........
        zc .........
        """,
    ),
    Case(
        "does-not-exist-matches-nothing",
        "cyclonus: podSelector DoesNotExist on a label every pod has: isolates and admits nobody",
        np("x", "x-from-unlabelled", "  podSelector: {}\n  ingress:\n  - from:\n    - podSelector:\n        matchExpressions:\n        - {key: pod, operator: DoesNotExist}\n"),
        80, "TCP", X_INGRESS_CLOSED,
    ),
    Case(
        "named-port-protocol-mismatch",
        "cyclonus: named port serve-80-udp with protocol TCP resolves to nothing",
        np("x", "x-bad-named-port", "  podSelector: {}\n  ingress:\n  - ports:\n    - port: serve-80-udp\n      protocol: TCP\n"),
        80, "UDP", X_INGRESS_CLOSED,
    ),
    Case(
        "deny-from-other-namespaces",
        "e2e: should deny ingress from pods on other namespaces",
        np("x", "x-from-x-only", "  podSelector: {}\n  ingress:\n  - from:\n    - podSelector: {}\n"),
        80, "TCP",
        """
        xa .........
        xb .........
        xc .........
        ya XXX......
        yb XXX......
        yc XXX......
        za XXX......
        zb XXX......
        zc XXX......
        """,
    ),
    Case(
        "egress-udp-named-port",
        "cyclonus: egress on named port serve-81-udp, UDP 80 probed",
        np("x", "x-a-egress-81-udp", SEL_XA + "  policyTypes: [Egress]\n  egress:\n  - ports:\n    - port: serve-81-udp\n      protocol: UDP\n"),
        80, "UDP", XA_SENDS_NOTHING,
    ),
]


def case(name: str) -> Case:
    return next(c for c in CASES if c.name == name)
