"""Unit tests for pooler.config: no PostgreSQL needed."""
from __future__ import annotations

import textwrap

import pytest

from pooler.config.converters import ConfigError, parse_connstr
from pooler.config.load import check_config_file, load_config
from pooler.config.model import AuthConfig, Config, DatabaseEntry, PoolEntry
from pooler.config.settings import AUTH_TYPES, POOL_MODES
from pooler.config.validate import parse_config


@pytest.fixture
def userlist(tmp_path):
    path = tmp_path / "userlist.txt"
    path.write_text('"app" "secret"\n')
    return path


def write(tmp_path, text: str, name: str = "pooler.yaml") -> str:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return str(path)


def errors_of(data: dict) -> list[str]:
    """Errors parse_config reports for data (plus trust auth, so no userlist is needed)."""
    data = {"auth": {"type": "trust"}, **data}
    with pytest.raises(ConfigError) as exc:
        parse_config(data)
    assert str(exc.value) == "\n".join(exc.value.errors)
    return exc.value.errors


def one_error(data: dict) -> str:
    errors = errors_of(data)
    assert len(errors) == 1, errors
    return errors[0]


# ----------------------------------------------------------------------------- defaults

def test_defaults_match_pgbouncer():
    c = Config()
    expected = {
        "listen_port": 6432, "pool_mode": "session", "default_pool_size": 20,
        "min_pool_size": 0, "reserve_pool_size": 0, "reserve_pool_timeout": 5.0,
        "max_client_conn": 100, "max_db_connections": 0, "max_user_connections": 0,
        "max_user_client_connections": 0, "max_prepared_statements": 200,
        "server_reset_query": "DISCARD ALL",
        "server_reset_query_always": False, "server_check_query": "<empty>",
        "server_check_delay": 30.0, "server_lifetime": 3600.0, "server_idle_timeout": 600.0,
        "server_connect_timeout": 15.0, "server_login_retry": 15.0,
        "server_round_robin": False, "query_timeout": 0.0, "query_wait_timeout": 120.0,
        "client_idle_timeout": 0.0, "client_login_timeout": 60.0,
        "idle_transaction_timeout": 0.0, "track_extra_parameters": ["IntervalStyle"],
        "log_connections": True, "log_disconnections": True, "log_pooler_errors": True,
        "stats_period": 60, "tcp_keepalive": True,
    }
    assert {k: getattr(c, k) for k in expected} == expected
    assert c.auth == AuthConfig(type="md5", file=None, user=None,
                                query="SELECT usename, passwd FROM pg_shadow WHERE usename=$1")
    assert PoolEntry(name="p", database="d").mode == "transaction"
    assert PoolEntry(name="p", database="d").size == 10
    assert POOL_MODES == ("session", "transaction", "statement")
    assert "scram-sha-256" in AUTH_TYPES


def test_empty_mapping_gives_defaults():
    c = parse_config({"auth": {"type": "trust"}})
    assert c.databases == {} and c.pools == {}
    assert c.ignore_startup_parameters == ["extra_float_digits"]
    assert c.effective_workers() == 1


def test_workers_zero_means_cpus(monkeypatch):
    monkeypatch.setattr("os.cpu_count", lambda: 7)
    assert Config(workers=0).effective_workers() == 7


def test_listen_addresses():
    assert Config(listen_addr="*").listen_addresses() == ["0.0.0.0"]
    assert Config(listen_addr="127.0.0.1, ::1").listen_addresses() == ["127.0.0.1", "::1"]


# ----------------------------------------------------------------------------- full file

FULL = """\
listen_addr: "*"
listen_port: 6433
workers: 4
pool_mode: transaction
default_pool_size: 15
reserve_pool_size: 2
max_db_connections: 50
query_wait_timeout: 30s
server_idle_timeout: 5m
server_lifetime: 1h
client_login_timeout: 250ms
server_connect_timeout: 2.5
server_round_robin: true
ignore_startup_parameters: extra_float_digits, search_path
admin_users: [admin]
log_format: json
auth:
  type: scram-sha-256
  file: userlist.txt
databases:
  app:
    host: db.internal
    port: 5433
    dbname: app_prod
    user: app
    password: s3cret
    pool_size: 5
  reports: "host=/var/run/postgresql port=5432 dbname=reports pool_mode=session reserve_pool=3"
  "*":
    host: 10.0.0.9
pools:
  app-tx:
    database: app
    user: readonly
    mode: statement
    size: 7
  analytics_pool:
    database: analytics
"""


