"""PgBouncer's [users] section (the YAML `users:`), against a real PostgreSQL: a user's
pool_mode, pool_size, max_user_connections, max_user_client_connections and
query_timeout beat the database's and the global ones, for that user only. Backends
are counted in pg_stat_activity; one test runs two workers to check that
max_user_client_connections is counted across processes."""
from __future__ import annotations

import re
import time

import psycopg2
import pytest

from conftest import (APP_DB, APP_PASSWORD, APP_USER, MD5_USER, SUPERUSER, SUPERUSER_PASSWORD,
                      Poller, backend_count, raw_client, run_threads, wait_until)
from pooler.proc import shm
from pooler.config.validate import parse_config
from rawpg import PgError, RawConn, error_fields, query

REFUSAL = "client connections exceeded (max_user_client_connections)"   # PgBouncer's words


def start(pooler_factory, pooler_config, app_userlist, users: dict, **overrides):
    """Transaction pooling, trust for clients; the pooler logs in with the userlist."""
    cfg = pooler_config(**{"pool_mode": "transaction", "auth": {"type": "trust"},
                           "users": users, **overrides})
    return pooler_factory(cfg, app_userlist)


def one_value(w: RawConn, sql: str) -> str:
    return w.rows(sql)[0][0]


def transactions(p, user: str, database: str = APP_DB, n: int = 8, sleep: float = 0.05) -> None:
    """One client running n short transactions, each checking its own answer."""
    w = raw_client(p.port, user=user, database=database)
    for i in range(n):
        assert w.rows(f"BEGIN; SELECT {i}, pg_sleep({sleep}); COMMIT")[0][0] == str(i)
    w.terminate()


def fatal_of(w: RawConn, timeout: float) -> dict[str, str]:
    """Read until the pooler sends an ErrorResponse and closes; its fields."""
    w.sock.settimeout(timeout)
    err = None
    try:
        while True:
            t, b = w.read_msg()
            if t == "E":
                err = error_fields(b)
    except (ConnectionError, OSError):
        pass
    assert err is not None, "the connection closed without an error message"
    return err


# ----------------------------------------------------------------------------- pool_mode

def test_session_user_keeps_its_server_in_a_transaction_database(pg, pooler_factory, pooler_config,
                                                                 app_userlist):
    p = start(pooler_factory, pooler_config, app_userlist, {MD5_USER: {"pool_mode": "session"}})
    # md5user (session): each client keeps its own backend, temp tables survive.
    s1, s2 = raw_client(p.port, user=MD5_USER), raw_client(p.port, user=MD5_USER)
    pid1 = one_value(s1, "CREATE TEMP TABLE kept (x int); SELECT pg_backend_pid()")
    pid2 = one_value(s2, "SELECT pg_backend_pid()")
    assert pid1 != pid2
    s1.rows("INSERT INTO kept VALUES (1)")
    assert one_value(s1, "SELECT count(*) FROM kept") == "1"
    assert [one_value(s, "SELECT pg_backend_pid()") for s in (s1, s2)] == [pid1, pid2]
    # app (the database's transaction mode): a client keeps nothing between transactions,
    # so the second client gets the server the first one just used.
    t1, t2 = raw_client(p.port), raw_client(p.port)
    tpid = one_value(t1, "SELECT pg_backend_pid()")
    assert one_value(t2, "SELECT pg_backend_pid()") == tpid
    assert one_value(t1, "SELECT pg_backend_pid()") == tpid
    assert backend_count(pg, APP_DB, APP_USER) == 1
    assert backend_count(pg, APP_DB, MD5_USER) == 2
    for w in (s1, s2, t1, t2):
        w.terminate()


# ----------------------------------------------------------------------------- pool_size

def test_user_pool_size_caps_its_backends_under_load(pg, pooler_factory, pooler_config,
                                                     app_userlist):
    p = start(pooler_factory, pooler_config, app_userlist, {MD5_USER: {"pool_size": 2}},
              default_pool_size=5, query_wait_timeout=30)
    with Poller(lambda: backend_count(pg, APP_DB, MD5_USER)) as capped, \
            Poller(lambda: backend_count(pg, APP_DB, APP_USER)) as other:
        run_threads(lambda user: transactions(p, user), [(u,) for u in [MD5_USER, APP_USER] * 8])
    assert capped.max == 2, f"md5user's pool_size is 2 but saw {capped.max} backends"
    # app has no [users] entry: default_pool_size (5) applies to it.
    assert 2 < other.max <= 5, other.max


