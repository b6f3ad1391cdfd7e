"""TLS for clients (client_tls_*) and for server connections (server_tls_*), PgBouncer-style.

The relay works on raw non-blocking sockets and waits on their fds (netio.py). A TLS
socket does not fit as it is: it raises SSLWantReadError instead of BlockingIOError,
and it can hold decrypted bytes while its fd is not readable. So after the handshake
the owner (Client, ServerConn) gets a netio.Stream over a TlsSocket: the face of a
non-blocking socket over the C-level SSL object, so netio.Stream and the relay step
read and write the TLS connection themselves, on the real fd; whoever would wait on
the fd checks `pending()` first (netio.Stream.wait_readable, pooling/relaytls.py).

Contexts are built once per config (`configure`, from Worker.apply_config: so on
start, RELOAD, SIGHUP and SET), and the files are re-read each time. `check` builds
them with the plain `ssl` module for config validation (the master imports no gevent).
"""
from __future__ import annotations

import errno
import logging
import socket
import ssl
import struct
from dataclasses import dataclass
from typing import Any

log = logging.getLogger("pooler.tls")

VERIFYING = ("verify-ca", "verify-full")
# The settings this module reads (PgBouncer's names). Declared here, not in the config
# layer, because wire imports nothing above it; pooler/config/settings.py uses these.
TLS_MODES = ("disable", "allow", "prefer", "require") + VERIFYING
TLS_FILE_KEYS = ("client_tls_key_file", "client_tls_cert_file", "client_tls_ca_file",
                 "server_tls_ca_file", "server_tls_key_file", "server_tls_cert_file")
TLS_KEYS = ("client_tls_sslmode", "server_tls_sslmode") + TLS_FILE_KEYS
SSL_REQUEST = struct.pack("!ii", 8, 80877103)


# --------------------------------------------------------------------------- contexts

@dataclass
class Contexts:
    client_mode: str = "disable"
    server_mode: str = "disable"
    client: ssl.SSLContext | None = None     # for accepting clients (server side of TLS)
    server: ssl.SSLContext | None = None     # for connecting to PostgreSQL

    @property
    def client_required(self) -> bool:
        return self.client_mode in ("require",) + VERIFYING


def _secure(ctx: ssl.SSLContext) -> None:
    # PgBouncer's default client_tls_protocols / server_tls_protocols "secure": TLS 1.2+.
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.options |= getattr(ssl, "OP_NO_RENEGOTIATION", 0)


def _client_context(v: dict[str, Any], cls: type) -> ssl.SSLContext:
    ctx = cls(ssl.PROTOCOL_TLS_SERVER)
    _secure(ctx)
    ctx.load_cert_chain(v["client_tls_cert_file"], v["client_tls_key_file"])
    if v.get("client_tls_ca_file"):
        ctx.load_verify_locations(cafile=v["client_tls_ca_file"])
        # verify-ca / verify-full: a client certificate is required (PgBouncer: the two
        # are the same on the client side); otherwise one that is sent is verified.
        ctx.verify_mode = ssl.CERT_REQUIRED if v["client_tls_sslmode"] in VERIFYING \
            else ssl.CERT_OPTIONAL
    return ctx


def _server_context(v: dict[str, Any], cls: type) -> ssl.SSLContext:
    mode = v["server_tls_sslmode"]
    ctx = cls(ssl.PROTOCOL_TLS_CLIENT)
    _secure(ctx)
    if mode in VERIFYING:
        ctx.check_hostname = mode == "verify-full"
        ctx.verify_mode = ssl.CERT_REQUIRED
        if v.get("server_tls_ca_file"):
            ctx.load_verify_locations(cafile=v["server_tls_ca_file"])
        else:
            ctx.load_default_certs(ssl.Purpose.SERVER_AUTH)
    else:
        # allow / prefer / require: encrypted, not verified (PgBouncer, libpq's require).
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    if v.get("server_tls_cert_file"):
        ctx.load_cert_chain(v["server_tls_cert_file"], v["server_tls_key_file"])
    return ctx


def build(v: dict[str, Any], cls: type = ssl.SSLContext) -> Contexts:
    """Contexts for the TLS settings in `v` (a Config's attributes as a dict)."""
    out = Contexts(v.get("client_tls_sslmode", "disable"), v.get("server_tls_sslmode", "disable"))
    if out.client_mode != "disable":
        out.client = _client_context(v, cls)
    if out.server_mode != "disable":
        out.server = _server_context(v, cls)
    return out


def check(v: dict[str, Any]) -> list[tuple[str, str]]:
    """(key, problem) for each side whose files do not make a context (config validation)."""
    problems = []
    for side, make in (("client", _client_context), ("server", _server_context)):
        if v.get(f"{side}_tls_sslmode", "disable") == "disable":
            continue
        try:
            make(v, ssl.SSLContext)
        except (ssl.SSLError, OSError, ValueError) as exc:
            keys = [k for k in (f"{side}_tls_cert_file", f"{side}_tls_key_file",
                                f"{side}_tls_ca_file") if v.get(k)]
            problems.append((keys[0] if keys else f"{side}_tls_sslmode",
                             f"cannot load the TLS files ({', '.join(keys)}): "
                             f"{getattr(exc, 'reason', None) or exc}"))
    return problems


def _settings(cfg: Any) -> dict[str, Any]:
    return {k: getattr(cfg, k) for k in TLS_KEYS}


_current: Contexts | None = None


