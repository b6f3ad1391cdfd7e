"""max_db_client_connections (PgBouncer 1.24+), global and per database entry: at most
that many clients of one entry, whatever their user, counted over every worker; SHOW
DATABASES shows max_client_connections and current_client_connections. The refusal is
PgBouncer's: FATAL 08P01 "client connections exceeded (max_db_client_connections)"."""
from __future__ import annotations

import re

import psycopg2
import pytest

from conftest import APP_DB, APP_PASSWORD, APP_USER, MD5_USER, SUPERUSER, raw_client, wait_until
from pooler.config.ini import load_ini
from pooler.proc import shm
from rawpg import PgError

REFUSAL = "client connections exceeded (max_db_client_connections)"
CAPPED = "capped"             # an entry of its own over the app database


def entries(pg, capped_limit: int | None) -> dict:
    db = {"host": pg.host, "port": pg.port, "dbname": APP_DB}
    capped = dict(db, max_db_client_connections=capped_limit) if capped_limit is not None else db
    return {APP_DB: db, CAPPED: capped}


def login(p, user: str, database: str) -> object | None:
    """A logged-in raw client, or None when refused for max_db_client_connections."""
    try:
        return raw_client(p.port, user=user, database=database)
    except PgError as exc:
        assert (exc.fields["S"], exc.fields["C"], exc.fields["M"]) == ("FATAL", "08P01", REFUSAL)
        return None


def show_databases(p, user: str = SUPERUSER) -> dict[str, tuple[int, int]]:
    conn = p.connect("pgbouncer", user, None)
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            cur.execute("SHOW DATABASES")
            names = [d.name for d in cur.description]
            rows = [dict(zip(names, r)) for r in cur.fetchall()]
    finally:
        conn.close()
    assert names.index("current_connections") < names.index("max_client_connections") < \
        names.index("current_client_connections") < names.index("paused")
    return {r["name"]: (r["max_client_connections"], r["current_client_connections"]) for r in rows}


def test_max_db_client_connections_per_entry_and_global(pg, pooler_factory, app_userlist):
    p = pooler_factory({"pool_mode": "transaction", "auth": {"type": "trust"},
                        "databases": entries(pg, 2), "max_db_client_connections": 3,
                        "admin_users": [SUPERUSER], "stats_users": [MD5_USER]}, app_userlist)
    # The entry's own cap (2) counts every user's clients together.
    capped = [login(p, APP_USER, CAPPED), login(p, MD5_USER, CAPPED)]
    assert all(capped)
    assert login(p, APP_USER, CAPPED) is None and login(p, MD5_USER, CAPPED) is None
    with pytest.raises(psycopg2.OperationalError, match=re.escape(REFUSAL)):
        p.connect(CAPPED, APP_USER, None)
    # The other entry has the global cap (3), apart from capped's clients.
    apps = [login(p, APP_USER, APP_DB) for _ in range(3)]
    assert all(apps) and login(p, MD5_USER, APP_DB) is None
    dbs = show_databases(p)
    assert dbs[CAPPED] == (2, 2) and dbs[APP_DB] == (3, 3)
    assert dbs["pgbouncer"] == (3, 1)          # the console connection asking
    # The console is a database too: stats users count against the global cap there,
    # and so does an admin user, who is never refused.
    admin = p.connect("pgbouncer", SUPERUSER, None)
    stats = [login(p, MD5_USER, "pgbouncer") for _ in range(2)]
    assert all(stats) and login(p, MD5_USER, "pgbouncer") is None
    assert show_databases(p)["pgbouncer"] == (3, 4)        # admin, 2 stats, the one asking
    admin.close()
    # Connected clients work; one that leaves gives its place back.
    assert [w.rows("SELECT 1") for w in capped + apps] == [[["1"]]] * 5
    capped.pop().terminate()
    capped.append(wait_until(lambda: login(p, APP_USER, CAPPED), 5,
                             message="a freed max_db_client_connections place was not reusable"))
    assert login(p, APP_USER, CAPPED) is None
    for w in capped + apps + stats:
        w.terminate()
    wait_until(lambda: show_databases(p)[CAPPED] == (2, 0), 5)


def test_ini_entry_zero_means_the_global_value(tmp_path):
    (tmp_path / "userlist.txt").write_text('"app" "apppass"\n')
    path = tmp_path / "pgbouncer.ini"
    path.write_text("\n".join([
        "[databases]", "a = host=127.0.0.1 dbname=app max_db_client_connections=7",
        "b = host=127.0.0.1 dbname=app max_db_client_connections=0", "c = host=127.0.0.1",
        "[pgbouncer]", "auth_type = plain", "auth_file = userlist.txt",
        "max_db_client_connections = 5"]) + "\n")
    cfg = load_ini(str(path))
    assert [cfg.route(n).max_db_client_connections for n in "abc"] == [7, 5, 5]


# ----------------------------------------------------------------------------- prefork

def _snapshot(p) -> dict:
    seg = shm.Segment.attach(shm.default_path(p.pid))
    try:
        return seg.snapshot()
    finally:
        seg.close()


def _owners(p, conns) -> set[int]:
    snap = _snapshot(p)
    return {w["id"] for c in conns for w in snap["workers"]
            if any(k[0] == c.get_backend_pid() for k in w["cancel_keys"])}


def _counted(p) -> int:
    return _snapshot(p)["claims"].get(f"db_clients/{CAPPED}", 0)


def test_max_db_client_connections_counts_every_worker(pg, pooler_factory):
    dbs = entries(pg, 3)
    for entry in dbs.values():
        entry.update(user=APP_USER, password=APP_PASSWORD)
    p = pooler_factory({"workers": 2, "pool_mode": "transaction", "auth": {"type": "trust"},
                        "databases": dbs})
    wait_until(lambda: len(re.findall(r"worker \d+ \(pid \d+\) started", p.log())) >= 2, 15,
               message="workers did not start")
    conns = [p.connect(CAPPED, APP_USER, None) for _ in range(3)]
    # Until both workers hold some: then no worker's own count is at the cap, and only
    # the count over both can refuse the next client.
    for _ in range(40):
        if len(_owners(p, conns)) == 2:
            break
        conns.pop().close()
        wait_until(lambda: _counted(p) == 2, 5)
        conns.append(p.connect(CAPPED, APP_USER, None))
    assert len(_owners(p, conns)) == 2, "the clients never spread over both workers"
    assert _counted(p) == 3
    for user in (APP_USER, MD5_USER, APP_USER, MD5_USER):    # whichever worker takes it
        with pytest.raises(psycopg2.OperationalError, match=re.escape(REFUSAL)):
            p.connect(CAPPED, user, None)
    other = p.connect(APP_DB, APP_USER, None)                  # another entry: no cap
    conns.pop().close()
    wait_until(lambda: _counted(p) == 2, 5, message="a client's place was not given back")
    conns.append(p.connect(CAPPED, MD5_USER, None))
    for c in conns + [other]:
        c.close()
    wait_until(lambda: _counted(p) == 0, 5)
