"""A tiny PostgreSQL v3 wire-protocol client for tests that need what drivers
hide: SQLSTATEs of login failures, malformed startup packets, SSL/GSS
requests, BackendKeyData, raw CancelRequests, closing a socket mid-query,
pipelines of extended-protocol messages sent before anything is read.

Written from the protocol documentation, independent of the pooler's own
code (its SCRAM client included), so it can catch the pooler's mistakes.

    c = RawConn(host, port)
    info = c.login("app", "apppass", "app")      # raises PgError on ErrorResponse
    rows, err = c.query("SELECT 1")
    assert c.rows("SELECT 1") == [["1"]]         # AssertionError on an ErrorResponse
    msgs = c.exchange(parse("s", "SELECT $1::int") + bind("s", (1,)) + execute() + SYNC)
    assert types_of(msgs) == "12DCZ" and rows_of(msgs) == [["1"]]
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


class Closed(ConnectionError):
    """The peer closed the connection."""


# ------------------------------------------------------------------ parsing bodies
def error_fields(body: bytes) -> dict[str, str]:
    """Fields of an ErrorResponse/NoticeResponse body by their code letter."""
    out: dict[str, str] = {}
    pos = 0
    while pos < len(body) and body[pos] != 0:
        end = body.index(b"\0", pos + 1)
        out[chr(body[pos])] = body[pos + 1:end].decode("utf-8", "replace")
        pos = end + 1
    return out


def data_row(body: bytes) -> list[str | None]:
    """The values of a DataRow body, as text (None for NULL)."""
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
    return row


# A list of (type, body) messages as read by RawConn.read_msg / until_ready / exchange.
def types_of(msgs) -> str:
    """The message types in order, e.g. "12DCZ"."""
    return "".join(t for t, _ in msgs)


def rows_of(msgs) -> list[list[str | None]]:
    return [data_row(b) for t, b in msgs if t == "D"]


def error_of(msgs) -> dict[str, str] | None:
    """Fields of the first ErrorResponse, or None."""
    for t, b in msgs:
        if t == "E":
            return error_fields(b)
    return None


def show(msgs) -> list:
    """Readable form for assertion messages (and for comparing two answers)."""
    out = []
    for t, b in msgs:
        if t == "E":
            f = error_fields(b)
            out.append(("E", f.get("C"), f.get("M")))
        elif t == "D":
            out.append(("D", data_row(b)))
        else:
            out.append((t, b))
    return out


def count_ready(payload: bytes) -> int:
    """How many ReadyForQuery answers `payload` (its Query and Sync messages) will get."""
    n = pos = 0
    while pos < len(payload):
        if payload[pos] in (ord("Q"), ord("S")):
            n += 1
        pos += 1 + struct.unpack_from("!i", payload, pos + 1)[0]
    return n


# ------------------------------------------------------------------ building messages
def startup_packet(params: dict[str, str], protocol: int = PROTOCOL_V3) -> bytes:
    body = struct.pack("!i", protocol) + b"".join(
        k.encode() + b"\0" + v.encode() + b"\0" for k, v in params.items()) + b"\0"
    return struct.pack("!i", len(body) + 4) + body


def cancel_packet(pid: int, key: int) -> bytes:
    return struct.pack("!iiii", 16, CANCEL_REQUEST, pid, key)


def message(mtype: bytes, body: bytes = b"") -> bytes:
    return mtype + struct.pack("!i", len(body) + 4) + body


def cstr(s: str | bytes) -> bytes:
    return (s.encode() if isinstance(s, str) else s) + b"\0"


def query(sql: str) -> bytes:
    """Query (simple protocol)."""
    return message(b"Q", cstr(sql))


def parse(name: str, sql: str, types: tuple[int, ...] = ()) -> bytes:
    """Parse of statement `name` ("" = unnamed) with parameter type OIDs `types`."""
    return message(b"P", cstr(name) + cstr(sql) + struct.pack("!h", len(types))
                   + b"".join(struct.pack("!i", t) for t in types))


def bind(stmt: str, params: tuple = (), portal: str = "") -> bytes:
    """Bind with text parameters (None = NULL, bytes sent as they are) and text results."""
    body = cstr(portal) + cstr(stmt) + struct.pack("!h", 0) + struct.pack("!h", len(params))
    for p in params:
        if p is None:
            body += struct.pack("!i", -1)
        else:
            b = p if isinstance(p, bytes) else str(p).encode()
            body += struct.pack("!i", len(b)) + b
    return message(b"B", body + struct.pack("!h", 0))


def execute(portal: str = "", max_rows: int = 0) -> bytes:
    return message(b"E", cstr(portal) + struct.pack("!i", max_rows))


def describe(kind: str, name: str) -> bytes:
    """Describe of a statement (kind "S") or a portal ("P")."""
    return message(b"D", kind.encode() + cstr(name))


def close(kind: str, name: str) -> bytes:
    """Close of a statement (kind "S") or a portal ("P")."""
    return message(b"C", kind.encode() + cstr(name))


SYNC = message(b"S")
FLUSH = message(b"H")
TERMINATE = message(b"X")


def send_cancel(host: str, port: int, pid: int, key: int) -> None:
    """Send a CancelRequest on a fresh connection and wait for the pooler to close it."""
    with socket.create_connection((host, port), timeout=5) as s:
        s.sendall(cancel_packet(pid, key))
        try:
            s.recv(1)          # EOF once the request has been handled
        except OSError:
            pass


# ------------------------------------------------------------------ the connection
class RawConn:
    def __init__(self, host: str, port: int, timeout: float = 10.0) -> None:
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.buf = b""
        self.params: dict[str, str] = {}
        self.backend_key: tuple[int, int] | None = None
        self.status: str | None = None

    @property
    def pid(self) -> int:
        """The process id of BackendKeyData (0 before it came)."""
        return self.backend_key[0] if self.backend_key else 0

    # -- bytes --------------------------------------------------------------
    def send(self, *parts: bytes) -> None:
        """Send the parts in one sendall (a pipeline: nothing is read)."""
        self.sock.sendall(b"".join(parts))

    def _need(self, n: int) -> None:
        while len(self.buf) < n:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise Closed(f"connection closed by the peer; pending {self.buf[:200]!r}")
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

    def until_ready(self, n: int = 1) -> list[tuple[str, bytes]]:
        """Every message up to and including the n-th ReadyForQuery."""
        out = []
        while n:
            t, body = self.read_msg()
            out.append((t, body))
            if t == "Z":
                self.status = body.decode()
                n -= 1
        return out

    def exchange(self, payload: bytes) -> list[tuple[str, bytes]]:
        """Send `payload` (any messages) and read every answer up to its last ReadyForQuery."""
        self.send(payload)
        return self.until_ready(count_ready(payload))

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
        after AuthenticationOk. Raises PgError on an ErrorResponse; password None
        means trust (AssertionError if a password is asked for)."""
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
                if code != 0 and password is None:
                    raise AssertionError(f"auth request {code} but no password given (trust expected)")
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
        self.send(query(sql))

    def read_result(self) -> tuple[list[list[str | None]], PgError | None]:
        """Rows (text) and the error, if any, up to ReadyForQuery."""
        msgs = self.until_ready()
        err = None
        for t, body in msgs:
            if t == "E":
                err = PgError(error_fields(body))
        return rows_of(msgs), err

    def query(self, sql: str) -> tuple[list[list[str | None]], PgError | None]:
        self.send_query(sql)
        return self.read_result()

    def rows(self, sql: str) -> list[list[str | None]]:
        """The rows of a simple query; AssertionError if it answers with an error."""
        self.send_query(sql)
        msgs = self.until_ready()
        errors = [error_fields(b) for t, b in msgs if t == "E"]
        assert not errors, errors
        return rows_of(msgs)

    def scalar(self, sql: str) -> str | None:
        """First column of the first row of a simple query (text), or None; AssertionError
        on an error."""
        rows = self.rows(sql)
        return rows[0][0] if rows else None

    def terminate(self) -> None:
        """Send Terminate (if the socket still takes it) and close."""
        try:
            self.send(TERMINATE)
        except OSError:
            pass
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
