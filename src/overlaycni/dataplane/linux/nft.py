"""nftables: the node's tables through libnftables' JSON interface.

Design note. Four tables, one runner: ``ip overlaycni`` (rendered by the
pure ``nftmodel``: per node four base chains, per peer one ``node_ips`` and
one ``peer_blocks`` element (plus one ``peer_macs`` element on ``direct``),
per pod one ``pod_endpoints`` element ``ifname . ip``), the pods' guards
``arp overlaycni`` and ``ip6 overlaycni`` (``podguard``: per pod one ARP
``pod_endpoints`` element) and the NetworkPolicy table ``inet overlaycni``
(rendered by ``policy.render``, kept in step by ``policytable``). This
adapter only runs command lists, each as one nftables transaction (all or
nothing), and lists a table and its named counters back. A list that
declares a set by ``typeof`` (which nft 1.0.6 takes only in its native
syntax) runs as text (``nfttext``), every other as JSON. Set updates are
element adds/deletes, so chains are never rebuilt on pod, peer or label
events.

Calls go to ``libnftables.so.1`` in-process via ctypes (the library the
``nft`` binary is built on): one context per data plane, created on the
worker thread inside the node namespace, so a pod ADD pays ~0.3 ms for its
set element instead of ~3-5 ms for forking ``nft``. When the library is
missing, the ``nft -j -f -`` binary is used instead (same JSON). Rejected:
pyroute2's nftables module (no set-element support worth relying on),
iptables (no atomic multi-set updates) and ``ip netns exec ... nft`` for the
policy table (a fork per update, and a second way into the namespace).
Element-only transactions skip libnftables (``nftelements``: its cache fill
costs a dump of the ruleset per transaction); ``elements_direct=False``
keeps them on libnftables too.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import json
import logging
import subprocess
from collections.abc import Mapping
from typing import Any

from ...errors import DataplaneError, PermissionDenied
from .. import nftables, nftmodel, nfttext
from . import nftelements

log = logging.getLogger(__name__)

NFT_CTX_OUTPUT_JSON = 1 << 4


class _LibNft:
    def __init__(self) -> None:
        lib = ctypes.CDLL("libnftables.so.1", use_errno=True)
        lib.nft_ctx_new.restype = ctypes.c_void_p
        lib.nft_ctx_new.argtypes = [ctypes.c_uint32]
        lib.nft_ctx_free.argtypes = [ctypes.c_void_p]
        lib.nft_ctx_output_set_flags.argtypes = [ctypes.c_void_p, ctypes.c_uint]
        lib.nft_ctx_buffer_output.argtypes = [ctypes.c_void_p]
        lib.nft_ctx_buffer_error.argtypes = [ctypes.c_void_p]
        lib.nft_ctx_get_output_buffer.restype = ctypes.c_char_p
        lib.nft_ctx_get_output_buffer.argtypes = [ctypes.c_void_p]
        lib.nft_ctx_get_error_buffer.restype = ctypes.c_char_p
        lib.nft_ctx_get_error_buffer.argtypes = [ctypes.c_void_p]
        lib.nft_run_cmd_from_buffer.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
        lib.nft_run_cmd_from_buffer.restype = ctypes.c_int
        self.lib = lib
        self.ctx = lib.nft_ctx_new(0)
        if not self.ctx:
            raise DataplaneError("nftables: nft_ctx_new failed")
        lib.nft_ctx_output_set_flags(self.ctx, NFT_CTX_OUTPUT_JSON)
        lib.nft_ctx_buffer_output(self.ctx)
        lib.nft_ctx_buffer_error(self.ctx)

    def run(self, text: str) -> tuple[int, str, str]:
        rc = self.lib.nft_run_cmd_from_buffer(self.ctx, text.encode())
        out = (self.lib.nft_ctx_get_output_buffer(self.ctx) or b"").decode()
        err = (self.lib.nft_ctx_get_error_buffer(self.ctx) or b"").decode()
        return rc, out, err

    def close(self) -> None:
        if self.ctx:
            self.lib.nft_ctx_free(self.ctx)
            self.ctx = None


class _NftBinary:
    def run(self, text: str) -> tuple[int, str, str]:
        try:
            proc = subprocess.run(["nft", "-j", "-f", "-"], input=text, capture_output=True, text=True, timeout=30)
        except FileNotFoundError:
            raise DataplaneError("nftables: the nft binary is not installed (Debian package nftables)") from None
        return proc.returncode, proc.stdout, proc.stderr

    def close(self) -> None:
        pass


class NftRunner:
    """One way to nftables for every table: a libnftables context (the
    ``nft`` binary when the library is missing), its JSON in and out, and
    its failures mapped once. Create and use it on the worker thread."""

    def __init__(self, *, use_library: bool = True, elements_direct: bool = True) -> None:
        self.backend: _LibNft | _NftBinary
        try:
            self.backend = _LibNft() if use_library else _NftBinary()
        except OSError:
            self.backend = _NftBinary()
        self.elements_direct = elements_direct  # element-only transactions over nfnetlink (``nftelements``)
        self._elements: nftelements.NftElements | None = None

    def run_elements(self, batch: nftelements.Batch, *, what: str, error: type[DataplaneError] = DataplaneError) -> None:
        """One element-only transaction over nfnetlink (no libnftables cache fill)."""
        try:
            if self._elements is None:
                self._elements = nftelements.NftElements()
            self._elements.apply(batch)
        except OSError as exc:
            if exc.errno == errno.EPERM:
                raise PermissionDenied(f"nftables: {what}: {exc.strerror} (needs root / CAP_NET_ADMIN)") from None
            raise error(f"nftables: {what}: {exc.strerror}", details=str(exc)) from None

    def run(self, doc: dict[str, Any] | str, *, what: str, error: type[DataplaneError] = DataplaneError) -> str:
        """Run one JSON document (or one native script) as one transaction; its output."""
        if isinstance(doc, str):
            log.debug("nftables: %s: native script of %d line(s)", what, doc.count("\n"))
            rc, out, err = self.backend.run(doc)
        else:
            log.debug("nftables: %s: %d command(s)", what, len(doc.get("nftables", ())))
            rc, out, err = self.backend.run(json.dumps(doc))
        if rc != 0:
            text = " | ".join(err.strip().splitlines()[:6]) or f"exit {rc}"
            if "Operation not permitted" in err:
                raise PermissionDenied(f"nftables: {what}: {text} (needs root / CAP_NET_ADMIN)", details=err)
            raise error(f"nftables: {what}: {text}", details=err)
        return out

    def query(self, doc: dict[str, Any], *, what: str) -> dict[str, Any] | None:
        """A listing; None when the object listed does not exist."""
        rc, out, err = self.backend.run(json.dumps(doc))
        if rc != 0:
            if "No such file or directory" in err:
                return None
            raise DataplaneError(f"nftables: listing {what}: {err.strip()}", details=err)
        return json.loads(out) if out.strip() else None

    def close(self) -> None:
        self.backend.close()
        if self._elements is not None:
            self._elements.close()
            self._elements = None


class LinuxNft:
    """The ``NftRuleset`` port on one table (``family name``) through a shared ``NftRunner``."""

    def __init__(
        self,
        runner: NftRunner,
        *,
        family: str = nftmodel.FAMILY,
        table: str = nftmodel.TABLE,
        decls: Mapping[str, nftables.SetDecl] | None = None,
        error: type[DataplaneError] = DataplaneError,
        direct_elements: bool = False,
    ) -> None:
        """``direct_elements``: element-only transactions go over nfnetlink
        (``nftelements``); only for a table without interval sets, whose
        elements nft would split into ranges (the policy table)."""
        self.direct_elements = direct_elements
        self.runner = runner
        self.family, self.table = family, table
        self.decls = decls
        self.error = error

    def get_table(self) -> nftables.NftState | None:
        doc = self.runner.query(
            {"nftables": [{"list": {"table": {"family": self.family, "name": self.table}}}]},
            what=f"{self.family} {self.table}",
        )
        return None if doc is None else nftables.parse_listing(doc, decls=self.decls)

    def list_set(self, name: str) -> frozenset | None:
        body = {"family": self.family, "table": self.table, "name": name}
        doc = self.runner.query({"nftables": [{"list": {"set": body}}]}, what=f"set {name}")
        return None if doc is None else nftables.parse_listing(doc, decls=self.decls).sets.get(name)

    def counters(self) -> dict[str, int]:
        doc = self.runner.query(
            {"nftables": [{"list": {"counters": {"family": self.family, "table": self.table}}}]},
            what=f"counters of {self.family} {self.table}",
        )
        return {} if doc is None else nftables.counter_values(doc)

    def apply(self, commands: list[dict[str, Any]]) -> None:
        if not commands:
            return
        batch = nftelements.encode(commands) if self.direct_elements and self.runner.elements_direct else None
        if batch is not None:
            self.runner.run_elements(batch, what=f"{self.family} {self.table}", error=self.error)
            return
        doc: dict[str, Any] | str = nfttext.script(commands) if nfttext.needs_text(commands) else {"nftables": commands}
        self.runner.run(doc, what=f"{self.family} {self.table}", error=self.error)
