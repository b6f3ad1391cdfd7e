"""One client connection: startup, authentication, routing, then the relay."""
from __future__ import annotations

import itertools
import logging
import secrets
import struct
import sys
import time
from typing import TYPE_CHECKING

import gevent

from pooler.wire import authsecret, entropy, passwords, protocol, scram, tls
from pooler.pooling import hbaauth, peering, sqlprepare
from pooler.pooling.authquery import AuthQueryError
from pooler.config.settings import ADMIN_DB
from pooler.wire.netio import ConnectionClosed, Stream
from pooler.pooling.params import startup_parameters, sync_sql
from pooler.pooling.replication import REPLICATION_PARAM, replication_kind, replication_startup
from pooler.pooling.sessionstate import ClientSession, diff_sql
from pooler.pooling.pool import Pool
from pooler.pooling.relay import Relay
from pooler.errors import PoolerError
from pooler.pooling.clientstate import ClientState

if TYPE_CHECKING:
    from pooler.config.model import Route
    from pooler.pooling.server import ServerConn
    from pooler.pooling.worker import Worker

log = logging.getLogger("pooler.client")
_ids = itertools.count(1)



class LoginFailed(PoolerError):
    """The client may not log in; logged as a failed login, then sent to the client."""


class Client:
    """State of one client connection, from accept to close."""

    # An idle client is this object, its Relay and its socket: slots keep it small.
    __slots__ = ("worker", "cfg", "stream", "addr", "id", "user", "database", "pool", "relay",
                 "tparams", "tsig", "state", "local_superuser", "connect_time", "cancel_key",
                 "user_client_key", "db_client_key", "glet", "close_reason", "tls", "arrived",
                 "replication", "server_startup", "session")

    def __init__(self, worker: "Worker", stream: Stream, addr: str,
                 arrived: float | None = None) -> None:
        self.worker = worker
        self.cfg = worker.cfg
        self.stream = stream
        self.addr = addr
        self.id = next(_ids)
        self.user = ""
        self.database = ""
        self.pool: Pool | None = None
        self.relay: Relay | None = None
        self.tparams: dict[str, str | None] = {}   # tracked parameters as the client sees them
        self.tsig: tuple = ()                      # their values, compared against ServerConn.tsig
        self.session = ClientSession()             # untracked SET values, pin (sessionstate.py)
        self.state = ClientState.LOGIN
        self.local_superuser = False               # `pgbouncer` over the Unix socket (admin.py)
        self.connect_time = time.time()
        self.arrived = time.monotonic() if arrived is None else arrived   # accepted (monotonic)
        self.cancel_key = (0, 0)
        self.user_client_key: tuple | None = None   # max_user_client_connections claim held
        self.db_client_key: tuple | None = None     # max_db_client_connections claim held
        self.glet = gevent.getcurrent()
        self.close_reason = "client close request"   # for the log line; fatal() sets it
        self.tls: tls.TlsDirect | None = None       # set once a TLS handshake is done
        self.replication = "none"                   # "logical" / "physical": a walsender client
        self.server_startup: dict[str, str] | None = None   # replication: its server's extra startup

    # -- life cycle -------------------------------------------------------------

    def serve(self) -> None:
        """Log the client in, in the greenlet the listener spawned; then hand it to the
        relay, which lives on in loop callbacks after this greenlet ends (and closes
        the client), or serve the admin console here."""
        try:
            with gevent.Timeout(self._login_time_left(),
                                LoginFailed("08P01", "client_login_timeout")):
                if not self._startup():
                    return
            if self.state == ClientState.ADMIN:
                self.worker.admin.serve(self)   # outside client_login_timeout
                return
            self.relay = Relay(self)
            self.state = ClientState.IDLE
        except LoginFailed as exc:
            log.info("C-%d %s login failed: %s", self.id, self._who(), exc)
            self.fatal(exc.sqlstate, str(exc))
        except PoolerError as exc:      # no server, killed, protocol violation, ...
            self.fatal(exc.sqlstate, exc.message)
        except ConnectionClosed:
            pass
        except gevent.GreenletExit:
            raise
        except Exception as exc:
            self.internal_error(exc)
        finally:
            if self.relay is None:
                self.close()
        if self.relay is not None:
            if self.worker.keeper is not None:
                self.worker.keeper.started(self)
            self.relay.start()
        self.glet = None                # the relay's callbacks carry the client from here

    def _login_time_left(self) -> float | None:
        """client_login_timeout counts from accept (prelogin.py held the first bytes)."""
        limit = self.cfg.client_login_timeout
        if not limit:
            return None
        return max(0.001, limit - (time.monotonic() - self.arrived))

    def kill(self, exc: PoolerError) -> None:
        """Disconnect with `exc` (timeouts, KILL, shutdown), wherever the client is."""
        if self.relay is not None:
            self.relay.kill(exc)
        elif self.glet is not None:
            self.glet.kill(exc, block=False)

    def internal_error(self, exc: Exception) -> None:
        """A bug must cost one client, with an error it can read, never the worker."""
        log.error("C-%d %s closing because: internal error (%s)", self.id, self._who(),
                  type(exc).__name__, exc_info=exc)
        self.fatal("XX000", f"pooler internal error: {type(exc).__name__}")

    def _who(self) -> str:
        # PgBouncer's "db/user@addr:port", so log searches written for it still match.
        return f"{self.database or '(nodb)'}/{self.user or '(nouser)'}@{self.addr}"

    def close(self) -> None:
        if self.relay is not None and self.relay.kslot:
            self.worker.keeper.forget(self)     # before the close: the master has a copy
        self.worker.forget_client(self)
        if self.pool is not None:
            self.pool.clients.discard(self)
        if self.cfg.log_disconnections and self.state != ClientState.LOGIN:
            log.info("C-%d %s closing because: %s (age=%.0fs)", self.id, self._who(),
                     self.close_reason, time.time() - self.connect_time)
        self.stream.close()

    def fatal(self, sqlstate: str, message: str) -> None:
        """Send a FATAL error and stop; never raises (the client may already be gone)."""
        self.close_reason = message
        try:
            self.stream.sendall(protocol.error_response(sqlstate, message, "FATAL"))
        except Exception:
            pass

    # -- startup ----------------------------------------------------------------

    def _startup(self) -> bool:
        """Read the startup packet (after SSL/GSS refusals); False for a cancel request."""
        s = self.stream
        while True:
            length = protocol.unpack_i32(s.read_exact(4), 0)[0]
            if length < 8 or length > protocol.MAX_STARTUP_LEN:
                raise LoginFailed("08P01", "invalid startup packet length")
            body = s.read_exact(length - 4)
            code = protocol.unpack_i32(body, 0)[0]
            if code == protocol.SSL_REQUEST:
                s = self._ssl_request(s)
                continue
            if code == protocol.GSSENC_REQUEST:
                s.sendall(b"N")
                continue
            if code == protocol.CANCEL_REQUEST:
                if len(body) >= 12:
                    self.worker.forward_cancel(*struct.unpack("!ii", body[4:12]))
                return False
            if self.tls is None and self.addr != "unix" and tls.current().client_required:
                # PgBouncer's check and words (not on the Unix socket, as there).
                raise LoginFailed("08P01", "SSL required")
            if code >> 16 != 3:
                raise LoginFailed("08P01", f"unsupported frontend protocol {code >> 16}.{code & 0xffff}: "
                                  "server supports 3.0")
            params = protocol.parse_startup(body[4:])
            if code & 0xffff:
                self._negotiate_minor(params)
            self._login(params)
            return True

    def _ssl_request(self, s: Stream) -> Stream:
        """Answer an SSLRequest: 'N' (client_tls_sslmode disable, Unix socket), or 'S'
        and the TLS handshake; returns the stream to go on with."""
        if self.tls is not None:
            raise LoginFailed("08P01", "SSL req inside SSL")
        ctxs = tls.current()
        if ctxs.client is None or self.addr == "unix":
            s.sendall(b"N")
            return s
        if s.rbuf:
            # Bytes after the SSLRequest were sent before encryption: never take them as
            # if they came over TLS (PostgreSQL's and PgBouncer's fix for CVE-2021-23214).
            raise LoginFailed("08P01", "received unencrypted data after SSL request")
        s.sendall(b"S")
        try:
            self.stream, self.tls = tls.wrap(s, ctxs.client, server_side=True)
        except tls.HandshakeFailed as exc:
            log.info("C-%d %s TLS handshake failed: %s", self.id, self._who(), exc)
            raise ConnectionClosed(str(exc)) from None
        if self.cfg.verbose:
            log.info("C-%d %s TLS established: %s", self.id, self._who(), self.tls.info)
        return self.stream

    def _negotiate_minor(self, params: dict[str, str]) -> None:
        """Protocol 3.x with x > 0: answer NegotiateProtocolVersion as PostgreSQL does."""
        opts = [k for k in params if k.startswith("_pq_.")]
        body = protocol.pack_i32(protocol.PROTOCOL_V3) + protocol.pack_i32(len(opts)) + \
            b"".join(protocol.cstr(o) for o in opts)
        self.stream.sendall(protocol.message(b"v", body))
        for o in opts:
            params.pop(o)

    def _login(self, params: dict[str, str]) -> None:
        # Interned: every client of an application carries the same few names.
        self.user = sys.intern(params.get("user", ""))
        if not self.user:
            raise LoginFailed("08P01", "no user name in startup packet")
        self.database = sys.intern(params.get("database") or self.user)
        kind = replication_kind(params.get("replication"))
        if kind is None:        # PostgreSQL's words for a value it does not take
            raise LoginFailed("22023", 'invalid value for parameter "replication": '
                              f'"{params["replication"]}"')
        self.replication = kind
        cfg = self.cfg
        if not self.worker.try_add_client(self):
            raise LoginFailed("53300", "no more connections allowed (max_client_conn)")
        if self.worker.admin is not None and self.database == ADMIN_DB:
            self.local_superuser = self.worker.admin.trusts_local_superuser(self)
            if not self.local_superuser:
                self._authenticate()
                self.worker.admin.check_login(self)     # admin_users / stats_users only
            # The console is a database too; admin_users take a place but always get
            # in (PgBouncer), in its database's count and in their user's.
            exempt = self.user in cfg.admin_users or self.local_superuser
            self._admit_db(ADMIN_DB, cfg.max_db_client_connections, exempt=exempt)
            self._admit_user(exempt=exempt)
            self.state = ClientState.ADMIN                    # serve() runs the console
            self._welcome(self.worker.admin.welcome_params())
            return
        # The pool's settings depend on its user too ([users]): resolve with the login user.
        route = self.worker.route(self.database, self.user)
        if route is None:
            raise LoginFailed("3D000", f"no such database: {self.database}")
        if route.name in self.worker.disabled_dbs:
            raise LoginFailed("55000", f"database does not allow connections: {route.name}")
        startup = self._startup_parameters(params)
        if self.replication != "none":
            self.server_startup = replication_startup(self.replication, params, startup)
        scram_keys = self._authenticate(route)
        if self.worker.shutting_down:         # only the console is reachable now (PgBouncer's)
            raise LoginFailed("08P01", "pooler is shutting down")
        # Counted only once authenticated: clients that never prove who they are must
        # not be able to use up a database's or a user's connections.
        self._admit_db(route.name, route.max_db_client_connections)
        self._admit_user()
        self.pool = self.worker.get_pool(route, self.user)
        if scram_keys and self.pool.scram_keys is None:
            self.pool.scram_keys = scram_keys
        self.pool.clients.add(self)
        self.pool.stats.client_logins += 1      # authenticated and admitted: PgBouncer's point
        if self.pool.welcome is None:
            self._fetch_welcome()
        self.tparams, self.tsig = self.worker.shared_tracked(self._initial_tracked(startup))
        if cfg.log_connections:
            log.info("C-%d %s login attempt: db=%s user=%s replication=%s", self.id, self._who(),
                     self.database, self.user, REPLICATION_PARAM[self.replication])
        self._welcome(self.pool.welcome_messages(self.tparams, self.tsig))

    def _admit_db(self, database: str, cap: int, exempt: bool = False) -> None:
        if not self.worker.admit_db_client(self, database, cap, exempt):
            # PgBouncer's words and SQLSTATE (its default for a refused login).
            raise LoginFailed("08P01", "client connections exceeded (max_db_client_connections)")

    def _admit_user(self, exempt: bool = False) -> None:
        """max_user_client_connections of the login user, whichever way it authenticated
        (auth_file or auth_query); the place is held until the client leaves, also when
        the pool's server login fails (PgBouncer's count and its words)."""
        if not self.worker.admit_user_client(self, exempt):
            raise LoginFailed("08P01", "client connections exceeded (max_user_client_connections)")

    def _startup_parameters(self, params: dict[str, str]) -> dict[str, str]:
        """Tracked parameters from the startup packet and its `options`; unknown ones
        refused as PgBouncer does."""
        if self.replication != "none":
            # Its server is its own and logs in with the very same `options` (PgBouncer):
            # any setting may be in it, such as CREATE SUBSCRIPTION's extra_float_digits.
            params = {k: v for k, v in params.items() if k != "options"}
        out, refusal = startup_parameters(params, self.worker.tracked_canon,
                                          self.cfg.ignore_startup_parameters)
        if refusal is not None:
            raise LoginFailed("08P01", refusal)
        return out

    def _initial_tracked(self, startup: dict[str, str]) -> dict[str, str | None]:
        welcome = self.pool.welcome or {}
        return {name: startup.get(name, welcome.get(name)) for name in self.worker.tracked}

    def _fetch_welcome(self) -> None:
        """The pool has never connected: open a server now to learn its parameters."""
        srv = self.pool.acquire(self)
        self.pool.release(srv, fresh=True)      # no client used it (server_lifetime 0)

    def _welcome(self, params: dict[str, str] | bytes) -> None:
        """AuthenticationOk, the ParameterStatus messages (prebuilt bytes, or values),
        BackendKeyData, the login notice, ReadyForQuery."""
        pid, key = peering.new_cancel_key(self.cfg.peer_id)   # peer_id in it when peering
        self.cancel_key = (pid, key)
        self.worker.register_cancel_key(self)
        out = [protocol.auth_ok()]
        if isinstance(params, bytes):
            out.append(params)
        else:
            out += [protocol.parameter_status(k, v) for k, v in params.items()]
        out.append(protocol.backend_key_data(pid, key))
        if self.cfg.login_notify_message:     # after the key, before ReadyForQuery: PgBouncer's place
            out.append(protocol.notice_response(self.cfg.login_notify_message))
        out.append(protocol.ready_for_query(b"I"))
        self.stream.sendall(b"".join(out))

    # -- authentication ----------------------------------------------------------

    def _authenticate(self, route: "Route | None" = None) -> tuple | None:
        """Authenticate the client; returns SCRAM keys for pass-through, if any."""
        try:
            atype = self._auth_method()
        except hbaauth.Refused as exc:
            raise LoginFailed(exc.sqlstate, exc.message) from None
        secret, looked_up = self._user_secret(route)
        if atype in ("trust", "cert", "peer"):     # identity proven without a password
            if secret is None and (looked_up or (self.worker.userlist and self.cfg.auth.file)):
                raise LoginFailed("28000", f'no such user: "{self.user}"')
            if looked_up:
                self.worker.auth_query.remember(route, self.user, secret)
            return None
        if secret is None:
            # Go through the motions so that unknown and known users look alike.
            # (md5 asks for md5 with a plain fake secret, as it does for a known user.)
            fake = secrets.token_hex(16)
            self._do_auth(atype, fake if atype == "md5" else scram.scram_secret(fake))
            raise LoginFailed("28P01", f'password authentication failed for user "{self.user}"')
        keys = self._do_auth(atype, secret)
        if looked_up:
            # The pool logs in to the server with it too, as with an auth_file secret.
            self.worker.auth_query.remember(route, self.user, secret)
        return keys

    def _auth_method(self) -> str:
        """The auth.type for this login: auth.type, or the method of its hba rule; a
        cert or peer check is done here (hbaauth.Refused when it fails)."""
        auth = self.cfg.auth
        atype, map_name = auth.type, None
        if atype == "hba":
            rule = hbaauth.rule_for(auth.hba, self.addr, self.tls is not None, self.database,
                                    self.user, self.replication != "none")
            atype = hbaauth.METHOD_AS_TYPE.get(rule.method, rule.method)
            map_name = rule.map
        if atype == "cert":
            hbaauth.check_cert(self.tls.tls if self.tls else None, self.user, auth.hba, map_name)
        elif atype == "peer":
            hbaauth.check_peer(self.stream.sock, self.addr, self.user, auth.hba, map_name)
        return atype

    def _user_secret(self, route: "Route | None") -> tuple[str | None, bool]:
        """(secret, looked_up): from the auth_file, else from auth_query when an
        auth_user applies to the route; None for a user neither knows."""
        secret = self.worker.userlist.get(self.user)
        if secret is not None or route is None:
            return secret, False
        aq = self.worker.auth_query
        try:
            if aq.settings(route) is None:
                return None, False
            return aq.lookup(route, self.user), True
        except AuthQueryError as exc:
            raise LoginFailed(exc.sqlstate, str(exc)) from None

    def _do_auth(self, atype: str, secret: str) -> tuple | None:
        kind = authsecret.secret_kind(secret)
        if atype == "scram-sha-256" or (atype == "md5" and kind == "scram"):
            return self._auth_scram(secret)
        if atype == "md5":
            self._auth_md5(secret)
            return None
        return self._auth_plain(secret)

    def _read_password(self) -> bytes:
        mtype, body = self.stream.read_message(max_len=65536)
        if mtype != ord("p"):
            raise LoginFailed("08P01", f"expected password response, got message type {chr(mtype)!r}")
        return body

    def _auth_failed(self) -> LoginFailed:
        return LoginFailed("28P01", f'password authentication failed for user "{self.user}"')

    def _auth_plain(self, secret: str) -> tuple | None:
        self.stream.sendall(protocol.auth_request(protocol.AUTH_CLEARTEXT))
        password = self._read_password().rstrip(b"\0").decode("utf-8", "replace")
        if not passwords.verify_plain(secret, self.user, password):
            raise self._auth_failed()
        if authsecret.secret_kind(secret) == "scram":
            # Only a SCRAM secret is stored: the password gives the keys to log in to the server.
            iterations, salt, _, _ = authsecret.parse_scram_secret(secret)
            return scram.scram_keys(password, salt, iterations)
        return None

    def _auth_md5(self, secret: str) -> None:
        salt = entropy.take(4)
        self.stream.sendall(protocol.auth_request(protocol.AUTH_MD5, salt))
        response = self._read_password().rstrip(b"\0").decode("ascii", "replace")
        if not passwords.verify_md5(secret, self.user, salt, response):
            raise self._auth_failed()

    def _auth_scram(self, secret: str) -> tuple:
        if authsecret.secret_kind(secret) == "md5":
            log.warning("C-%d %s: SCRAM requested but auth_file holds an md5 secret", self.id, self._who())
            raise self._auth_failed()
        server = scram.ScramServer(self.worker.scram_secret_for(secret))
        self.stream.sendall(protocol.auth_request(protocol.AUTH_SASL, b"SCRAM-SHA-256\0\0"))
        body = self._read_password()
        try:
            mech, pos = protocol.read_cstr(body, 0)
            if mech != "SCRAM-SHA-256":
                raise LoginFailed("28000", f"unsupported SASL mechanism {mech}")
            (dlen,) = struct.unpack_from("!i", body, pos)
        except (ValueError, struct.error):
            raise LoginFailed("08P01", "malformed SASLInitialResponse message") from None
        first = body[pos + 4:pos + 4 + dlen] if dlen >= 0 else b""
        try:
            reply = server.server_first(first)
            self.stream.sendall(protocol.auth_request(protocol.AUTH_SASL_CONTINUE, reply))
            final = server.server_final(self._read_password())
        except authsecret.AuthFailed:
            raise self._auth_failed() from None
        self.stream.sendall(protocol.auth_request(protocol.AUTH_SASL_FINAL, final))
        if server.client_key is not None:
            return (server.client_key, server.server_key)
        return None

    # -- parameters ---------------------------------------------------------------

    def on_parameter_status(self, srv: "ServerConn", body: bytes) -> None:
        """The server reported a parameter change (a SET of the client's): follow it."""
        name, pos = protocol.read_cstr(body, 0)
        value, _ = protocol.read_cstr(body, pos)
        srv.params[name] = value
        if name in self.tparams:
            tparams = dict(self.tparams)     # a copy: the dict is shared (Worker.shared_tracked)
            tparams[name] = value
            self.tparams = tparams
            self.tsig = self.signature()
            srv.tsig = self.tsig

    def signature(self) -> tuple:
        """What the server must have for this client: tracked values, then SET ones."""
        return (*self.tparams.values(), self.session.key)

    def sync_parameters(self, srv: "ServerConn") -> None:
        """Make the server's tracked parameters and session settings equal to the
        client's before relaying (one batch: params.sync_sql, sessionstate.diff_sql)."""
        if srv.tsig == self.tsig:
            return              # the common case: this server last served the same values
        sparams = srv.params
        changes = [(k, v) for k, v in self.tparams.items() if sparams.get(k) != v]
        settings = self.session.settings
        stmts, prepares = [], []
        if srv.sess != settings:
            stmts = diff_sql(srv.sess, settings)
            prepares = sqlprepare.diff_sql(srv.sess, settings)[1]    # each its own Query
        if changes:
            stmts.insert(0, sync_sql(changes))
        queries = ([";".join(stmts)] if stmts else []) + prepares
        if queries:
            srv.run(*queries)
        for k, v in changes:
            if v is None:
                sparams.pop(k, None)
            else:
                sparams[k] = v
        srv.sess = settings
        srv.tsig = self.tsig
