"""Kernel-test fixtures: a fresh topology / namespace per test, always removed."""

from __future__ import annotations

import pytest

from tests.kernel.topology import Topology


@pytest.fixture
def topo():
    t = Topology()
    try:
        yield t
    finally:
        t.cleanup()


@pytest.fixture
def node_ns(topo):
    """One node namespace on an underlay bridge: (topology, NodeNs)."""
    topo.add_underlay()
    return topo, topo.add_node("n1", "10.224.0.1/16")
