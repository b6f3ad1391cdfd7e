"""pgbouncer.ini as a config: PgBouncer's parsing rules, the mapping onto the
typed Config, convert-ini, and the same ini run by PgBouncer and the pooler."""
from __future__ import annotations

import dataclasses
import threading
import time

import psycopg2
import pytest
import yaml

from bouncer import (connect, hold_transactions, login_ok, pool_counts, reconfigure,
                     admin_query, side_by_side, side_ini)  # noqa: F401  (side_by_side: fixture)
from conftest import APP_DB, APP_PASSWORD, APP_USER, MD5_PASSWORD, MD5_USER, backend_count, wait_until
from pooler import cli
from pooler.config.convert_ini import main as convert_main
from pooler.config.converters import ConfigError
from pooler.config.ini import load_ini
from pooler.config.load import load_config
from pooler.config.runtime import runtime_setting

def write(tmp_path, lines: list[str], name: str = "pgbouncer.ini") -> str:
    path = tmp_path / name
    path.write_text("\n".join(lines) + "\n")
    return str(path)


@pytest.fixture
def userlist(tmp_path):
    (tmp_path / "userlist.txt").write_text('"app" "apppass"\n')
    return "userlist.txt"


def base(userlist: str, *extra: str) -> list[str]:
    return ["[databases]", "app = host=127.0.0.1 port=5432 dbname=app",
            "[pgbouncer]", "listen_addr = 127.0.0.1", "auth_type = plain",
            f"auth_file = {userlist}", *extra]


def warned(capsys, caplog) -> str:
    """WARNING lines from loading a config (stderr before logging is set up, else the log)."""
    return capsys.readouterr().err + caplog.text


def ini_errors(path: str) -> list[str]:
    with pytest.raises(ConfigError) as exc:
        load_ini(path)
    return exc.value.errors


# --------------------------------------------------------------------------- parsing rules


def test_pgbouncer_parsing_rules(tmp_path, userlist):
    path = write(tmp_path, [
        "; a comment", "# another", "",
        "[databases]",
        "   app = host=127.0.0.1 port=5433 dbname=app pool_size=3 reserve_pool=2",
        '"odd ""name""" = host=127.0.0.1 dbname=\'x y\'',
        "  [pgbouncer]",
        "    listen_port = 7000",
        "   ; indented comment",
        "auth_type = plain",
        f"auth_file = {userlist}",
        "server_check_query = select 2 ; not a comment",
        "default_pool_size = 5",
        "default_pool_size = 9",
        "ignore_startup_parameters =",
        "admin_users = a,  b",
        "server_reset_query = 'DISCARD ALL'",
        "log_connections = 0",
        "server_lifetime = 1.5",
    ])
    cfg = load_ini(path)
    assert cfg.listen_port == 7000
    assert cfg.default_pool_size == 9                       # the last duplicate wins
    assert cfg.server_check_query == "select 2 ; not a comment"
    assert cfg.server_reset_query == "'DISCARD ALL'"        # PgBouncer keeps quotes too
    assert cfg.ignore_startup_parameters == []
    assert cfg.admin_users == ["a", "b"]
    assert cfg.log_connections is False and cfg.server_lifetime == 1.5
    assert cfg.auth.type == "plain" and cfg.auth.file == str(tmp_path / "userlist.txt")
    app = cfg.databases["app"]
    assert (app.port, app.pool_size, app.reserve_pool_size) == (5433, 3, 2)
    assert cfg.databases['odd "name"'].dbname == "x y"


