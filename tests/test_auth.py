"""Tests for pooler.auth: SCRAM-SHA-256, md5, SASLprep and userlist parsing.

Everything runs without a server except TestRealServer, which starts a
throwaway PostgreSQL 15 cluster and logs in over the raw wire protocol.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import tempfile
import time

import pytest

from pooler.wire.authsecret import AuthFailed, parse_scram_secret, secret_kind
from pooler.wire.passwords import md5_challenge_response, md5_secret, verify_md5, verify_plain
from pooler.wire.scram import ScramClient, ScramServer, saslprep, scram_secret
from pooler.wire.userlist import load_userlist, parse_userlist

# RFC 7677 section 3 example exchange (user "user", password "pencil").
RFC_CLIENT_NONCE = b"rOprNGfwEbeRWgbNEkqO"
RFC_SERVER_NONCE = b"%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0"
RFC_SALT = base64.b64decode("W22ZaJ0SNY7soEsUEjb6gQ==")
RFC_C1 = b"n,,n=user,r=rOprNGfwEbeRWgbNEkqO"
RFC_S1 = (
    b"r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,"
    b"s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096"
)
RFC_C2 = (
    b"c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,"
    b"p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ="
)
RFC_S2 = b"v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4="


def exchange(client: ScramClient, server: ScramServer) -> None:
    """Run a full SCRAM conversation in memory."""
    server_first = server.server_first(client.client_first())
    server_final = server.server_final(client.client_final(server_first))
    client.verify_server_final(server_final)


# ---------------------------------------------------------------------------
# SCRAM


class TestRfc7677Vector:
    def test_client(self):
        client = ScramClient("pencil", nonce=RFC_CLIENT_NONCE, username="user")
        assert client.client_first() == RFC_C1
        assert client.client_final(RFC_S1) == RFC_C2
        client.verify_server_final(RFC_S2)

    def test_server(self):
        secret = scram_secret("pencil", salt=RFC_SALT, iterations=4096)
        server = ScramServer(secret, nonce=RFC_SERVER_NONCE)
        assert server.server_first(RFC_C1) == RFC_S1
        assert server.client_key is None
        assert server.server_final(RFC_C2) == RFC_S2
        assert hashlib.sha256(server.client_key).digest() == parse_scram_secret(secret)[2]
        assert (server.iterations, server.salt) == (4096, RFC_SALT)

    def test_server_with_plain_secret_uses_fresh_salt(self):
        server = ScramServer("pencil", nonce=RFC_SERVER_NONCE)
        first = server.server_first(RFC_C1)
        assert first.startswith(b"r=" + RFC_CLIENT_NONCE + RFC_SERVER_NONCE + b",s=")
        assert first.endswith(b",i=4096")
        assert len(server.salt) == 16

    def test_client_rejects_bad_server_signature(self):
        client = ScramClient("pencil", nonce=RFC_CLIENT_NONCE, username="user")
        client.client_first()
        client.client_final(RFC_S1)
        bad = b"v=" + base64.b64encode(b"\x00" * 32)
        with pytest.raises(AuthFailed, match="signature"):
            client.verify_server_final(bad)

    def test_client_reports_server_error(self):
        client = ScramClient("pencil", nonce=RFC_CLIENT_NONCE, username="user")
        client.client_first()
        client.client_final(RFC_S1)
        with pytest.raises(AuthFailed, match="invalid-proof"):
            client.verify_server_final(b"e=invalid-proof")

    def test_client_final_wrong_password_differs(self):
        client = ScramClient("pencil2", nonce=RFC_CLIENT_NONCE, username="user")
        client.client_first()
        assert client.client_final(RFC_S1) != RFC_C2


class TestRoundTrip:
    def test_plain_secret(self):
        server = ScramServer("s3cret")
        exchange(ScramClient("s3cret"), server)
        assert server.client_key is not None

    def test_scram_secret(self):
        exchange(ScramClient("s3cret"), ScramServer(scram_secret("s3cret")))

    def test_custom_iterations(self):
        server = ScramServer(scram_secret("s3cret", iterations=10))
        exchange(ScramClient("s3cret"), server)
        assert server.iterations == 10

    @pytest.mark.parametrize("secret", ["s3cret", scram_secret("s3cret")])
    def test_wrong_password(self, secret):
        client, server = ScramClient("wrong"), ScramServer(secret)
        final = client.client_final(server.server_first(client.client_first()))
        with pytest.raises(AuthFailed) as exc:
            server.server_final(final)
        assert str(exc.value) == "password authentication failed"
        assert server.client_key is None

    def test_no_second_attempt(self):
        client, server = ScramClient("s3cret"), ScramServer("s3cret")
        final = client.client_final(server.server_first(client.client_first()))
        server.server_final(final)
        with pytest.raises(AuthFailed):
            server.server_final(final)

    def test_saslprep_applied_on_both_sides(self):
        # U+2168 ROMAN NUMERAL NINE normalizes (NFKC) to "IX"; the soft hyphen
        # is mapped to nothing.
        exchange(ScramClient("I\u00adX"), ScramServer(scram_secret("\u2168")))

    def test_pass_through(self):
        secret = scram_secret("hunter2")
        front = ScramServer(secret)
        exchange(ScramClient("hunter2"), front)
        assert front.client_key is not None
        backend = ScramServer(secret)  # e.g. PostgreSQL holding the same secret
        relay = ScramClient(client_key=front.client_key, server_key=front.server_key)
        exchange(relay, backend)
        assert backend.client_key == front.client_key

    def test_pass_through_needs_same_salt(self):
        front = ScramServer(scram_secret("hunter2"))
        exchange(ScramClient("hunter2"), front)
        relay = ScramClient(client_key=front.client_key, server_key=front.server_key)
        backend = ScramServer(scram_secret("hunter2"))  # different random salt
        final = relay.client_final(backend.server_first(relay.client_first()))
        with pytest.raises(AuthFailed, match="password authentication failed"):
            backend.server_final(final)


class TestScramServerProtocol:
    def test_md5_secret_cannot_do_scram(self):
        with pytest.raises(AuthFailed):
            ScramServer(md5_secret("u", "p"))

    def test_channel_binding_rejected(self):
        server = ScramServer("x")
        with pytest.raises(AuthFailed, match="channel binding"):
            server.server_first(b"p=tls-server-end-point,,n=,r=abc")

    def test_y_flag_accepted_and_checked_in_final(self):
        server = ScramServer(scram_secret("pw"))
        client = ScramClient("pw")
        first = client.client_first()
        assert first.startswith(b"n,,")
        server_first = server.server_first(b"y,," + first[3:])
        final = client.client_final(server_first)  # sends c=biws ("n,,")
        with pytest.raises(AuthFailed, match="channel binding"):
            server.server_final(final)

    @pytest.mark.parametrize(
        "msg",
        [
            b"",
            b"n,",
            b"x,,n=,r=abc",
            b"n,a=admin,n=,r=abc",
            b"n,,m=ext,n=,r=abc",
            b"n,,n=",
            b"n,,r=abc,n=",
            b"n,,n=,r=",
            b"n,,n=,r=a\x7fb",
            b"n,,n=,r=abc\x00",
            b"n,,garbage",
        ],
    )
    def test_bad_client_first(self, msg):
        with pytest.raises(AuthFailed):
            ScramServer("x").server_first(msg)

    def test_extensions_ignored(self):
        server = ScramServer("x", nonce=b"SRV")
        out = server.server_first(b"n,,n=someone,r=abc,x=ext")
        assert out.startswith(b"r=abcSRV,s=")

    def _final_parts(self):
        client, server = ScramClient("pw"), ScramServer("pw")
        final = client.client_final(server.server_first(client.client_first()))
        return server, final

    @pytest.mark.parametrize(
        "mangle",
        [
            lambda f: f.replace(b"c=biws", b"c=eSws"),  # "y,," instead of "n,,"
            lambda f: f.replace(b"c=biws", b"c=!!"),
            lambda f: re.sub(rb"r=[^,]+", b"r=other", f),
            lambda f: f[: f.index(b",p=")],
            lambda f: f[: f.index(b",p=")] + b",p=AAAA",
            lambda f: f[: f.index(b",p=")] + b",p=not base64",
        ],
    )
    def test_bad_client_final(self, mangle):
        server, final = self._final_parts()
        with pytest.raises(AuthFailed):
            server.server_final(mangle(final))

    def test_final_before_first(self):
        with pytest.raises(AuthFailed):
            ScramServer("x").server_final(b"c=biws,r=x,p=AAAA")


class TestScramClientProtocol:
    def test_client_first_format(self):
        client = ScramClient("pw")
        first = client.client_first()
        m = re.fullmatch(rb"n,,n=,r=([A-Za-z0-9+/=]+)", first)
        assert m and len(base64.b64decode(m.group(1))) == 18
        assert client.mechanism == "SCRAM-SHA-256"

    def test_username_escaped(self):
        client = ScramClient("pw", username="a=b,c", nonce=b"N")
        assert client.client_first() == b"n,,n=a=3Db=2Cc,r=N"

    def test_nonces_are_random(self):
        assert ScramClient("pw").client_first() != ScramClient("pw").client_first()

    @pytest.mark.parametrize(
        "server_first",
        [
            b"r=EVILxyz,s=QUJD,i=4096",  # does not start with our nonce
            b"r=N,s=QUJD,i=4096",  # server added nothing
            b"r=Nxyz,s=QUJD,i=0",
            b"r=Nxyz,s=QUJD,i=-1",
            b"r=Nxyz,s=QUJD,i=abc",
            b"r=Nxyz,s=QUJD,i=99999999999",
            b"r=Nxyz,s=,i=4096",
            b"r=Nxyz,s=***,i=4096",
            b"r=Nxyz,i=4096",
            b"m=ext,r=Nxyz,s=QUJD,i=4096",
            b"e=other-error",
        ],
    )
    def test_bad_server_first(self, server_first):
        client = ScramClient("pw", nonce=b"N")
        client.client_first()
        with pytest.raises(AuthFailed):
            client.client_final(server_first)

    def test_out_of_order(self):
        client = ScramClient("pw", nonce=b"N")
        with pytest.raises(AuthFailed):
            client.client_final(b"r=Nxyz,s=QUJD,i=4096")
        with pytest.raises(AuthFailed):
            client.verify_server_final(b"v=AAAA")

    @pytest.mark.parametrize(
        "kwargs",
        [
            {},
            {"password": "pw", "client_key": b"k" * 32, "server_key": b"k" * 32},
            {"client_key": b"k" * 32},
            {"client_key": b"k" * 31, "server_key": b"k" * 32},
        ],
    )
    def test_constructor_validation(self, kwargs):
        with pytest.raises(ValueError):
            ScramClient(**kwargs)


# ---------------------------------------------------------------------------
# secrets


class TestScramSecret:
    def test_format_and_parse(self):
        secret = scram_secret("pencil", salt=RFC_SALT)
        assert re.fullmatch(r"SCRAM-SHA-256\$4096:[A-Za-z0-9+/=]+\$[A-Za-z0-9+/=]+:[A-Za-z0-9+/=]+", secret)
        iterations, salt, stored_key, server_key = parse_scram_secret(secret)
        assert (iterations, salt) == (4096, RFC_SALT)
        # Independent derivation (RFC 5802 section 3).
        salted = hashlib.pbkdf2_hmac("sha256", b"pencil", RFC_SALT, 4096)
        client_key = hmac.new(salted, b"Client Key", "sha256").digest()
        assert stored_key == hashlib.sha256(client_key).digest()
        assert server_key == hmac.new(salted, b"Server Key", "sha256").digest()

    def test_random_salt(self):
        assert scram_secret("pw") != scram_secret("pw")
        assert len(parse_scram_secret(scram_secret("pw"))[1]) == 16

    @pytest.mark.parametrize(
        "secret",
        [
            "pencil",
            "SCRAM-SHA-256$",
            "SCRAM-SHA-256$4096:QUJD$AAAA:AAAA",  # keys too short
            "SCRAM-SHA-1$4096:QUJD$" + "A" * 43 + "=:" + "A" * 43 + "=",
            "SCRAM-SHA-256$0:QUJD$" + "A" * 43 + "=:" + "A" * 43 + "=",
            "SCRAM-SHA-256$x:QUJD$" + "A" * 43 + "=:" + "A" * 43 + "=",
            "SCRAM-SHA-256$4096:$" + "A" * 43 + "=:" + "A" * 43 + "=",
            "SCRAM-SHA-256$4096:Q!JD$" + "A" * 43 + "=:" + "A" * 43 + "=",
            "SCRAM-SHA-256$4096:QUJD$" + "A" * 43 + "=",
        ],
    )
    def test_parse_rejects(self, secret):
        assert parse_scram_secret(secret) is None
        assert secret_kind(secret) == "plain"

    def test_parse_accepts_minimal(self):
        secret = "SCRAM-SHA-256$1:QUJD$" + "A" * 43 + "=:" + "A" * 43 + "="
        assert parse_scram_secret(secret) == (1, b"ABC", b"\0" * 32, b"\0" * 32)

    def test_bad_arguments(self):
        with pytest.raises(ValueError):
            scram_secret("pw", iterations=0)
        with pytest.raises(ValueError):
            scram_secret("pw", salt=b"")


class TestSecretKind:
    def test_kinds(self):
        assert secret_kind("pencil") == "plain"
        assert secret_kind("") == "plain"
        assert secret_kind(md5_secret("user", "pencil")) == "md5"
        assert secret_kind(scram_secret("pencil")) == "scram"

    def test_md5_lookalikes_are_plain(self):
        assert secret_kind("md5" + "A" * 32) == "plain"  # PostgreSQL wants lowercase
        assert secret_kind("md5" + "a" * 31) == "plain"
        assert secret_kind("md5" + "g" * 32) == "plain"


class TestSaslprep:
    @pytest.mark.parametrize(
        "password,expected",
        [
            ("pencil", b"pencil"),
            ("with\x07control", b"with\x07control"),  # ASCII is never touched
            ("I\u00adX", b"IX"),  # soft hyphen mapped to nothing
            ("a\u00a0b", b"a b"),  # non-ASCII space mapped to space
            ("a\u200bb", b"a b"),  # in C.1.2 and B.1: PostgreSQL maps it to space
            ("\u2168", b"IX"),  # NFKC
            ("\u00aa", b"a"),  # NFKC
            ("caf\u00e9", "caf\u00e9".encode()),
            ("\u05d0\u05d1", "\u05d0\u05d1".encode()),  # all RTL is fine
        ],
    )
    def test_prepared(self, password, expected):
        assert saslprep(password) == expected

    @pytest.mark.parametrize(
        "password",
        [
            "caf\u00e9\x07",  # prohibited control character
            "\u00e9\ue000",  # private use
            "\u05d0a",  # RandALCat mixed with LCat
            "\u05d01",  # RandALCat not at the end
            "\u00ad",  # empty after mapping
            "\u00e9\u0221",  # unassigned in Unicode 3.2
        ],
    )
    def test_failure_falls_back_to_raw(self, password):
        assert saslprep(password) == password.encode("utf-8")

    def test_undecodable_bytes_passed_through(self):
        password = b"\xff\xfeab".decode("utf-8", "surrogateescape")
        assert saslprep(password) == b"\xff\xfeab"


# ---------------------------------------------------------------------------
# md5 and cleartext


class TestMd5:
    SALT = b"\x01\x02\x03\x04"

    def test_md5_secret_known_value(self):
        expected = "md5" + hashlib.md5(b"penciluser").hexdigest()
        assert md5_secret("user", "pencil") == expected

    def test_challenge_response_known_value(self):
        inner = hashlib.md5(b"pencil" + b"user").hexdigest()
        expected = "md5" + hashlib.md5(inner.encode() + self.SALT).hexdigest()
        assert md5_challenge_response("pencil", "user", self.SALT) == expected
        stored = md5_secret("user", "pencil")
        assert md5_challenge_response(stored, "user", self.SALT) == expected

    def test_challenge_response_needs_no_scram(self):
        with pytest.raises(AuthFailed):
            md5_challenge_response(scram_secret("pencil"), "user", self.SALT)

    @pytest.mark.parametrize("secret", ["pencil", md5_secret("user", "pencil")])
    def test_verify(self, secret):
        good = md5_challenge_response("pencil", "user", self.SALT)
        assert verify_md5(secret, "user", self.SALT, good)
        assert not verify_md5(secret, "user", b"\x00\x00\x00\x00", good)
        if secret_kind(secret) == "plain":  # an md5 secret already embeds the user
            assert not verify_md5(secret, "other", self.SALT, good)
        wrong = md5_challenge_response("pencil!", "user", self.SALT)
        assert not verify_md5(secret, "user", self.SALT, wrong)
        assert not verify_md5(secret, "user", self.SALT, "md5\u00e9")
        assert not verify_md5(secret, "user", self.SALT, "")

    def test_verify_with_scram_secret_is_false(self):
        good = md5_challenge_response("pencil", "user", self.SALT)
        assert not verify_md5(scram_secret("pencil"), "user", self.SALT, good)


class TestVerifyPlain:
    @pytest.mark.parametrize(
        "secret",
        ["pencil", md5_secret("user", "pencil"), scram_secret("pencil", iterations=16)],
    )
    def test_all_kinds(self, secret):
        assert verify_plain(secret, "user", "pencil")
        assert not verify_plain(secret, "user", "pencil ")
        assert not verify_plain(secret, "user", "")

    def test_md5_is_user_salted(self):
        assert not verify_plain(md5_secret("user", "pencil"), "other", "pencil")

    def test_scram_uses_saslprep(self):
        assert verify_plain(scram_secret("\u2168", iterations=16), "user", "IX")


# ---------------------------------------------------------------------------
# userlist.txt


class TestUserlist:
    def test_parse(self):
        text = "\n".join(
            [
                '"alice" "secret1"',  # 1
                '',  # 2
                '; comment "x" "y"',  # 3
                '# comment "x" "y"',  # 4
                '   "bob"\t  "md5abc"  "ignored" trailing',  # 5
                '"say ""hi""" "pa""ss"',  # 6
                '"carol"',  # 7 bad: one field
                'dave "x"',  # 8 bad: unquoted
                '"eve" "unterminated',  # 9 bad
                '"frank""nospace"',  # 10 bad: one field containing a quote
                '"" "empty user"',  # 11 bad
                '"empty" ""',  # 12 ok: empty secret
                '   ; indented comment',  # 13
                '"alice" "secret2"',  # 14: last one wins
                '"sp ace" "with space"\r',  # 15
            ]
        )
        users, bad = parse_userlist(text)
        assert users == {
            "alice": "secret2",
            "bob": "md5abc",
            'say "hi"': 'pa"ss',
            "empty": "",
            "sp ace": "with space",
        }
        assert bad == [7, 8, 9, 10, 11]

    def test_empty(self):
        assert parse_userlist("") == ({}, [])

    def test_load(self, tmp_path, caplog):
        path = tmp_path / "userlist.txt"
        path.write_text('"u1" "SCRAM-SHA-256$x"\n"broken "topsecret\n"u2" "p2"\n', encoding="utf-8")
        with caplog.at_level(logging.WARNING, logger="pooler.auth"):
            users = load_userlist(str(path))
        assert users == {"u1": "SCRAM-SHA-256$x", "u2": "p2"}
        assert ":2:" in caplog.text
        assert "topsecret" not in caplog.text

    def test_load_non_utf8(self, tmp_path):
        path = tmp_path / "userlist.txt"
        path.write_bytes(b'"u" "p\xe9"\n')
        users = load_userlist(str(path))
        # The raw byte survives into the derived md5 secret.
        assert md5_secret("u", users["u"]) == "md5" + hashlib.md5(b"p\xe9u").hexdigest()


