"""The end of a relay: the client is gone (or being closed), its server goes back
to the pool if it is at a clean boundary, else it is closed; then the client is
closed. Runs in a greenlet (a reset query or a cancel may block)."""
from __future__ import annotations

from typing import TYPE_CHECKING

from pooler.pooling import recovery, relaybuf, replication, sessionstate

if TYPE_CHECKING:
    from pooler.pooling.relay import Relay

STATUS_IDLE = ord("I")


def end(relay: "Relay") -> None:
    """Leave the pool's queue, stop the watchers, return the buffer and the server,
    close the client."""
    relay.ended = True
    try:
        leave_queue(relay)
        relay._disarm()
        relay.step.cend = 0
        relaybuf.give_back(relay)
        hub = relay.pool.listen_hub
        if hub is not None:              # shared LISTEN (notifyhub.py): its channels go
            hub.leave(relay.client)
        if relay.synced is not None:
            relay.pool.release(relay.synced)
            relay.synced = None
        return_server(relay)
    finally:
        relay.glet = None
        relay.client.close()


def leave_queue(relay: "Relay") -> None:
    """A client that waited in the pool as a callback waiter (Relay.waiter) leaves it."""
    w, relay.waiter = relay.waiter, None
    if w is not None and not w.done:
        w.done = True
        try:
            relay.pool.waiters.remove(w)
        except ValueError:
            pass


def return_server(relay: "Relay") -> None:
    """Reuse the client's server only if it is at a clean boundary."""
    step = relay.step
    step.flush_stats(relay.stats)
    srv = relay.server
    if srv is None:
        return
    relay.server = None
    step.unlink()
    pool = relay.pool
    if relay.dedicated:
        replication.close_dedicated(pool, srv)      # a replication server is never reused
        return
    clean = (step.send == step.recv and step.status == STATUS_IDLE and not step.unsynced
             and not step.c_skip and not step.s_skip and not step.skept and not srv.closed
             and step.pending is None)
    if relay.mode != "session":          # a busy server is recovered if it can be
        clean = recovery.give_back(relay, srv, clean)
    if not clean:
        if (step.send != step.recv or step.unsynced) and not srv.closed:
            srv.cancel()     # so the backend stops the abandoned query (query_timeout too)
        pool.discard(srv, "client disconnected while server was not ready")
        return
    reset = pool.cfg.server_reset_query
    if reset and (relay.mode == "session" or pool.cfg.server_reset_query_always):
        try:
            srv.run(reset)
            srv.stmts.clear()
            sessionstate.after_reset_query(srv, reset)
        except Exception as exc:
            pool.discard(srv, f"server_reset_query failed: {exc}")
            return
    pool.release(srv)
