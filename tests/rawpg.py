"""A tiny PostgreSQL v3 wire-protocol client for tests that need what drivers
hide: SQLSTATEs of login failures, malformed startup packets, SSL/GSS
requests, BackendKeyData, raw CancelRequests, closing a socket mid-query.

Written from the protocol documentation, independent of the pooler's own
code (its SCRAM client included), so it can catch the pooler's mistakes.

    c = RawConn(host, port)
    info = c.login("app", "apppass", "app")      # raises PgError on ErrorResponse
    rows, err = c.query("SELECT 1")
"""
from __future__ import annotations

import base64
import hashlib
import hmac
import os
import socket
import struct

PROTOCOL_V3 = 196608
SSL_REQUEST = 80877103
GSSENC_REQUEST = 80877104
CANCEL_REQUEST = 80877102


class PgError(Exception):
    """An ErrorResponse: .fields by code letter, .sqlstate, .message."""

    def __init__(self, fields: dict[str, str]):
        self.fields = fields
        self.sqlstate = fields.get("C", "")
        self.message = fields.get("M", "")
        super().__init__(f"{fields.get('S', '?')} {self.sqlstate}: {self.message}")


class Closed(Exception):
    """The peer closed the connection."""


def error_fields(body: bytes) -> dict[str, str]:
    out: dict[str, str] = {}
    pos = 0
    while pos < len(body) and body[pos] != 0:
        end = body.index(b"\0", pos + 1)
        out[chr(body[pos])] = body[pos + 1:end].decode("utf-8", "replace")
        pos = end + 1
    return out


def startup_packet(params: dict[str, str], protocol: int = PROTOCOL_V3) -> bytes:
    body = struct.pack("!i", protocol) + b"".join(
        k.encode() + b"\0" + v.encode() + b"\0" for k, v in params.items()) + b"\0"
    return struct.pack("!i", len(body) + 4) + body


def cancel_packet(pid: int, key: int) -> bytes:
    return struct.pack("!iiii", 16, CANCEL_REQUEST, pid, key)


def message(mtype: bytes, body: bytes = b"") -> bytes:
    return mtype + struct.pack("!i", len(body) + 4) + body


def send_cancel(host: str, port: int, pid: int, key: int) -> None:
    """Send a CancelRequest on a fresh connection and wait for the pooler to close it."""
    with socket.create_connection((host, port), timeout=5) as s:
        s.sendall(cancel_packet(pid, key))
        try:
            s.recv(1)          # EOF once the request has been handled
        except OSError:
            pass


