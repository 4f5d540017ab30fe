"""``overlaycni lab flows``: the flow logs of every node of a lab, merged.

The command hangs off the ``lab`` group of ``cli/lab.py``; the reading is
``lab.flows`` (from inside each node's namespace), the printing is
``cli/flows.py``'s.
"""

from __future__ import annotations

from typing import Annotated

import typer

from ..errors import AgentUnavailable
from .common import LabDirOpt, LabNameOpt, Output, OutputOpt, print_warning
from .flows import FollowOpt, PodOpt, SinceOpt, VerdictOpt, flow_filter, print_flows
from .lab import lab_app


def _warn(errors: dict[str, str]) -> None:
    for node, why in sorted(errors.items()):
        print_warning(f"node {node}: {why}")


@lab_app.command("flows")
def lab_flows(
    name: LabNameOpt = "demo",
    node: Annotated[str | None, typer.Option("--node", help="Only this node (default: all).", show_default=False)] = None,
    verdict: VerdictOpt = None,
    pod: PodOpt = None,
    since: SinceOpt = None,
    follow: FollowOpt = False,
    output: OutputOpt = Output.table,
    lab_dir: LabDirOpt = None,
) -> None:
    """Flows the lab's NetworkPolicy tables decided, all nodes merged by time:
    who talked to whom, allowed or denied, and which policy decided.

    A connection between pods of two nodes shows up on both: egress at the
    source's node, ingress at the destination's. "Why was this blocked?":
    lab flows --verdict deny, then policy explain SRC DST PORT/PROTO --lab.

    --output json prints {"flows": [...]}; with --follow, one flow object
    a line (JSON lines) as they come.

    Example: overlaycni lab flows --verdict deny --pod x/web --since 60
    """
    from ..lab import members
    from ..lab.flows import LabFlows
    from ..lab.netns import require_privileges

    state = members.open_lab(name, lab_dir)
    require_privileges()
    flt = flow_filter(verdict=verdict, pod=pod, since=since)
    with LabFlows(state, node=node) as lab:
        if not follow:
            records, errors = lab.read(flt)
            _warn(errors)
            if errors and len(errors) == len(lab.agents):
                raise AgentUnavailable(f"no agent of lab {name} answered")
            print_flows(records, output)
            return
        try:
            for records, errors in lab.follow(flt):
                _warn(errors)
                print_flows(records, output, stream=True)
        except KeyboardInterrupt:
            pass


def register(app: typer.Typer) -> None:
    """Nothing to add at the top: the command lives in the ``lab`` group."""
    return None
