"""``overlaycni flows``: the flow log of one node's agent (``GET /flows``).

The table view is one line per flow, oldest first, deny in red; ``--output
json`` prints ``{"flows": [...]}`` with exactly the keys of the contract
(``agent.flows``), or with ``--follow`` one such flow object per line as
flows arrive. ``lab flows`` (``cli/lab_flows.py``) prints the same way.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterable
from datetime import datetime
from typing import TYPE_CHECKING, Annotated

import typer

from .common import Output, OutputOpt, console, print_json

if TYPE_CHECKING:
    from ..agent.flows import FlowEndpoint, FlowFilter, FlowRecord

DEFAULT_AGENT = "http://127.0.0.1:9161"
FOLLOW_WAIT = 10.0

VerdictOpt = Annotated[
    str | None, typer.Option("--verdict", help="Only allow or only deny.", show_default=False, metavar="allow|deny")
]
PodOpt = Annotated[
    str | None, typer.Option("--pod", help="Only flows from or to this pod.", show_default=False, metavar="NS/NAME")
]
SinceOpt = Annotated[
    float | None, typer.Option("--since", min=0, help="Only the last SECONDS.", show_default=False, metavar="SECONDS")
]
FollowOpt = Annotated[bool, typer.Option("--follow", "-f", help="Keep printing new flows until Ctrl-C.")]


def flow_filter(*, verdict: str | None, pod: str | None, since: float | None) -> FlowFilter:
    """The filter of the common options (``--since`` counts back from now)."""
    from ..agent.flows import FlowFilter

    return FlowFilter(since=time.time() - since if since is not None else None, verdict=verdict, pod=pod)


def _end(e: FlowEndpoint) -> str:
    return f"{e.namespace}/{e.pod}({e.ip})" if e.pod is not None else e.ip


def flow_line(r: FlowRecord) -> str:
    """One flow for people (rich markup; names escaped)."""
    from rich.markup import escape

    when = datetime.fromtimestamp(r.time).strftime("%H:%M:%S.%f")[:-3]
    port = f":{r.dport}" if r.dport is not None else ""
    if r.verdict == "deny":
        verdict = "[bold red]DENY [/]"
        why = f"isolated by {', '.join(r.policies)}" if r.policies else "isolated"
    else:
        verdict = "[green]allow[/]"
        why = f"by {r.policies[0]} {r.rule or ''}".rstrip() if r.policies else "not isolated"
    text = f"{_end(r.src)} -> {_end(r.dst)}{port}"
    return f"{when} {escape(r.node):8} {r.direction:7} {verdict} {r.proto:4} {escape(text)}  [dim]{escape(why)}[/]"


def print_flows(records: Iterable[FlowRecord], output: Output, *, stream: bool = False) -> None:
    """A batch of flows: the table lines, or (``stream``) JSON lines, or the ``{"flows": [...]}`` document."""
    if output is Output.json and not stream:
        print_json({"flows": [r.to_json(contract=True) for r in records]})
        return
    for r in records:
        if output is Output.json:
            sys.stdout.write(json.dumps(r.to_json(contract=True)) + "\n")
        else:
            console.print(flow_line(r), highlight=False, soft_wrap=True)
    sys.stdout.flush()


def flows(
    agent: Annotated[
        str, typer.Option("--agent", help="The agent's metrics address (its --metrics-addr), as a URL.", metavar="URL")
    ] = DEFAULT_AGENT,
    verdict: VerdictOpt = None,
    pod: PodOpt = None,
    since: SinceOpt = None,
    follow: FollowOpt = False,
    output: OutputOpt = Output.table,
) -> None:
    """Show the new flows one node's NetworkPolicy table decided: who talked to
    whom, allowed or denied, and which policy decided.

    Each record is one direction at one node: egress at the source's node,
    ingress at the destination's. A deny names the policies isolating the
    pod; an allow names the policy and rule that allowed it.

    --output json prints {"flows": [...]}; with --follow, one flow object
    a line (JSON lines) as they come.

    Example: overlaycni flows --agent http://127.0.0.1:9161 --verdict deny --pod x/web --follow
    """
    from ..agent.flows import read_flows

    flt = flow_filter(verdict=verdict, pod=pod, since=since)
    records, cursor = read_flows(agent, flt)
    if not follow:
        print_flows(records, output)
        return
    print_flows(records, output, stream=True)
    try:
        while True:
            records, cursor = read_flows(agent, flt, after=cursor, wait=FOLLOW_WAIT)
            print_flows(records, output, stream=True)
    except KeyboardInterrupt:
        pass


def register(app: typer.Typer) -> None:
    app.command("flows")(flows)