def configure(cfg) -> None:
    """Build this process's contexts from `cfg` (re-reading the files). On a failure
    (a file changed since validation) the previous contexts stay, logged."""
    global _current
    from gevent import ssl as gssl
    try:
        _current = build(_settings(cfg), gssl.SSLContext)
    except (ssl.SSLError, OSError, ValueError) as exc:
        log.error("TLS settings not applied, keeping the previous ones: %s", exc)
        if _current is None:
            _current = Contexts()


def current() -> Contexts:
    if _current is None:
        return Contexts()
    return _current


# --------------------------------------------------------------------------- handshakes

class HandshakeFailed(Exception):
    """The TLS handshake did not complete (bad certificate, garbage, peer gone)."""


def describe(tls_sock) -> str:
    """PgBouncer's SHOW CLIENTS/SERVERS `tls` column, as far as Python can tell:
    'TLSv1.3/TLS_AES_256_GCM_SHA384'."""
    try:
        cipher = tls_sock.cipher()
        return f"{tls_sock.version()}/{cipher[0]}" if cipher else ""
    except (OSError, ValueError, AttributeError):
        return ""


def wrap(stream, ctx: ssl.SSLContext, *, server_side: bool, server_hostname: str | None = None):
    """TLS handshake on `stream`'s socket (cooperatively, under the caller's timeout);
    returns (a new netio.Stream over a TlsSocket for the owner, the TlsDirect behind
    it). `stream` is closed either way (its socket now belongs to the TLS layer);
    HandshakeFailed on failure."""
    from gevent import socket as gsocket

    from pooler.wire import netio
    raw = stream.sock
    family = raw.family
    fd = raw.detach()
    stream.close()
    gsock = gsocket.socket(family, socket.SOCK_STREAM, 0, fileno=fd)
    tls_sock = None
    try:
        tls_sock = ctx.wrap_socket(gsock, server_side=server_side,
                                   server_hostname=None if server_side else server_hostname,
                                   do_handshake_on_connect=False)
        tls_sock.do_handshake()
    except BaseException as exc:
        (tls_sock or gsock).close()
        if isinstance(exc, ssl.SSLCertVerificationError):
            raise HandshakeFailed(f"certificate verification failed: {exc.verify_message}") from None
        if isinstance(exc, (ssl.SSLError, OSError, ValueError)):
            reason = getattr(exc, "reason", None) or str(exc) or type(exc).__name__
            raise HandshakeFailed(reason) from None
        raise
    return netio.Stream(TlsSocket(tls_sock), stream.peer), TlsDirect(tls_sock)


class TlsSocket:
    """A TLS connection with the face of a non-blocking `_socket.socket`, for netio.Stream
    and the relay step: recv_into/send go straight to the C-level SSL object over the
    real fd (no pump, no socketpair), and "would block" is BlockingIOError, as for a
    plain socket. The fd's readiness is the kernel's; bytes OpenSSL already decrypted
    but not returned (`pending()`, when a read's buffer was smaller than a record) are
    not, so a caller that waits on the fd checks pending() first (the relay does)."""

    __slots__ = ("tls", "ssl", "fd", "family")

    def __init__(self, tls_sock) -> None:
        self.tls = tls_sock                 # owns the fd; the SSL object refers back to it
        self.ssl = tls_sock._sslobj         # the C object: non-blocking on gevent's real socket
        self.fd = tls_sock.fileno()
        self.family = tls_sock.family

    def fileno(self) -> int:
        return self.fd

    def setblocking(self, _flag: bool) -> None:
        """Always non-blocking underneath (gevent's socket); nothing to change."""

    def pending(self) -> int:
        return self.ssl.pending()

    def recv_into(self, buf, nbytes: int = 0) -> int:
        size = nbytes or len(buf)
        if not size:
            return 0
        try:
            return self.ssl.read(size, buf)
        except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
            raise BlockingIOError(errno.EAGAIN, "TLS: no record yet") from None
        except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
            return 0                        # close_notify, or the peer just went away
        except ssl.SSLError as exc:
            raise ConnectionResetError(errno.ECONNRESET, f"TLS: {exc.reason or exc}") from None

    def recv(self, size: int) -> bytes:
        buf = bytearray(size)
        return bytes(buf[:self.recv_into(buf)])

    def send(self, data) -> int:
        if not len(data):
            return 0
        try:
            return self.ssl.write(data)
        except (ssl.SSLWantWriteError, ssl.SSLWantReadError):
            # OpenSSL wants the same bytes again: every caller retries from here.
            raise BlockingIOError(errno.EAGAIN, "TLS: socket full") from None
        except ssl.SSLError as exc:
            raise BrokenPipeError(errno.EPIPE, f"TLS: {exc.reason or exc}") from None

    def sendmsg(self, parts: list) -> int:
        return self.send(b"".join(parts))   # one record: encryption copies anyway

    def getsockname(self):
        return self.tls.getsockname()

    def getpeername(self):
        return self.tls.getpeername()

    def close(self) -> None:
        try:
            self.tls.close()
        except OSError:
            pass


class TlsDirect:
    """What the owner keeps of a direct TLS connection (TlsSocket): the `tls` socket
    and the `info` SHOW shows; closing the owner's Stream closes the connection."""

    __slots__ = ("tls", "info")

    def __init__(self, tls_sock) -> None:
        self.tls = tls_sock
        self.info = describe(tls_sock)

    def release(self) -> None:
        """Nothing is left to flush: the owner's writes went to the connection itself."""

    def close(self) -> None:
        try:
            self.tls.close()
        except OSError:
            pass
