"""The old name of ``policy.records`` (keys: ``datastore.keys``), kept for
callers that have not switched yet; new code imports those two."""

from ..datastore.keys import namespace_key, namespaces_prefix, pod_key, pods_prefix, policies_prefix, policy_key
from ..errors import PolicyFieldError
from .records import (
    delete_policy,
    encode,
    load_namespaces,
    load_pods,
    load_policies,
    namespace_from_dict,
    namespace_to_dict,
    parse_named_port,
    pod_from_dict,
    pod_to_dict,
    policy_from_dict,
    policy_to_dict,
    save_policies,
    validate_labels,
)

__all__ = [
    "PolicyFieldError",
    "delete_policy",
    "encode",
    "load_namespaces",
    "load_pods",
    "load_policies",
    "namespace_from_dict",
    "namespace_key",
    "namespace_to_dict",
    "namespaces_prefix",
    "parse_named_port",
    "pod_from_dict",
    "pod_key",
    "pod_to_dict",
    "pods_prefix",
    "policies_prefix",
    "policy_from_dict",
    "policy_key",
    "policy_to_dict",
    "save_policies",
    "validate_labels",
]
