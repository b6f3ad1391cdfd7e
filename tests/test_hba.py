"""auth.type hba (auth_hba_file, auth_ident_file) and cert, against a real PostgreSQL;
the refusals side by side with PgBouncer 1.18 (tests/bouncer.py) where 1.18 has them."""
from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import sys
import time
from pathlib import Path

import psycopg2
import pytest

from bouncer import Bouncer, require_pgbouncer
from rawpg import PgError
from conftest import raw_client
from conftest import (APP_DB, APP_PASSWORD, APP_USER, MD5_USER, MD5_PASSWORD, REPO_ROOT, SUPERUSER,
                      SUPERUSER_PASSWORD)
from pooler.config.converters import ConfigError
from pooler.config.hba import Hba, parse_hba
from pooler.config.validate import parse_config
from test_tls import certs, client_tls  # noqa: F401  (the certs fixture)

HBA = """\
# the four methods over TCP (127.0.0.1)
host    all  app       127.0.0.1/32              trust
host    all  rejected  127.0.0.1/32              reject
host    all  md5user   127.0.0.1 255.255.255.255 md5
host    "app"    postgres  127.0.0.0/8           scram-sha-256
"""


def _connect(p, user: str, password: str | None = None, db: str = APP_DB, **extra):
    kw = {"host": getattr(p, "host", "127.0.0.1"), "port": p.port, "dbname": db, "user": user, "connect_timeout": 10,
          "sslmode": "disable", **extra}
    if password is not None:
        kw["password"] = password
    return psycopg2.connect(**kw)


def _message(exc: Exception) -> str:
    """The server's message text, without libpq's "connection to server ... failed:"."""
    line = str(exc).strip().splitlines()[-1]
    return line.split(" failed: ", 1)[-1].replace("FATAL:  ", "")


def _sqlstate(p, user: str) -> str:
    """The SQLSTATE of a refused login (psycopg2 has none for a connection error)."""
    with pytest.raises(PgError) as ei:
        raw_client(p.port, user, APP_DB, "x")
    return ei.value.fields["C"]


def _login(p, user: str, password: str | None = None, **extra) -> str:
    """'ok', or the server's error message."""
    try:
        conn = _connect(p, user, password, **extra)
    except psycopg2.OperationalError as exc:
        return _message(exc)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT 1")
        return "ok"
    finally:
        conn.close()


def _hba_pooler(pooler_factory, pooler_config, app_userlist, tmp_path, text: str = HBA, **extra):
    hba_path = tmp_path / "hba.conf"
    hba_path.write_text(text)
    cfg = pooler_config(auth={"type": "hba", "hba_file": str(hba_path)}, **extra)
    return pooler_factory(cfg, userlist=app_userlist), hba_path


# --------------------------------------------------------------------------- parsing


def test_parse_and_match(tmp_path):
    f = tmp_path / "hba.conf"
    (tmp_path / "dbs.txt").write_text("one, two\nthree\n")
    f.write_text('local all all peer\n'
                 'hostssl @dbs.txt all ::1/128 cert\n'
                 'hostnossl sameuser all 10.0.0.0 255.0.0.0 md5 # comment\n'
                 'host all "Quoted User" all password\n')
    hba = Hba(parse_hba(str(f)))
    assert hba.match("unix", False, "x", "y").method == "peer"
    assert hba.match("[::1]:5000", True, "two", "u").method == "cert"
    assert hba.match("[::1]:5000", False, "two", "u") is None           # hostssl only
    assert hba.match("10.1.2.3:1", False, "bob", "bob").method == "md5"
    assert hba.match("10.1.2.3:1", True, "bob", "bob") is None           # hostnossl only
    assert hba.match("10.1.2.3:1", False, "db", "bob") is None           # sameuser
    assert hba.match("192.168.0.1:1", False, "db", "Quoted User").method == "password"


@pytest.mark.parametrize("line, error", [
    ("host all all 127.0.0.1/32 ldap", 'unsupported authentication method "ldap"'),
    ("hostgssenc all all 127.0.0.1/32 trust", 'unsupported connection type "hostgssenc"'),
    ("host all +admins 127.0.0.1/32 trust", "group names are not supported"),
    ("host all all 127.0.0.1 trust", 'invalid IP mask "trust"'),
    ("host all all localhost trust", 'invalid IP address "localhost"'),
    ("host all all 127.0.0.1/32", "missing fields"),
    ("host all all 127.0.0.1/32 md5 map=x", "map= is only for the peer and cert methods"),
    ("local all all peer map=nope", 'map "nope" is not in auth_ident_file'),
])
def test_malformed_lines_name_file_and_line(tmp_path, line, error):
    f = tmp_path / "hba.conf"
    f.write_text(f"# first\nlocal all all trust\n{line}\n")
    with pytest.raises(ConfigError) as ei:
        parse_config({"auth": {"type": "hba", "hba_file": str(f)}})
    assert f"auth.hba_file: {f}:3: {error}" in str(ei.value)


