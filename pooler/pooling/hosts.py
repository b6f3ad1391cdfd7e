"""Which host of a database entry's host list a new server connection goes to.

A database entry may name several hosts (`host=a,b,c`, with one port or one per
host). PgBouncer 1.24's `load_balance_hosts` picks among them for each new
connection: `round-robin` takes the next entry every time; `disable` stays on
one entry until a connection to it fails, then moves to the next. The choice
is made only when a server is opened: clients still get whichever idle server
the pool has (server_round_robin decides that).

A reload that changes the list (or load_balance_hosts) moves new connections
at once; the servers opened before are closed as for any change of where the
entry leads (Pool.reconfigure: Route.target() holds the list).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pooler.config.model import Route


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

