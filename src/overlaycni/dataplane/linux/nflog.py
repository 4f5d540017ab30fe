"""Policy verdicts from the kernel: an NFLOG group read over nfnetlink.

Design note
-----------
What the kernel does. The NetworkPolicy table, rendered with flow logging
on (``policy.flowlog``), ends every decision about a new flow in a log
chain whose last rule is ``log group N prefix P`` before the verdict. The
``log`` expression with a group hands the packet to nfnetlink_log (the
kernel's NFLOG target, ``net/netfilter/nfnetlink_log.c``; message layout in
``include/uapi/linux/netfilter/nfnetlink_log.h``, codec in
``dataplane.nflog``), which copies its first ``COPY_RANGE`` bytes into a
batch for the netlink socket bound to group N *in that network namespace*
(NFLOG instances are per namespace) and sends the batch when it holds
``QTHRESH`` packets, when ``FLUSH_CS`` hundredths of a second have passed,
or when ``NLBUFSIZ`` bytes are full. A group nobody bound costs a lookup.

Objects: one ``NETLINK_NETFILTER`` socket per node, created by the data
plane's namespace worker (``netns.NetnsWorker``, the one module that enters
namespaces) so that it binds the node namespace's group, then read by the
agent's collector thread (a socket keeps the namespace it was made in).
Binding is ``NFULNL_CFG_CMD_BIND`` plus the copy mode, batching and
``NFULNL_CFG_F_SEQ`` (per-group sequence numbers) in one config request;
a group bound by another socket answers EPERM (another agent, ulogd). The
kernel counter of flows decided without logging (``flowlog-ratelimited``)
is read and zeroed atomically (``reset counter``) on the same worker, with
a libnftables context of its own for each read: a context that already
answered one ``reset`` answers the next from its cache (nftables 1.0.6:
the ruleset generation does not change when a counter does), while the
kernel still zeroes the counter. A whole-table replace (a policy change,
the controller's periodic repair) restarts the counter; the agent reads it
right before every policy pass, so a replace loses only what was counted
between that read and the transaction.

Bounded: the socket's receive buffer (``RCVBUF``) is the only queue between
the kernel and the agent. When it is full the kernel drops the batch and the
next ``recv`` fails with ENOBUFS; the sequence numbers then say exactly how
many messages were lost. A flood therefore costs the agent at most the
kernel cap's worth of messages per second (``policy.flowlog``), never
memory: nothing here keeps packets, each ``receive`` returns one bounded
batch. ``close`` from another thread wakes a ``receive`` at once
(``wake.WaitableSockets``): the agent's stop does not wait out the poll.

Rejected: conntrack events (``NFNLGRP_CONNTRACK_NEW``, joined with the
render): a denied packet's conntrack entry is never confirmed, so denies
never produce an event, and the deciding rule would have to be recomputed
in userspace, racing policy changes; NFQUEUE (the agent in the datapath:
every new flow waits for Python); ``nft monitor trace`` (per packet,
every rule, meant for debugging); pyroute2 (it has no NFLOG client in
0.9); ulogd2 (a second daemon and config for one socket); the kernel log
(``log`` without ``group``: text in the ring buffer, rate-limited
globally, unparseable for pod names).
"""

from __future__ import annotations

import errno
import logging
import os
import socket

from ...errors import DataplaneError, PermissionDenied
from .. import nflog
from ..nflog import CaptureStats, LoggedPacket, SeqTracker
from ..nlcodec import HDR, error_code, iter_messages
from .netns import NetnsWorker
from .nft import NftRunner
from .wake import WaitableSockets

COPY_RANGE = 128  # an IPv4 header with options (60) + ports, or IPv6 (40) + ports
QTHRESH = 64  # packets per batch
FLUSH_CS = 10  # a batch waits at most 0.1 s
NLBUFSIZ = 64 << 10  # bytes per batch
RCVBUF = 4 << 20  # the socket's receive buffer: the bound on what waits for the agent
MAX_DATAGRAMS = 256  # per receive call
SO_RCVBUFFORCE = 33
log = logging.getLogger(__name__)