def test_include_and_pgbouncer_defaults(tmp_path, userlist, capsys, caplog):
    (tmp_path / "more.ini").write_text("max_client_conn = 77\n[databases]\nother = dbname=o\n")
    path = write(tmp_path, ["[databases]", "app = port=5433", "[pgbouncer]", "auth_type = trust",
                            f"%include {tmp_path / 'more.ini'}"])
    cfg = load_ini(path)
    assert cfg.max_client_conn == 77
    # No host: PgBouncer's Unix socket directory, as PgBouncer would connect.
    assert cfg.databases["other"].host == "/tmp" and cfg.databases["app"].host == "/tmp"
    assert cfg.databases["app"].dbname is None and cfg.route("app").dbname == "app"
    assert cfg.unix_socket_dir == "/tmp"
    assert "listen_addr is not set" in warned(capsys, caplog)


def test_misspelled_key_names_key_value_and_line(tmp_path, userlist):
    path = write(tmp_path, base(userlist, "defualt_pool_size = 5"))
    [err] = ini_errors(path)
    assert f"{path}:7: [pgbouncer] defualt_pool_size = '5': unknown setting" in err
    assert "did you mean default_pool_size" in err


def test_bad_values_are_reported_with_ini_names(tmp_path, userlist):
    path = write(tmp_path, ["[databases]", "app = host=127.0.0.1 pool_size=many password=s3cret",
                            "[pgbouncer]", "auth_type = any", "default_pool_size = abc",
                            "log_connections = maybe", "[nosuch]"])
    errors = "\n".join(ini_errors(path))
    assert "unknown section [nosuch]" in errors
    assert "[pgbouncer] auth_type: 'any' is not valid: one of 'trust'" in errors
    assert "[pgbouncer] default_pool_size: 'abc' is not valid: an integer" in errors
    assert "[pgbouncer] log_connections: 'maybe' is not valid" in errors
    assert "[databases] app: pool_size: 'many' is not valid" in errors
    assert "s3cret" not in errors


def test_unknown_connection_parameter_hides_password(tmp_path, userlist):
    path = write(tmp_path, ["[databases]", "app = host=x password=s3cret bogus=1 passwrd=s3cret",
                            "[pgbouncer]", "auth_type = trust"])
    errors = "\n".join(ini_errors(path))
    assert "unknown connection parameter bogus = '1'" in errors
    assert "passwrd = ***" in errors and "s3cret" not in errors


def test_unsupported_settings_are_warnings_by_name(tmp_path, userlist, capsys, caplog):
    path = write(tmp_path, base(userlist, "client_tls_ciphers = HIGH", "server_tls_protocols = secure",
                                "so_reuseport = 0", "[users]",
                                "app = pool_mode=session transaction_timeout=30",
                                "[databases]", "b = host=x client_encoding=UTF8"))
    cfg = load_ini(path)
    err = warned(capsys, caplog)
    assert "WARNING" in err and "client_tls_ciphers = 'HIGH': not supported" in err
    # PgBouncer 1.25's transaction_timeout is implemented, globally and per user
    assert "transaction_timeout" not in err and cfg.users["app"].transaction_timeout == 30.0
    assert cfg.users["app"].pool_mode == "session"
    assert "[databases] b: client_encoding is not supported" in err
    assert "server_tls_protocols" not in err and "so_reuseport" not in err   # same behaviour here


def test_check_config_dispatches_ini(tmp_path, userlist, capsys):
    good = write(tmp_path, base(userlist), "good.ini")
    bad = write(tmp_path, base(userlist, "pool_mod = session"), "bad.ini")
    assert cli.main(["check-config", good]) == 0
    assert cli.main(["check-config", bad]) == 1
    assert "pool_mod" in capsys.readouterr().err


