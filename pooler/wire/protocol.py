"""PostgreSQL wire protocol (v3): framing helpers and message builders.

No sockets and no state live here: everything takes and returns bytes, so the
relay, the client and server handshakes and the admin console share one
encoding of every message.
"""
from __future__ import annotations

import struct
from pooler.errors import PoolerError

PROTOCOL_V3 = 196608          # 3 << 16
SSL_REQUEST = 80877103
GSSENC_REQUEST = 80877104
CANCEL_REQUEST = 80877102
MAX_STARTUP_LEN = 10000       # PostgreSQL's own limit for a startup packet

_I32 = struct.Struct("!i")
_I16 = struct.Struct("!h")
_HDR = struct.Struct("!ci")   # type byte + length
unpack_i32 = _I32.unpack_from
pack_i32 = _I32.pack

# Authentication request codes (AuthenticationXXX, message 'R').
AUTH_OK = 0
AUTH_CLEARTEXT = 3
AUTH_MD5 = 5
AUTH_SASL = 10
AUTH_SASL_CONTINUE = 11
AUTH_SASL_FINAL = 12

# Message type bytes as ints, for comparing against bytearray items in the relay.
Q, P, B, E, D, C, H, S, F, X = (ord(c) for c in "QPBEDCHSFX")
Z = ord("Z")
COPY_DATA, COPY_DONE, COPY_FAIL = ord("d"), ord("c"), ord("f")


class ProtocolError(PoolerError):
    """Input that violates the protocol: answered with SQLSTATE 08P01."""

    def __init__(self, message: str) -> None:
        super().__init__("08P01", message)


def message(mtype: bytes, body: bytes = b"") -> bytes:
    """One typed message: type byte, int32 length (counting itself), body."""
    return _HDR.pack(mtype, len(body) + 4) + body


def cstr(s: str) -> bytes:
    return s.encode() + b"\0"


def read_cstr(buf: bytes | memoryview, pos: int) -> tuple[str, int]:
    """A NUL-terminated string at pos; returns (string, position after the NUL)."""
    end = bytes(buf[pos:]).index(b"\0") if isinstance(buf, memoryview) else buf.index(b"\0", pos)
    if isinstance(buf, memoryview):
        end += pos
    return bytes(buf[pos:end]).decode("utf-8", "replace"), end + 1


# ---- startup phase -------------------------------------------------------

def parse_startup(body: bytes) -> dict[str, str]:
    """Key/value pairs of a StartupMessage body (after the protocol version)."""
    if not body.endswith(b"\0"):
        raise ProtocolError("invalid startup packet layout: expected terminator as last byte")
    parts = body[:-1].split(b"\0")
    if parts and parts[-1] == b"":
        parts.pop()
    if len(parts) % 2:
        raise ProtocolError("invalid startup packet layout: odd number of strings")
    params: dict[str, str] = {}
    for i in range(0, len(parts), 2):
        try:
            params[parts[i].decode()] = parts[i + 1].decode()
        except UnicodeDecodeError as exc:
            raise ProtocolError("invalid startup packet: not UTF-8") from exc
    return params


def startup_message(params: dict[str, str]) -> bytes:
    body = pack_i32(PROTOCOL_V3) + b"".join(cstr(k) + cstr(v) for k, v in params.items()) + b"\0"
    return pack_i32(len(body) + 4) + body


def cancel_request(pid: int, key: int) -> bytes:
    return struct.pack("!iiii", 16, CANCEL_REQUEST, pid, key)


# ---- backend messages (what the pooler sends to clients) -----------------

def auth_request(code: int, data: bytes = b"") -> bytes:
    return message(b"R", pack_i32(code) + data)


def auth_ok() -> bytes:
    return auth_request(AUTH_OK)


def parameter_status(name: str, value: str) -> bytes:
    return message(b"S", cstr(name) + cstr(value))


def backend_key_data(pid: int, key: int) -> bytes:
    return message(b"K", struct.pack("!ii", pid, key))


def ready_for_query(status: bytes = b"I") -> bytes:
    return message(b"Z", status)


def error_response(sqlstate: str, msg: str, severity: str = "ERROR", detail: str | None = None) -> bytes:
    fields = [b"S" + cstr(severity), b"V" + cstr(severity), b"C" + cstr(sqlstate), b"M" + cstr(msg)]
    if detail:
        fields.append(b"D" + cstr(detail))
    return message(b"E", b"".join(fields) + b"\0")


def notice_response(msg: str, severity: str = "NOTICE", sqlstate: str = "00000") -> bytes:
    fields = b"S" + cstr(severity) + b"V" + cstr(severity) + b"C" + cstr(sqlstate) + b"M" + cstr(msg)
    return message(b"N", fields + b"\0")


def parse_error_fields(body: bytes) -> dict[str, str]:
    """Fields of an ErrorResponse/NoticeResponse body keyed by their code letter."""
    out: dict[str, str] = {}
    pos = 0
    while pos < len(body) and body[pos] != 0:
        code = chr(body[pos])
        end = body.index(b"\0", pos + 1)
        out[code] = body[pos + 1:end].decode("utf-8", "replace")
        pos = end + 1
    return out


def row_description(columns: list[tuple[str, int]]) -> bytes:
    """RowDescription for text-format columns given as (name, type oid)."""
    parts = [_I16.pack(len(columns))]
    for name, oid in columns:
        parts.append(cstr(name) + struct.pack("!ihihih", 0, 0, oid, -1, -1, 0))
    return message(b"T", b"".join(parts))


def data_row(values: list[object]) -> bytes:
    parts = [_I16.pack(len(values))]
    for v in values:
        if v is None:
            parts.append(pack_i32(-1))
        else:
            b = str(v).encode()
            parts.append(pack_i32(len(b)) + b)
    return message(b"D", b"".join(parts))


def command_complete(tag: str) -> bytes:
    return message(b"C", cstr(tag))


def empty_query_response() -> bytes:
    return message(b"I")


# ---- frontend messages (what the pooler sends to servers) ----------------

def query(sql: str) -> bytes:
    return message(b"Q", cstr(sql))


def password_message(data: bytes) -> bytes:
    return message(b"p", data)


def sasl_initial_response(mechanism: str, data: bytes) -> bytes:
    return message(b"p", cstr(mechanism) + pack_i32(len(data)) + data)


def terminate() -> bytes:
    return message(b"X")


def parse_msg(name: bytes, tail: bytes) -> bytes:
    """Parse with statement `name`; `tail` is the query + parameter types, as the client sent them."""
    return message(b"P", name + b"\0" + tail)


def close_statement(name: bytes) -> bytes:
    return message(b"C", b"S" + name + b"\0")


def sync() -> bytes:
    return message(b"S")