def test_check_config_refuses_a_malformed_file(pg, tmp_path):
    hba = tmp_path / "hba.conf"
    hba.write_text("host all all 127.0.0.1/32 trust\nhost all all 127.0.0.1/32 kerberos\n")
    ini = tmp_path / "pgbouncer.ini"
    ini.write_text(f"[databases]\napp = host=127.0.0.1 port={pg.port}\n[pgbouncer]\n"
                   f"auth_type = hba\nauth_hba_file = {hba}\n")
    cp = subprocess.run([sys.executable, "-m", "pooler", "check-config", "--no-connect", str(ini)],
                        capture_output=True, text=True, timeout=60, cwd=REPO_ROOT)
    assert cp.returncode == 1
    assert f"{hba}:2: unsupported authentication method \"kerberos\"" in cp.stderr, cp.stderr
    hba.write_text("host all all 127.0.0.1/32 trust\n")
    cp = subprocess.run([sys.executable, "-m", "pooler", "check-config", "--no-connect", str(ini)],
                        capture_output=True, text=True, timeout=60, cwd=REPO_ROOT)
    assert cp.returncode == 0, cp.stderr


def test_cert_needs_verified_client_certificates(certs):  # noqa: F811
    with pytest.raises(ConfigError, match="'cert' needs client_tls_sslmode verify-full"):
        parse_config({"auth": {"type": "cert"}, **client_tls(certs)})
    with pytest.raises(ConfigError, match="'cert' needs client_tls_sslmode verify-full"):
        parse_config({"auth": {"type": "cert"},
                      **client_tls(certs, "verify-ca", client_tls_ca_file=certs["ca.crt"])})


# --------------------------------------------------------------------------- logins


@pytest.mark.parametrize("workers", [1, 2])
def test_methods_per_user(pg, pooler_factory, pooler_config, app_userlist, tmp_path, workers):
    # workers=2: the rules travel to the forked workers inside the Config
    p, _ = _hba_pooler(pooler_factory, pooler_config, app_userlist, tmp_path, workers=workers)
    assert _login(p, APP_USER) == "ok"                        # trust: no password asked
    assert _login(p, "rejected", "x") == "login rejected"
    assert _login(p, MD5_USER, MD5_PASSWORD) == "ok"
    assert "password authentication failed" in _login(p, MD5_USER, "wrong")
    assert _login(p, SUPERUSER, SUPERUSER_PASSWORD) == "ok"
    assert "password authentication failed" in _login(p, SUPERUSER, "wrong")
    assert _login(p, SUPERUSER, SUPERUSER_PASSWORD, db="postgres") == "login rejected"  # not listed
    assert _login(p, "nobody", "x") == "login rejected"       # no line at all
    assert _sqlstate(p, "rejected") == "08P01"     # PgBouncer's SQLSTATE of a refused login
    assert "login rejected" in p.log()


def test_reload_changes_the_rules_and_a_bad_file_keeps_them(pg, pooler_factory, pooler_config,
                                                            app_userlist, tmp_path):
    p, hba_path = _hba_pooler(pooler_factory, pooler_config, app_userlist, tmp_path)
    assert _login(p, APP_USER) == "ok"
    hba_path.write_text(HBA.replace("app       127.0.0.1/32              trust",
                                    "app       127.0.0.1/32              reject"))
    mark = len(p.log())
    p.reload()
    p.wait_for_log("RELOAD", start=mark)
    time.sleep(0.3)
    assert _login(p, APP_USER) == "login rejected"
    hba_path.write_text("host all all 127.0.0.1/32 trust\nhost all all bogus trust\n")
    mark = len(p.log())
    p.reload()
    p.wait_for_log(rf"RELOAD failed.*{hba_path}:2", start=mark)
    assert _login(p, APP_USER) == "login rejected"            # the old rules still apply
    assert _login(p, MD5_USER, MD5_PASSWORD) == "ok"


