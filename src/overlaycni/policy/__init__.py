"""Kubernetes NetworkPolicy: parse -> model -> engine (who may talk to whom)
-> nftables render (pure); ``apply`` is the one module that runs nft."""

from .engine import Decision, Verdict, allowed, matrix
from .model import IPBlock, NamedPort, NamespaceInfo, NetworkPolicy, Peer, PodInfo, PolicyPort, Rule, parse_policies
from .render import counts, diff_render, render_node
from .selectors import LabelSelector, Requirement
from .store_codec import policy_from_dict, policy_to_dict

__all__ = [
    "Decision",
    "IPBlock",
    "LabelSelector",
    "NamedPort",
    "NamespaceInfo",
    "NetworkPolicy",
    "Peer",
    "PodInfo",
    "PolicyPort",
    "Requirement",
    "Rule",
    "Verdict",
    "allowed",
    "counts",
    "diff_render",
    "matrix",
    "parse_policies",
    "policy_from_dict",
    "policy_to_dict",
    "render_node",
]
