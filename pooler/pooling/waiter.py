"""A client waiting for a server, and the state SHOW commands count it in."""
from __future__ import annotations

import time
from typing import Callable

from gevent import getcurrent

from pooler.pooling.clientstate import ClientState


class Waiter:
    """A client parked until a server is handed to it: a greenlet blocked in
    acquire() (`glet`), or (with `cb`) a relay whose loop callback takes the server
    without a greenlet switch (no greenlet at all: `glet` is None)."""
    __slots__ = ("glet", "since", "client", "done", "cb")

    def __init__(self, client, cb: Callable | None = None) -> None:
        self.glet = getcurrent() if cb is None else None
        self.since = time.monotonic()
        self.client = client
        self.done = False
        self.cb = cb

    def fail(self, hub, exc: BaseException) -> None:
        """The wait is over with an error (query_wait_timeout): raise it in the waiter."""
        if self.glet is not None:
            hub.loop.run_callback(self.glet.throw, exc)
        else:
            self.client.kill(exc)


def shown_state(client) -> ClientState:
    """The state SHOW CLIENTS and SHOW POOLS count `client` in. A client joins its pool
    once authenticated; if it is still in LOGIN then, it waits for the pool's first
    server (whose parameters it is greeted with): PgBouncer's "waiting for login",
    shown and counted as waiting."""
    state = client.state
    if state == ClientState.LOGIN and client.pool is not None:
        return ClientState.WAITING
    return state