@pytest.fixture
def full(tmp_path, userlist):
    return load_config(write(tmp_path, FULL))


def test_full_file_loads(full, userlist, tmp_path):
    assert full.listen_addr == "*" and full.listen_port == 6433 and full.workers == 4
    assert full.query_wait_timeout == 30.0
    assert full.server_idle_timeout == 300.0
    assert full.server_lifetime == 3600.0
    assert full.client_login_timeout == pytest.approx(0.25)
    assert full.server_connect_timeout == 2.5
    assert full.ignore_startup_parameters == ["extra_float_digits", "search_path"]
    assert full.auth.type == "scram-sha-256"
    assert full.auth.file == str(userlist)  # resolved against the config's directory
    assert full.source_path == str(tmp_path / "pooler.yaml")
    assert check_config_file(full.source_path) == []


def test_route_pool_forces_user_mode_size(full):
    r = full.route("app-tx")
    assert (r.name, r.host, r.port, r.dbname) == ("app-tx", "db.internal", 5433, "app_prod")
    assert (r.user, r.pool_mode, r.pool_size) == ("readonly", "statement", 7)
    assert r.password is None  # the entry's password belongs to 'app', not 'readonly'
    assert r.reserve_pool_size == 2 and r.max_db_connections == 50


def test_route_pool_via_fallback(full):
    r = full.route("analytics_pool")
    assert (r.host, r.dbname, r.user, r.pool_mode, r.pool_size) == (
        "10.0.0.9", "analytics", None, "transaction", 10)


def test_route_database_entry(full):
    r = full.route("app")
    assert (r.dbname, r.user, r.password, r.pool_mode, r.pool_size) == (
        "app_prod", "app", "s3cret", "transaction", 5)
    r = full.route("reports")
    assert (r.host, r.dbname, r.pool_mode, r.pool_size, r.reserve_pool_size) == (
        "/var/run/postgresql", "reports", "session", 15, 3)


def test_route_fallback_and_unknown(full):
    r = full.route("whatever")
    assert (r.name, r.host, r.port, r.dbname, r.user) == ("whatever", "10.0.0.9", 5432, "whatever", None)
    del full.databases["*"]
    assert full.route("whatever") is None


def test_redacted_hides_passwords(full):
    red = full.redacted()
    assert red["databases"]["app"]["password"] == "***"
    assert red["databases"]["reports"]["password"] is None  # unset stays visibly unset
    assert "s3cret" not in repr(red)
    assert full.databases["app"].password == "s3cret"  # the config itself is untouched


# ----------------------------------------------------------------------------- connection strings

def test_connstr_entry_parses():
    c = parse_config({"auth": {"type": "trust"}, "databases": {
        "app": "host=127.0.0.1 port=5432 dbname=app pool_size=5",
        "q": "host = h  user=u password='it''s' application_name='my app' connect_query='SELECT 1'",
    }})
    assert c.databases["app"] == DatabaseEntry(name="app", host="127.0.0.1", port=5432,
                                               dbname="app", pool_size=5)
    q = c.databases["q"]
    assert (q.host, q.user, q.application_name, q.connect_query) == ("h", "u", "my app", "SELECT 1")
    assert q.password == "it's"


def test_parse_connstr_quotes_and_errors():
    assert parse_connstr(r"a=1 b='x y' c='it\'s' d=") == {"a": "1", "b": "x y", "c": "it's", "d": ""}
    for bad in ("a='open", "justaword", "a=1 b'=2"):
        with pytest.raises(ValueError):
            parse_connstr(bad)


def test_connstr_bad_values():
    errors = errors_of({"databases": {"app": "port=abc pool_mode=fast sise=3 password=hunter2"}})
    assert "databases.app.port: 'abc' is not valid: an integer from 1 to 65535" in errors
    assert any(e.startswith("databases.app.pool_mode: 'fast' is not valid") for e in errors)
    assert any(e.startswith("databases.app.sise: unknown key (allowed: host, port,") for e in errors)
    err = one_error({"databases": {"app": "host=x password=hunter2 'junk"}})
    assert err.startswith("databases.app: ") and "hunter2" not in err


# ----------------------------------------------------------------------------- bad values