def test_hostssl_hostnossl_and_cert(pg, pooler_factory, pooler_config, app_userlist, tmp_path,
                                    certs):  # noqa: F811
    text = ("hostssl   all app      127.0.0.1/32 cert\n"
            "hostssl   all postgres 127.0.0.1/32 cert\n"
            "hostssl   all md5user  127.0.0.1/32 md5\n"
            "hostnossl all md5user  127.0.0.1/32 reject\n"
            "hostnossl all app      127.0.0.1/32 trust\n")
    p, _ = _hba_pooler(pooler_factory, pooler_config, app_userlist, tmp_path, text,
                       **client_tls(certs, "prefer", client_tls_ca_file=certs["ca.crt"]))
    # prefer + a CA file: TLS optional, a certificate sent is verified (tls.py)
    with_cert = {"sslmode": "require", "sslcert": certs["client.crt"], "sslkey": certs["client.key"]}
    assert _login(p, APP_USER, **with_cert) == "ok"                 # CN app
    assert _login(p, SUPERUSER, **with_cert) == "certificate authentication failed"
    assert _login(p, MD5_USER, MD5_PASSWORD, **with_cert) == "ok"   # hostssl: md5
    assert _login(p, MD5_USER, MD5_PASSWORD) == "login rejected"    # hostnossl: reject
    assert _login(p, APP_USER) == "ok"                              # hostnossl: trust
    assert _login(p, APP_USER, sslmode="require") == "certificate authentication failed"


def test_auth_type_cert(pg, pooler_factory, pooler_config, app_userlist, certs):  # noqa: F811
    cfg = pooler_config(auth={"type": "cert"},
                        **client_tls(certs, "verify-full", client_tls_ca_file=certs["ca.crt"]))
    p = pooler_factory(cfg, userlist=app_userlist)        # (auth.file set, type kept)
    with_cert = {"sslmode": "require", "sslcert": certs["client.crt"], "sslkey": certs["client.key"]}
    assert _login(p, APP_USER, **with_cert) == "ok"
    assert _login(p, MD5_USER, **with_cert) == "certificate authentication failed"
    # verify-full: no certificate fails the handshake itself (CERT_REQUIRED)
    assert _login(p, APP_USER, sslmode="require") != "ok"


def test_peer_over_the_unix_socket_with_an_ident_map(pg, pooler_factory, pooler_config,
                                                     app_userlist, tmp_path):
    me = pwd.getpwuid(os.geteuid()).pw_name
    sock = tmp_path / "sock"
    sock.mkdir()
    ident = tmp_path / "ident.conf"
    ident.write_text(f"# MAP SYSTEM PG\nappmap {me} {APP_USER}\nappmap /^nomatch$ all\n")
    hba_path = tmp_path / "hba.conf"
    hba_path.write_text(f"local all {APP_USER} peer map=appmap\nlocal all all peer\n")
    cfg = pooler_config(auth={"type": "hba", "hba_file": str(hba_path), "ident_file": str(ident)},
                        unix_socket_dir=str(sock))
    p = pooler_factory(cfg, userlist=app_userlist)

    def login(user):
        try:
            conn = psycopg2.connect(host=str(sock), port=p.port, dbname=APP_DB, user=user,
                                    connect_timeout=10)
        except psycopg2.OperationalError as exc:
            return _message(exc)
        conn.close()
        return "ok"
    assert login(APP_USER) == "ok"                                   # me -> app by the map
    assert login(MD5_USER) == "unix socket login rejected"           # no map: me != md5user
    if me == SUPERUSER:
        pytest.skip("running as postgres")
    assert login(SUPERUSER) == "unix socket login rejected"


# --------------------------------------------------------------------------- PgBouncer 1.18

BOUNCER_INI = """\
[databases]
app = host=127.0.0.1 port={pgport} dbname=app
[pgbouncer]
listen_addr = 127.0.0.1
listen_port = {port}
unix_socket_dir =
auth_type = hba
auth_file = {userlist}
auth_hba_file = {hba}
"""


def test_side_by_side_with_pgbouncer(pg, pooler_factory, app_userlist):
    require_pgbouncer()
    users = {APP_USER: APP_PASSWORD, MD5_USER: MD5_PASSWORD, SUPERUSER: SUPERUSER_PASSWORD}
    bouncer = Bouncer("", users)
    try:
        hba = Path(bouncer.dir) / "hba.conf"
        hba.write_text(HBA)
        ini = BOUNCER_INI.replace("{pgport}", str(pg.port)).replace("{hba}", str(hba))
        bouncer.write_ini(ini)
        bouncer.start()
        pooler = pooler_factory(ini, userlist=users, filename="pgbouncer.ini")
        cases = [(APP_USER, None), ("rejected", "x"), ("nobody", "x"), (MD5_USER, MD5_PASSWORD),
                 (MD5_USER, "wrong"), (SUPERUSER, SUPERUSER_PASSWORD)]
        for user, password in cases:
            theirs = _login(bouncer, user, password)
            ours = _login(pooler, user, password)
            # (1.18 leaves the user name out of a failed password; ours is PostgreSQL's
            # wording, as for every auth_type: the same start)
            assert ours == theirs or ours.startswith(theirs), (user, ours, theirs)
        assert _sqlstate(bouncer, "rejected") == _sqlstate(pooler, "rejected") == "08P01"
        assert _sqlstate(bouncer, "nobody") == _sqlstate(pooler, "nobody") == "08P01"
    finally:
        bouncer.stop()