# ---------------------------------------------------------------------------
# real PostgreSQL 15


PG_BIN = "/usr/lib/postgresql/15/bin"

SCRAM_USER, SCRAM_PASSWORD = "scramuser", "pencil-Secret1"
MD5_USER, MD5_PASSWORD = "md5user", "md5-pencil"
UNI_USER, UNI_PASSWORD = "uniuser", "p\u00e4ss\u00adw\u00f6rd\u00a0\u2168"  # mapped + NFKC
RAW_USER, RAW_PASSWORD = "rawuser", "\u05d0abc"  # bidi violation: used raw
PT_USER, PT_PASSWORD = "ptuser", "pass-through"


def _sql_literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


class PgCluster:
    def __init__(self) -> None:
        self.base = tempfile.mkdtemp(prefix="pooler-auth-pg-")
        self.data = os.path.join(self.base, "data")
        self.port = self._free_port()
        self.proc: subprocess.Popen | None = None

    @staticmethod
    def _free_port() -> int:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]

    def _as_postgres(self, *args: str) -> None:
        cmd = ["runuser", "-u", "postgres", "--", *args]
        proc = subprocess.run(cmd, cwd=self.base, capture_output=True, text=True, timeout=120)
        if proc.returncode != 0:
            raise RuntimeError(f"{args[0]} failed: {proc.stdout}{proc.stderr}")

    def start(self) -> None:
        shutil.chown(self.base, "postgres", "postgres")
        self._as_postgres(
            f"{PG_BIN}/initdb", "-D", self.data, "-U", "postgres", "-A", "trust",
            "-E", "UTF8", "--locale=C", "--no-sync",
        )
        with open(os.path.join(self.data, "pg_hba.conf"), "w") as fh:
            fh.write(
                "local all all trust\n"
                f"host all {MD5_USER} 127.0.0.1/32 md5\n"
                "host all all 127.0.0.1/32 scram-sha-256\n"
            )
        # postgres runs as our (grand)child rather than daemonized by pg_ctl,
        # so that it is reaped when it exits instead of lingering as a zombie.
        self.log = open(os.path.join(self.base, "log"), "wb")
        self.proc = subprocess.Popen(
            ["runuser", "-u", "postgres", "--", f"{PG_BIN}/postgres", "-D", self.data,
             "-c", "listen_addresses=127.0.0.1", "-c", f"port={self.port}",
             "-c", f"unix_socket_directories={self.base}", "-c", "fsync=off"],
            cwd=self.base, stdout=self.log, stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 60
        while not self._ready():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                with open(os.path.join(self.base, "log")) as fh:
                    raise RuntimeError(f"postgres did not start: {fh.read()}")
            time.sleep(0.1)

    def _ready(self) -> bool:
        probe = subprocess.run(
            [f"{PG_BIN}/pg_isready", "-q", "-h", self.base, "-p", str(self.port)],
            capture_output=True, timeout=30,
        )
        return probe.returncode == 0

    def psql(self, sql: str) -> str:
        proc = subprocess.run(
            [f"{PG_BIN}/psql", "-X", "-A", "-t", "-q", "-v", "ON_ERROR_STOP=1",
             "-h", self.base, "-p", str(self.port), "-U", "postgres", "-d", "postgres"],
            input=sql, capture_output=True, text=True, timeout=60,
            env={**os.environ, "PGCLIENTENCODING": "UTF8"},
        )
        if proc.returncode != 0:
            raise RuntimeError(f"psql failed: {proc.stderr}")
        return proc.stdout.strip()

    def stored_secret(self, role: str) -> str:
        return self.psql(f"SELECT rolpassword FROM pg_authid WHERE rolname = {_sql_literal(role)};")

    def _kill_postmaster(self) -> None:
        """Fallback when pg_ctl cannot stop it: SIGQUIT (immediate shutdown)
        to the postmaster whose pid it recorded."""
        try:
            with open(os.path.join(self.data, "postmaster.pid")) as fh:
                os.kill(int(fh.readline()), signal.SIGQUIT)
        except (OSError, ValueError):
            pass

    def stop(self) -> None:
        if self.proc is not None:
            try:
                self._as_postgres(f"{PG_BIN}/pg_ctl", "-D", self.data, "-m", "immediate", "stop")
                self.proc.wait(timeout=30)
            except Exception:
                self._kill_postmaster()
                self.proc.wait(timeout=30)
            self.log.close()
        shutil.rmtree(self.base, ignore_errors=True)


@pytest.fixture(scope="module")
def pg():
    if not os.path.exists(f"{PG_BIN}/initdb"):
        pytest.fail(f"PostgreSQL 15 is required: {PG_BIN}/initdb not found (install postgresql-15)")
    cluster = PgCluster()
    try:
        cluster.start()
        cluster.psql(
            f"CREATE ROLE {SCRAM_USER} LOGIN PASSWORD {_sql_literal(SCRAM_PASSWORD)};\n"
            f"CREATE ROLE {UNI_USER} LOGIN PASSWORD {_sql_literal(UNI_PASSWORD)};\n"
            f"CREATE ROLE {RAW_USER} LOGIN PASSWORD {_sql_literal(RAW_PASSWORD)};\n"
            # A secret built by us: PostgreSQL stores pre-hashed secrets as is.
            f"CREATE ROLE {PT_USER} LOGIN PASSWORD {_sql_literal(scram_secret(PT_PASSWORD))};\n"
            "SET password_encryption = 'md5';\n"
            f"CREATE ROLE {MD5_USER} LOGIN PASSWORD {_sql_literal(MD5_PASSWORD)};\n"
        )
    except BaseException:
        cluster.stop()
        raise
    yield cluster
    cluster.stop()


# --- minimal frontend side of the wire protocol, just enough to log in ---


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("server closed the connection")
        buf += chunk
    return buf


def _read_message(sock: socket.socket) -> tuple[bytes, bytes]:
    header = _recv_exact(sock, 5)
    (length,) = struct.unpack("!i", header[1:])
    return header[:1], _recv_exact(sock, length - 4)


def _send(sock: socket.socket, kind: bytes, payload: bytes) -> None:
    sock.sendall(kind + struct.pack("!i", len(payload) + 4) + payload)


def _error_fields(payload: bytes) -> dict[str, str]:
    return {f[:1].decode(): f[1:].decode() for f in payload.split(b"\0") if f}


def pg_login(port: int, user: str, password: str | None = None,
             scram: ScramClient | None = None) -> str:
    """Log in; return "ok" on AuthenticationOk, else the error's SQLSTATE."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        body = struct.pack("!i", 196608) + b"user\0" + user.encode() + b"\0database\0postgres\0\0"
        sock.sendall(struct.pack("!i", len(body) + 4) + body)
        while True:
            kind, payload = _read_message(sock)
            if kind == b"E":
                return _error_fields(payload)["C"]
            assert kind == b"R", kind
            (code,) = struct.unpack("!i", payload[:4])
            data = payload[4:]
            if code == 0:  # AuthenticationOk
                _send(sock, b"X", b"")
                return "ok"
            if code == 5:  # AuthenticationMD5Password
                response = md5_challenge_response(password, user, data)
                _send(sock, b"p", response.encode() + b"\0")
            elif code == 10:  # AuthenticationSASL
                assert "SCRAM-SHA-256" in data.decode().split("\0")
                scram = scram or ScramClient(password)
                first = scram.client_first()
                _send(sock, b"p", scram.mechanism.encode() + b"\0" + struct.pack("!i", len(first)) + first)
            elif code == 11:  # AuthenticationSASLContinue
                _send(sock, b"p", scram.client_final(data))
            elif code == 12:  # AuthenticationSASLFinal
                scram.verify_server_final(data)
            else:
                raise AssertionError(f"unexpected auth request {code}")


class TestRealServer:
    def test_scram_login(self, pg):
        assert pg_login(pg.port, SCRAM_USER, SCRAM_PASSWORD) == "ok"

    def test_scram_wrong_password(self, pg):
        assert pg_login(pg.port, SCRAM_USER, "wrong") == "28P01"

    def test_our_secret_matches_postgres(self, pg):
        for user, password in [(SCRAM_USER, SCRAM_PASSWORD), (UNI_USER, UNI_PASSWORD),
                               (RAW_USER, RAW_PASSWORD)]:
            stored = pg.stored_secret(user)
            iterations, salt, _, _ = parse_scram_secret(stored)
            assert scram_secret(password, salt=salt, iterations=iterations) == stored, user
            assert verify_plain(stored, user, password)

    def test_saslprep_matches_postgres(self, pg):
        assert pg_login(pg.port, UNI_USER, UNI_PASSWORD) == "ok"
        assert pg_login(pg.port, UNI_USER, "p\u00e4ssw\u00f6rd IX") == "ok"  # already prepared
        assert pg_login(pg.port, RAW_USER, RAW_PASSWORD) == "ok"

    def test_postgres_accepts_our_secret(self, pg):
        assert pg_login(pg.port, PT_USER, PT_PASSWORD) == "ok"

    def test_pass_through(self, pg):
        # The pooler holds PostgreSQL's secret, authenticates a client with it
        # and logs in to the server with the keys recovered from the proof.
        front = ScramServer(pg.stored_secret(SCRAM_USER))
        exchange(ScramClient(SCRAM_PASSWORD), front)
        relay = ScramClient(client_key=front.client_key, server_key=front.server_key)
        assert pg_login(pg.port, SCRAM_USER, scram=relay) == "ok"

    def test_md5_login(self, pg):
        stored = pg.stored_secret(MD5_USER)
        assert stored == md5_secret(MD5_USER, MD5_PASSWORD)
        assert pg_login(pg.port, MD5_USER, MD5_PASSWORD) == "ok"
        assert pg_login(pg.port, MD5_USER, stored) == "ok"  # md5 secret, no password
        assert pg_login(pg.port, MD5_USER, "wrong") == "28P01"
