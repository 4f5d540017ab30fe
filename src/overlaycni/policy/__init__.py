"""Kubernetes NetworkPolicy: parse -> model -> engine (who may talk to whom)
-> nftables render (pure). The data plane's ``PolicyTable`` port puts a
render into the kernel; ``records`` holds the datastore records."""

from .engine import Decision, Verdict, allowed, matrix
from .model import IPBlock, NamedPort, NamespaceInfo, NetworkPolicy, PodInfo, PolicyPeer, PolicyPort, Rule, parse_policies
from .records import decode_namespace, decode_pod, decode_policy, policy_from_dict, policy_to_dict
from .render import counts, diff_render, render_node
from .selectors import LabelSelector, Requirement

__all__ = [
    "Decision",
    "IPBlock",
    "LabelSelector",
    "NamedPort",
    "NamespaceInfo",
    "NetworkPolicy",
    "PolicyPeer",
    "PodInfo",
    "PolicyPort",
    "Requirement",
    "Rule",
    "Verdict",
    "allowed",
    "counts",
    "decode_namespace",
    "decode_pod",
    "decode_policy",
    "diff_render",
    "matrix",
    "parse_policies",
    "policy_from_dict",
    "policy_to_dict",
    "render_node",
]
