"""The agent's policy controller in a dual-stack cluster: the incremental
state (``policy.incremental``) covers both families, so after the first
whole render a pod label change is an element-only update of the IPv4 and
IPv6 sets; the table stays the whole render's at every pass. Control: the
same state built for IPv4 only would not describe the dual-stack render."""

from __future__ import annotations

import threading
from dataclasses import replace
from ipaddress import IPv6Address

from overlaycni.agent.policy import PolicyController
from overlaycni.dataplane.fake import FakeKernel, FakeNft
from overlaycni.dataplane.policytable import FAMILY, TABLE, PolicyTableSync
from overlaycni.families import DUAL_STACK, SINGLE_STACK
from overlaycni.policy.incremental import NodePolicy

from .test_policy_incremental import NODE, conformance, full, kernel, same


class Controller(PolicyController):
    def __init__(self, inv: dict, k: FakeKernel, families=None) -> None:
        super().__init__(
            None,  # type: ignore[arg-type]
            cluster="c1", node=NODE, stop=threading.Event(),
            table=PolicyTableSync(FakeNft(k, family=FAMILY, table=TABLE)), on_bad=lambda *a: None,
            families=families,
        )  # fmt: skip
        self.inv = inv

    def load(self):
        return list(self.inv["pods"].values()), list(self.inv["ns"].values()), list(self.inv["pol"].values())


def dual_inventory() -> dict:
    inv = conformance("stacked-policies")
    inv["pods"] = {k: replace(p, ip_v6=IPv6Address(f"fd12:3456:789a::{int(p.ip) & 0xffff:x}"))
                   for k, p in inv["pods"].items()}  # fmt: skip
    return inv


def test_a_dual_stack_controller_updates_both_families_incrementally():
    inv = dual_inventory()
    k = FakeKernel()
    ctl = Controller(inv, k, DUAL_STACK)
    assert ctl.sync() == "full" and ctl.state is not None and ctl.incremental_off is None
    same(k.nft_table(FAMILY, TABLE), kernel(full(NODE, inv, families=DUAL_STACK)))
    assert any(name.endswith("-v6") for name in k.nft_table(FAMILY, TABLE).sets)  # IPv6 sets are there
    pod = inv["pods"]["x/a"]
    inv["pods"]["x/a"] = replace(pod, labels={"pod": "c"})
    assert ctl.sync() == "elements"
    same(k.nft_table(FAMILY, TABLE), kernel(full(NODE, inv, families=DUAL_STACK)))
    assert ctl.passes["full"] == 1 and ctl.incremental_off is None


def test_control_an_ipv4_only_state_does_not_describe_the_dual_stack_render():
    inv = dual_inventory()
    pods, nss, pols = inv["pods"].values(), inv["ns"].values(), inv["pol"].values()
    render = full(NODE, inv, families=DUAL_STACK)
    assert NodePolicy(NODE, pods=pods, namespaces=nss, policies=pols, families=DUAL_STACK).describes(render) is None
    assert NodePolicy(NODE, pods=pods, namespaces=nss, policies=pols, families=SINGLE_STACK).describes(render) is not None
