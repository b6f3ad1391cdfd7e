"""The admin console's SHOW tables, computed from worker snapshots.

One function per SHOW command, each a pure function of a View (the config
plus the snapshots of every worker), so they are the same for one process
and for many. Columns follow PgBouncer 1.23 (name, order, type); the extra
`id` column of CLIENTS/SERVERS/SOCKETS is 1.24's, for KILL_CLIENT.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING, Callable

from pooler.admin import procstat
from pooler.config import runtime
from pooler.wire import protocol
from pooler.version import version_line
from pooler.pooling import histogram, relaystep
from pooler.config.settings import ADMIN_DB
from pooler.pooling.relaybuf import CLIENT_BUF
from pooler.pooling.server import SERVER_BUF

if TYPE_CHECKING:
    from pooler.config.model import Config
    from pooler.pooling.worker import Worker

TEXT, INT4, INT8, NUMERIC, BYTEA = 25, 23, 20, 1700, 17
_OIDS = {"s": TEXT, "i": INT4, "q": INT8, "N": NUMERIC, "b": BYTEA}


@dataclass
class Result:
    """What one admin command sends back (before ReadyForQuery)."""
    tag: str
    columns: list[tuple[str, int]] | None = None
    rows: list[list] = field(default_factory=list)
    notices: list[bytes] = field(default_factory=list)

    def encode(self) -> bytes:
        out = list(self.notices)
        if self.columns is not None:
            out.append(protocol.row_description(self.columns))
            out += [protocol.data_row(r) for r in self.rows]
        out.append(protocol.command_complete(self.tag))
        return b"".join(out)


def table(columns: str, rows: list[list]) -> Result:
    """A SHOW result; `columns` is 'name:t name:t ...', t one of s i q N b (PgBouncer's letters)."""
    cols = []
    for spec in columns.split():
        name, kind = spec.rsplit(":", 1)
        cols.append((name, _OIDS[kind]))
    return Result("SHOW", cols, rows)


# --------------------------------------------------------------------------- statistics

# Snapshot counter names, in the order PgBouncer 1.23 prints them.
STAT_KEYS = ("server_assignment_count", "xact_count", "query_count", "bytes_in", "bytes_out",
             "xact_time_us", "query_time_us", "wait_time_us", "client_parse_count",
             "server_parse_count", "bind_count", "client_login_count")
# Ours, in SHOW STATS only (after PgBouncer's columns): servers given back after their
# client left inside a transaction / mid-query, and those closed instead (recovery.py);
# idle servers taken over from another worker (proc/servermove.py).
OUR_KEYS = ("recovered_xact_count", "recovered_query_count", "recovery_failed_count",
            "server_moved_in_count")


class StatsHistory:
    """Samples of the per-database totals, for the avg_* columns.

    As in PgBouncer, an average is taken over the time since the sample
    before the latest one, and a new sample is due every stats_period (taken
    when a SHOW asks, so an idle console costs nothing).
    """

    def __init__(self) -> None:
        now = time.monotonic()
        self.prev: tuple[float, dict[str, dict[str, int]]] = (now - 1.0, {})
        self.last: tuple[float, dict[str, dict[str, int]]] = (now, {})

    def averages(self, totals: dict[str, dict[str, int]], period: float) -> dict[str, dict[str, int]]:
        now = time.monotonic()
        if now - self.last[0] >= period:
            self.prev, self.last = self.last, (now, {k: dict(v) for k, v in totals.items()})
        since, old = self.prev
        dur = max(now - since, 1e-6)
        return {db: _average(cur, old.get(db, {}), dur) for db, cur in totals.items()}


def _average(cur: dict[str, int], old: dict[str, int], dur: float) -> dict[str, int]:
    d = {k: cur.get(k, 0) - old.get(k, 0) for k in STAT_KEYS}

    def per(num: str, den: str) -> int:
        return int(d[num] / d[den]) if d[den] > 0 else 0
    out = {k: int(d[k] / dur) for k in STAT_KEYS}
    out["xact_time_us"] = per("xact_time_us", "xact_count")
    out["query_time_us"] = per("query_time_us", "query_count")
    out["wait_time_us"] = per("wait_time_us", "server_assignment_count")
    return out


# --------------------------------------------------------------------------- the view

COUNT_KEYS = ("cl_active", "cl_waiting", "cl_active_cancel_req", "cl_waiting_cancel_req",
              "sv_active", "sv_active_cancel", "sv_being_canceled", "sv_idle", "sv_used",
              "sv_tested", "sv_login")
SERVER_KEYS = ("sv_active", "sv_active_cancel", "sv_being_canceled", "sv_idle", "sv_used",
               "sv_tested", "sv_login")


class View:
    """The config and all workers' snapshots, merged the way SHOW needs them."""

    def __init__(self, worker: "Worker", snaps: list[dict], history: StatsHistory) -> None:
        self.worker = worker
        self.cfg = worker.cfg
        self.snaps = snaps
        self.history = history

    @cached_property
    def pools(self) -> list[dict]:
        """Pools summed across workers, sorted by (database, user) as PgBouncer lists them."""
        merged: dict[tuple[str, str], dict] = {}
        for snap in self.snaps:
            for p in snap["pools"]:
                m = merged.get((p["database"], p["user"]))
                if m is None:
                    m = merged[(p["database"], p["user"])] = {
                        "database": p["database"], "user": p["user"], "mode": p["mode"],
                        "server_user": p["server_user"], "wait_us": 0,
                        "stats": {k: 0 for k in STAT_KEYS + OUR_KEYS}, "hist": {},
                        **{k: 0 for k in COUNT_KEYS}}
                for k in COUNT_KEYS:
                    m[k] += p[k]
                for k in STAT_KEYS + OUR_KEYS:
                    m["stats"][k] += p["stats"].get(k, 0)
                _add_hist(m["hist"], p.get("hist", {}))
                # The oldest waiter of all workers, not a sum.
                m["wait_us"] = max(m["wait_us"], p["maxwait"] * 1_000_000 + p["maxwait_us"])
        return [merged[k] for k in sorted(merged)]

    @cached_property
    def clients(self) -> list[dict]:
        return [c for snap in self.snaps for c in snap["clients"]]

    @cached_property
    def servers(self) -> list[dict]:
        return [s for snap in self.snaps for s in snap["servers"]]

    @cached_property
    def admin_clients(self) -> list[dict]:
        return [c for c in self.clients if c["state"] == "admin"]

    def flag(self, name: str, db: str) -> bool:
        return any(db in snap["state"][name] for snap in self.snaps)

    def pause_mode(self) -> str:
        return self.snaps[0]["state"]["pause_mode"] if self.snaps else "none"

    def db_totals(self) -> dict[str, dict[str, int]]:
        """Counters per database, the admin console's own under 'pgbouncer'."""
        out: dict[str, dict[str, int]] = {}
        for p in self.pools:
            t = out.setdefault(p["database"], {k: 0 for k in STAT_KEYS + OUR_KEYS})
            for k in STAT_KEYS + OUR_KEYS:
                t[k] += p["stats"].get(k, 0)
        admin = out.setdefault(ADMIN_DB, {k: 0 for k in STAT_KEYS + OUR_KEYS})
        for snap in self.snaps:
            for k, val in snap.get("admin_stats", {}).items():
                admin[k] += val
        return dict(sorted(out.items()))


def _add_hist(into: dict, hist: dict) -> None:
    """Sum one worker's histograms (kind -> [counts, sum_us]) into `into`."""
    for kind, (counts, sum_us) in hist.items():
        have = into.get(kind)
        if have is None:
            into[kind] = [list(counts), sum_us]
        else:
            have[0] = [a + b for a, b in zip(have[0], counts)]
            have[1] += sum_us


# --------------------------------------------------------------------------- SHOW tables

POOLS_COLS = ("database:s user:s cl_active:i cl_waiting:i cl_active_cancel_req:i "
              "cl_waiting_cancel_req:i sv_active:i sv_active_cancel:i sv_being_canceled:i "
              "sv_idle:i sv_used:i sv_tested:i sv_login:i maxwait:i maxwait_us:i pool_mode:s")


def show_pools(v: View) -> Result:
    rows = [[p["database"], p["user"], *(p[k] for k in COUNT_KEYS),
             p["wait_us"] // 1_000_000, p["wait_us"] % 1_000_000, p["mode"]] for p in v.pools]
    admin = [ADMIN_DB, ADMIN_DB, len(v.admin_clients), *([0] * 12), "statement"]
    rows.append(admin)
    return table(POOLS_COLS, sorted(rows, key=lambda r: (r[0], r[1])))


DATABASES_COLS = ("name:s host:s port:i database:s force_user:s pool_size:i min_pool_size:i "
                  "reserve_pool:i server_lifetime:i pool_mode:s load_balance_hosts:s max_connections:i "
                  "current_connections:i max_client_connections:i current_client_connections:i "
                  "paused:i disabled:i")


def show_databases(v: View) -> Result:
    cfg = v.cfg
    current: dict[str, int] = {}
    for p in v.pools:
        current[p["database"]] = current.get(p["database"], 0) + sum(p[k] for k in SERVER_KEYS)
    clients: dict[str, int] = {}
    for c in v.clients:
        # Logged-in clients of each entry (the console's under pgbouncer), as counted
        # against max_db_client_connections; a client still authenticating is not.
        if c["state"] != "login":
            clients[c["database"]] = clients.get(c["database"], 0) + 1
    names = (set(cfg.databases) - {"*"}) | set(cfg.pools) | set(current)
    rows = [_database_row(v, name, current.get(name, 0), clients.get(name, 0)) for name in names]
    rows = [r for r in rows if r is not None]
    rows.append([ADMIN_DB, None, cfg.listen_port, ADMIN_DB, ADMIN_DB, 2, 0, 0,
                 int(cfg.server_lifetime), "statement", None, 0, 0, cfg.max_db_client_connections,
                 clients.get(ADMIN_DB, 0), 0, 0])
    return table(DATABASES_COLS, sorted(rows, key=lambda r: r[0]))


def _database_row(v: View, name: str, current: int, clients: int) -> list | None:
    cfg = v.cfg
    route = cfg.route(name)
    if route is None:           # removed by a reload while its pool lives on
        return None
    if name in cfg.pools:
        mode: str | None = cfg.pools[name].mode
    else:
        entry = cfg.databases.get(name) or cfg.databases.get("*")
        mode = entry.pool_mode if entry is not None else None
    return [name, route.host, route.port, route.dbname, route.user, route.pool_size,
            route.min_pool_size, route.reserve_pool_size, int(route.server_lifetime), mode,
            route.load_balance_hosts if len(route.hosts) > 1 else None,   # PgBouncer: lists only
            route.max_db_connections, current, route.max_db_client_connections, clients,
            int(v.flag("paused_dbs", name)), int(v.flag("disabled_dbs", name))]


SOCKET_COLS = ("type:s user:s database:s replication:s state:s addr:s port:i local_addr:s "
               "local_port:i connect_time:s request_time:s wait:i wait_us:i close_needed:i "
               "ptr:s link:s remote_pid:i tls:s application_name:s prepared_statements:i id:i pin:s")
DEBUG_COLS = " recv_pos:i pkt_pos:i pkt_remain:i send_pos:i send_remain:i pkt_avail:i send_avail:i"
CLIENT_STATES = {"idle": "idle", "active": "active", "waiting": "waiting", "admin": "idle"}
SOCKET_STATES = {"idle": "cl_active", "active": "cl_active", "waiting": "cl_waiting",
                 "admin": "cl_active", "login": "cl_login", "used": "sv_used"}


def _ts(wall: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(wall))


def _client_row(c: dict, state: str) -> list:
    return ["C", c["user"] or "(nouser)", c["database"] or "(nodb)", c.get("replication", "none"),
            state, c["addr"],
            c["port"], c["local_addr"], c["local_port"], _ts(c["connect_time"]),
            _ts(c["request_time"]), c["wait_us"] // 1_000_000, c["wait_us"] % 1_000_000, 0,
            c["ptr"], c["link"] or "", 0, c.get("tls", ""), c["application_name"], c["prepared_statements"],
            c["id"], c.get("pin", "")]


def _server_row(s: dict, state: str) -> list:
    return ["S", s["user"], s["database"], s.get("replication", "none"), state, s["addr"],
            s["port"], s["local_addr"],
            s["local_port"], _ts(s["connect_time"]), _ts(s["request_time"]), 0, 0,
            int(s["close_needed"]), s["ptr"], s["link"] or "", s["remote_pid"], s.get("tls", ""),
            s["application_name"], s["prepared_statements"], s["id"], s.get("pin", "")]


def _by_pool(rows: list[dict]) -> list[dict]:
    return sorted(rows, key=lambda r: (r["database"] or "", r["user"] or "", r["id"]))


def show_clients(v: View) -> Result:
    rows = [_client_row(c, CLIENT_STATES[c["state"]]) for c in _by_pool(v.clients)
            if c["state"] != "login"]
    return table(SOCKET_COLS, rows)


def show_servers(v: View) -> Result:
    return table(SOCKET_COLS, [_server_row(s, s["state"]) for s in _by_pool(v.servers)])


def show_sockets(v: View) -> Result:
    rows = [_client_row(c, SOCKET_STATES[c["state"]]) + [0] * 7 for c in _by_pool(v.clients)]
    rows += [_server_row(s, "sv_" + s["state"]) + [0] * 7 for s in _by_pool(v.servers)]
    return table(SOCKET_COLS + DEBUG_COLS, rows)


def show_active_sockets(_v: View) -> Result:
    # PgBouncer lists sockets with unsent or unparsed bytes buffered; the relay
    # forwards whole chunks before it reads again, so there are none to show.
    return table(SOCKET_COLS + DEBUG_COLS, [])


USERS_COLS = ("name:s pool_size:s reserve_pool_size:s pool_mode:s max_user_connections:i "
              "current_connections:i max_user_client_connections:i current_client_connections:i")


def show_users(v: View) -> Result:
    cfg = v.cfg
    names = {ADMIN_DB} | {u for snap in v.snaps for u in snap.get("users", ())}
    names |= {d.user for d in cfg.databases.values() if d.user} | set(cfg.users)
    names |= {p["user"] for p in v.pools} | ({cfg.auth.user} if cfg.auth.user else set())
    conns: dict[str, int] = {}
    for p in v.pools:
        conns[p["server_user"]] = conns.get(p["server_user"], 0) + sum(p[k] for k in SERVER_KEYS)
    clients: dict[str, int] = {}
    for c in v.clients:
        if c["state"] != "login":       # console sessions count too, as in PgBouncer
            clients[c["user"]] = clients.get(c["user"], 0) + 1
    rows = [_user_row(cfg, n, conns.get(n, 0), clients.get(n, 0)) for n in sorted(names)]
    return table(USERS_COLS, rows)


def _user_row(cfg: "Config", name: str, conns: int, clients: int) -> list:
    """PgBouncer 1.25's row: the [users] entry's own pool sizes (text, right-aligned in
    9 characters as its printf does; '' when unset) and pool_mode (NULL when unset),
    then the caps in force for the user (its own, else the global one)."""
    u = cfg.users.get(name)

    def own(attr: str):
        return None if u is None else getattr(u, attr)
    text = ["" if own(k) is None else f"{own(k):9d}" for k in ("pool_size", "reserve_pool_size")]
    max_conns = own("max_user_connections")
    if max_conns is None:
        max_conns = cfg.max_user_connections
    return [name, *text, own("pool_mode"), max_conns, conns, cfg.user_client_limit(name), clients]


STATS_NAMES = ("server_assignment_count", "xact_count", "query_count", "received", "sent",
               "xact_time", "query_time", "wait_time", "client_parse_count",
               "server_parse_count", "bind_count", "client_login_count")


def show_stats(v: View) -> Result:
    totals = v.db_totals()
    avgs = v.history.averages(totals, v.cfg.stats_period)
    cols = ("database:s " + " ".join(f"total_{n}:N" for n in STATS_NAMES) + " " +
            " ".join(f"avg_{n}:N" for n in _avg_names()) + " " +
            " ".join(f"total_{n}:N" for n in OUR_KEYS))
    rows = [[db, *(t[k] for k in STAT_KEYS), *(avgs[db][k] for k in STAT_KEYS),
             *(t[k] for k in OUR_KEYS)] for db, t in totals.items()]
    return table(cols, rows)


def _avg_names() -> list[str]:
    # PgBouncer abbreviates two of them: avg_recv, avg_sent.
    return ["recv" if n == "received" else n for n in STATS_NAMES]


TOTALS_NAMES = ("server_assignment_count", "xact_count", "query_count", "bytes_received",
                "bytes_sent", "xact_time", "query_time", "wait_time")


def show_stats_totals(v: View) -> Result:
    cols = "database:s " + " ".join(f"{n}:N" for n in TOTALS_NAMES) + \
        " client_parse_count:N server_parse_count:N bind_count:N client_login_count:N"
    return table(cols, [[db, *(t[k] for k in STAT_KEYS)] for db, t in v.db_totals().items()])


def show_stats_averages(v: View) -> Result:
    totals = v.db_totals()
    avgs = v.history.averages(totals, v.cfg.stats_period)
    cols = "database:s " + " ".join(f"{n}:N" for n in TOTALS_NAMES) + \
        " avg_client_parse_count:N avg_server_parse_count:N avg_bind_count:N" \
        " avg_client_login_count:N"
    return table(cols, [[db, *(avgs[db][k] for k in STAT_KEYS)] for db in totals])


def show_totals(v: View) -> Result:
    totals = v.db_totals()
    avgs = v.history.averages(totals, v.cfg.stats_period)
    names = ("server_assignment_count", "xact_count", "query_count", "client_bytes",
             "server_bytes", "xact_time", "query_time", "wait_time", "ps_client_parse_count",
             "ps_server_parse_count", "ps_bind_count", "client_login_count")
    rows = [[f"total_{n}", sum(t[k] for t in totals.values())] for n, k in zip(names, STAT_KEYS)]
    rows += [[f"avg_{n}", sum(a[k] for a in avgs.values())] for n, k in zip(names, STAT_KEYS)]
    return table("name:s value:N", rows)


def show_peers(v: View) -> Result:
    """PgBouncer 1.25's columns. Its pool_size caps the connections forwarding cancel
    requests to a peer; ours opens one per request (a peer's pool_size is ignored by
    the ini reader), so the row shows what PgBouncer shows without one: default_pool_size."""
    rows = [[pid, p.host, p.port, v.cfg.default_pool_size] for pid, p in sorted(v.cfg.peers.items())]
    return table("peer_id:i host:s port:i pool_size:i", rows)


PEER_POOL_KEYS = ("cl_active_cancel_req", "cl_waiting_cancel_req", "sv_active_cancel", "sv_login")


def show_peer_pools(v: View) -> Result:
    """One row per peer a cancel request was forwarded to, summed over workers."""
    return table("peer_id:i " + " ".join(f"{k}:i" for k in PEER_POOL_KEYS),
                 [[pid, *counts] for pid, counts in sorted(_peer_pools(v).items())])


def _peer_pools(v: View) -> dict[int, list[int]]:
    out: dict[int, list[int]] = {}
    for snap in v.snaps:
        for pid, row in snap.get("peer_pools", {}).items():
            counts = out.setdefault(int(pid), [0] * len(PEER_POOL_KEYS))
            for i, k in enumerate(PEER_POOL_KEYS):
                counts[i] += row[k]
    return out


def show_lists(v: View) -> Result:
    dbs = len(show_databases(v).rows)
    users = len(show_users(v).rows)
    servers = len(v.servers) + sum(p["sv_login"] for p in v.pools)
    items = [("databases", dbs), ("users", users), ("peers", len(v.cfg.peers)),
             ("pools", len(v.pools) + 1), ("peer_pools", len(_peer_pools(v))),
             ("free_clients", 0), ("used_clients", len(v.clients)),
             ("login_clients", sum(1 for c in v.clients if c["state"] == "login")),
             ("free_servers", 0), ("used_servers", servers), ("dns_names", 0), ("dns_zones", 0),
             ("dns_queries", 0), ("dns_pending", 0)]
    return table("list:s items:i", [list(i) for i in items])


def show_state(v: View) -> Result:
    mode = v.pause_mode()
    rows = [["active", "yes" if mode == "none" else "no"], ["paused", "yes" if mode == "pause" else "no"],
            ["suspended", "yes" if mode == "suspend" else "no"]]
    return table("key:s value:s", rows)


def show_mem(v: View) -> Result:
    # Python has no slab caches; report the per-connection buffers, the memory that scales.
    rows = [["client_cache", CLIENT_BUF, len(v.clients), 0, CLIENT_BUF * len(v.clients)],
            ["server_cache", SERVER_BUF, len(v.servers), 0, SERVER_BUF * len(v.servers)],
            ["pool_cache", 0, len(v.pools), 0, 0]]
    return table("name:s size:i used:i free:i memtotal:i", rows)


def show_fds(_v: View) -> Result:
    # File descriptors are handed over only for PgBouncer's online restart (-R), which
    # the pooler does not do (it restarts workers instead), so the list is empty.
    return table("fd:i task:s user:s database:s addr:s port:i cancel:q link:i client_encoding:s "
                 "std_strings:s datestyle:s timezone:s password:s scram_client_key:b "
                 "scram_server_key:b", [])


PROCESSES_COLS = ("role:s worker:i pid:i cpu_seconds:N rss_bytes:q vms_bytes:q "
                  "start_time:N open_fds:i")


def show_processes(v: View) -> Result:
    """Ours (not PgBouncer's): CPU and memory of the master and of each worker that
    answered, from /proc, for monitors that cannot read this container's /proc."""
    procs: dict[int, tuple[str, int | None]] = {}
    for snap in v.snaps:
        master = snap.get("master_pid")
        if master is not None and master != snap["pid"]:
            procs.setdefault(master, ("master", None))
        procs[snap["pid"]] = ("worker", snap["worker_id"])
    rows = []
    for pid, (role, wid) in sorted(procs.items()):
        u = procstat.usage(pid)
        if u is not None:
            rows.append([role, wid, pid, round(u.cpu_seconds, 2), u.rss_bytes, u.vms_bytes,
                         round(u.start_time, 2), u.open_fds])
    return table(PROCESSES_COLS, rows)


def show_config(v: View) -> Result:
    rows = [list(r) for r in runtime.config_rows(v.cfg, v.worker.config_path or None)]
    return table("key:s value:s default:s changeable:s", rows)


def show_histograms(v: View) -> Result:
    """Ours (PgBouncer has none): per pool and kind (histogram.KINDS), one row per
    bucket with Prometheus' cumulative count; sum_us is the kind's observed total."""
    rows = []
    for p in v.pools:
        for kind in histogram.KINDS:
            counts, sum_us = p["hist"].get(kind, (histogram.new_counts(), 0))
            for i, n in enumerate(histogram.cumulative(counts)):
                rows.append([p["database"], p["user"], kind, histogram.bound_label(i), n, sum_us])
    return table("database:s user:s kind:s le:s count:N sum_us:N", rows)


def show_help(_v: View) -> Result:
    text = ("\n\tSHOW HELP|CONFIG|DATABASES|POOLS|CLIENTS|SERVERS|USERS|VERSION\n"
            "\tSHOW FDS|SOCKETS|ACTIVE_SOCKETS|LISTS|MEM|STATE|PROCESSES|HISTOGRAMS\n"
            "\tSHOW PEERS|PEER_POOLS|DNS_HOSTS|DNS_ZONES\n"
            "\tSHOW STATS|STATS_TOTALS|STATS_AVERAGES|TOTALS\n"
            "\tSET key = arg\n\tRELOAD\n\tPAUSE [<db>]\n\tRESUME [<db>]\n\tDISABLE <db>\n"
            "\tENABLE <db>\n\tRECONNECT [<db>]\n\tKILL [<db>]\n\tKILL_CLIENT <client_id>\n"
            "\tSUSPEND\n\tSHUTDOWN\n\tSHUTDOWN WAIT_FOR_SERVERS|WAIT_FOR_CLIENTS\n\tWAIT_CLOSE [<db>]")
    fields = [b"S" + protocol.cstr("NOTICE"), b"V" + protocol.cstr("NOTICE"),
              b"C" + protocol.cstr("00000"), b"M" + protocol.cstr("Console usage"),
              b"D" + protocol.cstr(text)]
    return Result("SHOW", notices=[protocol.message(b"N", b"".join(fields) + b"\0")])


SHOWS: dict[str, Callable[[View], Result]] = {
    "help": show_help,
    "version": lambda _v: table("version:s", [[version_line(relaystep.describe())]]),
    "config": show_config, "databases": show_databases, "pools": show_pools,
    "clients": show_clients, "servers": show_servers, "sockets": show_sockets,
    "active_sockets": show_active_sockets, "users": show_users, "stats": show_stats,
    "stats_totals": show_stats_totals, "stats_averages": show_stats_averages,
    "totals": show_totals, "lists": show_lists, "state": show_state, "mem": show_mem,
    "fds": show_fds, "processes": show_processes, "peers": show_peers,
    "peer_pools": show_peer_pools, "histograms": show_histograms,
    "dns_hosts": lambda _v: table("hostname:s ttl:q addrs:s", []),
    "dns_zones": lambda _v: table("zonename:s serial:q count:i", []),
}