class RawConn:
    def __init__(self, host: str, port: int, timeout: float = 10.0) -> None:
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.buf = b""
        self.params: dict[str, str] = {}
        self.backend_key: tuple[int, int] | None = None
        self.status: str | None = None

    # -- bytes --------------------------------------------------------------
    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _need(self, n: int) -> None:
        while len(self.buf) < n:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise Closed("connection closed by the pooler")
            self.buf += chunk

    def read_byte(self) -> bytes:
        self._need(1)
        b, self.buf = self.buf[:1], self.buf[1:]
        return b

    def read_msg(self) -> tuple[str, bytes]:
        self._need(5)
        mtype = chr(self.buf[0])
        (length,) = struct.unpack_from("!i", self.buf, 1)
        self._need(1 + length)
        body = self.buf[5:1 + length]
        self.buf = self.buf[1 + length:]
        return mtype, body

    def read_error(self) -> PgError:
        """Read until an ErrorResponse (returned) or EOF (Closed)."""
        while True:
            t, body = self.read_msg()
            if t == "E":
                return PgError(error_fields(body))

    def at_eof(self, timeout: float = 5.0) -> bool:
        """True when the peer closes the connection within `timeout` (data is skipped)."""
        self.sock.settimeout(timeout)
        try:
            while True:
                if not self.sock.recv(65536):
                    return True
        except ConnectionResetError:
            return True
        except socket.timeout:
            return False

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass

    def __enter__(self) -> "RawConn":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- login ----------------------------------------------------------------
    def startup(self, user: str, database: str, **extra: str) -> None:
        self.send(startup_packet({"user": user, "database": database, **extra}))

    def login(self, user: str, password: str | None, database: str, **extra: str) -> list[tuple[str, bytes]]:
        """Startup + authentication until ReadyForQuery; returns every message
        after AuthenticationOk. Raises PgError on an ErrorResponse."""
        self.startup(user, database, **extra)
        return self.finish_login(user, password)

    def finish_login(self, user: str, password: str | None) -> list[tuple[str, bytes]]:
        scram = None
        after_ok: list[tuple[str, bytes]] = []
        authed = False
        while True:
            t, body = self.read_msg()
            if t == "E":
                raise PgError(error_fields(body))
            if t == "R":
                (code,) = struct.unpack_from("!i", body)
                if code == 0:
                    authed = True
                elif code == 3:
                    self.send(message(b"p", password.encode() + b"\0"))
                elif code == 5:
                    inner = hashlib.md5(password.encode() + user.encode()).hexdigest()
                    outer = hashlib.md5(inner.encode() + body[4:8]).hexdigest()
                    self.send(message(b"p", b"md5" + outer.encode() + b"\0"))
                elif code == 10:
                    assert b"SCRAM-SHA-256\0" in body[4:], body
                    scram = _Scram(password)
                    first = scram.client_first()
                    self.send(message(b"p", b"SCRAM-SHA-256\0" + struct.pack("!i", len(first)) + first))
                elif code == 11:
                    self.send(message(b"p", scram.client_final(body[4:])))
                elif code == 12:
                    scram.verify(body[4:])
                else:
                    raise AssertionError(f"unexpected auth request {code}")
                continue
            if not authed:
                raise AssertionError(f"message {t!r} before AuthenticationOk")
            after_ok.append((t, body))
            if t == "S":
                name, value, _ = body.split(b"\0", 2)
                self.params[name.decode()] = value.decode()
            elif t == "K":
                self.backend_key = struct.unpack("!ii", body[:8])
            elif t == "Z":
                self.status = body.decode()
                return after_ok

    # -- queries ----------------------------------------------------------------
    def send_query(self, sql: str) -> None:
        self.send(message(b"Q", sql.encode() + b"\0"))

    def read_result(self) -> tuple[list[list[str | None]], PgError | None]:
        """Rows (text) and the error, if any, up to ReadyForQuery."""
        rows: list[list[str | None]] = []
        err: PgError | None = None
        while True:
            t, body = self.read_msg()
            if t == "D":
                (n,) = struct.unpack_from("!h", body)
                pos, row = 2, []
                for _ in range(n):
                    (ln,) = struct.unpack_from("!i", body, pos)
                    pos += 4
                    if ln < 0:
                        row.append(None)
                    else:
                        row.append(body[pos:pos + ln].decode())
                        pos += ln
                rows.append(row)
            elif t == "E":
                err = PgError(error_fields(body))
            elif t == "Z":
                self.status = body.decode()
                return rows, err

    def query(self, sql: str) -> tuple[list[list[str | None]], PgError | None]:
        self.send_query(sql)
        return self.read_result()

    def terminate(self) -> None:
        self.send(message(b"X"))
        self.close()


class _Scram:
    """Client side of SCRAM-SHA-256 (RFC 5802/7677), no channel binding."""

    def __init__(self, password: str) -> None:
        self.password = password.encode()
        self.nonce = base64.b64encode(os.urandom(18))
        self.first_bare = b"n=,r=" + self.nonce
        self.server_sig = b""

    def client_first(self) -> bytes:
        return b"n,," + self.first_bare

    def client_final(self, server_first: bytes) -> bytes:
        attrs = dict(kv.split(b"=", 1) for kv in server_first.split(b","))
        assert attrs[b"r"].startswith(self.nonce), "server nonce must extend ours"
        salted = hashlib.pbkdf2_hmac("sha256", self.password, base64.b64decode(attrs[b"s"]),
                                     int(attrs[b"i"]))
        client_key = hmac.new(salted, b"Client Key", hashlib.sha256).digest()
        stored = hashlib.sha256(client_key).digest()
        without_proof = b"c=biws,r=" + attrs[b"r"]
        auth_msg = self.first_bare + b"," + server_first + b"," + without_proof
        sig = hmac.new(stored, auth_msg, hashlib.sha256).digest()
        proof = bytes(a ^ b for a, b in zip(client_key, sig))
        server_key = hmac.new(salted, b"Server Key", hashlib.sha256).digest()
        self.server_sig = hmac.new(server_key, auth_msg, hashlib.sha256).digest()
        return without_proof + b",p=" + base64.b64encode(proof)

    def verify(self, server_final: bytes) -> None:
        assert server_final.startswith(b"v="), server_final
        assert base64.b64decode(server_final[2:]) == self.server_sig, "bad server signature"
