"""Every exception overlaycni raises, and the one mapping to CNI error codes.

Lower layers map their backend's errors (sqlite, etcd, netlink, nft,
subprocess) to one of these once, at their boundary. The CLI turns any
``OverlayCNIError`` into a clear message and exit code 2 (or 1 for a failed
check); the CNI layer turns it into the spec's error JSON with
``cni_code()``.

Grouped by layer: the CNI codes, the base class, bad input (flags, network
settings, policy manifests), named objects, then datastore, IPAM, data
plane and agent/CNI errors, each with the code the plugin reports for it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

# --- CNI error codes -------------------------------------------------------------
# Well-known codes of the CNI spec 1.1.0 ("Error" section of
# https://github.com/containernetworking/cni/blob/main/SPEC.md); 100 and up
# are the plugin's own.
CNI_INCOMPATIBLE_VERSION = 1
CNI_UNSUPPORTED_FIELD = 2
CNI_UNKNOWN_CONTAINER = 3
CNI_INVALID_ENV = 4
CNI_IO_FAILURE = 5
CNI_DECODE_FAILURE = 6
CNI_INVALID_CONFIG = 7
CNI_TRY_AGAIN_LATER = 11
CNI_NOT_AVAILABLE = 50
CNI_NOT_AVAILABLE_AFFECTED = 51
# Project codes (>= 100).
CNI_IPAM_EXHAUSTED = 100
CNI_IP_UNAVAILABLE = 101
CNI_DATAPLANE_FAILURE = 102
CNI_NOT_FOUND = 103
CNI_CHECK_FAILED = 104  # CHECK: the pod's network does not match its prevResult
CNI_INTERNAL = 199


# --- base --------------------------------------------------------------------------


class OverlayCNIError(Exception):
    """Base of every error overlaycni raises on purpose."""

    cni_code: int = CNI_INTERNAL

    def __init__(self, message: str, *, details: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.details = details

    def __str__(self) -> str:  # pragma: no cover - trivial
        return self.message


def cni_code(exc: BaseException) -> int:
    """The CNI error code for any exception (the one mapping)."""
    if isinstance(exc, OverlayCNIError):
        return exc.cni_code
    if isinstance(exc, (TimeoutError, ConnectionError)):
        return CNI_TRY_AGAIN_LATER
    return CNI_INTERNAL


# --- bad input: flags, network settings, policy manifests --------------------------


def flag_name(field: str) -> str:
    """How a person typed ``field``: ``--lease-ttl`` for a flag (given
    without dashes), ``NODE`` as it is for an argument (its upper-case
    metavar)."""
    return field if field.isupper() or field.startswith("-") else f"--{field}"


@dataclass(frozen=True)
class FieldError:
    """One problem with one input field. ``field`` is the flag name without
    dashes (``dns-service-ip``)."""

    field: str
    message: str

    def __str__(self) -> str:
        if self.message.startswith(f"--{self.field}"):
            return self.message
        return f"--{self.field}: {self.message}"

    def to_dict(self) -> dict[str, str]:
        return {"field": self.field, "message": self.message}


@dataclass(frozen=True)
class PolicyFieldError(FieldError):
    """One problem in a NetworkPolicy manifest. ``field`` is the JSON path
    inside the object (``spec.ingress[0].ports[1].endPort``); ``document``
    names the YAML document it came from (``document 2 (x/allow-a)``) when the
    input held more than one."""

    document: str = ""

    def __str__(self) -> str:
        where = f"{self.document}: " if self.document else ""
        return f"{where}{self.field}: {self.message}"

    def to_dict(self) -> dict[str, str]:
        out = {"field": self.field, "message": self.message}
        if self.document:
            out["document"] = self.document
        return out


class ConfigError(OverlayCNIError):
    """Invalid cluster network configuration; carries every problem found."""

    cni_code = CNI_INVALID_CONFIG

    def __init__(self, errors: Sequence[FieldError] | FieldError, *, warnings: Sequence[str] | None = None) -> None:
        if isinstance(errors, FieldError):
            errors = [errors]
        self.errors = list(errors)
        self.warnings = list(warnings or [])
        super().__init__("; ".join(str(e) for e in self.errors) or "invalid configuration")


class UsageError(OverlayCNIError):
    """Bad command-line usage not tied to the network model.

    The idiom for a bad flag or argument: ``UsageError("is out of range
    (2..3600)", field="lease-ttl")`` reads ``--lease-ttl: is out of range
    (2..3600)``; ``field="NODE"`` names an argument. ``field`` stays on the
    error for callers that report it on its own."""

    cni_code = CNI_INVALID_CONFIG

    def __init__(self, message: str, *, field: str | None = None, details: str = "") -> None:
        self.field = field
        super().__init__(f"{flag_name(field)}: {message}" if field else message, details=details)


# --- named objects (clusters, nodes, allocations, labs) ----------------------------


class NotFound(OverlayCNIError):
    """A named object (cluster, node, pod allocation, lab) does not exist."""

    cni_code = CNI_NOT_FOUND


class AlreadyExists(OverlayCNIError):
    cni_code = CNI_INVALID_CONFIG


class Conflict(OverlayCNIError):
    """A compare-and-swap lost too many times, or an object exists with
    different settings."""

    cni_code = CNI_TRY_AGAIN_LATER


class NodeConflict(OverlayCNIError):
    """A node name, node IP or block is held by another (live) node: two
    machines with one name, two nodes with one IP, a block taken while this
    node was away. Waiting does not fix it; the message says what would."""

    cni_code = CNI_NOT_AVAILABLE


# --- datastore ---------------------------------------------------------------------


class DatastoreError(OverlayCNIError):
    """The datastore failed in a way a retry will not fix."""

    cni_code = CNI_IO_FAILURE


class DatastoreURLError(DatastoreError):
    cni_code = CNI_INVALID_CONFIG


class DatastoreCredentialsError(DatastoreError):
    """TLS files or etcd user settings are missing, unreadable or do not fit
    together (named by flag); nothing was sent to the datastore."""

    cni_code = CNI_INVALID_CONFIG


class DatastoreAuthError(DatastoreError):
    """The datastore and we did not accept each other: a TLS handshake failed
    (untrusted server certificate, client certificate refused, TLS spoken to
    a plain-HTTP server or the reverse) or etcd refused our user. A retry
    with the same settings will not help."""


class DatastoreUnavailable(DatastoreError):
    """The datastore cannot be reached now; a retry later may succeed."""

    cni_code = CNI_TRY_AGAIN_LATER


class WatchCompacted(DatastoreError):
    """A watch asked for events older than the store keeps; the watcher must
    re-list and watch again from the current revision."""

    cni_code = CNI_TRY_AGAIN_LATER

    def __init__(self, message: str, *, revision: int = 0, details: str = "") -> None:
        super().__init__(message, details=details)
        self.revision = revision  # the compacted revision


class BadRecord(OverlayCNIError):
    """A datastore record that does not decode (malformed or inconsistent):
    ``key``, ``kind`` (cluster, node, block, allocation, pod, namespace,
    policy) and ``problem``. Readers that can go on skip it and report it."""

    cni_code = CNI_IO_FAILURE

    def __init__(self, *, key: str, kind: str, problem: str, revision: int = 0) -> None:
        super().__init__(f"bad {kind} record {key}: {problem}")
        self.key = key
        self.kind = kind
        self.problem = problem
        self.revision = revision


# --- IPAM --------------------------------------------------------------------------


class IPAMError(OverlayCNIError):
    cni_code = CNI_IP_UNAVAILABLE


class PoolExhausted(IPAMError):
    """No free block in the pod CIDR, or no free address in a node's block."""

    cni_code = CNI_IPAM_EXHAUSTED


class AddressUnavailable(IPAMError):
    """A specific requested address is taken or outside the node's block."""

    cni_code = CNI_IP_UNAVAILABLE


# --- data plane (netlink, nftables, namespaces) -------------------------------------


class DataplaneError(OverlayCNIError):
    """The kernel refused an operation (netlink or nftables)."""

    cni_code = CNI_DATAPLANE_FAILURE


class NetnsNotFound(DataplaneError):
    cni_code = CNI_UNKNOWN_CONTAINER


class NetnsRefused(DataplaneError):
    """CNI_NETNS exists but is not a network namespace a pod may be given
    (a FIFO, a device, another kind of namespace, the node's own or the
    host's initial namespace). Nothing was opened for reading or changed."""

    cni_code = CNI_INVALID_ENV


class AttachmentConflict(DataplaneError):
    """The (containerID, ifname) is already attached, in another network
    namespace than the one this request names; the first attachment stays."""

    cni_code = CNI_INVALID_ENV


class InterfaceExists(DataplaneError):
    cni_code = CNI_INVALID_CONFIG


class UnderlayNotFound(DataplaneError):
    """No interface in the node's namespace holds the node IP."""

    cni_code = CNI_INVALID_CONFIG


class PeerNotAdjacent(DataplaneError):
    """The direct backend needs every peer node on the same L2 segment."""

    cni_code = CNI_INVALID_CONFIG


class PolicyApplyError(DataplaneError):
    """nft refused a rendered NetworkPolicy ruleset (or an incremental update)."""


class PermissionDenied(OverlayCNIError):
    """Needs root / CAP_NET_ADMIN."""

    cni_code = CNI_IO_FAILURE


# --- agent / CNI -------------------------------------------------------------------


class AgentUnavailable(OverlayCNIError):
    """The node agent is not running or does not answer in time."""

    cni_code = CNI_TRY_AGAIN_LATER


class DeadlineExceeded(OverlayCNIError):
    """A request ran out of its time inside the agent (waiting for a lock,
    the datastore, the kernel worker or a policy pass); what it had done is
    rolled back and the runtime may try again."""

    cni_code = CNI_TRY_AGAIN_LATER


class CNIError(OverlayCNIError):
    """A CNI protocol error with an explicit spec code (one of the
    ``CNI_*`` names above, never a bare number)."""

    def __init__(self, code: int, message: str, *, details: str = "") -> None:
        super().__init__(message, details=details)
        self.cni_code = code
