"""A pool's side of sharing servers between prefork workers: an idle server given up
(closed, or moved with its claim to the worker whose client waits) and one taken
over from another worker (proc/peers.py, proc/servermove.py call these)."""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pooler.pooling.pool import Pool
    from pooler.pooling.server import ServerConn


def give_back_coldest(pool: "Pool", now: float, min_idle: float,
                      keep_claim: bool = False) -> "ServerConn | None":
    """Take the pool's least recently used idle server out and return its quota claim
    (unless `keep_claim`: it moves with the server), if it has been idle for
    `min_idle` (a younger one is likely reused here); the caller closes or moves
    it. None when there is none to give."""
    if not pool.idle or now - pool.idle[0].last_used < min_idle:
        return None
    srv = pool.idle[0]
    if keep_claim:
        pool.idle.pop(0)
    else:
        pool._forget(srv)
    return srv


def adopt(pool: "Pool", srv: "ServerConn", welcome: dict | None) -> bool:
    """A logged-in server moved here from another worker, its claim with it: hand it to
    a waiter or keep it idle (`welcome`: that worker's pool's, for a pool here that has
    none yet: its logins wait for one). False (paused, or the pool has its pool_size
    here already): the caller closes it and releases the claim."""
    if pool.paused or pool.total >= pool.route.pool_size:
        return False
    if pool.welcome is None and welcome is not None:
        pool.welcome = dict(welcome)
        pool._welcome_msgs.clear()
    pool.active.add(srv)
    pool.stats.servers_moved_in += 1
    pool.release(srv)
    return True