def test_convert_ini_round_trip(tmp_path, userlist):
    path = write(tmp_path, base(userlist, "pool_mode = transaction", "default_pool_size = 7",
                                "server_idle_timeout = 30", "max_user_client_connections = 8",
                                "[databases]", "* = host=127.0.0.1 port=5433 password=pw",
                                "[users]", "alice = pool_mode=session pool_size=2 query_timeout=0",
                                "bob = max_user_client_connections=3 query_wait_timeout=1.5"))
    out = tmp_path / "sub" / "pooler.yaml"
    out.parent.mkdir()
    assert convert_main([path, "-o", str(out)]) == 0
    assert yaml.safe_load(out.read_text())["users"] == {
        "alice": {"pool_mode": "session", "pool_size": 2},     # 0: unset, so left out
        "bob": {"max_user_client_connections": 3, "query_wait_timeout": "1.5"}}
    from_yaml = dataclasses.asdict(load_config(str(out)))
    from_ini = dataclasses.asdict(load_ini(path))
    from_yaml.pop("source_path"), from_ini.pop("source_path")
    assert from_yaml == from_ini
    assert from_yaml["users"]["bob"]["query_wait_timeout"] == 1.5
    assert convert_main([write(tmp_path, base(userlist, "bogus = 1"), "bad.ini")]) == 1


def test_users_section_is_read(tmp_path, userlist):
    path = write(tmp_path, base(userlist, "query_timeout = 30", "max_user_connections = 9",
                                "[users]",
                                "alice = pool_mode=session pool_size=5 max_user_connections=3",
                                '"odd user" = query_timeout=0 idle_transaction_timeout=2.5 '
                                "reserve_pool_size=0 max_user_client_connections=4",
                                "bob = max_user_connections=0 client_idle_timeout=0s"))
    cfg = load_ini(path)
    alice, odd, bob = cfg.users["alice"], cfg.users["odd user"], cfg.users["bob"]
    assert (alice.pool_mode, alice.pool_size, alice.max_user_connections) == ("session", 5, 3)
    assert (odd.idle_transaction_timeout, odd.reserve_pool_size) == (2.5, 0)
    assert odd.max_user_client_connections == 4
    # PgBouncer: a [users] timeout or cap of 0 is "not set", so the global one applies.
    assert odd.query_timeout is None and cfg.route("app", "odd user").query_timeout == 30.0
    assert bob.max_user_connections is None and cfg.route("app", "bob").max_user_connections == 9
    assert bob.client_idle_timeout is None
    route = cfg.route("app", "alice")
    assert (route.pool_mode, route.pool_size, route.max_user_connections) == ("session", 5, 3)


def test_users_section_errors_name_key_line_and_user(tmp_path, userlist):
    path = write(tmp_path, base(userlist, "[users]", "alice = pool_mode=session pool_sise=5",
                                "bob = pool_size=lots", "carol = pool_mode='open"))
    errors = ini_errors(path)
    assert f"{path}:8: [users] alice: unknown setting pool_sise = '5' (did you mean pool_size?)" \
        in errors
    assert f"{path}:9: [users] bob: pool_size: 'lots' is not valid: an integer >= 0" in errors
    assert any(e.startswith(f"{path}:10: [users] carol: cannot parse") for e in errors), errors
    assert len(errors) == 3, errors


def test_runtime_setting_validates_like_the_file(tmp_path, userlist):
    cfg = load_ini(write(tmp_path, base(userlist)))
    assert runtime_setting(cfg, "default_pool_size", "7").default_pool_size == 7
    assert runtime_setting(cfg, "server_lifetime", "2.5").server_lifetime == 2.5
    assert runtime_setting(cfg, "auth_type", "md5").auth.type == "md5"
    for key, value, text in [("default_pool_size", "x", "'x' is not valid"),
                             ("nosuch", "1", "unknown parameter: nosuch"),
                             ("listen_port", "1", "cannot be changed while running")]:
        with pytest.raises(ConfigError, match=text):
            runtime_setting(cfg, key, value)


# --------------------------------------------------------------------------- side by side

