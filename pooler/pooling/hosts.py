"""Which host of a database entry's host list a new server connection goes to.

A database entry may name several hosts (`host=a,b,c`, with one port or one per
host). PgBouncer 1.24's `load_balance_hosts` picks among them for each new
connection: `round-robin` takes the next entry every time; `disable` stays on
one entry until a connection to it fails, then moves to the next. The choice
is made only when a server is opened: clients still get whichever idle server
the pool has (server_round_robin decides that).

A reload that changes the list moves new connections at once; servers to an
address no longer listed are closed: idle ones now, linked ones when released
(close_needed), so new transactions run on the new hosts; a replication
client's server, never released, is closed now with its client.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from pooler.errors import PoolerError

if TYPE_CHECKING:
    from pooler.config.model import Route
    from pooler.pooling.pool import Pool


class HostPicker:
    """The host choice of one pool (a counter per pool, as in PgBouncer)."""

    __slots__ = ("hosts", "round_robin", "turn", "last_failed")

    def __init__(self, route: "Route") -> None:
        self.turn = 0
        self.last_failed = False
        self.set_route(route)

    def set_route(self, route: "Route") -> None:
        self.hosts = route.hosts or ((route.host, route.port),)
        self.round_robin = route.load_balance_hosts == "round-robin"

    def next(self) -> tuple[str, int]:
        """The address for the connection about to be opened."""
        hosts = self.hosts
        if len(hosts) == 1:
            return hosts[0]
        if not self.round_robin and self.last_failed:
            self.turn += 1              # `disable`: leave a host only when it failed
        addr = hosts[self.turn % len(hosts)]
        if self.round_robin:
            self.turn += 1
        return addr

    def outcome(self, ok: bool) -> None:
        """The connection attempt to the last address given succeeded or failed."""
        self.last_failed = not ok


def retarget(pool: "Pool", route: "Route") -> None:
    """A reload gave `pool` a new route: if its addresses changed, close the servers
    to addresses no longer listed (idle ones now, linked ones when released)."""
    picker = pool.hosts
    old = picker.hosts
    picker.set_route(route)
    if picker.hosts == old:
        return
    keep = set(picker.hosts)
    for srv in list(pool.idle):
        if (srv.host, srv.port) not in keep:
            pool.discard(srv, "database host changed (RELOAD)")
    for srv in list(pool.active):
        if (srv.host, srv.port) not in keep:
            srv.close_needed = True     # Pool.release closes it
            if srv.replication != "none" and srv.client is not None:
                # Never released: it goes now, with its client, which may reconnect
                # to the new hosts (PgBouncer closes close_needed replication servers).
                srv.client.kill(PoolerError("08006", "database host changed (RELOAD): "
                                            "replication connection closed"))