# ----------------------------------------------------------------------------- max_user_connections

def test_user_max_user_connections_spans_databases(pg, pooler_factory, pooler_config,
                                                   app_userlist):
    p = start(pooler_factory, pooler_config, app_userlist, {APP_USER: {"max_user_connections": 2}},
              default_pool_size=4, query_wait_timeout=30)

    def app_backends() -> int:
        return backend_count(pg, APP_DB, APP_USER) + backend_count(pg, "postgres", APP_USER)

    work = [(APP_USER, db) for db in (APP_DB, "postgres")] * 4 + [(MD5_USER, APP_DB)] * 6
    with Poller(app_backends) as capped, \
            Poller(lambda: backend_count(pg, APP_DB, MD5_USER)) as other:
        run_threads(lambda user, db: transactions(p, user, db), work)
    assert capped.max == 2, f"app's max_user_connections is 2 but saw {capped.max} backends"
    assert other.max > 2, "md5user has no cap but was held to app's"


# ------------------------------------------------------------------ max_user_client_connections

def _login(p, user: str) -> RawConn | None:
    try:
        return raw_client(p.port, user=user)
    except PgError as exc:
        assert (exc.fields["C"], exc.fields["M"], exc.fields["S"]) == ("08P01", REFUSAL, "FATAL")
        return None


def _show_users(p) -> dict[str, dict]:
    conn = p.connect("pgbouncer", SUPERUSER, None)
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            cur.execute("SHOW USERS")
            names = [d.name for d in cur.description]
            return {row[0]: dict(zip(names, row)) for row in cur.fetchall()}
    finally:
        conn.close()


def test_max_user_client_connections_refuses_as_pgbouncer(pg, pooler_factory, pooler_config,
                                                        app_userlist):
    p = start(pooler_factory, pooler_config, app_userlist,
              {APP_USER: {"max_user_client_connections": 2, "pool_size": 3}},
              max_user_client_connections=3, admin_users=[SUPERUSER])
    apps = [_login(p, APP_USER) for _ in range(2)]
    assert all(apps)
    assert _login(p, APP_USER) is None                    # app's own cap: 2
    with pytest.raises(psycopg2.OperationalError, match=re.escape(REFUSAL)):
        p.connect(user=APP_USER, password=None)
    # Others are unaffected by app's cap; they have the global one (3).
    others = [_login(p, MD5_USER) for _ in range(3)]
    assert all(others) and _login(p, MD5_USER) is None
    users = _show_users(p)
    assert (users[APP_USER]["max_user_client_connections"],
            users[APP_USER]["current_client_connections"]) == (2, 2)
    assert (users[MD5_USER]["max_user_client_connections"],
            users[MD5_USER]["current_client_connections"]) == (3, 3)
    # PgBouncer 1.25's text: the number as its "%9d" prints it, '' when unset.
    assert (users[APP_USER]["pool_size"], users[MD5_USER]["pool_size"]) == ("        3", "")
    assert (users[APP_USER]["reserve_pool_size"], users[APP_USER]["pool_mode"]) == ("", None)
    # The connected clients work; a client that leaves gives its place back.
    assert [w.rows("SELECT 1") for w in apps] == [[["1"]]] * 2
    apps.pop().terminate()
    apps.append(wait_until(lambda: _login(p, APP_USER), timeout=5,
                           message="a freed max_user_client_connections slot was not reusable"))
    assert _login(p, APP_USER) is None
    for w in apps + others:
        w.terminate()


def test_max_user_client_connections_counts_auth_query_users(pg, pooler_factory, pooler_config):
    """A user found by auth_query (not in the auth_file) is counted like any other."""
    p = pooler_factory(pooler_config(auth={"user": SUPERUSER}, admin_users=[SUPERUSER],
                                     users={APP_USER: {"max_user_client_connections": 2}}),
                       userlist={SUPERUSER: SUPERUSER_PASSWORD})
    conns = [p.connect() for _ in range(2)]             # app's password from pg_shadow
    with pytest.raises(psycopg2.OperationalError, match=re.escape(REFUSAL)):
        p.connect()
    admin = p.connect("pgbouncer", SUPERUSER, SUPERUSER_PASSWORD)
    admin.autocommit = True
    with admin.cursor() as cur:
        cur.execute("SHOW USERS")
        names = [d.name for d in cur.description]
        rows = {r[0]: dict(zip(names, r)) for r in cur.fetchall()}
    assert (rows[APP_USER]["max_user_client_connections"],
            rows[APP_USER]["current_client_connections"]) == (2, 2)
    assert rows[SUPERUSER]["current_client_connections"] == 1     # its console session
    admin.close()
    conns.pop().close()
    conns.append(wait_until(lambda: _try_connect(p), 5,
                            message="an auth_query user's freed place was not reusable"))
    for c in conns:
        c.close()