@pytest.mark.parametrize("data, expected", [
    ({"listen_port": 70000}, "listen_port: 70000 is not valid: an integer from 1 to 65535"),
    ({"listen_port": "abc"}, "listen_port: 'abc' is not valid: an integer from 1 to 65535"),
    ({"listen_port": True}, "listen_port: True is not valid: an integer from 1 to 65535"),
    ({"pool_mode": "fast"},
     "pool_mode: 'fast' is not valid: one of 'session', 'transaction', 'statement'"),
    ({"default_pool_size": -1}, "default_pool_size: -1 is not valid: an integer >= 0"),
    ({"server_round_robin": 1}, "server_round_robin: 1 is not valid: true or false"),
    ({"listen_addr": ""}, "listen_addr: '' is not valid: an address"),
    ({"query_timeout": -5}, "query_timeout: -5 is not valid: a number of seconds >= 0"),
    ({"query_timeout": "5 weeks"}, "query_timeout: '5 weeks' is not valid: a number of seconds"),
    ({"admin_users": [1]}, "admin_users: [1] is not valid: a list of strings"),
    ({"listen_prot": 1}, "listen_prot: unknown key (did you mean listen_port"),
    ({"auth_type": "md5", "auth": {"type": "trust"}}, "auth_type: unknown key (did you mean auth.type?)"),
    ({"frobnicate": 1}, "frobnicate: unknown key (see the config reference)"),
    ({"auth": {"type": "ldap"}}, "auth.type: 'ldap' is not valid: one of 'trust', 'plain'"),
    ({"auth": {"type": "trust", "kind": 1}}, "auth.kind: unknown key (allowed: type, file, query, user, dbname, hba_file, ident_file)"),
    ({"databases": {"app": {"port": 0}}}, "databases.app.port: 0 is not valid: an integer from 1"),
    ({"databases": {"app": {"pool_size": -3}}}, "databases.app.pool_size: -3 is not valid: an integer >= 0"),
    ({"databases": {"app": {"hots": "x"}}}, "databases.app.hots: unknown key (allowed: host, port,"),
    ({"databases": {"app": {"password": 1234}}}, "databases.app.password: '***' is not valid: a string"),
    ({"databases": {"pgbouncer": {}}}, "databases.pgbouncer: 'pgbouncer' is not valid"),
    ({"databases": ["app"]}, "databases: ['app'] is not valid: a mapping"),
    ({"databases": {"*": {}}, "pools": {"x": {"database": "d"}}},
     "pools.x: 'x' is not valid: a pool name of 3 to 60 characters"),
    ({"databases": {"*": {}}, "pools": {"xyz": {"database": "d", "sise": 3}}},
     "pools.xyz.sise: unknown key (allowed: database, user, mode, size)"),
    ({"databases": {"*": {}}, "pools": {"p" * 61: {"database": "d"}}}, f"pools.{'p' * 61}: 'ppp"),
    ({"databases": {"*": {}}, "pools": {"bad name!": {"database": "d"}}},
     "pools.bad name!: 'bad name!' is not valid: a pool name of 3 to 60 characters"),
    ({"databases": {"*": {}}, "pools": {"pgbouncer": {"database": "d"}}},
     "pools.pgbouncer: 'pgbouncer' is not valid: a name not already used"),
    ({"databases": {"*": {}}, "pools": {"pool": {"database": "d" * 41}}},
     f"pools.pool.database: '{'d' * 41}"[:60]),
    ({"databases": {"*": {}}, "pools": {"pool": {"database": ""}}},
     "pools.pool.database: '' is not valid: a database name of 1 to 40 characters"),
    ({"databases": {"*": {}}, "pools": {"pool": {"database": "d", "user": "u" * 65}}},
     "pools.pool.user: 'uuuu"),
    ({"databases": {"*": {}}, "pools": {"pool": {"database": "d", "size": 0}}},
     "pools.pool.size: 0 is not valid: an integer from 1 to 10000"),
    ({"databases": {"*": {}}, "pools": {"pool": {"database": "d", "mode": "tx"}}},
     "pools.pool.mode: 'tx' is not valid: one of 'session', 'transaction', 'statement'"),
    ({"databases": {"*": {}}, "pools": {"pool": {"user": "u"}}}, "pools.pool.database: is required"),
    ({"pools": {"pool": {"database": "nowhere"}}},
     "pools.pool.database: 'nowhere' is not valid: a key of databases"),
])
def test_bad_value_is_named(data, expected):
    err = one_error(data)
    assert err.startswith(expected), err


