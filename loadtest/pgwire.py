"""A minimal asyncio PostgreSQL client: startup and login only.

Enough to hold thousands of idle, authenticated client connections open
against a pooler without a driver per connection. Message framing comes from
pooler.protocol; the SCRAM-SHA-256 client side is written here (RFC 5802/7677)
because it caches the salted keys per (salt, iterations): every connection to
one pooler sees the same salt, and paying a 2 ms PBKDF2 per connection would
make the connect time measure this script rather than the pooler.
"""
from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import os
import struct
from functools import lru_cache

from pooler.wire import protocol

AUTH_OK, AUTH_CLEARTEXT, AUTH_MD5 = 0, 3, 5
AUTH_SASL, AUTH_SASL_CONTINUE, AUTH_SASL_FINAL = 10, 11, 12


class LoginError(Exception):
    """The server refused or broke the login."""


@lru_cache(maxsize=64)
def scram_keys(password: str, salt: bytes, iterations: int) -> tuple[bytes, bytes]:
    """(ClientKey, ServerKey) for password; cached since the salt repeats."""
    salted = hashlib.pbkdf2_hmac("sha256", password.encode(), salt, iterations)
    return (hmac.digest(salted, b"Client Key", "sha256"),
            hmac.digest(salted, b"Server Key", "sha256"))


class Scram:
    """Client side of one SCRAM-SHA-256 exchange (no channel binding)."""

    def __init__(self, password: str):
        self.password = password
        self.nonce = base64.b64encode(os.urandom(18))
        self.first_bare = b"n=,r=" + self.nonce
        self.expected_server_sig = b""

    def client_first(self) -> bytes:
        return b"n,," + self.first_bare

    def client_final(self, server_first: bytes) -> bytes:
        attrs = dict(part.split(b"=", 1) for part in server_first.split(b","))
        nonce, salt, iters = attrs[b"r"], base64.b64decode(attrs[b"s"]), int(attrs[b"i"])
        if not nonce.startswith(self.nonce):
            raise LoginError("SCRAM server nonce does not extend ours")
        client_key, server_key = scram_keys(self.password, salt, iters)
        without_proof = b"c=biws,r=" + nonce
        auth_msg = self.first_bare + b"," + server_first + b"," + without_proof
        sig = hmac.digest(hashlib.sha256(client_key).digest(), auth_msg, "sha256")
        proof = bytes(a ^ b for a, b in zip(client_key, sig))
        self.expected_server_sig = hmac.digest(server_key, auth_msg, "sha256")
        return without_proof + b",p=" + base64.b64encode(proof)

    def verify(self, server_final: bytes) -> None:
        if not server_final.startswith(b"v="):
            raise LoginError(f"SCRAM failed: {server_final.decode(errors='replace')}")
        if not hmac.compare_digest(base64.b64decode(server_final[2:]), self.expected_server_sig):
            raise LoginError("SCRAM server signature mismatch")


async def read_message(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
    head = await reader.readexactly(5)
    mtype, length = head[:1], struct.unpack("!i", head[1:])[0]
    return mtype, await reader.readexactly(length - 4)


def _error_text(body: bytes) -> str:
    fields = protocol.parse_error_fields(body)
    return f"{fields.get('C', '?????')} {fields.get('M', 'error')}"


def _md5_response(user: str, password: str, salt: bytes) -> bytes:
    inner = hashlib.md5((password + user).encode()).hexdigest()
    return b"md5" + hashlib.md5(inner.encode() + salt).hexdigest().encode() + b"\0"


async def _authenticate(reader, writer, user: str, password: str, code: int, data: bytes) -> None:
    """Answer one authentication request (and, for SASL, the rest of the exchange)."""
    if code == AUTH_CLEARTEXT:
        writer.write(protocol.password_message(password.encode() + b"\0"))
    elif code == AUTH_MD5:
        writer.write(protocol.password_message(_md5_response(user, password, data[:4])))
    elif code == AUTH_SASL:
        if b"SCRAM-SHA-256\0" not in data:
            raise LoginError(f"no SCRAM-SHA-256 among SASL mechanisms {data!r}")
        scram = Scram(password)
        writer.write(protocol.sasl_initial_response("SCRAM-SHA-256", scram.client_first()))
        mtype, body = await read_message(reader)
        if mtype != b"R" or struct.unpack("!i", body[:4])[0] != AUTH_SASL_CONTINUE:
            raise LoginError(_error_text(body[4:] if mtype == b"R" else body))
        writer.write(protocol.password_message(scram.client_final(body[4:])))
        mtype, body = await read_message(reader)
        if mtype != b"R" or struct.unpack("!i", body[:4])[0] != AUTH_SASL_FINAL:
            raise LoginError(_error_text(body))
        scram.verify(body[4:])
    else:
        raise LoginError(f"unsupported authentication request {code}")
    await writer.drain()


async def login(host: str, port: int, user: str, password: str, database: str,
                timeout: float = 30.0) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Connect and log in; return the open stream once ReadyForQuery arrives."""
    async def _go():
        reader, writer = await asyncio.open_connection(host, port)
        try:
            writer.write(protocol.startup_message({"user": user, "database": database,
                                                   "application_name": "loadtest-idle"}))
            await writer.drain()
            while True:
                mtype, body = await read_message(reader)
                if mtype == b"E":
                    raise LoginError(_error_text(body))
                if mtype == b"Z":
                    return reader, writer
                if mtype == b"R":
                    code = struct.unpack("!i", body[:4])[0]
                    if code != AUTH_OK:
                        await _authenticate(reader, writer, user, password, code, body[4:])
                # ParameterStatus, BackendKeyData, NoticeResponse: nothing to do.
        except BaseException:
            writer.close()
            raise
    return await asyncio.wait_for(_go(), timeout)


def close(writer: asyncio.StreamWriter) -> None:
    """Say goodbye properly (Terminate), so the pooler sees a clean disconnect."""
    try:
        writer.write(protocol.terminate())
    except Exception:
        pass
    writer.close()
