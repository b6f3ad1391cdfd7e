"""A plain, JSON-able picture of one worker: pools, clients, servers, counters.

The admin console never reads live objects: it asks the worker for
its pooler for `snapshots()` (one dict per worker process) and computes every SHOW
from those, summing across workers. So the same code serves one process and
many, and a snapshot can cross a pipe as JSON.

Times are seconds since the epoch (floats) unless a key says `_us`
(integer microseconds). Identifiers (`id`) are unique across workers: see
global_id().
"""
from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING, Any

from pooler.pooling.waiter import shown_state

if TYPE_CHECKING:
    from pooler.pooling.client import Client
    from pooler.pooling.pool import Pool
    from pooler.pooling.server import ServerConn
    from pooler.pooling.worker import Worker

# Client/server ids are per process; a stride keeps them unique across workers
# and small enough for PgBouncer's int4 `id` column (worker 0 keeps its own ids).
ID_STRIDE = 100_000_000


def global_id(worker_id: int, local_id: int) -> int:
    return worker_id * ID_STRIDE + local_id


def snapshot(worker: "Worker") -> dict[str, Any]:
    """Everything the admin console needs to know about one worker, right now."""
    clock = _Clock()
    wid = worker.worker_id
    pools = list(worker.pools.values())
    waits = _wait_starts(pools)
    flags = worker.operator_state()
    admin = getattr(worker, "admin", None)
    return {
        "worker_id": wid,
        "pid": os.getpid(),
        # The master of a prefork pooler; a one-process pooler is its own (SHOW PROCESSES).
        "master_pid": getattr(worker.peers, "master_pid", None) or os.getpid(),
        "taken_at": clock.wall_now,
        "state": flags,
        "shutting_down": bool(worker.shutting_down or worker.shutdown_mode),
        "pools": [_pool(p, clock) for p in pools],
        "clients": [_client(c, wid, clock, waits) for c in list(worker.clients)],
        "servers": [s for p in pools for s in _servers(p, wid, clock)],
        "databases": _databases(pools, flags),
        "users": sorted(worker.userlist),
        "peer_pools": worker.peer_pools.snapshot(),
        "admin_stats": admin.stats_dict() if admin is not None else {},
    }


class _Clock:
    """One reading of both clocks, to turn monotonic stamps into wall times."""

    def __init__(self) -> None:
        self.mono_now = time.monotonic()
        self.wall_now = time.time()

    def wall(self, mono: float) -> float:
        return self.wall_now - (self.mono_now - mono)


# --------------------------------------------------------------------------- pools

def _pool(pool: "Pool", clock: _Clock) -> dict[str, Any]:
    g = pool.gauges(clock.mono_now)
    st = pool.stats
    prepared = st.prepared
    return {
        "database": pool.name,
        "user": pool.user,
        "server_user": pool.server_user,
        "mode": pool.route.pool_mode,
        "paused": bool(pool.paused),
        "cl_active": g.cl_active,
        "cl_waiting": g.cl_waiting,
        "cl_active_cancel_req": 0,
        "cl_waiting_cancel_req": 0,
        "sv_active": g.sv_active,
        "sv_active_cancel": 0,
        "sv_being_canceled": 0,
        "sv_idle": g.sv_idle,
        "sv_used": g.sv_used,
        "sv_tested": 0,
        "sv_login": g.sv_login,
        "maxwait": int(g.maxwait),
        "maxwait_us": int((g.maxwait - int(g.maxwait)) * 1_000_000),
        "stats": {
            "server_assignment_count": getattr(st, "server_assignment_count", 0),
            "xact_count": st.xact_count,
            "query_count": st.query_count,
            "bytes_in": st.bytes_in,
            "bytes_out": st.bytes_out,
            "xact_time_us": _us(st.xact_time),
            "query_time_us": _us(st.query_time),
            "wait_time_us": _us(st.wait_time),
            "client_parse_count": prepared.client_parses,
            "server_parse_count": prepared.server_parses,
            "bind_count": prepared.binds,
            "client_login_count": st.client_logins,
            "recovered_xact_count": st.recovered_xacts,
            "recovered_query_count": st.recovered_queries,
            "recovery_failed_count": st.recovery_failures,
            "server_moved_in_count": st.servers_moved_in,
        },
        # histogram.py: per-bucket counts and the sum of the observed seconds (in us).
        "hist": {"xact": [list(st.xact_hist), _us(st.xact_time)],
                 "query": [list(st.query_hist), _us(st.query_time)],
                 "wait": [list(st.wait_hist), _us(st.link_wait_time)]},
    }


def _us(seconds: float) -> int:
    return int(seconds * 1_000_000)