def test_database_user_too_long_is_named():
    err = one_error({"databases": {"*": {}}, "pools": {"pool": {"database": "d", "user": "u" * 65}}})
    assert err.endswith("is not valid: a user name of 1 to 64 characters")
    err = one_error({"databases": {"*": {}}, "pools": {"pool": {"database": "d" * 41}}})
    assert err.endswith("is not valid: a database name of 1 to 40 characters")


def test_pool_name_clashes_with_database():
    err = one_error({"databases": {"app": {}}, "pools": {"app": {"database": "app"}}})
    assert err == ("pools.app: 'app' is not valid: "
                   "a name not already used by databases or 'pgbouncer'")


def test_pool_name_boundaries():
    ok = {"databases": {"*": {}}, "pools": {"abc": {"database": "d"}, "a" * 60: {"database": "d"}}}
    parse_config({"auth": {"type": "trust"}, **ok})
    one_error({"databases": {"*": {}}, "pools": {"ab": {"database": "d"}}})


def test_password_alias_and_duration_units():
    c = parse_config({"auth": {"type": "trust"}, "server_check_delay": "1.5m"})
    assert c.server_check_delay == 90.0
    c = parse_config({"auth": {"type": "password", "user": "pgbouncer_auth"}})
    assert c.auth.type == "plain"


def test_all_errors_reported_at_once():
    errors = errors_of({
        "listen_port": "abc", "pool_mode": "fast", "bogus": 1, "log_connections": 0,
        "databases": {"app": {"port": -1, "what": 2}},
        "pools": {"ab": {"database": "app", "size": -1}},
    })
    for key in ("listen_port", "pool_mode", "bogus", "log_connections", "databases.app.port",
                "databases.app.what", "pools.ab:", "pools.ab.size"):
        assert any(e.startswith(key) for e in errors), (key, errors)
    assert len(errors) == 8


# ----------------------------------------------------------------------------- files

def test_missing_auth_file_names_path(tmp_path):
    path = write(tmp_path, "auth: {type: md5, file: nope.txt}\n")
    errors = check_config_file(path)
    assert errors == [f"auth.file: '{tmp_path / 'nope.txt'}' is not valid: an existing userlist file"]


def test_auth_file_required_unless_trust_or_auth_user(tmp_path):
    errors = check_config_file(write(tmp_path, "listen_port: 6000\n"))
    assert len(errors) == 1 and errors[0].startswith("auth.file: is required when auth.type is 'md5'")
    assert check_config_file(write(tmp_path, "auth: {user: pgbouncer}\n")) == []


def test_missing_config_file(tmp_path):
    path = str(tmp_path / "absent.yaml")
    with pytest.raises(ConfigError) as exc:
        load_config(path)
    assert exc.value.errors == [f"{path}: cannot read config file: No such file or directory"]


def test_yaml_syntax_error_names_file_and_line(tmp_path):
    path = write(tmp_path, "listen_port: 6432\ndatabases: [unclosed\n")
    errors = check_config_file(path)
    assert len(errors) == 1
    assert errors[0].startswith(f"{path}: YAML syntax error: line ")


def test_top_level_not_a_mapping(tmp_path):
    path = write(tmp_path, "- a\n- b\n")
    assert check_config_file(path) == [
        f"{path}: ['a', 'b'] is not valid: a mapping of settings at the top level"]
    with pytest.raises(ConfigError, match=r"\(top level\): 'x' is not valid"):
        parse_config("x")  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- users

USERS_CFG = {
    "auth": {"type": "trust"}, "pool_mode": "transaction", "default_pool_size": 20,
    "reserve_pool_size": 1, "max_user_connections": 50, "max_user_client_connections": 9,
    "query_timeout": 30, "query_wait_timeout": 60, "client_idle_timeout": "5m",
    "databases": {
        "app": {"pool_mode": "statement", "pool_size": 8, "reserve_pool_size": 2},
        "forced": {"user": "alice", "password": "pw"},
        "*": {},
    },
    "pools": {"app-pool": {"database": "app", "mode": "statement", "size": 4}},
    "users": {
        "alice": {"pool_mode": "session", "pool_size": 3, "reserve_pool_size": 0,
                  "max_user_connections": 5, "max_user_client_connections": 0,
                  "query_timeout": 0, "idle_transaction_timeout": "2s"},
        "bob": "pool_size=6 query_wait_timeout=250ms",
    },
}


@pytest.fixture
def with_users() -> Config:
    return parse_config(USERS_CFG)


