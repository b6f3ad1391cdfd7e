"""Idle servers move between workers instead of being closed in one and opened in the
other (issue 13 item 4).

When clients of a pool wait in worker B while worker A holds an idle server of
the same pool (and the global pool_size allows no new one), A used to close its
server so that B could open a backend of its own. Now A sends the socket itself
over B's control channel (SCM_RIGHTS, channel.send_fd) with the server's state
(ServerConn.export: backend pid and key, parameters, SET values, protocol-level
prepared statements, age), and moves the quota claim from its shared-memory row
to B's under the lock, so the global counts never change and no third worker
can take the slot in between. B adopts it (ServerConn.adopt, poolshare.adopt): the
first waiter gets it at once; no backend is started. A TLS server cannot move
(its session lives in this process's OpenSSL) and is closed as before, as is one
whose claim keys have no shared-memory slot. Counted in SHOW STATS
(total_server_moved_in_count) and the workers' shared-memory rows.
"""
from __future__ import annotations

import logging
import pickle
import socket
from typing import TYPE_CHECKING

from gevent.socket import wait_write

from pooler.pooling import poolshare
from pooler.proc import channel, shm

if TYPE_CHECKING:
    from pooler.pooling.pool import Pool
    from pooler.pooling.server import ServerConn
    from pooler.proc.peers import Peers

log = logging.getLogger("pooler.worker")
SEND_TIMEOUT = 0.2          # a busy receiver: close the server instead, as before


def target(peers: "Peers", pool: "Pool") -> int | None:
    """The other worker with the most clients waiting on this pool's slot."""
    seg, slot = peers.seg, peers.quota.slot(pool.pool_key)
    if slot is None:
        return None
    best, most = None, 0
    for w in peers.live_workers():
        n = seg.q[seg.waiting_index(w, slot)] if w != peers.me else 0
        if n > most:
            best, most = w, n
    return best


def claim_slots(peers: "Peers", pool: "Pool") -> list[int] | None:
    """The shared-memory slots of the pool's claim keys (None: one has no slot)."""
    slots = [peers.quota.slot(key) for key, _ in pool._quota_keys]
    return None if any(s is None for s in slots) else slots    # type: ignore[return-value]


def move(peers: "Peers", pool: "Pool", srv: "ServerConn", to: int, slots: list[int]) -> bool:
    """Send `srv` (taken out of the pool, its claim still ours) to worker `to`. False:
    it did not go (the caller closes it and releases the claim)."""
    if srv.tls is not None:
        return False
    # The pool's welcome (the first login's parameters) too: a pool that never opened
    # a server of its own has none, and logins wait for it.
    body = pickle.dumps(((pool.route.name, pool.server_user), slots, srv.export(),
                         pool.welcome))
    peers.seg.transfer_claim(peers.me, to, slots)
    try:
        channel.send_fd(peers.channels[to][0], channel.MOVE, body, srv.stream.fd,
                        timeout=SEND_TIMEOUT, wait_write=wait_write)
    except (OSError, ValueError) as exc:
        peers.seg.transfer_claim(to, peers.me, slots)       # it never left
        log.info("S-%d could not move to worker %d (%s): closing it", srv.id, to, exc)
        return False
    log.info("S-%d %s@%s moved to worker %d, where a client waits for it", srv.id,
             pool.server_user, pool.name, to)
    srv.detach()
    peers.seg.worker_add(peers.me, shm.W_MOVED_OUT)
    return True


def receive(peers: "Peers", body: bytes, fds: list[int]) -> None:
    """A MOVE from another worker: adopt the server, or close it (and free its claim)."""
    if len(fds) != 1:
        channel.close_fds(fds)
        log.warning("a moved server arrived without its socket: ignored")
        return
    pool_key, slots, state, welcome = pickle.loads(body)
    sock = socket.socket(state["family"], socket.SOCK_STREAM, 0, fds[0])
    from pooler.pooling.server import ServerConn    # proc builds on pooling
    pool = peers.worker.pools.get(tuple(pool_key))
    if pool is None:
        _refuse(peers, sock, slots, "its pool is gone here")
        return
    srv = ServerConn.adopt(pool, sock, state)
    if not poolshare.adopt(pool, srv, welcome):
        _refuse(peers, sock, slots, "no room for it here any more", srv)
        return
    peers.seg.worker_add(peers.me, shm.W_MOVED_IN)
    log.info("S-%d %s@%s taken over from another worker (backend pid %d)", srv.id,
             pool.server_user, pool.name, srv.pid)


def _refuse(peers: "Peers", sock: socket.socket, slots: list[int], why: str,
            srv: "ServerConn | None" = None) -> None:
    """Close a moved server that cannot be used here, and give back the claim that came
    with it (so another worker may open one)."""
    log.info("moved server closed: %s", why)
    if srv is not None:
        srv.close()
    else:
        from pooler.wire import protocol
        try:
            sock.send(protocol.terminate())
        except OSError:
            pass
        sock.close()
    for slot in slots:
        peers.seg.release(peers.me, slot)
