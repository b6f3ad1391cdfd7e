"""Several hosts in one database entry (`host=a,b`, one port or one per host) with
PgBouncer 1.24's load_balance_hosts, and reloads that change the hosts: two
throwaway clusters on different loopback ports stand for the hosts.
"""
from __future__ import annotations

import contextlib

import psycopg2
import pytest

from bouncer import Bouncer
from conftest import admin_show, wait_until
from rawpg import RawConn
from pooler.dev.devcluster import TempPostgres, free_port

SUPER, SUPER_PW = "postgres", "postgres"
ADMIN, ADMIN_PW = "admin", "adminpass"
DB = "multi"


@pytest.fixture(scope="module")
def two():
    """Two clusters: (a, b)."""
    clusters = []
    try:
        for _ in range(2):
            clusters.append(TempPostgres().start())
        yield tuple(clusters)
    finally:
        for c in clusters:
            c.stop()


def start(pooler_factory, entry: dict, **glob):
    cfg = {"databases": {DB: {"dbname": "postgres", **entry}}, "pool_mode": "transaction",
           "admin_users": [ADMIN], "auth": {"type": "md5"}, **glob}
    return pooler_factory(cfg, {SUPER: SUPER_PW, ADMIN: ADMIN_PW})


@contextlib.contextmanager
def held(p, n: int, what: str = "inet_server_port()"):
    """n clients, each inside a transaction (so each holds a server of its own);
    yields `what` (the port of the PostgreSQL its server is on) for each, in order."""
    conns = [psycopg2.connect(p.dsn(DB, SUPER, SUPER_PW), connect_timeout=10) for _ in range(n)]
    try:
        ports = []
        for c in conns:
            with c.cursor() as cur:
                cur.execute(f"SELECT {what}")
                ports.append(cur.fetchone()[0])
        yield ports
        for c in conns:
            c.commit()          # released cleanly: the servers stay in the pool
    finally:
        for c in conns:
            c.close()


def admin(p, what: str) -> list[dict]:
    return admin_show(p, what, ADMIN, ADMIN_PW)


def pooled_backends(cluster) -> int:
    """Backends on `cluster` that came through the pooler (TCP; our checks use the socket)."""
    c = psycopg2.connect(cluster.unix_dsn("postgres", "postgres"))
    try:
        c.autocommit = True
        with c.cursor() as cur:
            cur.execute("SELECT count(*) FROM pg_stat_activity WHERE backend_type = "
                        "'client backend' AND client_addr IS NOT NULL")
            return cur.fetchone()[0]
    finally:
        c.close()


def one_port(p) -> int:
    with held(p, 1) as ports:
        return ports[0]


def test_round_robin_over_a_host_list(two, pooler_factory):
    a, b = two
    # Two spellings of loopback, a port each: new servers alternate between them.
    p = start(pooler_factory, {"host": "127.0.0.1,localhost", "port": f"{a.port},{b.port}"})
    with held(p, 4) as ports:
        assert ports == [a.port, b.port, a.port, b.port]
        servers = admin(p, "SERVERS")
        assert sorted((s["addr"], s["port"]) for s in servers) == sorted(
            [("127.0.0.1", a.port), ("localhost", b.port)] * 2)
        [db] = [d for d in admin(p, "DATABASES") if d["name"] == DB]
        assert (db["host"], db["port"], db["load_balance_hosts"]) == (
            "127.0.0.1,localhost", a.port, "round-robin")
    assert pooled_backends(a) == 2 and pooled_backends(b) == 2


def test_one_port_for_every_host_and_the_ini_form(two, pooler_factory, tmp_path):
    a, _ = two
    # pgbouncer.ini's connection string; one port for both hosts (PgBouncer's form).
    ini = (f"[databases]\n{DB} = host=127.0.0.1,localhost port={a.port} dbname=postgres "
           "load_balance_hosts=round-robin\n"
           "[pgbouncer]\nlisten_addr = 127.0.0.1\nlisten_port = {port}\n"
           "auth_type = md5\nauth_file = {userlist}\npool_mode = transaction\n"
           f"admin_users = {ADMIN}\n")
    p = pooler_factory(ini, {SUPER: SUPER_PW, ADMIN: ADMIN_PW}, filename="pgbouncer.ini")
    with held(p, 2) as ports:
        assert ports == [a.port, a.port]
        assert sorted(s["addr"] for s in admin(p, "SERVERS")) == ["127.0.0.1", "localhost"]


