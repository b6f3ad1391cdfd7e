"""A client waiting for a server, and the state SHOW commands count it in."""
from __future__ import annotations

import time
from typing import Callable

from gevent import getcurrent

from pooler.pooling import clientpush
from pooler.pooling.clientstate import ClientState
from pooler.wire import protocol

# PgBouncer 1.25's words for query_wait_notify.
QUEUED_NOTICE = protocol.notice_response(
    "No server connection available in postgres backend, client being queued")


class Waiter:
    """A client parked until a server is handed to it: a greenlet blocked in
    acquire() (`glet`), or (with `cb`) a relay whose loop callback takes the server
    without a greenlet switch (no greenlet at all: `glet` is None)."""
    __slots__ = ("glet", "since", "client", "done", "cb", "notified")

    def __init__(self, client, cb: Callable | None = None) -> None:
        self.glet = getcurrent() if cb is None else None
        self.since = time.monotonic()
        self.client = client
        self.done = False
        self.cb = cb
        self.notified = False    # query_wait_notify's NOTICE was sent (or was due)

    def fail(self, hub, exc: BaseException) -> None:
        """The wait is over with an error (query_wait_timeout): raise it in the waiter."""
        if self.glet is not None:
            hub.loop.run_callback(self.glet.throw, exc)
        else:
            self.client.kill(exc)

    def notify(self) -> None:
        """query_wait_notify: tell the client, once, that it is queued. The NOTICE goes
        only if the socket takes it whole at once: the client waits for an answer, so
        nothing of ours is half-written, and a notice that cannot go now is dropped
        rather than risk a partial message (a send that blocks would also stall the
        janitor)."""
        self.notified = True
        client = self.client
        if client is None or client.stream is None:
            return
        fd = client.stream.fd
        if clientpush.room(fd) >= len(QUEUED_NOTICE) + clientpush.overhead(client):
            try:
                client.stream.sock.send(QUEUED_NOTICE)
            except OSError:
                pass             # the client is gone: its relay notices on its own


def notify_queued(waiters, now: float, after: float) -> None:
    """query_wait_notify: one NOTICE to each waiter queued longer than `after`."""
    for w in waiters:
        if not w.notified and not w.done and now - w.since > after:
            w.notify()


def shown_state(client) -> ClientState:
    """The state SHOW CLIENTS and SHOW POOLS count `client` in. A client joins its pool
    once authenticated; if it is still in LOGIN then, it waits for the pool's first
    server (whose parameters it is greeted with): PgBouncer's "waiting for login",
    shown and counted as waiting."""
    state = client.state
    if state == ClientState.LOGIN and client.pool is not None:
        return ClientState.WAITING
    return state