def test_max_user_client_connections_counts_console_sessions(pg, pooler_factory, pooler_config,
                                                              app_userlist):
    """PgBouncer's rule on the console: a stats user's sessions count and are refused at
    the cap; an admin user's count but always get in."""
    userlist = {**app_userlist, "stats": "statspass"}
    p = pooler_factory(pooler_config(admin_users=[SUPERUSER], stats_users=["stats"],
                                     max_user_client_connections=1), userlist=userlist)
    first = p.connect("pgbouncer", "stats", "statspass")
    with pytest.raises(psycopg2.OperationalError, match=re.escape(REFUSAL)):
        p.connect("pgbouncer", "stats", "statspass")
    admins = [p.connect("pgbouncer", SUPERUSER, SUPERUSER_PASSWORD) for _ in range(2)]
    admins[0].autocommit = True
    with admins[0].cursor() as cur:
        cur.execute("SHOW USERS")
        names = [d.name for d in cur.description]
        users = {r[0]: dict(zip(names, r)) for r in cur.fetchall()}
    assert (users["stats"]["current_client_connections"],
            users[SUPERUSER]["current_client_connections"]) == (1, 2)
    for c in [first, *admins]:
        c.close()


def _try_connect(p):
    try:
        return p.connect()
    except psycopg2.OperationalError:
        return None


def test_max_user_client_connections_and_failed_server_logins(pg, pooler_factory, pooler_config,
                                                               app_userlist):
    """A client whose pool cannot log in to PostgreSQL gets PostgreSQL's error and gives
    its place back when it is closed (PgBouncer counts a client until it is gone)."""
    dbs = {APP_DB: {"host": pg.host, "port": pg.port, "dbname": APP_DB},
           "broken": {"host": pg.host, "port": pg.port, "dbname": "no_such_database"}}
    p = start(pooler_factory, pooler_config, app_userlist,
              {APP_USER: {"max_user_client_connections": 1}}, databases=dbs,
              admin_users=[SUPERUSER])
    seen = []
    for _ in range(3):                  # each time the server's refusal, never the cap's
        with pytest.raises(PgError) as exc:
            raw_client(p.port, user=APP_USER, database="broken")
        seen.append((exc.value.fields["C"], exc.value.fields["M"]))
    # PostgreSQL's error first, then (within server_login_retry) the pooler's fast fail.
    assert seen[0] == ("3D000", 'database "no_such_database" does not exist'), seen
    assert all('"no_such_database" does not exist' in m and m != REFUSAL for _, m in seen), seen
    wait_until(lambda: _show_users(p)[APP_USER]["current_client_connections"] == 0, 5)
    w = raw_client(p.port, user=APP_USER)
    assert w.rows("SELECT 1") == [["1"]]
    assert _login(p, APP_USER) is None                    # and the cap still holds
    w.terminate()


# ----------------------------------------------------------------------------- query_timeout

@pytest.mark.parametrize("global_timeout, users", [
    (0, {MD5_USER: {"query_timeout": 1}}),     # only md5user has one
    (1, {APP_USER: {"query_timeout": 0}}),     # everyone but app (explicit 0: off)
], ids=["user-timeout", "user-exempt"])
def test_user_query_timeout_ends_only_that_users_query(pg, pooler_factory, pooler_config,
                                                       app_userlist, global_timeout, users):
    p = start(pooler_factory, pooler_config, app_userlist, users, query_timeout=global_timeout)
    slow, spared = raw_client(p.port, user=MD5_USER), raw_client(p.port, user=APP_USER)
    t0 = time.monotonic()
    slow.send(query("SELECT pg_sleep(2.5) /* md5user slow */"))
    spared.send(query("SELECT 'done', pg_sleep(2.5)"))
    err = fatal_of(slow, 10)
    assert (err["C"], err["M"]) == ("57014", "query timeout")
    assert time.monotonic() - t0 < 2.4, "the query was not ended by the timeout"
    assert [b for t, b in spared.until_ready() if t == "D"], "app's equally slow query failed"
    assert spared.rows("SELECT 'still connected'") == [["still connected"]]
    spared.terminate()
    # The pooler cancelled md5user's query on the server too.
    wait_until(lambda: not _running(pg), timeout=5,
               message="the timed-out query is still running on the server")


