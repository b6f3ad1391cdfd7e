"""`pooler check-config FILE` and `pooler -V` as a user runs them (a subprocess
of `python -m pooler`): every kind of bad value is rejected with a message
naming the key and the value, a valid file prints OK."""
from __future__ import annotations

import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))
from pooler.version import __version__  # noqa: E402


def pooler(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pooler", *args], capture_output=True, text=True,
                          timeout=60, cwd=cwd or REPO_ROOT, stdin=subprocess.DEVNULL)


def base_config() -> dict:
    return {
        "listen_port": 6432,
        "auth": {"type": "md5", "file": "userlist.txt"},
        "databases": {"app": {"host": "127.0.0.1", "port": 5432, "dbname": "app"}},
    }


@pytest.fixture
def write(tmp_path: Path):
    (tmp_path / "userlist.txt").write_text('"app" "apppass"\n')

    def w(cfg, name: str = "pooler.yaml") -> Path:
        path = tmp_path / name
        path.write_text(cfg if isinstance(cfg, str) else yaml.safe_dump(cfg, sort_keys=False))
        return path
    return w


def with_change(path: str, value):
    """The base config with the dotted `path` set to `value`."""
    cfg = base_config()
    node = cfg
    keys = path.split(".")
    for k in keys[:-1]:
        node = node.setdefault(k, {})
    node[keys[-1]] = value
    return cfg


# (dotted key, bad value, text the message must contain besides the key)
BAD_VALUES = [
    ("pool_mode", "sessions", "'sessions'"),
    ("listen_port", 70000, "70000"),
    ("listen_port", "http", "'http'"),
    ("default_pool_size", -1, "-1"),
    ("max_client_conn", "many", "'many'"),
    ("max_client_conn", True, "True"),
    ("server_lifetime", "10 parsecs", "'10 parsecs'"),
    ("query_wait_timeout", -5, "-5"),
    ("server_round_robin", "yes", "'yes'"),
    ("log_format", "xml", "'xml'"),
    ("stats_period", 0, "0"),
    ("ignore_startup_parameters", 5, "5"),
    ("auth.type", "kerberos", "'kerberos'"),
    ("auth.file", "no-such-userlist.txt", "no-such-userlist.txt"),
    ("databases.app.port", "abc", "'abc'"),
    ("databases.app.pool_mode", "batch", "'batch'"),
    ("databases.app.pool_size", -3, "-3"),
    ("databases.app", "host='127.0.0.1 port=5432", "host="),
    ("databases.app", "host=127.0.0.1 port=", "''"),
    ("databases.pgbouncer", {"host": "127.0.0.1"}, "'pgbouncer'"),
    ("pools.a!", {"database": "app"}, "'a!'"),
    ("pools.mypool", {"database": "nosuchdb"}, "'nosuchdb'"),
    ("pools.mypool", {"database": "app", "mode": "batch"}, "'batch'"),
    ("pools.mypool", {"database": "app", "size": 0}, "0"),
]


def _error_key(path: str, value) -> str:
    """The key path the error must name."""
    if path == "databases.app" and value.endswith("port="):
        return "databases.app.port"
    if path.startswith("pools.") and isinstance(value, dict) and path != "pools.a!":
        extra = {"nosuchdb": "database"}.get(value.get("database"), None)
        field = extra or next(k for k in value if k != "database")
        return f"{path}.{field}"
    return path


@pytest.mark.parametrize("path,value,shown", BAD_VALUES,
                         ids=[f"{p}={v!r}" for p, v, _ in BAD_VALUES])
def test_bad_value_is_rejected_naming_key_and_value(path, value, shown, write):
    cfg_path = write(with_change(path, value))
    cp = pooler("check-config", str(cfg_path))
    out = cp.stdout + cp.stderr
    assert cp.returncode != 0, out
    assert "OK" not in cp.stdout
    key = _error_key(path, value)
    lines = [ln for ln in out.splitlines() if ln.startswith(key + ":")]
    assert lines, f"no error line naming {key!r}:\n{out}"
    assert any(shown in ln for ln in lines), f"value {shown} not named:\n{out}"


def test_unknown_key_is_rejected_with_a_suggestion(write):
    cfg = base_config()
    cfg["pool_mod"] = "session"
    cp = pooler("check-config", str(write(cfg)))
    assert cp.returncode != 0
    assert re.search(r"^pool_mod: unknown key.*pool_mode", cp.stderr, re.M), cp.stderr


def test_every_error_is_reported_in_one_run(write):
    cfg = base_config()
    cfg.update(pool_mode="x", listen_port=0, server_idle_timeout="soon")
    cp = pooler("check-config", str(write(cfg)))
    assert cp.returncode != 0
    for key in ("pool_mode: 'x'", "listen_port: 0", "server_idle_timeout: 'soon'"):
        assert key in cp.stderr, cp.stderr
    assert "3 error(s)" in cp.stderr


def test_password_value_is_never_printed(write):
    cfg = base_config()
    cfg["databases"]["app"]["password"] = 12345678
    cp = pooler("check-config", str(write(cfg)))
    assert cp.returncode != 0
    assert "databases.app.password" in cp.stderr
    assert "12345678" not in cp.stdout + cp.stderr


def test_unreadable_or_unparsable_files(write, tmp_path):
    cp = pooler("check-config", str(tmp_path / "missing.yaml"))
    assert cp.returncode != 0 and "missing.yaml" in cp.stderr and "cannot read" in cp.stderr
    cp = pooler("check-config", str(write("pool_mode: [session\n", "broken.yaml")))
    assert cp.returncode != 0 and "YAML syntax error" in cp.stderr and "line" in cp.stderr
    cp = pooler("check-config", str(write("- a\n- b\n", "list.yaml")))
    assert cp.returncode != 0 and "mapping" in cp.stderr
    cp = pooler("check-config")
    assert cp.returncode != 0 and "config" in cp.stderr


def test_valid_file_exits_0_and_prints_OK(write, tmp_path):
    text = textwrap.dedent("""\
        listen_addr: 127.0.0.1
        listen_port: 6543
        pool_mode: transaction
        default_pool_size: 5
        server_lifetime: 1h
        server_idle_timeout: 30s
        query_wait_timeout: 250ms
        ignore_startup_parameters: extra_float_digits, options
        log_format: json
        auth: {type: scram-sha-256, file: userlist.txt}
        databases:
          app: {host: 127.0.0.1, port: 5432, dbname: app, pool_size: 3}
          legacy: "host=127.0.0.1 port=5432 dbname=app pool_mode=session"
        pools:
          app-pool: {database: app, mode: session, size: 4}
        """)
    path = write(text)
    # --no-connect: no capacity check (tests/test_capacity.py), so nothing on stderr.
    cp = pooler("check-config", "--no-connect", str(path))
    assert cp.returncode == 0, cp.stderr
    assert cp.stdout.strip() == f"{path}: OK"
    assert cp.stderr == ""
    # relative auth.file resolves against the config file, not the working directory
    cp = pooler("check-config", str(path), cwd=Path("/"))
    assert cp.returncode == 0, cp.stderr


def test_version():
    for flag in ("-V", "--version"):
        cp = pooler(flag)
        assert cp.returncode == 0, cp.stderr
        assert len(cp.stdout.splitlines()) == 1, cp.stdout
        assert re.search(rf"\bpooler {re.escape(__version__)}\b", cp.stdout), cp.stdout