class NflogSocket:
    """A netlink socket bound to one NFLOG group of the namespace it is
    created in (create it on the namespace worker)."""

    def __init__(self, group: int) -> None:
        self.group = group
        try:
            self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, nflog.NETLINK_NETFILTER)
        except PermissionError:
            raise PermissionDenied("nfnetlink: needs root / CAP_NET_ADMIN") from None
        try:
            try:
                self.sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, RCVBUF)
            except OSError:
                self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RCVBUF)
            self.sock.bind((0, 0))
            self._configure()
            self.sock.setblocking(False)
        except BaseException:
            self.sock.close()
            raise
        self.buf = bytearray(1 << 18)
        self._waitable = WaitableSockets([self.sock])

    def _configure(self) -> None:
        self._request(nflog.config_request(self.group, seq=1, command=nflog.NFULNL_CFG_CMD_BIND), "binding")
        request = nflog.config_request(
            self.group, seq=2, copy_range=COPY_RANGE, qthresh=QTHRESH, timeout_cs=FLUSH_CS, nlbufsiz=NLBUFSIZ,
            flags=nflog.NFULNL_CFG_F_SEQ,
        )  # fmt: skip
        self._request(request, "configuring")

    def _request(self, msg: bytes, what: str) -> None:
        self.sock.send(msg)
        seq = HDR.unpack_from(msg)[3]
        self.sock.settimeout(5.0)
        while True:
            data = self.sock.recv(65536)
            for kind, mseq, reply in iter_messages(data):
                if kind != nflog.NLMSG_ERROR or mseq != seq:
                    continue
                code = error_code(reply)
                if code == 0:
                    return
                if code == errno.EPERM and os.geteuid() != 0:
                    raise PermissionDenied(f"NFLOG group {self.group}: {what}: needs CAP_NET_ADMIN")
                if code in (errno.EPERM, errno.EBUSY):  # the kernel answers EPERM to a socket not holding the group
                    raise DataplaneError(
                        f"NFLOG group {self.group}: bound by another process in this namespace "
                        "(another agent, ulogd?); choose another with --flow-log-group"
                    )
                raise DataplaneError(f"NFLOG group {self.group}: {what}: {os.strerror(code)}")

    def receive(self, timeout: float, seqs: SeqTracker, stats: dict[str, int]) -> list[LoggedPacket]:
        """The packets that arrive within ``timeout`` seconds (at most
        ``MAX_DATAGRAMS`` batches); lost and malformed ones are counted."""
        out: list[LoggedPacket] = []
        with self._waitable.ready(timeout) as ready:
            if ready:
                self._read(out, seqs, stats)
        stats["received"] += len(out)
        return out

    def _read(self, out: list[LoggedPacket], seqs: SeqTracker, stats: dict[str, int]) -> None:
        for _ in range(MAX_DATAGRAMS):
            try:
                n = self.sock.recv_into(self.buf)
            except BlockingIOError:
                break
            except OSError as exc:
                if exc.errno == errno.ENOBUFS:
                    stats["overruns"] += 1  # the sequence gap counts the messages
                    continue
                if exc.errno == errno.EBADF:
                    break
                raise DataplaneError(f"NFLOG group {self.group}: receive failed: {exc.strerror}") from None
            for kind, _seq, msg in iter_messages(bytes(self.buf[:n])):
                if kind != nflog.MSG_PACKET:
                    continue
                pkt = nflog.decode_packet(msg)
                if pkt is None:
                    stats["malformed"] += 1
                    continue
                seqs.see(pkt.seq)
                out.append(pkt)

    def close(self) -> None:
        """Wakes a ``receive`` in another thread at once; idempotent."""
        self._waitable.close()


class LinuxVerdictLog:
    """The ``VerdictLog`` port: one NFLOG group of the node namespace, and
    the policy table's count of flows decided without logging."""

    def __init__(self, worker: NetnsWorker, *, group: int, family: str, table: str, use_nft_library: bool = True) -> None:
        self._worker, self._use_library = worker, use_nft_library
        self._counter = {"family": family, "table": table, "name": nflog.RATELIMITED_COUNTER}
        self._sock = worker.call(lambda: NflogSocket(group))
        self._seqs = SeqTracker()
        self._stats = {"received": 0, "malformed": 0, "overruns": 0}
        self._ratelimited = 0
        self._closed = False
        log.debug("NFLOG group %d bound", group)

    def receive(self, timeout: float) -> list[LoggedPacket]:
        """Packets within ``timeout`` seconds; [] at once when closed (also by
        ``close`` from another thread while this one waits)."""
        return self._sock.receive(timeout, self._seqs, self._stats)

    def stats(self) -> CaptureStats:
        self._ratelimited += self._worker.call(self._reset_counter)
        s = self._stats
        return CaptureStats(
            received=s["received"], lost=self._seqs.lost, malformed=s["malformed"],
            ratelimited=self._ratelimited, overruns=s["overruns"],
        )  # fmt: skip

    def _reset_counter(self) -> int:
        runner = NftRunner(use_library=self._use_library)  # a fresh context: see the design note
        try:
            doc = runner.query({"nftables": [{"reset": {"counter": self._counter}}]}, what="the flow log counter")
        finally:
            runner.close()
        for item in (doc or {}).get("nftables", []):
            if "counter" in item:
                return int(item["counter"].get("packets", 0))
        return 0  # no table (yet), or logging off: nothing was rate-limited

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._sock.close()
