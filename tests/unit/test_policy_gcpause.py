"""The cyclic collector is held during whole renders and given back as it was (``policy.gcpause``)."""

from __future__ import annotations

import gc
import threading
from ipaddress import IPv4Address

import pytest

from overlaycni.policy import parse_policies, render_node
from overlaycni.policy.gcpause import collector_held
from overlaycni.policy.incremental import NodePolicy
from overlaycni.policy.model import NamespaceInfo, PodInfo

POLICY = """apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: web, namespace: a}
spec:
  podSelector: {matchLabels: {app: web}}
  ingress:
  - from: [{podSelector: {}}]
"""


@pytest.fixture
def collector_on():
    was = gc.isenabled()
    gc.enable()
    yield
    if not was:
        gc.disable()


def test_held_inside_and_restored_after(collector_on):
    with collector_held():
        assert not gc.isenabled()
    assert gc.isenabled()


def test_nested_holds_keep_it_off_until_the_outer_ends(collector_on):
    with collector_held():
        with collector_held():
            assert not gc.isenabled()
        assert not gc.isenabled()  # the inner end must not give it back while the outer holds it
    assert gc.isenabled()


def test_restored_after_an_exception(collector_on):
    with pytest.raises(RuntimeError), collector_held():
        raise RuntimeError("boom")
    assert gc.isenabled()


def test_a_collector_that_was_off_stays_off(collector_on):
    gc.disable()
    with collector_held():
        pass
    assert not gc.isenabled()  # control: held and released, but it was off before


def test_concurrent_holders_release_once_both_end(collector_on):
    inside, release = threading.Event(), threading.Event()

    def other() -> None:
        with collector_held():
            inside.set()
            release.wait(10)

    t = threading.Thread(target=other)
    t.start()
    assert inside.wait(10)
    with collector_held():
        pass
    assert not gc.isenabled()  # the other thread still holds it
    release.set()
    t.join(10)
    assert gc.isenabled()


def test_render_and_build_give_the_collector_back(collector_on):
    pods = [PodInfo("a", f"p{i}", IPv4Address(f"10.244.0.{i + 2}"), "n1", {"app": "web"}) for i in range(3)]
    namespaces = [NamespaceInfo("a", {})]
    policies = parse_policies(POLICY)
    doc = render_node("n1", pods=pods, namespaces=namespaces, policies=policies)
    assert gc.isenabled()
    state = NodePolicy("n1", pods=pods, namespaces=namespaces, policies=policies)
    assert gc.isenabled()
    assert state.describes(doc) is None  # the held build is still the render's table
