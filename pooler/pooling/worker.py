"""One gevent worker process: accepts clients on the (shared) listening socket
and serves each in a greenlet; a janitor greenlet enforces timeouts and keeps
pools in shape."""
from __future__ import annotations

import logging
import math
import socket
import time

import gevent
import gevent.event

from pooler.wire import authsecret, netio, protocol, scram, tls, userlist
from pooler import logs
from pooler.pooling import peering
from pooler.pooling.authquery import AuthQuery
from pooler.version import version_line
from pooler.pooling.client import Client
from pooler.pooling.params import tracked_names
from pooler.config.model import Config, Route
from pooler.pooling.listener import Listener
from pooler.pooling.localquota import LocalQuota
from pooler.pooling.pool import Pool
from pooler.pooling.prelogin import Arrivals
from pooler.pooling.relay import STATUS_IDLE, ClientKill
from pooler.pooling.clientstate import ClientState
from pooler.config.settings import ADMIN_DB

log = logging.getLogger("pooler.worker")
JANITOR_PERIOD = 0.5

# Shutdown levels, slowest first (PgBouncer's meanings): SIGTERM and SHUTDOWN
# WAIT_FOR_CLIENTS wait for clients to leave; SIGINT and SHUTDOWN WAIT_FOR_SERVERS
# wait for servers to be released; SHUTDOWN closes everything now.
STOP_CLIENTS, STOP_SERVERS, STOP_NOW = 1, 2, 3
STOP_WORDS = {STOP_CLIENTS: "waiting for all clients to disconnect",
              STOP_SERVERS: "waiting for all servers to be released",
              STOP_NOW: "closing every connection now"}
DRAIN_WINDOW = 5.0      # a STOP_CLIENTS shutdown drains like STOP_SERVERS for its last 5 s