def test_cert_side_by_side_with_pgbouncer(pg, pooler_factory, certs):  # noqa: F811
    require_pgbouncer()
    users = {APP_USER: APP_PASSWORD, MD5_USER: MD5_PASSWORD}
    bouncer = Bouncer("", users)
    try:
        for name in ("server.crt", "server.key", "ca.crt"):      # readable by its OS user
            shutil.copy(certs[name], Path(bouncer.dir) / name)
        ini = (BOUNCER_INI.replace("{pgport}", str(pg.port)).replace("auth_type = hba", "auth_type = cert")
               .replace("auth_hba_file = {hba}\n", "")
               + f"client_tls_sslmode = verify-full\nclient_tls_key_file = {bouncer.dir}/server.key\n"
                 f"client_tls_cert_file = {bouncer.dir}/server.crt\n"
                 f"client_tls_ca_file = {bouncer.dir}/ca.crt\n")
        bouncer.write_ini(ini)
        bouncer.start()
        pooler = pooler_factory(ini, userlist=users, filename="pgbouncer.ini")
        with_cert = {"sslmode": "require", "sslcert": certs["client.crt"],
                     "sslkey": certs["client.key"]}
        for user in (APP_USER, MD5_USER):
            theirs = _login(bouncer, user, **with_cert)
            ours = _login(pooler, user, **with_cert)
            assert ours == theirs, (user, ours, theirs)
        assert _login(pooler, MD5_USER, **with_cert) == "certificate authentication failed"
    finally:
        bouncer.stop()


def test_hostssl_and_peer_side_by_side_with_pgbouncer(pg, pooler_factory, certs):  # noqa: F811
    require_pgbouncer()
    users = {APP_USER: APP_PASSWORD, MD5_USER: MD5_PASSWORD}
    bouncer = Bouncer("", users)
    try:
        d = Path(bouncer.dir)
        for name in ("server.crt", "server.key"):
            shutil.copy(certs[name], d / name)
        (d / "hba.conf").write_text("local     all all             peer\n"
                                    "hostssl   all md5user 127.0.0.1/32 md5\n"
                                    "hostnossl all md5user 127.0.0.1/32 reject\n"
                                    "hostnossl all app     127.0.0.1/32 trust\n"
                                    "hostssl   all app     127.0.0.1/32 reject\n")
        ini = (BOUNCER_INI.replace("{pgport}", str(pg.port)).replace("{hba}", str(d / "hba.conf"))
               + f"client_tls_sslmode = prefer\nclient_tls_key_file = {d}/server.key\n"
                 f"client_tls_cert_file = {d}/server.crt\n")
        bouncer.write_ini(ini.replace("unix_socket_dir =", f"unix_socket_dir = {d}"))
        bouncer.start()
        sock = d.parent / f"pooler-sock-{bouncer.port}"
        sock.mkdir(exist_ok=True)
        pooler = pooler_factory(ini.replace("unix_socket_dir =", f"unix_socket_dir = {sock}"),
                                userlist=users, filename="pgbouncer.ini")
        cases = [(MD5_USER, MD5_PASSWORD, "require"), (MD5_USER, MD5_PASSWORD, "disable"),
                 (APP_USER, None, "disable"), (APP_USER, None, "require")]
        for user, password, mode in cases:
            theirs = _login(bouncer, user, password, sslmode=mode)
            ours = _login(pooler, user, password, sslmode=mode)
            assert ours == theirs, (user, mode, ours, theirs)
        # peer: the test's OS user (root) is not `app`, for either
        theirs = _login(bouncer, APP_USER, host=str(d))
        ours = _login(pooler, APP_USER, host=str(sock))
        assert ours == theirs == "unix socket login rejected", (ours, theirs)
        shutil.rmtree(sock, ignore_errors=True)
    finally:
        bouncer.stop()
