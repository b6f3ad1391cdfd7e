"""One pool per (database entry, user): idle servers, waiting clients, limits.

Reusing an idle server of this worker is a list pop and takes no lock. Opening
a new server needs a claim on the pool's global budget (`Quota`), which with
several workers lives in shared memory; the single-process quota is plain
counters with the same interface.
"""
from __future__ import annotations

import logging
import time
from collections import deque
from typing import TYPE_CHECKING, Callable, NamedTuple

from gevent.hub import get_hub

from pooler.wire import protocol
from pooler.config.model import Config, Route
from pooler.pooling.clientstate import ClientState
from pooler.pooling import replication
from pooler.pooling.hosts import HostPicker
from pooler.pooling.poolstats import Stats
from pooler.pooling.server import ServerConn, ServerError
from pooler.errors import PoolerError
from pooler.pooling.waiter import Waiter, notify_queued

if TYPE_CHECKING:
    from pooler.pooling.worker import Worker

log = logging.getLogger("pooler.pool")


class PoolError(PoolerError):
    """A client cannot get a server (PgBouncer-style text)."""


# The states a pool's client is in while it waits for a server (see shown_state).
_WAITING_STATES = frozenset((ClientState.WAITING, ClientState.LOGIN))


class Gauges(NamedTuple):
    """What is true of one pool now, as SHOW POOLS' columns count it (PgBouncer's meaning).

    The one definition: the admin snapshot and the prefork shared-memory stats both
    read `Pool.gauges()`, so SHOW POOLS and `python -m pooler.proc.shm dump` agree."""
    cl_active: int      # logged in and not waiting: idle between requests, or linked
    cl_waiting: int     # waiting for a server: for a request, or still for its login
    sv_active: int      # linked to a client
    sv_idle: int        # idle, usable at once
    sv_used: int        # idle, but gets server_check_query before its next client
    sv_login: int       # being connected
    maxwait: float      # seconds the oldest client in the queue has waited (login waits too)


