"""Replication connections (`replication=database` / `replication=true`), PgBouncer 1.23+.

A replication client (pg_basebackup, pg_receivewal, pg_recvlogical, a logical
subscription's apply and tablesync workers) talks to a walsender, which
streams WAL in CopyBoth mode and, for physical replication, takes no SQL at
all. So such a client gets a server of its own, in its pool, opened for it
with the replication parameter and with its tracked parameters and its
`options` in the startup packet (a walsender cannot be SET); the relay
forwards its bytes in session mode, where CopyData flows both ways untouched;
and when the client leaves, the server is closed, never reused.

The server counts against the pool's pool_size like any other: when the pool
is full the client evicts an idle ordinary server of its pool (also when, with
several workers, the pool is full over all of them), or waits for a slot (a
server handed over to it by a release is closed to make that slot).
"""
from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

from pooler.errors import PoolerError

if TYPE_CHECKING:
    from pooler.pooling.pool import Pool
    from pooler.pooling.server import ServerConn

log = logging.getLogger("pooler.replication")

# The startup value of each kind, as a server is logged in with it (and as PgBouncer logs it).
REPLICATION_PARAM = {"none": "no", "logical": "database", "physical": "yes"}
_TRUE = ("true", "on", "yes", "1")
_FALSE = ("false", "off", "no", "0")


def replication_kind(value: str | None) -> str | None:
    """'none', 'logical' or 'physical' for a startup packet's `replication` value, as
    PostgreSQL reads it ('database', or a boolean in any of its spellings and prefixes);
    None for a value PostgreSQL would refuse."""
    if value is None:
        return "none"
    if value == "database":
        return "logical"
    v = value.strip().lower()
    if v and any(t.startswith(v) for t in _TRUE if len(v) >= (2 if t[0] == "o" else 1)):
        return "physical"
    if v and any(f.startswith(v) for f in _FALSE if len(v) >= (2 if f[0] == "o" else 1)):
        return "none"
    return None


def replication_startup(kind: str, params: dict[str, str],
                        tracked: dict[str, str]) -> dict[str, str]:
    """The extra startup parameters of a replication client's own server: the kind, the
    tracked parameters the client gave, and its `options` as it gave them."""
    out = {"replication": REPLICATION_PARAM[kind]}
    out.update(tracked)
    if "options" in params:
        out["options"] = params["options"]
    return out


def acquire_dedicated(pool: "Pool", client) -> "ServerConn":
    """Open the replication client's own server in its pool (greenlet only): within
    pool_size, evicting an idle ordinary server when the pool is full, else waiting."""
    since = 0.0
    while True:
        if not pool.paused:
            if pool.total < pool.route.pool_size and _claim(pool):
                return _open(pool, client)
            if pool.idle:
                # Full, here or (several workers) over all of them: make room.
                pool.discard(pool.idle[0], "evicted for a replication connection")
                continue
        since = since or time.monotonic()
        srv = pool._wait(client, since)
        if srv is not None:
            # A release handed an ordinary server over: its slot is this client's now.
            pool.discard(srv, "evicted for a replication connection")


def _claim(pool: "Pool") -> bool:
    """A slot within pool_size and the database's and user's caps; at a cap, another
    pool's idle server is evicted first, as for an ordinary client."""
    keys = pool.ordinary_keys()
    return pool.worker.quota.try_claim(keys) or \
        (pool._evict_for_caps() and pool.worker.quota.try_claim(keys))


def _open(pool: "Pool", client) -> "ServerConn":
    try:
        srv = pool._open(client.server_startup)
    except PoolerError as exc:          # PoolError: the login failed
        log.warning("C-%d %s@%s replication server login failed: %s", client.id,
                    pool.server_user, pool.name, exc)
        pool.wake_waiters(1)            # the slot it claimed is free again
        raise
    srv.replication = client.replication
    srv.tsig = client.tsig              # its parameters came in the startup packet
    return srv


def close_dedicated(pool: "Pool", srv: "ServerConn") -> None:
    """The replication client left: its server goes with it."""
    pool.discard(srv, "replication client disconnected")


def close_marked(pool: "Pool", reason: str) -> None:
    """RECONNECT, or a reload that moved the database, marked the pool's servers
    close_needed: a replication server is never released, so it goes now, with its
    client, which may connect again to the new target (PgBouncer's janitor closes
    close_needed replication servers at once too)."""
    for srv in list(pool.active):
        if srv.replication != "none" and srv.close_needed and srv.client is not None:
            srv.client.kill(PoolerError("08006", f"replication connection closed: {reason}"))
