"""Flow records, their filters and the agent's bounded ring of them (pure).

A ``FlowRecord`` is one new flow a node's policy table decided, in one
direction: egress records come from the source's node, ingress records
from the destination's, so a connection between pods of two nodes shows up
once on each (a denied egress only on the source's). Its JSON is the
contract of ``GET /flows`` (one object per line), ``overlaycni flows`` and
``overlaycni lab flows``::

    {"time": "2026-01-02T03:04:05.678901Z", "node": "node1",
     "direction": "ingress", "verdict": "deny", "proto": "TCP", "dport": 80,
     "src": {"ip": "10.244.1.2", "pod": "client", "namespace": "y"},
     "dst": {"ip": "10.244.0.2", "pod": "web", "namespace": "x"},
     "policies": ["x/deny-all"]}

``policies`` names, for an allow, the policy whose rule allowed it (empty
when the pod is not isolated in that direction); for a deny, every policy
that isolates the pod. The agent's lines add ``rule`` (``ingress[0]``, the
allowing rule) and ``seq`` (the ring's cursor); the CLIs print exactly the
keys above.
"""

from __future__ import annotations

import json
import threading
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any
from urllib.error import HTTPError, URLError
from urllib.parse import urlencode
from urllib.request import urlopen

from ..errors import AgentUnavailable, UsageError

VERDICTS = ("allow", "deny")
DIRECTIONS = ("ingress", "egress")
CONTRACT_KEYS = ("time", "node", "direction", "verdict", "proto", "dport", "src", "dst", "policies")
MAX_WAIT = 30.0  # seconds a follow request may wait for new records


@dataclass(frozen=True)
class FlowEndpoint:
    ip: str
    pod: str | None = None
    namespace: str | None = None

    @property
    def key(self) -> str | None:
        return f"{self.namespace}/{self.pod}" if self.pod is not None else None

    def to_json(self) -> dict[str, Any]:
        return {"ip": self.ip, "pod": self.pod, "namespace": self.namespace}


@dataclass(frozen=True)
class FlowRecord:
    time: float  # seconds since the epoch
    node: str
    direction: str  # ingress | egress
    verdict: str  # allow | deny
    proto: str
    dport: int | None
    src: FlowEndpoint
    dst: FlowEndpoint
    policies: tuple[str, ...] = ()
    rule: str | None = None  # the allowing rule, e.g. "ingress[0]"
    seq: int = 0  # position in the node's ring (0: not in a ring)

    def to_json(self, *, contract: bool = False) -> dict[str, Any]:
        """The record as JSON; ``contract``: exactly the documented keys."""
        out: dict[str, Any] = {
            "time": format_time(self.time), "node": self.node, "direction": self.direction,
            "verdict": self.verdict, "proto": self.proto, "dport": self.dport,
            "src": self.src.to_json(), "dst": self.dst.to_json(), "policies": list(self.policies),
        }  # fmt: skip
        if not contract:
            out["rule"] = self.rule
            out["seq"] = self.seq
        return out

    @classmethod
    def from_json(cls, raw: Any) -> FlowRecord:
        """A record from one ``/flows`` line; ValueError names the bad field."""
        if not isinstance(raw, Mapping):
            raise ValueError("a flow record must be a JSON object")
        missing = [k for k in CONTRACT_KEYS if k not in raw]
        if missing:
            raise ValueError(f"missing {', '.join(missing)}")
        if raw["direction"] not in DIRECTIONS:
            raise ValueError(f"direction: {raw['direction']!r} is not ingress or egress")
        if raw["verdict"] not in VERDICTS:
            raise ValueError(f"verdict: {raw['verdict']!r} is not allow or deny")
        dport = raw["dport"]
        if dport is not None and (not isinstance(dport, int) or not 0 <= dport <= 65535):
            raise ValueError(f"dport: {dport!r} is not a port")
        return cls(
            time=parse_time(raw["time"], field="time"), node=str(raw["node"]), direction=raw["direction"],
            verdict=raw["verdict"], proto=str(raw["proto"]), dport=dport,
            src=_endpoint(raw["src"], "src"), dst=_endpoint(raw["dst"], "dst"),
            policies=tuple(str(p) for p in raw["policies"] or ()),
            rule=raw.get("rule"), seq=int(raw.get("seq") or 0),
        )  # fmt: skip