def test_users_section_parses_both_forms(with_users):
    alice, bob = with_users.users["alice"], with_users.users["bob"]
    assert (alice.pool_mode, alice.pool_size, alice.query_timeout) == ("session", 3, 0.0)
    assert alice.idle_transaction_timeout == 2.0 and alice.client_idle_timeout is None
    assert (bob.pool_size, bob.query_wait_timeout, bob.pool_mode) == (6, 0.25, None)


def test_user_beats_database_beats_global(with_users):
    alice, bob, carol = (with_users.route("app", u) for u in ("alice", "bob", "carol"))
    # pool_mode / pool_size / reserve_pool_size: user > database entry > global.
    assert (alice.pool_mode, alice.pool_size, alice.reserve_pool_size) == ("session", 3, 0)
    assert (bob.pool_mode, bob.pool_size, bob.reserve_pool_size) == ("statement", 6, 2)
    assert (carol.pool_mode, carol.pool_size, carol.reserve_pool_size) == ("statement", 8, 2)
    other = with_users.route("elsewhere", "carol")             # the '*' entry sets nothing
    assert (other.pool_mode, other.pool_size, other.reserve_pool_size) == ("transaction", 20, 1)
    # Without a user (SHOW DATABASES, auth lookups): the database's own values.
    assert with_users.route("app").pool_size == 8


def test_user_timeouts_and_caps_replace_the_global_ones(with_users):
    alice, bob, carol = (with_users.route("app", u) for u in ("alice", "bob", "carol"))
    assert alice.query_timeout == 0.0                 # explicit 0: off for alice only
    assert (bob.query_timeout, carol.query_timeout) == (30.0, 30.0)
    assert (alice.query_wait_timeout, bob.query_wait_timeout) == (60.0, 0.25)
    assert (alice.idle_transaction_timeout, bob.idle_transaction_timeout) == (2.0, 0.0)
    assert alice.client_idle_timeout == bob.client_idle_timeout == 300.0
    assert (alice.max_user_connections, bob.max_user_connections) == (5, 50)
    assert with_users.user_client_limit("alice") == 0          # explicit 0: no limit
    assert with_users.user_client_limit("bob") == 9            # the global one
    assert with_users.any_client_timeout()
    assert not parse_config({"auth": {"type": "trust"}}).any_client_timeout()
    assert parse_config({"auth": {"type": "trust"},
                         "users": {"u": {"client_idle_timeout": 1}}}).any_client_timeout()


def test_pool_user_is_the_forced_user(with_users):
    # A forced user's entry applies to every client of that database, whoever logs in.
    r = with_users.route("forced", "carol")
    assert (r.user, r.pool_mode, r.pool_size, r.max_user_connections) == ("alice", "session", 3, 5)
    # A named pool's mode and size are beaten by the user's too (PgBouncer's order).
    assert with_users.route("app-pool", "alice").pool_mode == "session"
    assert with_users.route("app-pool", "carol").pool_size == 4


@pytest.mark.parametrize("users, expected", [
    ({"u": {"pool_size": -1}}, "users.u.pool_size: -1 is not valid: an integer >= 0"),
    ({"u": {"pool_mode": "tx"}},
     "users.u.pool_mode: 'tx' is not valid: one of 'session', 'transaction', 'statement'"),
    ({"u": {"query_timeout": "soon"}},
     "users.u.query_timeout: 'soon' is not valid: a number of seconds >= 0"),
    ({"u": {"max_user_client_connections": True}},
     "users.u.max_user_client_connections: True is not valid: an integer >= 0"),
    ({"u": "pool_size=many"}, "users.u.pool_size: 'many' is not valid: an integer >= 0"),
    ({"u": {"pool_sise": 3}}, "users.u.pool_sise: unknown key (allowed: pool_mode, pool_size,"),
    ({"u": "pool_mode='open"}, "users.u: \"pool_mode='open\" is not valid: a connection string"),
    ({"u": 5}, "users.u: 5 is not valid: a mapping of settings, or a connection string"),
    ({"": {}}, "users.: '' is not valid: a non-empty user name"),
    (["u"], "users: ['u'] is not valid: a mapping of user name to settings"),
])
def test_bad_user_setting_is_named(users, expected):
    err = one_error({"users": users})
    assert err.startswith(expected), err


# ----------------------------------------------------------------------------- restart-only settings