class Worker:
    def __init__(self, cfg: Config, listeners: list[socket.socket], worker_id: int = 0,
                 quota=None) -> None:
        self.cfg = cfg
        self.listeners = listeners
        self.worker_id = worker_id
        self.quota = quota if quota is not None else LocalQuota()
        self.pools: dict[tuple[str, str], Pool] = {}
        self.clients: set[Client] = set()
        self.cancel_keys: dict[tuple[int, int], Client] = {}
        self.servers: list[Listener] = []
        # The admin console (the virtual database `pgbouncer`), given by the process
        # layer that assembles the pooler (proc/); None: no console (a bare worker).
        self.admin = None
        self.auth_query = AuthQuery(self)  # auth_user / auth_query lookups and their cache
        self.peer_pools = peering.PeerPools()   # cancel requests on their way to peers
        self.userlist: dict[str, str] = {}
        self._scram_cache: dict[str, str] = {}
        self.tracked: tuple[str, ...] = ()
        self.tracked_canon: dict[str, str] = {}
        self._tracked_shared: dict[tuple, tuple[dict, tuple]] = {}   # shared_tracked()
        # Connections whose first packet is not whole yet: no greenlet, no Client.
        self.arrivals = Arrivals(self._spawn_login, cfg.client_login_max_pending)
        self.shutting_down = False
        self.stop_level = 0                  # STOP_* of the shutdown under way; 0: serving
        self._stopper: gevent.Greenlet | None = None
        self.stopped = gevent.event.Event()  # set when a shutdown has closed everything
        self.config_path = ""
        # Prefork mode (master.py): the link to the other workers (workerproc.Peers),
        # None when this process is the whole pooler.
        self.peers = None
        # Prefork mode: the master's copies of long-lived client sockets (proc/clientkeep
        # Keeper: started(client), forget(client), tick(now)); None otherwise.
        self.keeper = None
        self.max_accept = 100        # lowered when several workers share the socket
        # What an operator set, by the admin console, SIGUSR1/SIGUSR2 or (prefork) another
        # worker through shared memory. Owned here: new pools, logins and snapshots read it.
        self.paused = False          # PAUSE / SUSPEND / SIGUSR1: new pools start paused too
        self.suspended = False       # SUSPEND: a pause that keeps its servers
        self.paused_dbs: set[str] = set()        # PAUSE db, KILL db
        self.disabled_dbs: set[str] = set()      # DISABLE db: new logins refused
        self.shutdown_mode: str | None = None    # the admin SHUTDOWN's mode, for SHOW STATE
        self.apply_config(cfg)

    # -- config -----------------------------------------------------------------

    def apply_config(self, cfg: Config) -> None:
        """Take a (validated) config: new limits apply to pools from now on."""
        old, self.cfg = self.cfg, cfg
        # A change of any TLS setting reconnects the servers, as PgBouncer does "for
        # security reasons": none stays open under settings that no longer hold.
        tls_changed = any(getattr(old, k) != getattr(cfg, k) for k in tls.TLS_KEYS)
        logs.reapply(cfg.log_format, cfg.logfile, cfg.verbose)    # no-op unless they changed
        self.userlist = userlist.load_userlist(cfg.auth.file) if cfg.auth.file else {}
        tls.configure(cfg)          # TLS contexts, the files re-read (new connections)
        self.auth_query.reset()
        self.tracked = tracked_names(cfg.track_extra_parameters)
        self.tracked_canon = {p.lower(): p for p in self.tracked}
        self.client_timeouts_on = cfg.any_client_timeout()
        self._routes: dict[tuple[str, str], Route | None] = {}   # route(), for this cfg
        self.arrivals.max_pending = cfg.client_login_max_pending
        for key, pool in list(self.pools.items()):
            route = cfg.route(pool.name, pool.user)     # the pool's user: its [users] entry
            if route is None:
                pool.close_listen("database removed from config")
                pool.close_all("database removed from config")
                continue
            pool.reconfigure(cfg, route)
            if tls_changed:
                pool.mark_close_needed("TLS settings changed")

    def route(self, database: str, user: str) -> Route | None:
        """cfg.route(), remembered per (database, user) until the config changes: a
        login storm resolves each pair once."""
        key = (database, user)
        routes = self._routes
        try:
            return routes[key]
        except KeyError:
            pass
        if len(routes) >= 4096:
            routes.clear()
        route = routes[key] = self.cfg.route(database, user)
        return route

    def scram_secret_for(self, secret: str) -> str:
        """A SCRAM secret for a userlist entry, derived once per plaintext password.

        Deriving costs 4096 PBKDF2 rounds; doing it on every login would make
        connection churn CPU-bound in the pooler. The cache lives in memory only.
        """
        if authsecret.secret_kind(secret) != "plain":
            return secret
        derived = self._scram_cache.get(secret)
        if derived is None:
            if len(self._scram_cache) > 10000:
                self._scram_cache.clear()
            derived = self._scram_cache[secret] = scram.scram_secret(secret)
        return derived

    def version_string(self) -> str:
        return version_line()           # the same string as `pooler -V` and SHOW VERSION

    # -- operator state --------------------------------------------------------------

    def set_pause(self, paused: bool, paused_dbs: set[str]) -> None:
        """Pause means: no server handed out (not even an idle one), clients wait,
        in-flight transactions finish. On resume every waiter retries."""
        self.paused = paused
        self.paused_dbs = set(paused_dbs)
        for pool in list(self.pools.values()):
            pool.set_paused(paused or pool.name in paused_dbs or self.shutting_down)

    def is_paused(self, db: str | None = None) -> bool:
        """Is the whole pooler (db None) or database `db` under PAUSE/SUSPEND/KILL?"""
        return self.paused if db is None else (self.paused or db in self.paused_dbs)

    def pause_mode(self) -> str:
        """'none', 'pause' or 'suspend' (SHOW STATE); per-database pauses are not a mode."""
        if not self.paused:
            return "none"
        return "suspend" if self.suspended else "pause"

    def operator_state(self) -> dict:
        """The operator's flags as plain data, for snapshots."""
        return {"pause_mode": self.pause_mode(), "paused_dbs": sorted(self.paused_dbs),
                "disabled_dbs": sorted(self.disabled_dbs), "shutdown_mode": self.shutdown_mode}

    # -- clients ------------------------------------------------------------------

    def shared_tracked(self, tparams: dict[str, str | None]) -> tuple[dict, tuple]:
        """(tracked parameters, their values' tuple) as one shared pair per distinct
        set of values: an application's 10,000 clients hold one dict between them.
        Clients never change the shared dict (Client.on_parameter_status copies)."""
        key = tuple(tparams.items())
        hit = self._tracked_shared.get(key)
        if hit is None:
            if len(self._tracked_shared) >= 4096:     # many distinct sets: just stop sharing old ones
                self._tracked_shared.clear()
            # The signature's last element is the client's SET settings (Client.signature,
            # sessionstate.py): none at login.
            hit = self._tracked_shared[key] = (tparams, (*tparams.values(), ()))
        return hit

    def try_add_client(self, client: Client) -> bool:
        """max_client_conn counts every worker's clients (in shared memory, prefork)."""
        if self.peers is not None:
            if not self.peers.add_client(self.cfg.max_client_conn):
                return False
        elif len(self.clients) >= self.cfg.max_client_conn:
            return False
        self.clients.add(client)
        return True

    def admit_db_client(self, client: Client, database: str, cap: int,
                        exempt: bool = False) -> bool:
        """max_db_client_connections: at most `cap` clients of the database entry (or
        named pool) `database`, whatever their user, over every worker; as for users,
        an uncapped database is not counted here (SHOW DATABASES counts from snapshots).
        An `exempt` client (an admin user on the console) is counted, never refused."""
        if not cap:
            return True
        key = ("db_clients", database)
        if not self.quota.try_admit(key, 0 if exempt else cap):
            return False
        client.db_client_key = key
        return True

    def admit_user_client(self, client: Client, exempt: bool = False) -> bool:
        """max_user_client_connections of the client's login user, counted over every
        worker by the quota (shared memory with several workers). Users without a cap
        are not counted at all, so that logins cost nothing extra by default. An
        `exempt` client (an admin user on the console) is counted, never refused."""
        cap = self.cfg.user_client_limit(client.user)
        if not cap:
            return True
        key = ("user_clients", client.user)
        if not self.quota.try_admit(key, 0 if exempt else cap):
            return False
        client.user_client_key = key
        return True

    def forget_client(self, client: Client) -> None:
        if client in self.clients:
            self.clients.discard(client)
            if self.peers is not None:
                self.peers.remove_client()
        for key in (client.user_client_key, client.db_client_key):
            if key is not None:
                self.quota.release([(key, 0)])
        client.user_client_key = client.db_client_key = None   # released once, whoever calls again
        if self.cancel_keys.pop(client.cancel_key, None) is not None and self.peers is not None:
            self.peers.cancel_key_removed(client.cancel_key)

    def register_cancel_key(self, client: Client) -> None:
        self.cancel_keys[client.cancel_key] = client
        if self.peers is not None:
            self.peers.cancel_key_added(client.cancel_key)

    def forward_cancel(self, pid: int, key: int) -> None:
        """A CancelRequest arrived here: cancel locally, or hand it to the owning worker,
        or (peering: the key names another peer_id) to the owning peer process."""
        if self.cfg.peer_id:
            owner = peering.peer_of(pid)
            if owner != self.cfg.peer_id:
                peering.forward(self.cfg, owner, pid, key, self.peer_pools)
                return
            key = peering.as_issued(key)        # forwarded ones arrive with a lower TTL
        if not self.cancel_local(pid, key) and self.peers is not None:
            self.peers.forward_cancel(pid, key)

    def cancel_local(self, pid: int, key: int) -> bool:
        """Send a CancelRequest to the server currently running that client's query;
        False when the key belongs to no client of this worker."""
        client = self.cancel_keys.get((pid, key))
        if client is None:
            return False
        relay = client.relay
        srv = relay.server if relay else None
        if srv is None:
            return True
        try:
            sock = netio.connect_tcp(srv.host, srv.port, self.cfg.server_connect_timeout)
            try:
                sock.sendall(protocol.cancel_request(srv.pid, srv.key))
            finally:
                sock.close()
        except OSError as exc:
            log.warning("cancel request to %s failed: %s", srv.addr, exc)
        return True

    def get_pool(self, route: Route, user: str) -> Pool:
        # `route` comes from cfg.route(name, user), so it carries the pool user's [users]
        # settings; apply_config re-resolves it the same way on reload.
        # A database entry with a forced user has one pool for all its clients,
        # as in PgBouncer; otherwise one pool per client user.
        server_user = route.user or user
        key = (route.name, server_user)
        pool = self.pools.get(key)
        if pool is None:
            pool = Pool(self, route, server_user, server_user, lambda: self._server_password(key))
            pool.paused = self.paused or route.name in self.paused_dbs
            self.pools[key] = pool
        return pool

    def _server_password(self, key: tuple[str, str]) -> str | None:
        pool = self.pools[key]
        if pool.route.password:
            return pool.route.password
        secret = self.userlist.get(pool.server_user)
        if secret is None:      # a user found by auth_query (md5 / plain secret)
            secret = self.auth_query.login_secret(pool.route, pool.server_user)
        return secret

    def handle(self, sock: socket.socket, peer: str) -> None:
        """A new connection, in the hub (the listener spawns no greenlet): it gets one
        when its first packet is whole (prelogin.Arrivals)."""
        self.arrivals.accept(netio.Stream(sock, peer), peer)

    def _spawn_login(self, stream: netio.Stream, peer: str, arrived: float) -> None:
        gevent.spawn(self._login, stream, peer, arrived)

    def _login(self, stream: netio.Stream, peer: str, arrived: float) -> None:
        Client(self, stream, peer, arrived).serve()

    # -- running --------------------------------------------------------------------

    def start(self) -> None:
        for sock in self.listeners:
            server = Listener(sock, self.handle, self.max_accept)
            server.start()
            self.servers.append(server)
        gevent.spawn(self._janitor)
        log.info("worker %d listening", self.worker_id)

    def stop_accepting(self, keep_unix: bool = False) -> None:
        """Close the listeners: with several workers the master closes its copies
        too, so the kernel refuses new connections at once. `keep_unix`: as PgBouncer
        does while shutting down, the Unix socket stays open, so an operator can still
        reach the admin console (other logins are refused: Client._login)."""
        for server in self.servers:
            if not (keep_unix and server.family == socket.AF_UNIX):
                server.close()

    def close_clients(self, sqlstate: str, message: str) -> None:
        for client in list(self.clients):
            client.kill(ClientKill(sqlstate, message))

    def _janitor(self) -> None:
        while True:
            gevent.sleep(JANITOR_PERIOD)
            try:
                self.janitor_tick(time.monotonic())
            except Exception:
                log.exception("janitor tick failed")

    def janitor_tick(self, now: float) -> None:
        # A database with a forced user and min_pool_size gets its pool before any
        # client arrives (PgBouncer does the same), so fill_min below can warm it.
        for name, entry in self.cfg.databases.items():
            if entry.user and name != "*" and (name, entry.user) not in self.pools:
                route = self.cfg.route(name, entry.user)
                if route is not None and route.min_pool_size:
                    self.get_pool(route, entry.user)
        for pool in list(self.pools.values()):
            pool.maintain(now)
            if pool.route.min_pool_size and pool.total < pool.route.min_pool_size:
                gevent.spawn(pool.fill_min)
        self.auth_query.maintain(now)
        self.arrivals.expire(now, self.cfg.client_login_timeout)
        self._client_timeouts(now)
        if self.keeper is not None:
            self.keeper.tick(now)

    def _client_timeouts(self, now: float) -> None:
        if not self.client_timeouts_on:         # none set, globally or for any user
            return
        for client in list(self.clients):
            reason = self._timeout_reason(client, now)
            if reason:
                log.info("C-%d %s closing because: %s", client.id, client._who(), reason[1])
                client.kill(ClientKill(*reason))

    def _timeout_reason(self, client: Client, now: float) -> tuple[str, str] | None:
        relay = client.relay
        if relay is None:
            return None
        # The client's pool's route: its user's timeouts, else the global ones.
        route = relay.pool.route
        if relay.server is not None:
            if route.transaction_timeout and relay.tx_start and \
                    (relay.send != relay.recv or relay.status != STATUS_IDLE) and \
                    now - relay.tx_start > route.transaction_timeout:
                return ("25P04", "transaction timeout")
            if relay.send != relay.recv:
                if route.query_timeout and now - relay.query_start > route.query_timeout:
                    return ("57014", "query timeout")
            elif route.idle_transaction_timeout and relay.status != STATUS_IDLE and \
                    now - relay.last_active > route.idle_transaction_timeout:
                # (a session-mode client between transactions holds its server at 'I')
                return ("25P03", "idle transaction timeout")
        elif route.client_idle_timeout and client.state == ClientState.IDLE and \
                now - relay.last_active > route.client_idle_timeout:
            return ("57P05", "client_idle_timeout")
        return None

    # -- shutdown -----------------------------------------------------------------

    def stop(self, level: int) -> None:
        """Begin a shutdown at `level` (STOP_CLIENTS, STOP_SERVERS, STOP_NOW), or make
        the one under way faster; a slower request never slows it down. `stopped` is
        set once every connection is closed."""
        if level > self.stop_level:
            self.stop_level = level
        if self._stopper is None:
            self._stopper = gevent.spawn(self._shutdown)

    def _shutdown(self) -> None:
        """Stop accepting at once, then, bounded by shutdown_timeout:
        STOP_CLIENTS serves connected clients until they leave; in the last
        DRAIN_WINDOW of the bound it turns into STOP_SERVERS, which starts no new
        transaction, lets those in flight finish and closes each client at its
        transaction boundary. Whatever is left at the bound (or at STOP_NOW) is
        closed with 57P01."""
        self.shutting_down = True
        self.stop_accepting(keep_unix=True)
        limit = self.cfg.shutdown_timeout
        deadline = time.monotonic() + limit if limit else math.inf      # 0: no bound
        drain_at = deadline - min(DRAIN_WINDOW, limit / 2) if limit else math.inf
        log.info("shutting down: %s (shutdown_timeout=%gs)", STOP_WORDS[self.stop_level], limit)
        draining = False
        while self.stop_level < STOP_NOW:
            now = time.monotonic()
            if now >= deadline:
                log.warning("shutdown_timeout reached: closing %d clients", len(self.clients))
                break
            if self.stop_level >= STOP_SERVERS or now >= drain_at:
                if not draining:
                    draining = True
                    self._start_draining()
                self._close_unlinked_clients()
            # Console sessions stay usable until the end (PgBouncer's); they never hold
            # a shutdown up: it ends when the other clients are gone.
            if not any(not _on_console(c) for c in list(self.clients)):
                break
            gevent.sleep(0.05)
        self.stop_accepting()
        self.close_clients("57P01", "pooler is shutting down")
        self.arrivals.close_all()
        gevent.sleep(0.05)
        for pool in self.pools.values():
            pool.close_listen("pooler shutdown")
            pool.close_all("pooler shutdown")
        self.auth_query.close()
        self.stopped.set()

    def _start_draining(self) -> None:
        """No transaction starts from now on: a client asking for a server waits, and
        is closed while parked (a transaction boundary); those in flight finish."""
        log.info("shutting down: %s", STOP_WORDS[STOP_SERVERS])
        for pool in self.pools.values():
            pool.paused = True

    def _close_unlinked_clients(self) -> None:
        """Clients between transactions can go now (session clients keep their server),
        and so can clients parked waiting for a server: their transaction has not begun.
        Console sessions stay (see _shutdown). Connections that have not sent their
        startup packet go at the end (the login refuses all but the console meanwhile)."""
        for client in list(self.clients):
            relay = client.relay
            if _on_console(client):
                continue
            if client.state == ClientState.LOGIN or self._between(client):
                client.kill(ClientKill("57P01", "pooler is shutting down"))

    def _between(self, client: Client) -> bool:
        """Between transactions, so closing it cuts nothing: no server linked and the
        last answer wholly written (a job still flushing it, or bytes the socket has
        not taken, would be cut: the client would see its COMMIT fail after it
        committed), or parked in the pool's queue, its transaction not begun."""
        relay = client.relay
        if relay is None or relay.server is not None:
            return False
        if self._parked(client):
            return True
        return client.state != ClientState.WAITING and relay.glet is None and \
            relay.step.pending is None

    @staticmethod
    def _parked(client: Client) -> bool:
        """Waiting in the pool's queue (not in the middle of opening a server)."""
        pool = client.pool
        return pool is not None and any(w.client is client and not w.done for w in pool.waiters)


def _on_console(client: Client) -> bool:
    """An admin console session, or a login to it (the database is known from the startup packet)."""
    return client.state == ClientState.ADMIN or (client.state == ClientState.LOGIN and
                                                 client.database == ADMIN_DB)
