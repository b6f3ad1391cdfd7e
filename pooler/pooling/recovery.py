"""Recovery of a server whose client left mid-transaction or mid-query.

A client that disconnects inside a transaction block, or while its query is
still running or its result still coming, leaves a server that is not at a
release point. Closing it (PgBouncer's way) costs a backend and a new login.
Instead, in the client's greenlet as it ends: end what the server was sent
(CopyFail for a COPY IN; for an open extended-protocol batch an Execute that
fails, then Sync, so its work is rolled back as PostgreSQL does for a client
that disconnects), read and
drop every answer still owed, ROLLBACK an open or failed transaction, and give
the server back. A query still running is cancelled first, and the cancel
request's connection is awaited to its end (PostgreSQL has then signalled the
backend, which acts on it before it reads another command: it can never hit a
later query of another client). All of it is bounded by `recovery_timeout`; on timeout, or
when a client message was only partly forwarded (the server waits for bytes
that will never come), the server is cancelled and closed as before. Counted
per pool: `Stats.recovered_xacts`, `recovered_queries`, `recovery_failures`
(SHOW STATS: total_recovered_xact_count, total_recovered_query_count,
total_recovery_failed_count).
"""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import gevent

from pooler.wire import protocol
from pooler.wire.netio import ConnectionClosed, Stream, connect_tcp
from pooler.errors import PoolerError
from pooler.pooling import sessionstate

if TYPE_CHECKING:
    from pooler.pooling.relay import Relay
    from pooler.pooling.server import ServerConn

log = logging.getLogger("pooler.relay")

STATUS_IDLE = ord("I")
Z, COPY_IN, COPY_OUT = ord("Z"), ord("G"), ord("H")


class _Timeout(Exception):
    pass


def give_back(relay: "Relay", srv: "ServerConn", clean: bool) -> bool:
    """The client left (transaction / statement pooling): make its server reusable,
    recovering it if the client left it busy, then forgetting what the client's
    session left on it (sessionstate.leave). False: the caller closes it."""
    if not clean and not recover(relay, srv):
        return False
    if relay.step.sess_seen or relay.client.session.pin:
        try:
            sessionstate.leave(relay.client, srv)
        except (PoolerError, ConnectionClosed, OSError) as exc:
            log.info("%r session state not cleared after its client left: %s", srv, exc)
            return False
    return True


def recover(relay: "Relay", srv: "ServerConn") -> bool:
    """Bring the server a departed client left busy back to idle; True when it may
    be reused. The caller closes it otherwise. Blocks (a greenlet's work)."""
    step, stats = relay.step, relay.stats
    timeout = relay.pool.cfg.recovery_timeout
    if srv.closed or timeout <= 0 or step.c_skip or step.pending is not None:
        stats.recovery_failures += 1
        return False
    owed = step.send - step.recv
    query = bool(owed or step.unsynced or step.in_copy_in)
    try:
        with gevent.Timeout(timeout, _Timeout):
            if owed:
                _cancel_and_wait(srv)
            status = _drain(srv, step, owed)
            if status != STATUS_IDLE:
                status = ord(srv.run("ROLLBACK"))
    except (_Timeout, ConnectionClosed, PoolerError, OSError) as exc:
        log.info("%r not recovered after its client left (%s): closing it", srv,
                 type(exc).__name__ if isinstance(exc, _Timeout) else exc)
        stats.recovery_failures += 1
        return False
    if status != STATUS_IDLE:
        stats.recovery_failures += 1
        return False
    if query:
        stats.recovered_queries += 1
    if step.status != STATUS_IDLE:
        stats.recovered_xacts += 1
    step.status = STATUS_IDLE
    step.send = step.recv = 0
    step.unsynced = step.in_copy_in = False
    step.s_skip = step.skept = 0
    return True


def _cancel_and_wait(srv: "ServerConn") -> None:
    """Send a CancelRequest for the backend and wait until PostgreSQL closes that
    connection, which it does after signalling the backend."""
    s = Stream(connect_tcp(srv.host, srv.port, srv.pool.cfg.server_connect_timeout), "cancel")
    try:
        s.sendall(protocol.cancel_request(srv.pid, srv.key))
        try:
            while True:
                s.read_exact(1)
        except ConnectionClosed:
            pass
    finally:
        s.close()


def _drain(srv: "ServerConn", step, owed: int) -> int:
    """Finish what the server was sent, dropping its answers; the last status."""
    s = srv.stream
    if step.s_skip:                         # the rest of a message half-forwarded
        s.read_exact(step.s_skip)
    if step.skept:                          # the start of a message the step kept
        s.rbuf[:0] = bytes(srv.buf[:step.skept])
    if step.in_copy_in:
        s.sendall(protocol.message(b"f", b"client disconnected\0"))
    if step.unsynced:
        # A Sync alone would commit what the batch did, where PostgreSQL rolls back the
        # work of a client that disconnects: fail the batch first (an Execute of a
        # portal that does not exist), so the Sync ends it in a rollback.
        s.sendall(protocol.message(b"E", b"pooler: client disconnected\0\0\0\0\0") +
                  protocol.message(b"S"))
        owed += 1
    status = step.status
    while owed > 0:
        mtype, body = s.read_message()
        if mtype == Z:
            owed -= 1
            status = body[0]
        elif mtype == COPY_IN:             # a COPY FROM STDIN nobody will feed
            s.sendall(protocol.message(b"f", b"client disconnected\0"))
        elif mtype == ord("S"):
            name, pos = protocol.read_cstr(body, 0)
            srv.params[name], _ = protocol.read_cstr(body, pos)
            srv.tsig = None
    return status
