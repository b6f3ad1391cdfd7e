"""The relay's slow paths for faults: a dead server met before the request left, a
server lost under a client, client input the pooler refuses, a transaction statement
mode refuses. They run in the client's greenlet (relay.py's jobs J_RETRY, J_LOST,
J_FAILED, J_BAD, J_REFUSE) and may block; the steady state never comes here."""
from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

import gevent

from pooler.wire import protocol
from pooler.errors import PoolerError
from pooler.pooling import relaybuf, relaystep
from pooler.pooling.clientstate import ClientState
from pooler.pooling.lostserver import FailedBlock, lost_error, unknown_error

if TYPE_CHECKING:
    from pooler.pooling.relay import Relay

log = logging.getLogger("pooler.relay")

STATUS_IDLE = ord("I")
SETTLE_TIMEOUT = 5.0          # seconds a server may take to finish before a bad client goes
unpack_i32 = protocol.unpack_i32


# -- a server found dead before the request reached it (issue 14.2) ----------------

def retry_unsent(relay: "Relay") -> int:
    """The first send to a server this walk linked failed (EPIPE, ECONNRESET: its
    peer closed before the idle watch saw it): not a byte of the request reached
    PostgreSQL, so the server is dropped and the walk starts again, linking another
    (or waiting for one). Only then: once a send succeeded the request may have
    arrived, and a loss is server_lost's. Returns the relay's next job."""
    srv, step = relay.server, relay.step
    relay.server = None
    step.unlink()
    relay.pool.discard(srv, "server closed before the request reached it; sent to another server")
    # The failed walk stopped before compacting: cbuf[:end] is the request, whole.
    step.cend = step.end
    step.c_skip = 0
    relay.client.state = ClientState.IDLE
    return relay.client_events(step.client_start())


# -- a server lost under a client ---------------------------------------------------

def server_lost(relay: "Relay") -> bool:
    """The linked server is gone (EOF, reset). True: the client stays (transaction and
    statement pooling) and has been told with a SQLSTATE; False: it was closed with
    a FATAL, as PgBouncer does (session pooling, server_loss_closes_client, a
    message or COPY half-forwarded, which cannot be finished elsewhere, or a
    client pinned to that server by state that died with it: sessionstate.py)."""
    srv, step = relay.server, relay.step
    relay.server = None
    step.unlink()
    relay.pool.discard(srv, "server conn crashed?")
    # A pinned client's session state (locks, temp tables, ...) died with the server.
    keep = (relay.mode != "session" and not relay.pool.cfg.server_loss_closes_client
            and not step.c_skip and not step.in_copy_in and step.pending is None
            and not relay.client.session.pin)
    if not keep:
        relay.client.fatal("08006", "server conn crashed?")
        return False
    owed = step.send - step.recv          # requests the dead server never answered
    in_block = step.status != STATUS_IDLE
    out = unknown_error() if owed else lost_error() if step.unsynced else b""
    out += protocol.ready_for_query(b"E" if in_block else b"I") * owed
    if in_block or step.unsynced:
        # What follows until the block (or the lost batch) ends is answered here.
        relay.failed = FailedBlock(first=not out, in_block=in_block, skipping=step.unsynced)
    step.send = step.recv = 0
    step.unsynced = False
    step.status = ord("E") if in_block else STATUS_IDLE
    relay.client.state = ClientState.IDLE
    if out:
        relay.cs.sendall(out)
    return True


def feed_failed(relay: "Relay") -> int | None:
    """Answer the client's whole messages while its block is failed (the step stopped
    at the first one, EV_LINK). Returns the relay's next job, None for Terminate."""
    step = relay.step
    buf, pos, end = step.cbuf, step.msg, step.end
    out = []
    terminate = False
    while relay.failed is not None and end - pos >= 5:
        t = buf[pos]
        mend = pos + 1 + unpack_i32(buf, pos + 1)[0]
        if mend > end:
            break
        if t == protocol.X:
            terminate = True
            break
        answer, still = relay.failed.consume(t, bytes(buf[pos + 5:mend]))
        if answer is None:                       # a BEGIN: the rest goes to a server
            relay.failed = None
            break
        out.append(answer)
        if not still:
            relay.failed = None
        pos = mend
    if out:
        relay.cs.sendall(b"".join(out))
    if terminate:
        return None
    rest = end - pos
    if rest:
        buf[:rest] = bytes(buf[pos:end])
    step.cend = rest
    if not rest:
        relaybuf.give_back(relay)
        return 0
    if relay.failed is None:                     # the block ended: the rest is normal
        return relay.client_events(step.client_start())
    if rest == len(buf):
        relaybuf.grow_client_buf(relay)
    return 0


# -- client input the pooler refuses -------------------------------------------------

def refuse_input(relay: "Relay") -> None:
    """The step stopped before a message the pooler will not forward (issue 14.5): an
    unknown type, or a length PostgreSQL would refuse. The server never saw it: let
    it finish what it was sent, then close this client with 08P01 (raised)."""
    buf = relay.step.cbuf
    t, ln = buf[0], unpack_i32(buf, 1)[0]
    client = relay.client
    if relaystep.valid_client_type(t):
        message = f"invalid message length {ln} for message type {chr(t)!r}"
    else:
        message = "unknown pkt"
    log.warning("C-%d %s closing because: %s from client (type %d/0x%x)", client.id,
                client._who(), message, t, t)
    settle(relay)
    raise protocol.ProtocolError(message)


def settle(relay: "Relay") -> None:
    """End what the server was sent (CopyFail for a COPY IN, Sync for an open extended
    batch, ROLLBACK of an open transaction), forwarding its answers, so it goes back
    to the pool clean; on timeout relayexit.return_server closes it instead."""
    srv, step = relay.server, relay.step
    if srv is None or srv.closed:
        return
    with gevent.Timeout(SETTLE_TIMEOUT, False):
        if step.in_copy_in:
            srv.stream.sendall(protocol.message(b"f", b"client sent an invalid message\0"))
            step.in_copy_in = False
        if step.unsynced:
            srv.stream.sendall(protocol.message(b"S"))
            step.send += 1
            step.unsynced = False
        while relay.server is not None and step.send != step.recv:
            srv.stream.wait_readable()
            if not relay.settle_read():
                return
        if relay.server is not None and step.status != STATUS_IDLE and not step.skept:
            srv.run("ROLLBACK")
            step.status = STATUS_IDLE


# -- statement pooling ----------------------------------------------------------------

def refuse_transaction(relay: "Relay") -> None:
    """Statement mode: a statement opened a transaction. Roll it back, tell the client."""
    srv = relay.server
    try:
        srv.run("ROLLBACK")
    except Exception:
        relay.server = None
        relay.step.unlink()
        relay.pool.discard(srv, "rollback failed in statement mode")
        raise PoolerError("08P01", "server connection lost while refusing a transaction")
    relay.step.status = STATUS_IDLE
    relay.cs.sendall(protocol.error_response(
        "0A000", "transaction blocks not allowed in statement pooling mode") +
        protocol.ready_for_query(b"I"))
    relay._unlink(time.monotonic())