def _endpoint(raw: Any, field: str) -> FlowEndpoint:
    if not isinstance(raw, Mapping) or not isinstance(raw.get("ip"), str):
        raise ValueError(f"{field}: must be an object with ip, pod and namespace")
    return FlowEndpoint(raw["ip"], raw.get("pod"), raw.get("namespace"))


def format_time(t: float) -> str:
    """RFC 3339, UTC, microseconds."""
    return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse_time(text: Any, *, field: str) -> float:
    """An RFC 3339 time or seconds since the epoch."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        return float(text)
    if isinstance(text, str):
        try:
            return float(text)
        except ValueError:
            pass
        try:
            return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
        except ValueError:
            pass
    raise ValueError(f"{field}: {text!r} is neither RFC 3339 nor seconds since the epoch")


@dataclass(frozen=True)
class FlowFilter:
    """Which records a reader wants: all given conditions hold. ``pod``
    (``NAMESPACE/NAME``) matches either end."""

    since: float | None = None
    verdict: str | None = None
    pod: str | None = None

    def __post_init__(self) -> None:
        if self.verdict is not None and self.verdict not in VERDICTS:
            raise UsageError(f"{self.verdict!r} is not allow or deny", field="verdict")
        if self.pod is not None:
            ns, _, name = self.pod.partition("/")
            if not ns or not name or "/" in name:
                raise UsageError(f"{self.pod!r} is not NAMESPACE/NAME", field="pod")

    def matches(self, r: FlowRecord) -> bool:
        if self.since is not None and r.time < self.since:
            return False
        if self.verdict is not None and r.verdict != self.verdict:
            return False
        return self.pod is None or self.pod in (r.src.key, r.dst.key)

    @classmethod
    def from_query(cls, query: Mapping[str, list[str]]) -> FlowFilter:
        """From ``/flows?since=..&verdict=..&pod=..``; UsageError names the parameter."""
        since = None
        if "since" in query:
            try:
                since = parse_time(query["since"][-1], field="since")
            except ValueError as exc:
                raise UsageError(str(exc).split(": ", 1)[-1], field="since") from None
        return cls(since=since, verdict=_last(query, "verdict"), pod=_last(query, "pod"))

    def to_query(self) -> dict[str, str]:
        out = {}
        if self.since is not None:
            out["since"] = f"{self.since:.6f}"
        if self.verdict is not None:
            out["verdict"] = self.verdict
        if self.pod is not None:
            out["pod"] = self.pod
        return out


def _last(query: Mapping[str, list[str]], key: str) -> str | None:
    values = query.get(key)
    return values[-1] if values else None


class FlowBuffer:
    """The node's last ``capacity`` records, oldest dropped first (each drop
    counted in ``evicted``); readers page with a cursor (``seq``) and may
    wait for records newer than theirs."""

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise UsageError(f"{capacity} is not a positive number of records", field="flow-log-buffer")
        self.capacity = capacity
        self._ring: deque[tuple[int, FlowRecord]] = deque(maxlen=capacity)  # (seq, record)
        self._cond = threading.Condition()
        self.seq = 0  # of the newest record
        self.evicted = 0

    def __len__(self) -> int:
        return len(self._ring)

    def append(self, record: FlowRecord) -> int:
        """Keep ``record``; its sequence number."""
        with self._cond:
            self.seq += 1
            if len(self._ring) == self.capacity:
                self.evicted += 1
            self._ring.append((self.seq, record))
            self._cond.notify_all()
            return self.seq

    def query(self, flt: FlowFilter = FlowFilter(), *, after: int = 0) -> tuple[list[FlowRecord], int]:
        """(matching records newer than ``after``, oldest first, each with
        its ``seq``; the cursor for the next call)."""
        with self._cond:
            entries, cursor = list(self._ring), self.seq
        return [replace(r, seq=seq) for seq, r in entries if seq > after and flt.matches(r)], cursor

    def wait(self, after: int, timeout: float) -> bool:
        """Until a record newer than ``after`` exists (True) or ``timeout`` passes."""
        with self._cond:
            return self._cond.wait_for(lambda: self.seq > after, timeout=min(timeout, MAX_WAIT))


@dataclass(frozen=True)
class HttpAnswer:
    code: int
    body: bytes
    content_type: str
    headers: tuple[tuple[str, str], ...] = ()


CURSOR_HEADER = "X-Flow-Cursor"


def answer_flows(buffer: FlowBuffer | None, query: Mapping[str, list[str]]) -> HttpAnswer:
    """``GET /flows?since=&verdict=&pod=&after=&wait=``: matching records
    as JSON lines, oldest first. ``after`` (a cursor from the previous
    answer's ``X-Flow-Cursor``) returns only newer records, and ``wait``
    seconds (at most 30) holds the answer until there are some (a follow).
    A cursor ahead of the ring (the agent restarted) starts over."""
    if buffer is None:
        return HttpAnswer(404, b"flow logs are off on this node (agent --no-flow-logs)\n", "text/plain")
    try:
        flt = FlowFilter.from_query(query)
        after = _number(query, "after", kind=int, default=0)
        wait = _number(query, "wait", kind=float, default=0.0)
    except UsageError as exc:
        return HttpAnswer(400, f"{exc}\n".encode(), "text/plain")
    if after > buffer.seq:
        after = 0
    if wait > 0:
        buffer.wait(after, wait)
    records, cursor = buffer.query(flt, after=after)
    body = "".join(json.dumps(r.to_json()) + "\n" for r in records).encode()
    return HttpAnswer(200, body, "application/x-ndjson", ((CURSOR_HEADER, str(cursor)),))


def _number(query: Mapping[str, list[str]], key: str, *, kind: type, default: Any) -> Any:
    values = query.get(key)
    if not values:
        return default
    try:
        value = kind(values[-1])
    except ValueError:
        raise UsageError(f"{values[-1]!r} is not a number", field=key) from None
    if value < 0:
        raise UsageError(f"{values[-1]!r} is negative", field=key)
    return value


# ----- the client side (``overlaycni flows``, ``overlaycni lab flows``) ----------------------


def read_flows(
    agent: str, flt: FlowFilter = FlowFilter(), *, after: int = 0, wait: float = 0.0, timeout: float = 10.0
) -> tuple[list[FlowRecord], int]:
    """One ``GET {agent}/flows``: (records, cursor for the next call).
    Call it from the network namespace the agent listens in. ``agent`` is
    a URL (``http://HOST:PORT``) or ``HOST:PORT``."""
    if "://" not in agent:
        agent = "http://" + agent
    params = {**flt.to_query(), **({"after": str(after)} if after else {}), **({"wait": f"{wait:g}"} if wait else {})}
    url = agent.rstrip("/") + "/flows" + (("?" + urlencode(params)) if params else "")
    try:
        with urlopen(url, timeout=timeout + wait) as resp:  # noqa: S310 - an http(s) URL the user gave
            lines = resp.read().decode().splitlines()
            cursor = int(resp.headers.get(CURSOR_HEADER) or after)
    except HTTPError as exc:
        text = exc.read().decode(errors="replace").strip() or exc.reason
        if exc.code == 400:
            raise UsageError(f"the agent at {agent} refused the query: {text}") from None
        raise AgentUnavailable(f"{url}: HTTP {exc.code}: {text}") from None
    except (URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", None) or exc
        raise AgentUnavailable(f"no agent answers at {agent} ({reason})") from None
    records = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            records.append(FlowRecord.from_json(json.loads(line)))
        except ValueError as exc:
            raise AgentUnavailable(f"{url}: line {i + 1} is not a flow record: {exc}") from None
    return records, cursor