def test_same_pool_size_as_pgbouncer(pg, side_by_side):
    for target in side_by_side:
        release = threading.Event()
        threads = hold_transactions(target, 4, release)
        try:
            # Settled: 2 clients in a transaction on the 2 servers, 2 waiting.
            wait_until(lambda: pool_counts(target) == (2, 2, 2), 10,
                       message=f"{target}: pool never settled at 2 active + 2 waiting")
            time.sleep(0.2)
            assert pool_counts(target) == (2, 2, 2), target
            assert backend_count(pg, APP_DB) == 2, target
        finally:
            release.set()
            for t in threads:
                t.join(20)
        admin_query(target, "RECONNECT")       # leave no server behind for the next target
        wait_until(lambda: backend_count(pg, APP_DB) == 0, 10)


AUTH_CASES = [(APP_USER, APP_PASSWORD), (APP_USER, "wrong"), (MD5_USER, MD5_PASSWORD),
              (MD5_USER, "wrong"), ("nosuchuser", "x")]


def test_same_auth_results_as_pgbouncer(pg, side_by_side):
    results: dict[tuple, dict] = {}
    for auth_type in ("trust", "plain", "md5", "scram-sha-256"):
        reconfigure(pg, side_by_side, auth_type)
        for is_pooler, target in enumerate(side_by_side):
            results[(auth_type, bool(is_pooler))] = {
                (u, p): login_ok(target, APP_DB, u, p) for u, p in AUTH_CASES}
        assert results[(auth_type, True)] == results[(auth_type, False)], auth_type
    # And they are the results one expects.
    assert results[("trust", True)][(APP_USER, "wrong")] is True
    assert results[("md5", True)][(MD5_USER, MD5_PASSWORD)] is True
    assert results[("scram-sha-256", True)][(MD5_USER, MD5_PASSWORD)] is False   # md5 secret
    assert not any(results[(t, True)][("nosuchuser", "x")] for t in ("trust", "plain", "md5"))
    assert all(results[(t, True)][(APP_USER, APP_PASSWORD)] for t in ("plain", "md5", "scram-sha-256"))


def last_line(exc: BaseException) -> str:
    return str(exc).strip().splitlines()[-1].split("failed: ", 1)[-1]


def test_same_unknown_database_error_and_auto_database(pg, side_by_side):
    # (Started without `*`: PgBouncer keeps a `*` entry even when a RELOAD removes it.)
    messages = []
    for target in side_by_side:
        with pytest.raises(psycopg2.OperationalError) as exc:
            connect(target, "nosuchdb", APP_USER, APP_PASSWORD).close()
        messages.append(last_line(exc.value))
    assert messages[0] == messages[1] == "FATAL:  no such database: nosuchdb"

    reconfigure(pg, side_by_side, "plain", star=True)
    for target in side_by_side:
        # `*`: any other name goes to that database on the `*` server...
        conn = connect(target, "postgres", APP_USER, APP_PASSWORD)
        with conn.cursor() as cur:
            cur.execute("SELECT current_database()")
            assert cur.fetchone()[0] == "postgres"
        conn.close()
        dbs = {row[0]: row for row in admin_query(target, "SHOW DATABASES")}
        assert dbs["postgres"][3] == "postgres" and "*" not in dbs
        # ...where a name PostgreSQL does not know fails with PostgreSQL's message.
        with pytest.raises(psycopg2.OperationalError) as exc:
            connect(target, "nosuchdb", APP_USER, APP_PASSWORD).close()
        assert 'database "nosuchdb" does not exist' in last_line(exc.value)


def test_misspelled_key_stops_the_pooler(pg, pooler_factory):
    text = side_ini(pg, "plain") + "max_client_con = 10\n"
    p = pooler_factory(text, userlist={APP_USER: APP_PASSWORD}, filename="pgbouncer.ini",
                       expect_fail=True)
    assert p.returncode != 0
    assert "max_client_con = '10': unknown setting (did you mean max_client_conn?)" in p.log()


def test_ini_drop_in_serves_and_warns(pg, pooler_factory):
    text = side_ini(pg, "plain") + "client_tls13_ciphers = TLS_AES_128_GCM_SHA256\n"
    p = pooler_factory(text, userlist={APP_USER: APP_PASSWORD}, filename="pgbouncer.ini")
    assert login_ok(p, APP_DB, APP_USER, APP_PASSWORD)
    assert "client_tls13_ciphers = 'TLS_AES_128_GCM_SHA256': not supported by pooler" in p.log()


