"""The agent's policy controller in a dual-stack cluster: the incremental
state (``policy.incremental``) keeps IPv4 only, so every pass renders the
whole table with both families' sets and rules; the IPv4 controller keeps
its incremental passes (control)."""

from __future__ import annotations

import threading
from dataclasses import replace
from ipaddress import IPv6Address

from overlaycni.agent.policy import PolicyController
from overlaycni.dataplane.fake import FakeKernel, FakeNft
from overlaycni.dataplane.policytable import FAMILY, TABLE, PolicyTableSync
from overlaycni.families import DUAL_STACK

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


def test_a_dual_stack_controller_renders_whole_with_both_families():
    inv = dual_inventory()
    k = FakeKernel()
    ctl = Controller(inv, k, DUAL_STACK)
    assert ctl.sync() == "full" and ctl.state is None and "IPv4-only" in (ctl.incremental_off or "")
    want = full(NODE, inv, families=DUAL_STACK)
    same(k.nft_table(FAMILY, TABLE), kernel(want))
    assert any(name.endswith("-v6") for name in k.nft_table(FAMILY, TABLE).sets)  # IPv6 sets are there
    pod = inv["pods"]["x/a"]
    inv["pods"]["x/a"] = replace(pod, labels={"pod": "c"})
    assert ctl.sync() in ("elements", "full") and ctl.state is None  # a whole render, applied as its diff
    same(k.nft_table(FAMILY, TABLE), kernel(full(NODE, inv, families=DUAL_STACK)))
    assert ctl.passes["rules"] == 0


def test_control_the_ipv4_controller_keeps_its_incremental_state():
    inv = conformance("stacked-policies")
    ctl = Controller(inv, FakeKernel())
    assert ctl.sync() == "full" and ctl.state is not None and ctl.incremental_off is None