def test_restart_only_settings_refused_by_set_kept_by_reload(tmp_path, caplog):
    """One list (settings.RESTART_ONLY): SET refuses those keys and RELOAD keeps their
    running value with a warning; the log settings may change at run time."""
    from pooler.config.runtime import config_rows, runtime_setting
    from pooler.proc.master import reload_config
    cfg = parse_config({"auth": {"type": "trust"}})
    for key in ("listen_port", "workers", "pidfile", "peer_id"):
        with pytest.raises(ConfigError, match=f"{key} cannot be changed while running"):
            runtime_setting(cfg, key, "1")
    assert runtime_setting(cfg, "log_format", "json").log_format == "json"
    assert runtime_setting(cfg, "logfile", "x.log").logfile == "x.log"
    changeable = {row[0]: row[3] for row in config_rows(cfg, None)}
    assert (changeable["pidfile"], changeable["log_format"], changeable["logfile"]) == \
        ("no", "yes", "yes")
    path = write(tmp_path, """
        auth: {type: trust}
        pidfile: other.pid
        log_format: json
    """)
    with caplog.at_level("WARNING", logger="pooler.master"):
        new = reload_config(path, None, cfg)
    assert (new.pidfile, new.log_format) == ("", "json")
    assert "RELOAD: pidfile changed; it takes effect after a restart" in caplog.text
    assert "log_format" not in caplog.text


# --------------------------------------------------------------------------- overlay


def _write(path, data) -> None:
    import yaml
    path.write_text(yaml.safe_dump(data))


def test_overlay_replaces_adds_and_removes_entries(tmp_path):
    main = tmp_path / "pooler.yaml"
    _write(main, {"auth": {"type": "trust"},
                  "databases": {"app": {"host": "127.0.0.1", "port": 5432},
                                "old": {"host": "127.0.0.1", "port": 5432}},
                  "pools": {"keep": {"database": "app", "size": 2},
                            "swap": {"database": "app", "size": 3, "user": "u1"},
                            "gone": {"database": "app"}}})
    assert load_config(str(main)).pools["swap"].size == 3      # no overlay: main file only
    overlay = tmp_path / "pooler.pools.yaml"
    _write(overlay, {"pools": {"swap": {"database": "app", "size": 7}, "gone": None,
                               "added": {"database": "app", "mode": "session"}},
                     "databases": {"old": None}})
    cfg = load_config(str(main))
    assert set(cfg.pools) == {"keep", "swap", "added"}
    assert cfg.pools["keep"].size == 2
    # An overlay entry replaces the main entry whole: its user is gone with it.
    assert (cfg.pools["swap"].size, cfg.pools["swap"].user) == (7, None)
    assert cfg.pools["added"].mode == "session"
    assert set(cfg.databases) == {"app"}
    assert check_config_file(str(main)) == []


def test_overlay_errors_name_the_overlay_file(tmp_path):
    main = tmp_path / "pooler.yaml"
    _write(main, {"auth": {"type": "trust"},
                  "databases": {"app": {"host": "127.0.0.1", "port": 5432}}})
    overlay = tmp_path / "pooler.pools.yaml"
    _write(overlay, {"pools": {"bad": {"database": "app", "size": 0}}})
    with pytest.raises(ConfigError) as e:
        load_config(str(main))
    assert e.value.errors == [f"{overlay}: pools.bad.size: 0 is not valid: "
                              "an integer from 1 to 10000"]
    _write(overlay, {"pools": {"x": "size=3"}, "listen_port": 1})
    errors = check_config_file(str(main))
    assert f"{overlay}: listen_port: unknown key (an overlay holds only pools and databases)" \
        in errors
    assert any(err.startswith(f"{overlay}: pools.x: is not valid") for err in errors)
    overlay.write_text("pools: [")
    assert check_config_file(str(main))[0].startswith(f"{overlay}: YAML syntax error")
    overlay.write_text("")
    assert check_config_file(str(main)) == []                 # empty: nothing to merge


def test_overlay_path_and_ini_has_none(tmp_path):
    from pooler.config.load import overlay_path
    assert overlay_path(str(tmp_path / "pooler.yaml")) == str(tmp_path / "pooler.pools.yaml")
    assert overlay_path(str(tmp_path / "conf.yml")) == str(tmp_path / "conf.pools.yaml")
    ini = tmp_path / "pgbouncer.ini"
    ini.write_text("[databases]\napp = host=127.0.0.1 port=5432\n[pgbouncer]\nauth_type = trust\n")
    (tmp_path / "pgbouncer.pools.yaml").write_text("pools: {p1: {database: nope}}\n")
    assert load_config(str(ini)).pools == {}                 # an ini config reads no overlay