def _session_user_picture(pg, target) -> tuple:
    """Two md5user clients at once, two transactions each: in session mode each keeps
    its own server (stable, distinct pids, two backends)."""
    conns = [connect(target, APP_DB, MD5_USER, MD5_PASSWORD) for _ in range(2)]
    try:
        pids = []
        for conn in conns + conns:
            conn.autocommit = True
            with conn.cursor() as cur:
                cur.execute("SELECT pg_backend_pid()")
                pids.append(cur.fetchone()[0])
        stable = pids[:2] == pids[2:]
        mode = [r[-1] for r in admin_query(target, "SHOW POOLS") if r[:2] == (APP_DB, MD5_USER)]
        return stable, pids[0] != pids[1], backend_count(pg, APP_DB, MD5_USER), mode
    finally:
        for conn in conns:
            conn.close()


def _capped_user_picture(pg, target) -> tuple:
    """Two app clients in a transaction each, app's max_user_connections = 1: one runs,
    the other waits, and PostgreSQL sees one backend of app."""
    release = threading.Event()
    threads = hold_transactions(target, 2, release)
    try:
        wait_until(lambda: pool_counts(target) == (1, 1, 1), 10,
                   message=f"{target}: app's pool never settled at 1 active + 1 waiting")
        return pool_counts(target), backend_count(pg, APP_DB, APP_USER)
    finally:
        release.set()
        for t in threads:
            t.join(20)


def test_users_section_same_as_pgbouncer(pg, side_by_side):
    """PgBouncer 1.18's [users] knows pool_mode and max_user_connections: the same ini
    gives the same pools and the same backends in PostgreSQL."""
    bouncer, pooler = side_by_side
    text = side_ini(pg, "plain") + \
        f"[users]\n{MD5_USER} = pool_mode=session\n{APP_USER} = max_user_connections=1\n"
    bouncer.write_ini(text)
    pooler.config_path.write_text(text.replace("{port}", str(pooler.port))
                                  .replace("{userlist}", str(pooler.userlist_path)))
    pictures = []
    for target in side_by_side:
        admin_query(target, "RELOAD")
        pictures.append((_session_user_picture(pg, target), _capped_user_picture(pg, target)))
        admin_query(target, "RECONNECT")       # leave no server behind for the next target
        wait_until(lambda: backend_count(pg, APP_DB) == 0, 10)
    assert pictures[0] == pictures[1]
    assert pictures[1] == ((True, True, 2, ["session"]), ((1, 1, 1), 1))


def test_database_query_wait_timeout_over_the_users_and_the_global(tmp_path, userlist, capsys,
                                                                   caplog):
    """PgBouncer 1.24's [databases] query_wait_timeout (its janitor: the user's, else the
    entry's, else the global one); -1 is PgBouncer's "not set"."""
    path = write(tmp_path, base(userlist, "query_wait_timeout = 60", "[users]",
                                "bob = query_wait_timeout=3",
                                "[databases]", "quick = host=x query_wait_timeout=1.5",
                                "unset = host=x query_wait_timeout=-1",
                                "off = host=x query_wait_timeout=0"))
    cfg = load_ini(path)
    assert "query_wait_timeout" not in warned(capsys, caplog)
    waits = {(db, u): cfg.route(db, u).query_wait_timeout
             for db in ("quick", "unset", "off", "app") for u in ("bob", "app")}
    assert waits == {("quick", "bob"): 3.0, ("quick", "app"): 1.5,
                     ("unset", "bob"): 3.0, ("unset", "app"): 60.0,
                     ("off", "bob"): 3.0, ("off", "app"): 0.0,
                     ("app", "bob"): 3.0, ("app", "app"): 60.0}