def test_disable_stays_on_one_host_until_it_fails(two, pooler_factory):
    a, b = two
    dead = free_port()
    p = start(pooler_factory, {"host": "127.0.0.1,127.0.0.1", "port": f"{dead},{b.port}",
                               "load_balance_hosts": "disable"},
              server_login_retry=0.2, server_connect_timeout=5)
    # The first host refuses: that client is told, and the next connection moves on.
    with pytest.raises(psycopg2.OperationalError) as exc:
        one_port(p)
    assert f"127.0.0.1:{dead}" in str(exc.value)
    wait_until(lambda: _connects(p), timeout=10, message="no login after the failed host")
    # ... and stays there: every new server goes to the second host.
    with held(p, 3) as ports:
        assert ports == [b.port] * 3
    [db] = [d for d in admin(p, "DATABASES") if d["name"] == DB]
    assert db["load_balance_hosts"] == "disable"


def _connects(p) -> bool:
    try:
        one_port(p)
        return True
    except psycopg2.OperationalError:
        return False


def test_reload_moves_new_transactions_to_the_new_host(two, pooler_factory):
    a, b = two
    p = start(pooler_factory, {"host": "127.0.0.1", "port": a.port})
    stay = psycopg2.connect(p.dsn(DB, SUPER, SUPER_PW))
    try:
        with stay.cursor() as cur:                 # a transaction open on a, over the reload
            cur.execute("SELECT inet_server_port()")
            assert cur.fetchone()[0] == a.port
            assert one_port(p) == a.port            # leaves an idle server on a
            wait_until(lambda: pooled_backends(a) == 2, message="two servers on a")
            cfg = p.update_config({"databases": {DB: {"dbname": "postgres", "host": "127.0.0.1",
                                                      "port": b.port}}})
            assert cfg["databases"][DB]["port"] == b.port
            p.wait_for_log("RELOAD|reload", timeout=10)
            # The idle server to the old host is closed at once; new transactions go to b.
            wait_until(lambda: pooled_backends(a) == 1, message="idle server to a not closed")
            assert one_port(p) == b.port
            # The open transaction finishes where it began.
            cur.execute("SELECT inet_server_port()")
            assert cur.fetchone()[0] == a.port
        stay.commit()                              # released: its server to a is closed
        wait_until(lambda: pooled_backends(a) == 0, message="server to a outlived its release")
        with stay.cursor() as cur:
            cur.execute("SELECT inet_server_port()")
            assert cur.fetchone()[0] == b.port
        stay.commit()
    finally:
        stay.close()
    assert "database configuration changed" in p.log()


def test_reload_closes_replication_server_to_the_old_host(two, pooler_factory):
    a, b = two
    p = start(pooler_factory, {"host": "127.0.0.1", "port": a.port})
    repl = RawConn("127.0.0.1", p.port, 20)
    try:
        # replication=database passes `all` pg_hba lines; IDENTIFY_SYSTEM runs on a.
        repl.login(SUPER, SUPER_PW, DB, replication="database")
        assert repl.rows("IDENTIFY_SYSTEM")[0][3] == "postgres"
        assert pooled_backends(a) == 1
        p.update_config({"databases": {DB: {"dbname": "postgres", "host": "127.0.0.1",
                                            "port": b.port}}})
        # Never released, so not left for later: closed with its client now.
        err = repl.read_error()
        assert err.sqlstate == "08006", err
        assert err.message == "replication connection closed: database configuration changed"
        assert repl.at_eof()
    finally:
        repl.close()
    wait_until(lambda: pooled_backends(a) == 0, message="replication server to a not closed")
    assert one_port(p) == b.port