def _running(pg) -> bool:
    conn = psycopg2.connect(pg.unix_dsn("postgres", "postgres"))
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT count(*) FROM pg_stat_activity WHERE state = 'active' "
                        "AND query LIKE '%md5user slow%' AND pid <> pg_backend_pid()")
            return cur.fetchone()[0] > 0
    finally:
        conn.close()


# ----------------------------------------------------------------------------- reload

def test_reload_re_resolves_pools_for_their_user():
    from pooler.pooling.worker import Worker
    base = {"auth": {"type": "trust"}, "databases": {"app": {"port": 5432, "pool_size": 4}}}
    worker = Worker(parse_config({**base, "users": {"alice": {"pool_size": 2}}}), [])
    pool = worker.get_pool(worker.cfg.route("app", "alice"), "alice")
    assert pool.route.pool_size == 2 and not worker.client_timeouts_on
    worker.apply_config(parse_config({**base, "users": {"alice": {
        "pool_size": 3, "max_user_connections": 7, "idle_transaction_timeout": 1}}}))
    assert (pool.route.pool_size, pool.route.idle_transaction_timeout) == (3, 1.0)
    assert pool._quota_keys[2] == (("user", "alice"), 7) and worker.client_timeouts_on
    worker.apply_config(parse_config(base))                   # entry removed: the database's
    assert pool.route.pool_size == 4 and not worker.client_timeouts_on


# ----------------------------------------------------------------------------- prefork

def _snapshot(p) -> dict:
    seg = shm.Segment.attach(shm.default_path(p.pid))
    try:
        return seg.snapshot()
    finally:
        seg.close()


def _owners(p, conns) -> set[int]:
    """The workers serving these psycopg2 connections (by their cancel keys in shm)."""
    snap = _snapshot(p)
    return {w["id"] for c in conns for w in snap["workers"]
            if any(k[0] == c.get_backend_pid() for k in w["cancel_keys"])}


def _counted(p) -> int:
    return _snapshot(p)["claims"].get(f"user_clients/{APP_USER}", 0)


def test_max_user_client_connections_counts_every_worker(pg, pooler_factory):
    db = {"host": pg.host, "port": pg.port, "dbname": APP_DB, "user": APP_USER,
          "password": APP_PASSWORD}
    p = pooler_factory({"workers": 2, "pool_mode": "transaction", "auth": {"type": "trust"},
                        "databases": {APP_DB: db},
                        "users": {APP_USER: {"max_user_client_connections": 3}}})
    wait_until(lambda: len(re.findall(r"worker \d+ \(pid \d+\) started", p.log())) >= 2, 15,
               message="workers did not start")
    conns = [p.connect(user=APP_USER, password=None) for _ in range(3)]
    # Reconnect until both workers hold some of app's clients: then neither worker's
    # own count reaches the cap, and only a global count can refuse the next one.
    for _ in range(40):
        if len(_owners(p, conns)) == 2:
            break
        conns.pop().close()
        wait_until(lambda: _counted(p) == 2, 5)
        conns.append(p.connect(user=APP_USER, password=None))
    assert len(_owners(p, conns)) == 2, "the clients never spread over both workers"
    assert _counted(p) == 3
    for _ in range(4):                                   # whichever worker takes it
        with pytest.raises(psycopg2.OperationalError, match=re.escape(REFUSAL)):
            p.connect(user=APP_USER, password=None)
    other = p.connect(user=MD5_USER, password=None)      # another login user: no cap
    conns.pop().close()
    wait_until(lambda: _counted(p) == 2, 5, message="a client's count was not given back")
    conns.append(p.connect(user=APP_USER, password=None))
    assert _counted(p) == 3
    for c in conns + [other]:
        c.close()
    wait_until(lambda: _counted(p) == 0, 5)
