"""One server connection: connect, log in, run the pooler's own queries, close."""
from __future__ import annotations

import itertools
import logging
import os
import struct
import time
from typing import TYPE_CHECKING

import gevent

from pooler.wire import authsecret, netio, passwords, protocol, tls
from pooler.wire.scram import ScramClient
from pooler.wire.netio import ConnectionClosed, Stream, connect_tcp, disarm
from pooler.config.settings import EMPTY_CHECK_QUERY
from pooler.pooling.prepared import ServerStatements
from pooler.errors import PoolerError

if TYPE_CHECKING:
    from pooler.pooling.pool import Pool

log = logging.getLogger("pooler.server")

_ids = itertools.count(1)
SERVER_BUF = 65536
SERVER_PRIORITY = 1        # libev watcher priority (-2..2; clients keep 0)


class ServerError(PoolerError):
    """The server answered with an ErrorResponse (its fields kept) or could not be reached
    or logged in to (08006 unless the server said otherwise)."""

    def __init__(self, sqlstate: str, message: str, fields: dict | None = None) -> None:
        super().__init__(sqlstate, message)
        self.fields = fields or {}


def _start_tls(stream: Stream, host: str, addr: str) -> tuple[Stream, "tls.TlsDirect | None"]:
    """server_tls_sslmode: SSLRequest first, then the handshake on 'S'; on 'N' plain text
    for allow/prefer, an error for require/verify-*. Never over a Unix socket (as
    PgBouncer). Returns the stream to log in on (over a tls.TlsSocket) and the TlsDirect
    (None: plain text)."""
    ctxs = tls.current()
    if ctxs.server is None or host.startswith("/"):
        return stream, None
    mode = ctxs.server_mode
    try:
        stream.sendall(tls.SSL_REQUEST)
        answer = stream.read_exact(1)
        if answer == b"N":
            if mode in ("allow", "prefer"):
                return stream, None
            raise ServerError("08006", f"server {addr} does not accept TLS connections, but "
                              f"server_tls_sslmode is {mode}")
        if answer != b"S":
            raise ServerError("08006", f"server {addr} answered the SSLRequest with {answer!r}")
        if stream.rbuf:
            # PostgreSQL's CVE-2021-23222 fix: nothing may come before the handshake.
            raise ServerError("08006", f"server {addr} sent unencrypted data after its SSL response")
        try:
            return tls.wrap(stream, ctxs.server, server_side=False, server_hostname=host)
        except tls.HandshakeFailed as exc:
            raise ServerError("08006", f"TLS handshake with server {addr} failed ({mode}): {exc}") from None
    except BaseException:
        stream.close()
        raise