def test_reload_changes_load_balance_hosts(two, pooler_factory):
    a, b = two
    entry = {"host": "127.0.0.1,127.0.0.1", "port": f"{a.port},{b.port}"}
    p = start(pooler_factory, entry)
    with held(p, 2) as first:
        assert first == [a.port, b.port]
        p.update_config({"databases": {DB: {"dbname": "postgres", **entry,
                                            "load_balance_hosts": "disable"}}})
        wait_until(lambda: [d for d in admin(p, "DATABASES")
                            if d["name"] == DB and d["load_balance_hosts"] == "disable"],
                   message="reload not applied")
        # As in PgBouncer, a changed load_balance_hosts changes the entry: its servers
        # are closed when released; new ones now all go to one host.
        assert [s["close_needed"] for s in admin(p, "SERVERS")] == [1, 1]
        with held(p, 3) as more:
            assert more == [a.port] * 3
    wait_until(lambda: (pooled_backends(a), pooled_backends(b)) == (3, 0),
               message="the servers opened before the reload were not closed at release")


# ------------------------------------------------------------- side by side with PgBouncer

@pytest.fixture(scope="module")
def two_addresses():
    """Two clusters on one port, at 127.0.0.1 and 127.0.0.2 (PgBouncer 1.18's host
    lists take one port for every host)."""
    loopback = ["host all all 127.0.0.0/8 md5"]
    a = TempPostgres(extra_hba=loopback).start()
    b = TempPostgres(port=a.port, extra_conf={"listen_addresses": "127.0.0.2"}, extra_hba=loopback)
    b.host = "127.0.0.2"
    try:
        b.start()
        yield a, b
    finally:
        b.stop()
        a.stop()


SIDE_INI = """\
[databases]
multi = host=127.0.0.1,127.0.0.2 port={pgport} dbname=postgres
[pgbouncer]
listen_addr = 127.0.0.1
listen_port = {port}
unix_socket_dir =
auth_type = md5
auth_file = {userlist}
admin_users = admin
pool_mode = transaction
"""


def test_host_list_round_robin_as_pgbouncer(two_addresses, pooler_factory):
    a, _ = two_addresses
    ini = SIDE_INI.replace("{pgport}", str(a.port))
    users = {SUPER: SUPER_PW, ADMIN: ADMIN_PW}
    ours = pooler_factory(ini, users, filename="pgbouncer.ini")
    with Bouncer(ini, users) as theirs:
        for target in (theirs, ours):
            with held(target, 4, "host(inet_server_addr())") as hosts:
                assert hosts == ["127.0.0.1", "127.0.0.2"] * 2, (target, hosts)
            # SHOW SERVERS names the host each server went to.
            servers = admin(target, "SERVERS")
            assert sorted(s["addr"] for s in servers) == ["127.0.0.1"] * 2 + ["127.0.0.2"] * 2


# ------------------------------------------------------------------ config

def test_host_and_port_lists_validated():
    from pooler.config.converters import ConfigError
    from pooler.config.validate import parse_config
    cfg = parse_config({"auth": {"type": "trust"}, "databases": {
        "a": "host=127.0.0.1,localhost port=5432,5433 load_balance_hosts=disable",
        "b": {"host": "h1,h2,h3", "port": 6000}}})
    a, b = cfg.route("a"), cfg.route("b")
    assert (a.hosts, a.port, a.load_balance_hosts) == (
        (("127.0.0.1", 5432), ("localhost", 5433)), 5432, "disable")
    assert (b.hosts, b.load_balance_hosts) == (
        (("h1", 6000), ("h2", 6000), ("h3", 6000)), "round-robin")
    with pytest.raises(ConfigError) as exc:
        parse_config({"auth": {"type": "trust"}, "databases": {
            "c": {"host": "a,b", "port": "1,2,3"}, "d": {"host": "a,,b"},
            "e": {"port": "1,x"}, "f": {"load_balance_hosts": "random"}}})
    assert exc.value.errors == [
        "databases.c.port: '1,2,3' is not valid: one port for all hosts, or one per host (2 hosts)",
        "databases.d.host: 'a,,b' is not valid: a host, or a comma-separated list of hosts "
        "with none empty",
        "databases.e.port: '1,x' is not valid: a comma-separated list of integers from 1 to 65535",
        "databases.f.load_balance_hosts: 'random' is not valid: one of 'round-robin', 'disable'"]