def _databases(pools: list["Pool"], flags: dict[str, Any]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for pool in pools:
        db = out.setdefault(pool.name, {"current_connections": 0})
        db["current_connections"] += pool.total
    for name, db in out.items():
        db["paused"] = name in flags["paused_dbs"]
        db["disabled"] = name in flags["disabled_dbs"]
    return out


# --------------------------------------------------------------------------- clients

def _wait_starts(pools: list["Pool"]) -> dict[int, float]:
    """id(client) -> when it started waiting for a server (the pools' queues know)."""
    return {id(w.client): w.since for p in pools for w in list(p.waiters) if not w.done}


def _client(client: "Client", wid: int, clock: _Clock, waits: dict[int, float]) -> dict[str, Any]:
    relay = client.relay
    pool = client.pool
    srv = getattr(relay, "server", None)
    addr, port = _split_peer(client.addr)
    secured = client.tls
    laddr, lport = _local_sock(secured.tls) if secured is not None else _local(client.stream)
    since = waits.get(id(client))
    wait = clock.mono_now - since if since is not None else 0.0
    last = getattr(relay, "last_active", None)
    request = clock.wall(last) if last is not None else client.connect_time
    stmts = getattr(relay, "stmts", None)
    return {
        "id": global_id(wid, client.id),
        "ptr": client_ptr(wid, client.id),
        "user": client.user,
        "database": pool.name if pool is not None else client.database,
        "pool_user": pool.user if pool is not None else None,
        "replication": client.replication,      # none / logical / physical
        "state": str(shown_state(client)),  # login / idle / waiting / active / admin
        "addr": addr,
        "port": port,
        "local_addr": laddr,
        "local_port": lport,
        "connect_time": client.connect_time,
        "request_time": request,
        "wait_us": _us(wait),
        "link": server_ptr(wid, srv.id) if srv is not None else None,
        "application_name": client.tparams.get("application_name") or "",
        "prepared_statements": len(stmts.names) if stmts is not None else 0,
        "tls": secured.info if secured is not None else "",
        "pin": client.session.pin if relay is not None else "",
    }


def client_ptr(wid: int, local_id: int) -> str:
    # PgBouncer shows object addresses; ours only need to be unique and match `link`.
    return f"0xc{global_id(wid, local_id):09x}"


def server_ptr(wid: int, local_id: int) -> str:
    return f"0x5{global_id(wid, local_id):09x}"


def _split_peer(peer: str) -> tuple[str, int]:
    """'1.2.3.4:5678' -> ('1.2.3.4', 5678); a Unix socket peer is ('unix', 0)."""
    host, sep, port = peer.rpartition(":")
    if not sep or not port.isdigit():
        return peer or "unix", 0
    return host, int(port)


def _local(stream) -> tuple[str, int]:
    return _local_sock(stream.sock)


def _local_sock(sock) -> tuple[str, int]:
    """(address, port) a socket is bound to; ('unix', 0) for a Unix socket.
    (A TLS connection's stream is a TlsSocket: its gevent TLS socket is asked.)"""
    try:
        name = sock.getsockname()
    except OSError:
        return "", 0
    if isinstance(name, tuple) and len(name) >= 2:
        return str(name[0]), int(name[1])
    return "unix", 0


# --------------------------------------------------------------------------- servers

def _servers(pool: "Pool", wid: int, clock: _Clock) -> list[dict]:
    out = []
    for srv in list(pool.active):
        out.append(_server(pool, srv, "active", wid, clock))
    for srv in list(pool.idle):
        used = pool.server_is_used(srv, clock.mono_now)     # the rule SHOW POOLS counts by
        out.append(_server(pool, srv, "used" if used else "idle", wid, clock))
    return out


def _server(pool: "Pool", srv: "ServerConn", st: str, wid: int, clock: _Clock) -> dict[str, Any]:
    client = srv.client
    secured = srv.tls
    laddr, lport = _local_sock(secured.tls) if secured is not None else _local(srv.stream)
    host = srv.host                     # the one of the entry's host list it went to
    return {
        "id": global_id(wid, srv.id),
        "ptr": server_ptr(wid, srv.id),
        "user": pool.server_user,
        "database": pool.name,
        "state": st,                        # active / idle / used
        "addr": "unix" if host.startswith("/") else host,
        "port": srv.port,
        "replication": srv.replication,
        "local_addr": laddr,
        "local_port": lport,
        "connect_time": clock.wall(srv.created),
        "request_time": clock.wall(srv.last_used),
        "close_needed": srv.close_needed and not srv.closed,
        "link": client_ptr(wid, client.id) if client is not None else None,
        "remote_pid": srv.pid,
        "application_name": (client.tparams.get("application_name") or "") if client is not None else "",
        "prepared_statements": len(srv.stmts.cache),
        "tls": secured.info if secured is not None else "",
        "pin": client.session.pin if client is not None else "",
    }