class Pool:
    def __init__(self, worker: "Worker", route: Route, user: str, server_user: str,
                 password_for: Callable[[], str | None]) -> None:
        self.worker = worker
        self.cfg = worker.cfg
        self.route = route
        self.user = user                    # the client-side user the pool serves
        self.server_user = server_user      # who we log in as
        self.password_for = password_for
        self.name = route.name
        self.idle: list[ServerConn] = []    # LIFO: the warmest server first
        self.active: set[ServerConn] = set()
        self.connecting = 0
        self.waiters: deque[Waiter] = deque()
        # Servers to give back at release instead of handing them to a waiter here: set
        # by the prefork ticker when other workers starve for this pool (peers.py).
        self.owe_back = 0
        self.clients: set = set()
        self.stats = Stats()
        self.welcome: dict[str, str] | None = None   # server ParameterStatus values for new clients
        self._welcome_msgs: dict[tuple, bytes] = {}   # welcome_messages(), by tracked values
        self.last_login_failure: tuple[float, str] | None = None
        self.login_down = False     # that failure passes (PostgreSQL down/restarting)
        self.paused = False
        self.hub = get_hub()
        self.scram_keys: tuple | None = None
        self.hosts = HostPicker(route)      # which host of the entry's list a new server gets
        self._quota_keys = self._make_quota_keys()
        self.listen_hub = None      # notifyhub.NotifyHub, made by the first shared LISTEN

    def _make_quota_keys(self) -> list[tuple[object, int]]:
        # The route holds the effective values: the pool's user's [users] entry first.
        r, cfg = self.route, self.cfg
        max_db = r.max_db_connections or cfg.max_db_connections
        return [(("pool", r.name, self.user), r.pool_size + r.reserve_pool_size),
                (("db", r.name), max_db),
                (("user", self.server_user), r.max_user_connections)]

    @property
    def total(self) -> int:
        return len(self.idle) + len(self.active) + self.connecting

    # -- gauges (SHOW POOLS, shared-memory stats) -----------------------------------

    def server_is_used(self, srv: ServerConn, now: float) -> bool:
        """An idle server that must pass server_check_query before reuse: idle longer
        than server_check_delay (PgBouncer's "used"). `_fresh` checks by this rule."""
        cfg = self.cfg
        return bool(cfg.server_check_query) and now - srv.last_used > cfg.server_check_delay

    def gauges(self, now: float) -> Gauges:
        """The pool's SHOW POOLS counts at monotonic time `now`."""
        clients = list(self.clients)
        # shown_state() for members of a pool: LOGIN there is a login wait. (Counted
        # inline: the prefork ticker runs this for every pool five times a second.)
        waiting = sum(1 for c in clients if c.state in _WAITING_STATES)
        active = len(clients) - waiting
        used = sum(1 for srv in list(self.idle) if self.server_is_used(srv, now))
        # Waiters already handed a server (done) no longer wait, even if not yet resumed.
        oldest = min((w.since for w in list(self.waiters) if not w.done), default=None)
        return Gauges(active, waiting, len(self.active), len(self.idle) - used, used,
                      self.connecting, 0.0 if oldest is None else max(0.0, now - oldest))

    # -- acquire / release ------------------------------------------------------

    def acquire_nowait(self) -> ServerConn | None:
        """The most recently used idle server if it can be handed out without blocking
        (used recently enough that server_check_delay asks for no check: server_is_used,
        inlined; not stale, inlined too); else None. The relay calls this from a loop
        callback; acquire() is the waiting path."""
        idle = self.idle
        if idle and not self.paused and not self.cfg.server_round_robin:
            srv = idle[-1]
            cfg, now, lifetime = self.cfg, time.monotonic(), self.route.server_lifetime
            if not srv.closed and (not cfg.server_check_query or
                                   now - srv.last_used <= cfg.server_check_delay) and \
                    not 0 < lifetime <= now - srv.created:
                idle.pop()
                self.active.add(srv)
                return srv
        return None

    def must_queue(self) -> bool:
        """acquire() would only queue: paused, or no idle server and none may be opened
        (pool_size reached, here or, with several workers, by all of them together:
        the claim would be refused; and no reserve pool). The relay then queues a
        callback waiter (enqueue) instead of blocking a greenlet in acquire(): with
        2 workers each holding part of pool_size, a greenlet and a locked claim per
        queued transaction cost 2.7x the CPU of one worker."""
        if self.paused:
            return True
        if self.idle or self.route.reserve_pool_size:
            return False
        pool_size = self.route.pool_size
        return self.total >= pool_size or self.worker.quota.count(self.pool_key) >= pool_size

    def enqueue(self, client, cb: Callable) -> Waiter:
        """Queue a callback waiter: cb(server) runs from the loop when one is handed
        over, cb(None) when it should retry through acquire() (resume, a freed slot)."""
        w = Waiter(client, cb)
        self.waiters.append(w)
        return w

    def acquire(self, client) -> ServerConn:
        """A server for `client`: an idle one, a new one, or the next one released."""
        srv = self.acquire_nowait()
        if srv is not None:
            return srv
        since = 0.0                  # when this client started waiting
        while True:
            # Paused: no server is handed out, not even an idle one; clients wait.
            srv = None if self.paused else self._pop_idle()
            if srv is not None:
                return self._checked_out(srv)
            if self.login_down and self._ride_out_restart(client, since or time.monotonic()):
                since = since or time.monotonic()
                continue
            if self._may_open(since):
                try:
                    return self._open()
                except PoolError:
                    if not self.login_down:
                        raise
                    since = since or time.monotonic()
                    continue                 # PostgreSQL is down: wait, then retry
            if self._evict_for_caps() and self._may_open(since):
                return self._open()
            since = since or time.monotonic()
            srv = self._wait(client, since)
            if srv is not None:
                return self._checked_out(srv)

    def _ride_out_restart(self, client, since: float) -> bool:
        """PostgreSQL refused or could not take a login for a reason that passes
        (down, starting up, shutting down, out of connection slots): wait, as a queued
        client, for a released server or the next attempt, one per server_login_retry
        and one at a time, up to query_wait_timeout (the janitor). True: waited; the
        caller looks again. False: an attempt may be made now."""
        left = self.last_login_failure[0] + self.cfg.server_login_retry - time.monotonic() \
            if self.last_login_failure else 0.0
        if left <= 0 and not self.connecting:
            return False
        self._wait(client, since, timeout=max(left, 0.05) if left > 0 else
                   self.cfg.server_login_retry)
        return True

    def _pop_idle(self) -> ServerConn | None:
        idle = self.idle
        while idle:
            srv = idle.pop(0) if self.cfg.server_round_robin else idle.pop()
            if self._fresh(srv):
                return srv
        return None

    def _fresh(self, srv: ServerConn) -> bool:
        """Check a server that sat idle longer than server_check_delay; close a bad one."""
        if srv.closed:
            self._forget(srv)
            return False
        now = time.monotonic()
        if self.stale(srv, now):
            self.discard(srv, "server lifetime over")
            return False
        # server_check_delay 0 means: check every time (PgBouncer).
        if self.server_is_used(srv, now):
            try:
                srv.check(self.cfg.server_check_query)
            except Exception as exc:
                log.info("S-%d %s@%s closing because: server check failed (%s)", srv.id,
                         self.server_user, self.name, exc)
                srv.close(send_terminate=False)
                self._forget(srv)
                return False
        return True

    def _checked_out(self, srv: ServerConn) -> ServerConn:
        self.active.add(srv)
        return srv

    def _may_open(self, since: float = 0.0) -> bool:
        """Within pool_size (reserve only for clients that waited reserve_pool_timeout)?"""
        if self.paused:
            return False
        if self.total >= self.route.pool_size:
            if not self._reserve_allowed(since):
                return False
        return self.worker.quota.try_claim(self._claim_keys())

    def _evict_for_caps(self) -> bool:
        """Below pool_size but max_db_connections / max_user_connections is reached:
        close the least recently used idle server of another pool of this worker that
        counts against the same cap, so this pool can open one (PgBouncer evicts too)."""
        max_db = self.route.max_db_connections or self.cfg.max_db_connections
        max_user = self.route.max_user_connections
        if self.paused or self.total >= self.route.pool_size or not (max_db or max_user):
            return False
        victim = None
        for pool in self.worker.pools.values():
            if pool is self or not pool.idle:
                continue
            if (max_db and pool.name == self.name) or \
                    (max_user and pool.server_user == self.server_user):
                srv = pool.idle[0]
                if victim is None or srv.last_used < victim.last_used:
                    victim = srv
        if victim is None:
            return False
        victim.pool.discard(victim, "evicted: max_db_connections/max_user_connections reached")
        return True

    def _claim_keys(self) -> list[tuple[object, int]]:
        if self.total < self.route.pool_size:
            return self.ordinary_keys()
        return self._quota_keys

    def _reserve_allowed(self, since: float = 0.0) -> bool:
        """`since`: when the asking client started waiting (it is not in `waiters`)."""
        r = self.route
        if not r.reserve_pool_size or self.total >= r.pool_size + r.reserve_pool_size:
            return False
        oldest = self.waiters[0].since if self.waiters else 0.0
        if since and (not oldest or since < oldest):
            oldest = since
        if not oldest:
            return False
        return time.monotonic() - oldest >= self.cfg.reserve_pool_timeout

    def _open(self, startup: dict[str, str] | None = None) -> ServerConn:
        """Connect a new server; the quota claim is already held. `startup`: the
        replication parameters of a replication client's own server (replication.py),
        whose failures say nothing of the pool's ordinary logins."""
        fail = self.last_login_failure
        if fail and startup is None and time.monotonic() - fail[0] < self.cfg.server_login_retry:
            self.worker.quota.release(self._quota_keys)
            raise PoolError("08P01", f"server login has been failing, try again later (server_login_retry): {fail[1]}")
        self.connecting += 1
        try:
            srv = ServerConn.connect(self, self.server_user, self.password_for(), self.scram_keys,
                                     self.cfg.server_connect_timeout, self.hosts.next(), startup)
            if self.route.connect_query and startup is None:
                srv.run(self.route.connect_query)
        except BaseException as exc:
            self.connecting -= 1
            self.worker.quota.release(self._quota_keys)
            if isinstance(exc, ServerError):
                self.hosts.outcome(False)
                if startup is None:
                    self._login_failed(exc)
                if exc.fields:
                    # PostgreSQL refused the login: pass its error on as PgBouncer does
                    # (e.g. 3D000 database "x" does not exist, 28P01 bad password).
                    raise PoolError(exc.sqlstate, str(exc)) from exc
                # Ours: an auth class (28xxx) or a protocol refusal (08P01) stays;
                # anything else is the connection failing (08006).
                sqlstate = exc.sqlstate if exc.sqlstate.startswith("28") or \
                    exc.sqlstate == "08P01" else "08006"
                raise PoolError(sqlstate, f"server login failed: {exc}") from exc
            raise
        self.connecting -= 1
        self.hosts.outcome(True)
        if self.last_login_failure is not None:
            self.last_login_failure = None
            self.login_down = False
            self.wake_waiters(len(self.waiters))     # back up: everyone waiting retries
        if self.welcome is None and startup is None:
            self.welcome = dict(srv.params)
            self._welcome_msgs.clear()
        log.info("S-%d %s@%s new connection to server (%s)", srv.id, self.server_user, self.name, srv.addr)
        self.active.add(srv)
        return srv

    def _login_failed(self, exc: ServerError) -> None:
        self.last_login_failure = (time.monotonic(), str(exc))
        # A server that worked and is down or restarting (no answer, 57P03
        # starting up / shutting down, 53300 no slots): clients wait it out.
        # One never reached, or a refusal for good (a bad password, no such
        # database), fails them at once, as PgBouncer's fast fail does.
        self.login_down = self.welcome is not None and (
            not exc.fields or exc.sqlstate in ("57P03", "53300"))
        log.warning("%s@%s server login failed: %s", self.server_user, self.name, exc)
        self._wake_next_waiter()

    def _wait(self, client, since: float = 0.0, timeout: float = 0.0) -> ServerConn | None:
        """Park until a server is handed over (or a slot frees up, or `timeout` passes:
        then None)."""
        w = Waiter(client)
        t0 = w.since
        if since:
            w.since = since         # query_wait_timeout / reserve count from the first wait
            # A wait resumed after a wake-up without a server: its notice was due already.
            w.notified = t0 - since > self.cfg.query_wait_notify
        self.waiters.append(w)
        timer = None
        if timeout:
            timer = self.hub.loop.timer(timeout)
            timer.start(self._wake_waiter, w)
        try:
            return self.hub.switch()
        except BaseException:
            # Killed or timed out while queued: leave the queue (a hand-over
            # already popped us, so only this path needs the O(n) removal).
            try:
                self.waiters.remove(w)
            except ValueError:
                pass
            raise
        finally:
            if timer is not None:
                timer.close()
            w.done = True
            self.stats.wait_time += time.monotonic() - t0

    def _wake_waiter(self, w: Waiter) -> None:
        """A timed wait is over: the waiter looks again (None), unless already served."""
        if w.done:
            return
        w.done = True
        try:
            self.waiters.remove(w)
        except ValueError:
            pass
        w.glet.switch(None)

    def _hand_over(self, srv: ServerConn | None) -> bool:
        """Give `srv` (or, with None, the right to retry) to the oldest waiter."""
        waiters = self.waiters
        while waiters:
            w = waiters.popleft()
            if w.done:
                continue
            w.done = True
            self.hub.loop.run_callback(w.glet.switch if w.cb is None else w.cb, srv)
            return True
        return False

    def set_paused(self, paused: bool) -> None:
        """PAUSE / RESUME of this pool: on resume every waiter retries."""
        was_paused, self.paused = self.paused, paused
        if was_paused and not paused:
            for _ in range(len(self.waiters)):
                self._wake_next_waiter()

    def _wake_next_waiter(self) -> None:
        self._hand_over(None)

    def life_over(self, srv: ServerConn, now: float) -> bool:
        """Older than its database's server_lifetime (PgBouncer: 0 = used only once)."""
        return now - srv.created >= self.route.server_lifetime

    def stale(self, srv: ServerConn, now: float) -> bool:
        """An idle server life_over that the janitor has not come round to yet: not
        handed out. (With server_lifetime 0 a server not yet used, min_pool_size's or
        the one a first login opened, still serves once, as in PgBouncer.)"""
        lifetime = self.route.server_lifetime
        return 0 < lifetime <= now - srv.created

    def release(self, srv: ServerConn, now: float = 0.0, fresh: bool = False) -> None:
        """A client is done with `srv` (clean, at ReadyForQuery 'I'). `fresh`: just
        logged in, never used (min_pool_size): not yet subject to server_lifetime."""
        self.active.discard(srv)
        srv.client = None
        if not now:
            now = time.monotonic()
        srv.last_used = now
        if srv.closed or srv.close_needed or (not fresh and self.life_over(srv, now)):
            self.discard(srv, "server closed" if srv.closed else
                         "RECONNECT" if srv.close_needed else "server lifetime over")
            return
        if self.owe_back:               # prefork fairness (proc/peers.py _share_fairly)
            self.owe_back -= 1
            self.active.discard(srv)
            if self.worker.peers.move_out(self, srv):    # to the worker whose client waits
                return
            log.info("S-%d %s@%s closing because: a client waits for it in another worker",
                     srv.id, self.server_user, self.name)
            srv.close()
            self._forget(srv, wake=False)    # the slot is for the other worker's client
            return
        if self.waiters and not self.paused:
            if self._hand_over(srv):
                self.active.add(srv)
                return
        srv.watch_idle()                # a server that dies while idle leaves at once
        self.idle.append(srv)

    def discard(self, srv: ServerConn, reason: str) -> None:
        """Close a server that must not be reused, and free its slot."""
        if not srv.closed:
            log.info("S-%d %s@%s closing because: %s", srv.id, self.server_user, self.name, reason)
            srv.close()
        self._forget(srv)

    def _forget(self, srv: ServerConn, wake: bool = True) -> None:
        self.active.discard(srv)
        try:
            self.idle.remove(srv)
        except ValueError:
            pass
        self.worker.quota.release(self._quota_keys)
        # A slot freed up: a waiter may now open its own server.
        if wake and self.waiters:
            self._wake_next_waiter()

    # -- maintenance (janitor) --------------------------------------------------

    def maintain(self, now: float) -> None:
        """Close old idle servers, open min_pool_size, grant reserve, expire waits."""
        cfg = self.cfg
        # min_pool_size holds for the whole pooler (fill_min claims globally), so the
        # idle timeout may shrink the pool down to it counting every worker's servers.
        surplus = self._surplus_over_min() if cfg.server_idle_timeout and self.idle else 0
        for srv in list(self.idle):
            age_idle = now - srv.last_used
            if cfg.server_idle_timeout and age_idle > cfg.server_idle_timeout and surplus > 0:
                surplus -= 1
                self.idle.remove(srv)
                self.discard(srv, "server idle timeout")
            elif self.life_over(srv, now):
                self.idle.remove(srv)
                self.discard(srv, "server lifetime over")
        if self.waiters and (self._reserve_allowed() or
                             (self.total < self.route.pool_size and not self.paused)):
            # Reserve granted, or below pool_size yet waiting: a database/user cap was
            # full; let the oldest waiter retry (it may evict another pool's idle server).
            self._wake_next_waiter()
        if cfg.query_wait_notify and self.waiters:
            notify_queued(self.waiters, now, cfg.query_wait_notify)
        wait_limit = self.route.query_wait_timeout     # the user's, else the global one
        if wait_limit:
            for w in list(self.waiters):
                if not w.done and now - w.since > wait_limit:
                    self.waiters.remove(w)
                    w.done = True
                    w.fail(self.hub, PoolError("08P01", "query_wait_timeout"))

    def _surplus_over_min(self) -> int:
        """Servers this pool holds beyond min_pool_size, counted over all workers."""
        want = self.route.min_pool_size
        if not want:
            return len(self.idle)
        return self.worker.quota.count(self._quota_keys[0][0]) - want

    def fill_min(self) -> None:
        """Open servers up to min_pool_size (called from the janitor's own greenlet)."""
        want = self.route.min_pool_size
        while not self.paused and self.total < want and not self.last_login_failure:
            # Claim against min_pool_size as the pool's cap: the quota is global
            # with several workers, so together they open min_pool_size, not N times it.
            keys = self._quota_keys
            if not self.worker.quota.try_claim([(keys[0][0], want)] + keys[1:]):
                return
            try:
                srv = self._open()
            except PoolError:
                return
            self.release(srv, fresh=True)

    def close_all(self, reason: str) -> None:
        self.close_listen(reason, reopen=True)    # PAUSE waits for every server
        for srv in list(self.idle):
            self.discard(srv, reason)

    def close_listen(self, reason: str, reopen: bool = False) -> None:
        """Shared LISTEN (notifyhub.py): close the hub's server; `reopen`: another is
        opened and its channels LISTENed again, else the hub ends (its clients stay)."""
        hub = self.listen_hub
        if hub is not None and reopen:
            hub.restart(reason)
        elif hub is not None:
            self.listen_hub = None
            hub.close(reason)

    def mark_close_needed(self, reason: str) -> None:
        """RECONNECT, or a reload that moved the database: idle servers go now, the others
        when released (SHOW SERVERS' close_needed until then; WAIT_CLOSE waits for them)."""
        for srv in list(self.active) + list(self.idle):
            srv.close_needed = True
        replication.close_marked(self, reason)     # never released: they go now
        self.close_all(reason)

    def welcome_messages(self, tparams: dict[str, str | None], tsig: tuple) -> bytes:
        """The ParameterStatus messages a new client is greeted with: the server's
        values with the client's tracked ones over them, built once per set of
        tracked values (`tsig`, the values of `tparams`) rather than per login."""
        msgs = self._welcome_msgs.get(tsig)
        if msgs is None:
            values = dict(self.welcome or {})
            values.update({k: v for k, v in tparams.items() if v is not None})
            msgs = b"".join(protocol.parameter_status(k, v) for k, v in values.items())
            if len(self._welcome_msgs) >= 256:
                self._welcome_msgs.clear()
            self._welcome_msgs[tsig] = msgs
        return msgs

    def reconfigure(self, cfg: Config, route: Route) -> None:
        """A reload: new limits (and quota caps) for the servers opened from now on. If the
        entry now leads elsewhere (PgBouncer: its connection string changed), the servers
        opened the old way are closed as above, so new transactions reach the new target."""
        moved = route.target() != self.route.target()
        self._welcome_msgs.clear()          # the tracked parameters may have changed
        self.cfg = cfg
        self.route = route
        self._quota_keys = self._make_quota_keys()
        self.hosts.set_route(route)     # new servers go to the new host list
        if moved:
            self.mark_close_needed("database configuration changed")

    # -- cross-worker hand-off (proc/peers.py; one process never calls these) -----

    @property
    def pool_key(self) -> object:
        """The quota key of this pool itself (its slot also holds its stats)."""
        return self._quota_keys[0][0]

    def ordinary_keys(self) -> list[tuple[object, int]]:
        """(key, cap) of every quota key, the pool key capped at pool_size: the caps an
        ordinary claim (no reserve) must fit under."""
        keys = self._quota_keys
        return [(keys[0][0], self.route.pool_size)] + keys[1:]

    def remote_waiters(self) -> int:
        """Clients waiting here that a server closed by another worker could serve: none
        while paused, or while this pool is at its own pool_size (then only one of its
        own servers coming back helps)."""
        if self.paused or self.total >= self.route.pool_size:
            return 0
        return len(self.waiters)

    def has_spare_idle(self) -> bool:
        """Idle servers that no client of this pool waits for (they may be given back)."""
        return bool(self.idle) and not self.waiters and not self.paused

    def wake_for_room(self, free: int) -> int:
        """Room for `free` more servers opened globally: let that many waiters retry
        (no more than this pool's own pool_size allows). Returns how many."""
        if not self.remote_waiters():
            return 0
        room = min(free, self.route.pool_size - self.total, len(self.waiters))
        self.wake_waiters(room)
        return max(room, 0)

    def wake_waiters(self, n: int) -> None:
        """Let the `n` oldest waiters retry (a resume, or room freed up elsewhere)."""
        for _ in range(n):
            self._wake_next_waiter()
