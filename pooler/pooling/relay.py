"""The hot loop: moves bytes between one client and the server linked to it.

The steady state runs in libev io-watcher callbacks: the client's read watcher
stays started with `_on_client`, the linked server's with `_on_server`, and each
wake-up is one call of the relay step (relaystep: compiled, or its pure-Python
twin) that reads a chunk, walks the message headers, forwards what it can and
returns an event. A client holds no greenlet while it relays or idles (~7 KB
each): the login greenlet ends once the relay starts, and a callback that meets
work that may block starts a greenlet for it:

  J_LINK    no idle server at hand: wait in the pool (and set parameters)
  J_SYNC    the idle server needs the client's parameters SET first
  J_FLUSH_* a socket took only part of a chunk: send the rest
  J_REFUSE  statement mode: roll back a transaction the client opened
  J_LOST    the server went away mid-transaction (relayfaults.server_lost)
  J_RAISE   a callback failed: raise its exception in the greenlet
  J_BAD     the client sent a message the pooler refuses: let the server finish
            what it was sent (so it stays pooled), then close the client (08P01)
  J_FAILED  the server died in a transaction block: the pooler answers the
            client until it ends the block (relayfaults.feed_failed)
  J_END     the client left (Terminate, EOF)
  J_RETRY   the first send to a server just linked failed: none of the request
            reached it, so it goes to another server (relayfaults.retry_unsent)
  J_SESS    session statements ran: read the state back (sessionstate.at_release)
  J_LISTEN  a lone LISTEN / UNLISTEN with no server linked: the pool's NotifyHub
            takes it (listencmd.serve; shared_listen)

A callback that hands work over disarms both watchers and starts the job's
greenlet as its last statement (`_spawn`); the greenlet does the job, arms the
watchers again and ends (`_work`). So a greenlet blocked in a job is never
entered by a callback, and one client's bytes never pass through two hands at
once. Timeouts, KILL and shutdown reach a client through `kill()`, raised in
the running job or in one started for it. The relay acts only on the step's
events (relaystep_py.py). A kept client's byte: pooling/clientflags.py.
"""
from __future__ import annotations

import logging
import time
from bisect import bisect_left
from typing import TYPE_CHECKING

from gevent import GreenletExit, get_hub, getcurrent
from greenlet import greenlet

from pooler.wire import protocol
from pooler.wire.netio import ConnectionClosed, disarm
from pooler.wire.tls import TlsSocket
from pooler.pooling import (
    clientflags, listencmd, relaybuf, relayexit, relayfaults, relaystep, relaytls, replication, sessionstate)
from pooler.pooling.relaystep import (
    EV_ANSWER, EV_CC, EV_CLOSED, EV_EOF, EV_HELD, EV_LINK, EV_NONE, EV_PARAM, EV_PROTO,
    EV_BAD, EV_QDONE, EV_REFUSE, EV_RELEASE, EV_REWRITE, EV_SESSION, EV_TERMINATE, EV_Z,
    END_MASK, F_AGAIN)
from pooler.pooling.histogram import BOUNDS
from pooler.pooling.pool import PoolError
from pooler.pooling.prepared import ClientStatements, is_forget_all, rewrite
from pooler.errors import PoolerError
from pooler.pooling.clientstate import ClientState

if TYPE_CHECKING:
    from pooler.pooling.client import Client
    from pooler.pooling.server import ServerConn

log = logging.getLogger("pooler.relay")

_free_bufs = relaybuf.free_bufs     # popped inline in _on_client (relaybuf.py)
monotonic = time.monotonic

STATUS_IDLE = ord("I")
ACTIVE, IDLE = ClientState.ACTIVE, ClientState.IDLE
SESSION, TRANSACTION, STATEMENT = "session", "transaction", "statement"
_MODE = {SESSION: relaystep.SESSION, TRANSACTION: relaystep.TRANSACTION,
         STATEMENT: relaystep.STATEMENT}