class ServerConn:
    """A logged-in connection to PostgreSQL, owned by one pool."""

    __slots__ = ("id", "pool", "stream", "pid", "key", "params", "created", "last_used",
                 "client", "buf", "view", "stmts", "addr", "closed", "reset_needed", "tsig", "sess",
                 "tls", "close_needed", "idle_cb", "host", "port", "replication", "__weakref__")

    def __init__(self, pool: "Pool", stream: Stream, host: str, port: int) -> None:
        self.id = next(_ids)
        self.pool = pool
        self.stream = stream
        self.host = host                # the entry of the database's host list it went to
        self.port = port
        self.addr = f"{host}:{port}"
        self.replication = "none"       # logical / physical: a replication client's own server
        self.pid = 0
        self.key = 0
        self.params: dict[str, str] = {}
        now = time.monotonic()
        self.created = now
        self.last_used = now
        self.client = None              # the client it is linked to, if any
        self.buf = bytearray(SERVER_BUF)
        self.view = memoryview(self.buf)
        self.stmts = ServerStatements()
        self.closed = False
        self.reset_needed = False       # session-mode servers get server_reset_query before reuse
        self.close_needed = False       # RECONNECT: closed when next released (SHOW SERVERS says so)
        self.tsig: tuple | None = None  # the client parameter values last applied (None: unknown)
        self.sess: dict[str, str] = {}  # session settings from SET on it (sessionstate.py)
        self.tls: tls.TlsDirect | None = None  # server_tls_sslmode: the TLS behind `stream`
        self.idle_cb = self._on_idle_readable   # bound once: armed at every release
        # A server's socket events go before clients' in one loop iteration: when a
        # server's FATAL/EOF and a client's request arrive together, the idle watch
        # drops the server before the client's callback could be handed it (issue
        # 14.2). Free on the hot path: libev runs every priority's queue anyway.
        if not stream.rw.active:
            stream.rw.priority = SERVER_PRIORITY

    # -- login ------------------------------------------------------------------

    @classmethod
    def connect(cls, pool: "Pool", user: str, password: str | None, scram_keys: tuple | None,
                timeout: float, address: tuple[str, int], startup: dict[str, str] | None = None
                ) -> "ServerConn":
        """Open a connection to `address` (host, port) and log in, with `startup`'s
        parameters too (a replication client's); raises ServerError with a message safe
        to show a client."""
        route = pool.route
        host, port = address
        addr = f"{host}:{port}"
        try:
            with gevent.Timeout(timeout or None, ServerError("08006", f"server connect timeout ({addr})")):
                sock = connect_tcp(host, port, timeout)
                stream, secured = _start_tls(Stream(sock, addr), host, addr)
                conn = cls(pool, stream, host, port)
                conn.tls = secured
                params = {"application_name": route.application_name} \
                    if route.application_name else {}
                params.update(startup or {})
                try:
                    conn._login(user, route.dbname, password, scram_keys, params)
                except BaseException:
                    conn.close(send_terminate=False)
                    raise
        except OSError as exc:
            raise ServerError("08006", f"could not connect to server {addr}: {exc.strerror or exc}") from exc
        except ConnectionClosed as exc:
            raise ServerError("08006", f"server {addr} closed the connection during login") from exc
        return conn

    def _login(self, user: str, dbname: str, password: str | None, scram_keys: tuple | None,
               extra: dict[str, str]) -> None:
        params = {"user": user, "database": dbname, **extra}
        s = self.stream
        s.sendall(protocol.startup_message(params))
        scram: ScramClient | None = None
        while True:
            mtype, body = s.read_message()
            if mtype == ord("R"):
                code = protocol.unpack_i32(body, 0)[0]
                scram = self._auth_step(code, body[4:], user, password, scram_keys, scram)
            elif mtype == ord("S"):
                name, pos = protocol.read_cstr(body, 0)
                self.params[name], _ = protocol.read_cstr(body, pos)
            elif mtype == ord("K"):
                self.pid, self.key = struct.unpack("!ii", body[:8])
            elif mtype == ord("Z"):
                return
            elif mtype == ord("E"):
                fields = protocol.parse_error_fields(body)
                raise ServerError(fields.get("C", "08006"), fields.get("M", "login failed"), fields)
            elif mtype in (ord("N"), ord("v")):
                continue
            else:
                raise ServerError("08006", f"unexpected message {chr(mtype)!r} during server login")

    def _auth_step(self, code: int, data: bytes, user: str, password: str | None,
                   scram_keys: tuple | None, scram: "ScramClient | None"):
        s = self.stream
        if code == protocol.AUTH_OK:
            return scram
        if code == protocol.AUTH_CLEARTEXT:
            s.sendall(protocol.password_message(self._need(password).encode() + b"\0"))
        elif code == protocol.AUTH_MD5:
            resp = passwords.md5_challenge_response(self._need(password), user, data[:4])
            s.sendall(protocol.password_message(resp.encode() + b"\0"))
        elif code == protocol.AUTH_SASL:
            mechs = data.split(b"\0")
            if b"SCRAM-SHA-256" not in mechs:
                raise ServerError("08006", "server offers no SASL mechanism the pooler supports")
            if password and authsecret.secret_kind(password) == "plain":
                scram = ScramClient(password)
            elif scram_keys:
                scram = ScramClient(client_key=scram_keys[0], server_key=scram_keys[1])
            elif password:
                # An md5 hash cannot answer SCRAM, and no SCRAM login of the client
                # lent its keys: PgBouncer's words for this.
                raise ServerError("08P01", "wrong password type")
            else:
                raise ServerError("28P01", "no password available to log in to the server with SCRAM")
            s.sendall(protocol.sasl_initial_response("SCRAM-SHA-256", scram.client_first()))
        elif code == protocol.AUTH_SASL_CONTINUE:
            assert scram is not None
            s.sendall(protocol.password_message(scram.client_final(data)))
        elif code == protocol.AUTH_SASL_FINAL:
            assert scram is not None
            try:
                scram.verify_server_final(data)
            except authsecret.AuthFailed as exc:
                raise ServerError("28P01", f"server SCRAM verification failed: {exc}") from exc
        else:
            raise ServerError("28000", f"server asked for unsupported authentication method {code}")
        return scram

    @staticmethod
    def _need(password: str | None) -> str:
        if not password:
            raise ServerError("28P01", "no password available to log in to the server")
        return password

    # -- pooler-issued queries -------------------------------------------------

    def run(self, sql: str, *more: str) -> str:
        """Run a simple query whose results nobody reads (and `more`, each its own Query,
        sent in the same write); returns the last ReadyForQuery status.

        ParameterStatus messages update self.params, so SETs the pooler issues
        keep its picture of the server current. An ErrorResponse raises
        ServerError (the first one) after the server is back at ReadyForQuery.
        """
        s = self.stream
        s.sendall(b"".join(protocol.query(q) for q in (sql, *more)))
        error: ServerError | None = None
        left = 1 + len(more)
        while True:
            mtype, body = s.read_message()
            if mtype == ord("Z"):
                left -= 1
                if left:
                    continue
                if error:
                    raise error
                return chr(body[0])
            if mtype == ord("S"):
                name, pos = protocol.read_cstr(body, 0)
                self.params[name], _ = protocol.read_cstr(body, pos)
                self.tsig = None
            elif mtype == ord("E") and error is None:
                fields = protocol.parse_error_fields(body)
                error = ServerError(fields.get("C", "XX000"), fields.get("M", "query failed"), fields)

    def check(self, check_query: str) -> None:
        """Run server_check_query: PgBouncer's `<empty>` is an empty Query (answered by
        EmptyQueryResponse and ReadyForQuery), any other text that query. ServerError
        or OSError: the server is not fit for a client."""
        self.run("" if check_query == EMPTY_CHECK_QUERY else check_query)

    def cancel(self) -> None:
        """Send PostgreSQL a CancelRequest for whatever this backend is running, from a
        greenlet of its own (a new connection; the caller never waits for it)."""
        host, port, pid, key = self.host, self.port, self.pid, self.key
        timeout = self.pool.cfg.server_connect_timeout or 5.0

        def send() -> None:
            try:
                sock = connect_tcp(host, port, timeout)
                try:
                    sock.sendall(protocol.cancel_request(pid, key))
                finally:
                    sock.close()
            except OSError as exc:
                log.warning("S-%d cancel request failed: %s", self.id, exc)
        gevent.spawn(send)

    # -- moving to another worker (proc/servermove.py) -----------------------------------

    def export(self) -> dict:
        """What another worker needs to take this idle, logged-in server over (its
        socket goes separately, as a descriptor)."""
        return {"host": self.host, "port": self.port, "family": self.stream.sock.family,
                "pid": self.pid, "key": self.key, "params": self.params,
                "created": self.created, "last_used": self.last_used, "sess": self.sess,
                "tsig": self.tsig, "stmts": list(self.stmts.cache.items())}

    @classmethod
    def adopt(cls, pool: "Pool", sock, state: dict) -> "ServerConn":
        """The other side of export(): `sock` is this process's copy of the socket.
        CLOCK_MONOTONIC is one clock for all processes, so `created` keeps its lifetime."""
        conn = cls(pool, Stream(sock, f"{state['host']}:{state['port']}"), state["host"],
                   state["port"])
        conn.pid, conn.key, conn.params = state["pid"], state["key"], state["params"]
        conn.created, conn.last_used = state["created"], state["last_used"]
        conn.sess, conn.tsig = state["sess"], state["tsig"]
        conn.stmts.cache.update(state["stmts"])
        return conn

    def detach(self) -> None:
        """Another worker took the server over: close this process's copy of its socket,
        without a Terminate (the connection lives on there)."""
        self.closed = True
        self.stream.rw.stop()
        netio.forget_fd(self.stream.fd)
        self.stream.close()

    # -- while idle in the pool ------------------------------------------------------

    def watch_idle(self) -> None:
        """Parked in the pool, a server owes us nothing: a byte or EOF from it now means
        it is going away (PostgreSQL's FATAL at a restart, pg_terminate_backend,
        idle_session_timeout). The read watcher stays started, costing no syscall."""
        self.stream.rw.start(self.idle_cb)

    def _on_idle_readable(self) -> None:
        pool = self.pool
        if self.closed or self.client is not None or self not in pool.idle:
            disarm(self.stream.rw)      # taken from the pool meanwhile: its reader decides
            return
        why = self._why_readable()
        if why is not None:
            pool.discard(self, why)

    def _why_readable(self) -> str | None:
        """What the idle server's readable socket says (None: nothing after all)."""
        try:
            data = self.stream.sock.recv(8192)
        except (BlockingIOError, InterruptedError):
            return None
        except OSError as exc:
            return f"server connection broke while idle ({exc.strerror or exc})"
        if not data:
            return "server closed the connection while idle"
        if data[0] == ord("E") and len(data) >= 5:
            try:
                fields = protocol.parse_error_fields(data[5:1 + protocol.unpack_i32(data, 1)[0]])
            except ValueError:          # cut short: the next read sees the EOF
                fields = {}
            return (f"server sent {fields.get('V', 'ERROR')} {fields.get('C', '?')} while idle: "
                    f"{fields.get('M', '')}")
        return f"server sent an unexpected message {chr(data[0])!r} while idle"

    def close(self, send_terminate: bool = True) -> None:
        if self.closed:
            return
        self.closed = True
        if send_terminate:
            try:
                self.stream.sock.send(protocol.terminate())
            except OSError:
                pass
        self.stream.close()         # over TLS too: the Terminate went to the connection itself

    def __repr__(self) -> str:
        return f"S-{self.id}({self.addr} pid={self.pid})"


if os.environ.get("POOLER_FAULT_NO_IDLE_WATCH"):
    # Fault injection, for tests only (test_server_death.py): parked servers go
    # unwatched, so a dead one reaches a client and the relay's retry of a request
    # that never left (relayfaults.retry_unsent) can be seen. Decided once at import:
    # nothing is checked per release.
    ServerConn.watch_idle = lambda self: None
