"""PgBouncer peering (1.19+): several independent pooler processes behind one port.

With `so_reuseport` several pooler processes (each with its own config, unix
socket and `peer_id`) listen on the same TCP port and the kernel spreads new
connections among them: more cores, and rolling restarts without a gap. A
CancelRequest comes on a new connection, so it may land on a process that does
not know the client. Each process therefore writes its `peer_id` into every
cancel key it issues, and forwards a CancelRequest naming another peer to that
peer's address from `peers`.

Cancel key layout (the 8 bytes of BackendKeyData, b0..b3 = the "pid",
b4..b7 = the "key", big-endian): PgBouncer 1.21+'s, so that pooler and PgBouncer
processes can in principle be peered with each other (not tested against a real
PgBouncer: the one installed here is 1.18, from before peering):

    b0       random, top bit 0 (the pid is positive)
    b1       peer_id & 0xff
    b2       peer_id >> 8            (peer_id <= 16383: 14 bits)
    b3       random
    b4..b7   random, top bit 0 (ours; PgBouncer uses all 32 bits) except the
             2 low bits of b7: the TTL, 3 when issued

Forwarding decrements the TTL; a request whose TTL is 0 is dropped, so a
request is forwarded at most 3 times and a misconfigured `peers` (an address
that leads back here, or a cycle) cannot loop. A request whose key names this
peer is never forwarded: its TTL bits are set back to 3 (as issued) and it is
handled locally (and, with `workers` > 1, by the owning worker). With
`peer_id: 0` (the default) keys are 62 random bits and nothing is forwarded;
with peering they keep 44 random bits (PgBouncer: 45).
"""
from __future__ import annotations

import logging
import socket as _pysocket

from pooler.wire import entropy, protocol

log = logging.getLogger("pooler.peering")

TTL_MASK = 0x03
DEFAULT_PEER_PORT = 6432          # PgBouncer's default for a [peers] entry without port


def new_cancel_key(peer_id: int) -> tuple[int, int]:
    """A fresh (pid, key) for BackendKeyData; carries `peer_id` when it is not 0."""
    if not peer_id:
        return entropy.randbits(31), entropy.randbits(31)
    pid = (entropy.randbits(7) << 24) | ((peer_id & 0xFF) << 16) | \
        (((peer_id >> 8) & 0xFF) << 8) | entropy.randbits(8)
    return pid, entropy.randbits(31) | TTL_MASK


def peer_of(pid: int) -> int:
    """The peer_id written in a cancel key's pid half (0: none)."""
    pid &= 0xFFFFFFFF
    return ((pid >> 16) & 0xFF) | (((pid >> 8) & 0xFF) << 8)


def ttl_of(key: int) -> int:
    return key & TTL_MASK


def as_issued(key: int) -> int:
    """The key half as this peer issued it (TTL bits back to 3), for lookups."""
    return key | TTL_MASK


def peer_address(host: str, port: int) -> str:
    return f"{host}/.s.PGSQL.{port}" if host.startswith("/") else f"{host}:{port}"


class PeerPools:
    """Cancel requests being forwarded, per peer: PgBouncer's "peer pools" (SHOW
    PEER_POOLS). A peer gets its row with its first forwarded request and keeps it."""

    def __init__(self) -> None:
        self.counts: dict[int, dict[str, int]] = {}

    def row(self, peer_id: int) -> dict[str, int]:
        return self.counts.setdefault(peer_id, {
            "cl_active_cancel_req": 0, "cl_waiting_cancel_req": 0, "sv_active_cancel": 0,
            "sv_login": 0})

    def snapshot(self) -> dict[str, dict[str, int]]:
        return {str(k): dict(v) for k, v in self.counts.items()}


def forward(cfg, owner: int, pid: int, key: int, pools: PeerPools | None = None) -> bool:
    """Send a CancelRequest for another peer's client to that peer (cooperatively;
    waits until the peer has closed the connection, i.e. handled it, so that the
    client's cancel call returns after the cancel went out). False if dropped.
    `pools` counts it while it is on its way: connecting, then sent."""
    if owner not in cfg.peers:
        log.info("cancel request for peer %d ignored: no such entry in peers", owner)
        return False
    row = (pools or PeerPools()).row(owner)
    row["cl_waiting_cancel_req"] += 1
    row["sv_login"] += 1
    connected = []

    def on_connect() -> None:           # connected to the peer: waiting -> active
        row["cl_waiting_cancel_req"] -= 1
        row["sv_login"] -= 1
        row["cl_active_cancel_req"] += 1
        row["sv_active_cancel"] += 1
        connected.append(True)
    try:
        return _forward(cfg, owner, pid, key, on_connect)
    finally:
        if connected:
            row["cl_active_cancel_req"] -= 1
            row["sv_active_cancel"] -= 1
        else:
            row["cl_waiting_cancel_req"] -= 1
            row["sv_login"] -= 1


def _forward(cfg, owner: int, pid: int, key: int, connected) -> bool:
    peer = cfg.peers[owner]
    ttl = ttl_of(key)
    if ttl == 0:
        log.warning("cancel request for peer %d dropped: forwarded too many times (TTL exhausted); "
                    "check the peers addresses", owner)
        return False
    where = peer_address(peer.host, peer.port)
    timeout = cfg.server_connect_timeout or 15.0
    import gevent
    import gevent.socket as gsocket
    try:
        with gevent.Timeout(timeout, OSError(f"timed out after {timeout:g}s")):
            if peer.host.startswith("/"):
                sock = gsocket.socket(_pysocket.AF_UNIX, _pysocket.SOCK_STREAM)
                try:
                    sock.connect(where)
                except BaseException:
                    sock.close()
                    raise
            else:
                sock = gsocket.create_connection((peer.host, peer.port))
            connected()
            try:
                sock.sendall(protocol.cancel_request(pid, key - 1))   # TTL - 1 (no borrow: ttl >= 1)
                while sock.recv(64):
                    pass                        # the peer answers nothing; it closes when done
            finally:
                sock.close()
    except OSError as exc:
        log.warning("forwarding a cancel request to peer %d (%s) failed: %s", owner, where,
                    exc.strerror or exc)
        return False
    log.info("cancel request forwarded to peer %d (%s)", owner, where)
    return True