# Jobs for the greenlet (bits: a walk can end with several, done in this order).
(J_FLUSH_S, J_FLUSH_C, J_REFUSE, J_LOST, J_END, J_LINK, J_SYNC, J_RAISE, J_BAD, J_FAILED,
 J_RETRY, J_SESS, J_LISTEN) = (1 << bit for bit in range(13))
LISTEN_FIRST = listencmd.FIRST
K_BUSY = clientflags.BUSY


def _io_job(ev: int, on_eof: int, on_closed: int, what: str) -> int:
    """The job an I/O event of one direction means: EV_NONE none, EV_EOF (this side
    closed) `on_eof`, EV_CLOSED (a send to the other side failed) `on_closed`."""
    if ev == EV_NONE:
        return 0
    if ev == EV_EOF:
        return on_eof
    if ev == EV_CLOSED:
        return on_closed
    raise protocol.ProtocolError(what)


class ClientKill(PoolerError):
    """Raised into a client's greenlet to disconnect it with an error (timeouts, admin KILL)."""


class Relay:
    """Relay state of one client; the server link comes and goes with the pool mode."""

    __slots__ = ("client", "cs", "pool", "stats", "mode", "stmts", "server", "step", "glet",
                 "hub", "query_start", "xact_start", "last_active", "parts", "refuse", "dedicated",
                 "exc", "synced", "waiter", "ended", "failed", "on_client_cb", "on_server_cb",
                 "tls", "tx_start", "listens", "kslot", "kflags", "ktsig")

    def __init__(self, client: "Client") -> None:
        self.client = client
        self.cs = client.stream
        self.pool = client.pool
        self.stats = client.pool.stats
        self.dedicated = client.replication != "none"     # its own server (replication.py)
        self.mode = SESSION if self.dedicated else client.pool.route.pool_mode
        cfg = client.pool.cfg
        self.stmts: ClientStatements | None = None
        if self.mode != SESSION and cfg.max_prepared_statements > 0:
            self.stmts = ClientStatements(cfg.max_prepared_statements, self.stats.prepared)
        self.server: ServerConn | None = None
        self.step = relaystep.Step(self.cs.sock, _MODE[self.mode], self.stmts is not None)
        self.glet = None
        self.hub = get_hub()
        self.query_start = 0.0   # when the oldest unanswered request was sent
        self.xact_start = 0.0    # when the server was linked (before: when one was needed)
        self.last_active = monotonic()
        self.parts: list | None = None    # bytes before cut messages, while a walk is held
        self.refuse = False
        self.exc: BaseException | None = None
        self.synced: ServerConn | None = None   # a fast-acquired server awaiting SETs
        self.waiter = None       # queued in the pool as a callback waiter (pool.enqueue)
        self.ended = False
        self.failed = None       # lostserver.FailedBlock after a server died mid-block
        # Bound once: a watcher started with the same callback object costs no allocation.
        self.on_client_cb = self._on_client
        self.on_server_cb = self._on_server
        # relaytls bits: which sides are wire/tls.TlsSocket (the server's set at _link).
        self.tls = relaytls.CLIENT if type(self.cs.sock) is TlsSocket else 0
        # When the client's current transaction began (transaction_timeout), 0 between
        # transactions: set by the first request after the server was last idle.
        self.tx_start = 0.0
        # Shared LISTEN (listencmd.py): looked for at each link, so decided once here.
        self.listens = self.mode != SESSION and not self.dedicated and cfg.shared_listen
        # Kept by the master (proc/clientkeep.py): the client's byte in kflags (0: not kept),
        # and the Client.tsig its record holds (pooling/clientflags.py).
        self.kslot, self.kflags, self.ktsig = 0, None, None

    # What the worker's janitor and SHOW commands read.
    send = property(lambda self: self.step.send, doc="requests sent on the link")
    recv = property(lambda self: self.step.recv, doc="of them answered (ReadyForQuery)")
    status = property(lambda self: self.step.status, doc="the last ReadyForQuery status")

    def start(self) -> None:
        """Start relaying, in the client's login greenlet, which then ends: from here the
        relay lives in loop callbacks, with a greenlet only while a job runs."""
        self.glet = getcurrent()
        early = self.cs.take_buffered()
        job = 0
        try:
            if early:
                relaybuf.borrow(self)
                self.step.cbuf[:len(early)] = early
                self.step.cend = len(early)
                job = self.client_events(self.step.client_start())
        except BaseException as exc:
            self._fail(exc)
            relayexit.end(self)
            return
        self._work(job)

    def resume(self) -> None:
        """Start relaying a client that logged in elsewhere (pooling/clientadopt.py)."""
        self._arm()

    def _spawn(self, job: int) -> None:
        """From a loop callback (watchers disarmed): run `job` in a new greenlet. A
        client that leaves with no server linked is ended right here: nothing in
        that can block, and a greenlet per disconnect costs what a login saves."""
        if job == J_END and self.server is None and self.synced is None:
            try:
                relayexit.end(self)
            except Exception:            # never into the hub's loop
                log.exception("C-%d closing failed", self.client.id)
            return
        g = self.glet = greenlet(self._work, self.hub)
        g.switch(job)

    def _work(self, job: int) -> None:
        """Run jobs in this greenlet until none is left, then arm the watchers and let
        the greenlet end (the relay goes on in callbacks); or end the relay."""
        ended = True
        try:
            while job:
                job = self._do(job)
                if job == J_END:
                    return
            self.glet = None
            self._arm()
            ended = False
        except BaseException as exc:
            self._fail(exc)
        finally:
            if ended:
                relayexit.end(self)

    def _fail(self, exc: BaseException) -> None:
        """Tell the client why it is closed (as its greenlet's handlers did)."""
        if isinstance(exc, (ConnectionClosed, GreenletExit)):
            return
        if isinstance(exc, PoolerError):     # ClientKill, PoolError, ProtocolError, ...
            self.client.fatal(exc.sqlstate, exc.message)
            return
        if not isinstance(exc, Exception):
            raise exc
        self.client.internal_error(exc)

    def kill(self, exc: BaseException) -> None:
        """Disconnect the client with `exc` (a ClientKill, a PoolError), from any greenlet."""
        self.hub.loop.run_callback(self._kill_now, exc)

    def _kill_now(self, exc: BaseException) -> None:
        if self.ended:
            return
        g = self.glet
        if g is not None:                # a job (or the start) is running: raise there
            if not g.dead:
                g.throw(exc)
            return
        self.exc = exc
        self._disarm()
        self._spawn(J_RAISE)

    def _arm(self) -> None:
        """Start the watchers: the steady state's callbacks take over."""
        self.cs.rw.start(self.on_client_cb)
        srv = self.server
        if srv is not None:
            srv.stream.rw.start(self.on_server_cb)
        if self.tls:
            relaytls.more(self)

    def _disarm(self) -> None:
        if self.kslot:                   # a job starts: what the client sees is its own
            self.kflags[self.kslot] = K_BUSY
        disarm(self.cs.rw)
        srv = self.server
        if srv is not None:
            disarm(srv.stream.rw)

    def _do(self, job: int) -> int:
        """Run one job in the greenlet (may block); returns the next job, 0 for none."""
        step = self.step
        if job & J_RAISE:
            exc, self.exc = self.exc, None
            raise exc
        if job & J_RETRY:
            return relayfaults.retry_unsent(self)
        if job & J_FLUSH_S:
            data, step.pending = step.pending, None
            try:
                self.server.stream.sendall(data)
            except ConnectionClosed:
                return J_LOST
            job &= ~J_FLUSH_S
        if job & J_FLUSH_C:
            data, step.pending = step.pending, None
            self.cs.sendall(data)
            job &= ~J_FLUSH_C
        if job & J_SESS:
            job &= ~J_SESS
            if not job & J_END and not sessionstate.at_release(self):
                job |= J_LOST
        if job & J_REFUSE:
            relayfaults.refuse_transaction(self)
            job &= ~J_REFUSE
        if job & J_LOST:
            if not relayfaults.server_lost(self):
                return J_END
            job &= ~J_LOST
        if job & J_BAD:
            relayfaults.refuse_input(self)
        if job & J_END:
            return J_END
        if job & J_FAILED:
            nxt = relayfaults.feed_failed(self)
            return J_END if nxt is None else nxt
        if job & J_LISTEN:
            return listencmd.serve(self)
        if job & J_LINK:
            if self.kslot:
                self.kflags[self.kslot] = clientflags.queued(self)
            self._link(self._acquire())
            return self.client_events(step.client_walk(), True)
        if job & J_SYNC:
            srv, self.synced = self.synced, None
            self._sync(srv)
            self._link(srv)
            return self.client_events(step.client_walk(), True)
        return job

    # -- callbacks: the steady state ---------------------------------------------

    def _on_client(self) -> None:
        step = self.step
        try:
            if step.cbuf is None:
                if self.kslot:           # a request starts: not at a boundary any more
                    self.kflags[self.kslot] = K_BUSY
                if _free_bufs:
                    step.set_cbuf(*_free_bufs.pop())
                else:
                    relaybuf.borrow(self)
            job = self.client_events(step.client_in())
        except Exception as exc:         # raised in the greenlet, where the handlers are
            self.exc = exc
            job = J_RAISE
        if job:
            self._disarm()
            self._spawn(job)
        elif self.tls:
            relaytls.more(self)        # TLS bytes the fd will not announce

    def _on_server(self) -> None:
        if self.kslot:                   # the answer starts to flow
            self.kflags[self.kslot] = K_BUSY
        try:
            job = self._server_end_or_event(self.step.server_in())
        except Exception as exc:
            self.exc = exc
            job = J_RAISE
        if job:
            self._disarm()
            self._spawn(job)
        elif self.tls:
            relaytls.more(self)

    def _on_handed(self, srv: "ServerConn | None") -> None:
        """The pool handed this queued client a server (None: retry via acquire())."""
        w, self.waiter = self.waiter, None
        if self.ended:                   # the client left while the server was on its way
            if srv is not None:
                self.pool.release(srv)
            return
        self.stats.wait_time += monotonic() - w.since
        try:
            if srv is None:
                job = J_LINK
            elif srv.tsig != self.client.tsig:
                self.synced = srv
                job = J_SYNC
            else:
                self._link(srv)
                self.cs.rw.start(self.on_client_cb)
                srv.stream.rw.start(self.on_server_cb)
                job = self.client_events(self.step.client_walk(), True)
        except Exception as exc:
            self.exc = exc
            job = J_RAISE
        if job:
            self._disarm()
            self._spawn(job)
        elif self.tls:
            relaytls.more(self)        # TLS bytes the fd will not announce

    def push_rest(self, data: bytes) -> None:
        """clientpush.py: the socket took part of a pushed message; the rest goes out in
        a job before anything else reaches the client (from a loop callback)."""
        self.step.pending = data
        self._disarm()
        self._spawn(J_FLUSH_C)

    # -- client -> server ------------------------------------------------------

    def client_events(self, ev: int, linked: bool = False) -> int:
        """Act on the client walk's events until it ends; returns a job or 0.
        `linked`: this walk linked the server, so nothing was sent to it yet."""
        step = self.step
        while True:
            if ev == EV_LINK:
                self.xact_start = monotonic()    # the wait for a server starts (_link)
                if self.failed is not None or self.dedicated:   # replication: never a pooled one
                    return J_FAILED if self.failed is not None else J_LINK
                # One lookup for other queries: the text's first byte (listencmd.FIRST).
                if self.listens and step.msg + 5 < step.end and \
                        LISTEN_FIRST[step.cbuf[step.msg + 5]] and listencmd.command(self):
                    return J_LISTEN
                pool = self.pool
                srv = pool.acquire_nowait()
                if srv is None:
                    if pool.must_queue() and getcurrent() is self.hub:
                        # Wait as a callback: the releasing client's callback hands
                        # the server over (_on_handed), no greenlet switch either way.
                        self.client.state = ClientState.WAITING
                        self.waiter = pool.enqueue(self.client, self._on_handed)
                        disarm(self.cs.rw)
                        if self.kslot:
                            self.kflags[self.kslot] = clientflags.queued(self)
                        return 0
                    return J_LINK
                if srv.tsig != self.client.tsig:
                    self.synced = srv
                    return J_SYNC
                self._link(srv)
                linked = True
                if getcurrent() is self.hub:
                    srv.stream.rw.start(self.on_server_cb)
            elif ev == EV_REWRITE:
                if step.sess_hit:        # a session statement's Parse (sessionstate.py)
                    sessionstate.on_text(self)
                rewrite(self)
            elif ev == EV_SESSION:
                sessionstate.on_text(self)
            elif ev >= EV_NONE and ev < F_AGAIN:
                if linked and ev == EV_CLOSED:  # the walk's one send, the link's first
                    return J_RETRY
                return _io_job(ev, J_END, J_LOST, "invalid message length")
            else:
                return self._client_end(ev)
            ev = step.client_walk()

    def _client_end(self, ev: int) -> int:
        step = self.step
        now = monotonic()
        self.last_active = now
        if step.new_query:
            step.new_query = False
            self.query_start = now
            if not self.tx_start:
                self.tx_start = now
        job = 0
        if ev & EV_HELD:
            parts, self.parts = self.parts, None
            parts.append(step.tail)
            step.tail = None
            job = self._send_parts(self.server.stream.sock, parts, J_FLUSH_S, J_LOST)
        elif ev & F_AGAIN:
            job = J_FLUSH_S
        end = ev & END_MASK
        if end == EV_TERMINATE:
            return job | J_END
        if end == EV_BAD:
            return job | J_BAD
        cend = step.cend
        if not cend:
            relaybuf.give_back(self)
            if self.kslot and not job and self.server is not None:
                self.kflags[self.kslot] = clientflags.in_flight(self)
        elif cend == len(step.cbuf) and cend >= 5:
            relaybuf.grow_client_buf(self)
        return job

    def _send_parts(self, sock, parts: list, again: int, gone: int) -> int:
        """Gather-write without blocking; what the socket did not take becomes pending."""
        try:
            n = sock.sendmsg(parts)
        except (BlockingIOError, InterruptedError):
            n = 0
        except OSError:
            return gone
        total = sum(map(len, parts))
        if n < total:
            self.step.pending = b"".join(parts)[n:]
            return again
        return 0

    # -- server -> client ------------------------------------------------------

    def _server_end_or_event(self, ev: int) -> int:
        step = self.step
        while True:
            if ev == EV_PARAM:
                self.client.on_parameter_status(self.server, bytes(step.sview[step.msg + 5:step.mend]))
            elif ev == EV_Z:
                sstmts = self.server.stmts
                sstmts.on_ready(step.recv)
                step.want_z = bool(sstmts.expect)
            elif ev == EV_ANSWER:
                sstmts = self.server.stmts
                if sstmts.expect and not sstmts.on_answer(step.sbuf[step.msg]):
                    self._cut_server()
            elif ev == EV_CC:
                if is_forget_all(bytes(step.sview[step.msg + 5:step.mend])):
                    self.server.stmts.clear()
            elif ev == EV_REFUSE:
                if self.stmts is not None:
                    self.server.stmts.on_ready(step.recv)
                self._cut_server()      # the client gets 'I' after the ROLLBACK, not this 'T'
                self.refuse = True
            elif ev >= EV_NONE and ev < F_AGAIN:
                return _io_job(ev, J_LOST, J_END, "server sent an invalid message length")
            else:
                return self._server_end(ev)
            ev = step.server_walk()

    def settle_read(self) -> bool:
        """One read of the server while settling it (relayfaults.settle); False: stop."""
        step = self.step
        job = self._server_end_or_event(step.server_in())
        if job & J_FLUSH_C:
            data, step.pending = step.pending, None
            self.cs.sendall(data)
            job &= ~J_FLUSH_C
        return not job

    def _cut_server(self) -> None:
        parts = self.parts
        if parts is None:
            parts = self.parts = []
        parts.append(self.step.cut())

    def _server_end(self, ev: int) -> int:
        step = self.step
        job = 0
        if ev & EV_HELD:
            parts, self.parts = self.parts, None
            parts.append(step.tail)
            step.tail = None
            job = self._send_parts(self.cs.sock, parts, J_FLUSH_C, J_END)
        elif ev & F_AGAIN:
            job = J_FLUSH_C
        code = ev & END_MASK
        if code:                         # EV_QDONE / EV_RELEASE: every request answered
            now = monotonic()
            d = now - self.query_start
            self.stats.query_time += d
            self.stats.query_hist[bisect_left(BOUNDS, d)] += 1
            self.last_active = now
            if step.status == STATUS_IDLE:
                self.tx_start = 0.0
            step.flush_stats(self.stats)
            if self.refuse:
                self.refuse = False
                return job | J_REFUSE
            if code == EV_RELEASE:
                if step.sess_seen or self.client.session.pin:
                    return job | (J_SESS if step.sess_seen else 0)   # pinned: stays linked
                self._unlink(now)
                return job
            if self.kslot and not job:   # answered, inside a block: what if this worker dies
                self.kflags[self.kslot] = clientflags.between(self)
        if step.skept == len(step.sbuf):
            relaybuf.grow_server_buf(self)
        return job

    # -- linking ------------------------------------------------------------------

    def _acquire(self) -> "ServerConn":
        """Wait in the pool for a server and bring its parameters in line (greenlet only)."""
        client = self.client
        client.state = ClientState.WAITING
        if self.dedicated:
            return replication.acquire_dedicated(self.pool, client)
        srv = self.pool.acquire(client)
        self._sync(srv)
        return srv

    def _sync(self, srv: "ServerConn") -> None:
        try:
            self.client.sync_parameters(srv)
        except Exception as exc:
            self.pool.discard(srv, f"could not set client parameters: {exc}")
            raise PoolError("08P01", f"could not apply client parameters on server: {exc}") from exc

    def _link(self, srv: "ServerConn") -> None:
        if self.kslot:                   # the request is about to leave
            self.kflags[self.kslot] = K_BUSY
        client = self.client
        st = self.stats
        st.server_assignment_count += 1
        now = monotonic()
        st.link_wait_time += now - self.xact_start      # since EV_LINK, 0 if one was idle
        st.wait_hist[bisect_left(BOUNDS, now - self.xact_start)] += 1
        client.state = ACTIVE
        srv.client = client
        self.server = srv
        step = self.step
        step.link(srv.stream.sock, srv.buf, srv.view)
        if self.stmts is not None:
            step.want_z = bool(srv.stmts.expect)
        self.xact_start = self.query_start = now
        if srv.tls is not None or self.tls:
            self.tls = (self.tls & relaytls.CLIENT) | (relaytls.SERVER if srv.tls else 0)

    def _unlink(self, now: float) -> None:
        """Return a clean server to the pool (transaction / statement mode)."""
        srv = self.server
        self.server = None
        self.step.unlink()
        disarm(srv.stream.rw)
        self.client.state = IDLE
        d = now - self.xact_start
        self.stats.xact_time += d
        self.stats.xact_hist[bisect_left(BOUNDS, d)] += 1
        self.pool.release(srv, now)
        if self.kslot:
            self.kflags[self.kslot] = clientflags.at_boundary(self)
