"""Shared LISTEN: one listening server per pool, notifications fanned out to clients.

Under transaction pooling a LISTEN would otherwise pin a server per listening
client (sessionstate.py). Instead the pool's NotifyHub holds one server, taken
with the pool's ordinary acquire (so it counts in pool_size), LISTENs on each
channel once, whatever the number of its listeners (listencmd.py answers the
clients' commands), and UNLISTENs when the last one leaves; with no channel
left the server goes back to the pool. A reader greenlet takes the server's
NotificationResponses and queues each for every client listening on its
channel; delivery (clientpush.py) happens between the client's transactions,
from a loop callback, retried every RETRY seconds while some are queued.
PostgreSQL sends a notification only once its transaction committed, so the
hub never sees one that rolled back.

A client whose queue reaches MAX_UNDELIVERED (it does not read, or it stays in
one transaction) loses it and is disconnected (53400). A lost server is
logged, replaced and every channel LISTENed again; notifications sent in
between are lost, as they would be for a client whose connection broke.
"""
from __future__ import annotations

import logging
from collections import deque
from typing import TYPE_CHECKING

import gevent
from gevent.event import AsyncResult
from gevent.hub import get_hub
from gevent.lock import Semaphore

from pooler.errors import PoolerError
from pooler.wire import protocol
from pooler.wire.netio import ConnectionClosed, disarm
from pooler.pooling.clientpush import push

if TYPE_CHECKING:
    from pooler.pooling.client import Client
    from pooler.pooling.pool import Pool
    from pooler.pooling.server import ServerConn

log = logging.getLogger("pooler.listen")

MAX_UNDELIVERED = 1000       # queued notifications per client before it is disconnected
RETRY = 0.02                 # seconds between delivery attempts while some are queued
REOPEN_PAUSE = 1.0           # after a failed attempt to replace a lost server


def quote_ident(name: str) -> str:
    """A channel name as an SQL identifier (always quoted: its case is kept)."""
    return '"' + name.replace('"', '""') + '"'


def hub_of(pool: "Pool") -> "NotifyHub":
    """The pool's hub, made on first use."""
    hub = pool.listen_hub
    if hub is None:
        hub = pool.listen_hub = NotifyHub(pool)
    return hub


class NotifyHub:
    """The channels of one pool's listening clients and the server that listens for them."""

    def __init__(self, pool: "Pool") -> None:
        self.pool = pool
        self.channels: dict[str, set["Client"]] = {}
        self.of_client: dict["Client", set[str]] = {}
        self.backlog: dict["Client", deque[bytes]] = {}
        self.srv: "ServerConn | None" = None
        self.listening: set[str] = set()          # what the server LISTENs on
        self.owed: deque[AsyncResult] = deque()   # one per command sent, set at its ReadyForQuery
        self.lock = Semaphore()                   # one greenlet talks to the server at a time
        self.reader: gevent.Greenlet | None = None
        self.closed = False
        self.reopening = False
        self.retiring: "ServerConn | None" = None  # given back once UNLISTEN * is answered
        self.loop = get_hub().loop
        self.timer = None
        self.scheduled = False

    def __repr__(self) -> str:
        return f"{self.pool.server_user}@{self.pool.name}"

    # -- clients' commands (listencmd.py) ---------------------------------------

    def listen(self, client: "Client", channel: str) -> None:
        """LISTEN for `client`; returns once the server listens (blocks: a greenlet)."""
        self.of_client.setdefault(client, set()).add(channel)
        self.channels.setdefault(channel, set()).add(client)
        try:
            while not self.sync():
                pass                              # the server was lost meanwhile: again
        except BaseException:
            self._drop(client, channel)
            self._sync_later()
            raise

    def unlisten(self, client: "Client", channel: str | None) -> None:
        """UNLISTEN `channel` (None: all) for `client`; never blocks (the server's
        UNLISTEN follows in a greenlet of its own)."""
        names = self.of_client.get(client)
        if not names:
            return
        for name in list(names) if channel is None else [channel] if channel in names else []:
            self._drop(client, name)
        self._sync_later()

    def leave(self, client: "Client") -> None:
        """The client is gone (relayexit.py): forget it and what was queued for it."""
        self.backlog.pop(client, None)
        self.unlisten(client, None)

    def _drop(self, client: "Client", channel: str) -> None:
        names = self.of_client.get(client)
        if names is not None:
            names.discard(channel)
            if not names:
                del self.of_client[client]
        members = self.channels.get(channel)
        if members is not None:
            members.discard(client)
            if not members:
                del self.channels[channel]

    # -- the server --------------------------------------------------------------

    def sync(self) -> bool:
        """Make the server's LISTENs those of `channels` (opening a server if needed,
        giving it back when none is left) and wait for its answer. False: the server
        was lost before it answered (the caller tries again)."""
        with self.lock:
            if self.closed:
                raise PoolerError("08006", "the pool's LISTEN connection was closed")
            want = set(self.channels)
            if self.srv is None:
                if not want:
                    return True
                self._open()
            if not want:
                return self._give_back()
            sql = [f"LISTEN {quote_ident(n)}" for n in sorted(want - self.listening)]
            sql += [f"UNLISTEN {quote_ident(n)}" for n in sorted(self.listening - want)]
            if sql:
                wait = AsyncResult()
                self.owed.append(wait)
                self.listening = want
                try:
                    self.srv.stream.sendall(protocol.query("; ".join(sql)))
                except ConnectionClosed as exc:
                    self._fail_server(self.srv, f"send failed: {exc}")
                    return False
            else:                                 # nothing new: wait for what is in flight
                wait = self.owed[-1] if self.owed else None
        return True if wait is None else wait.get()

    def _sync_later(self) -> None:
        gevent.spawn(self._sync_quietly)

    def _sync_quietly(self) -> None:
        try:
            self.sync()
        except PoolerError:
            pass                                  # closed meanwhile
        except Exception as exc:                  # the reader reopens a lost server
            log.warning("LISTEN connection to %r: %s", self, exc)

    def _open(self) -> None:
        """Take a server from the pool for the hub (lock held; may block)."""
        srv = self.pool.acquire(None)
        disarm(srv.stream.rw)
        self.srv, self.listening = srv, set()
        self.owed = deque()                       # this server's own: never mixed
        self.reader = gevent.spawn(self._read, srv, self.owed)

    def _give_back(self) -> bool:
        """No channel left: UNLISTEN * and let the reader give the server back to the
        pool once it is answered (lock held). The reader does it: it is the one that
        reads the server, so nothing of the answer is left unread."""
        srv = self.srv
        wait = AsyncResult()
        self.owed.append(wait)
        self.retiring, self.srv, self.listening = srv, None, set()
        try:
            srv.stream.sendall(protocol.query("UNLISTEN *"))
        except ConnectionClosed:
            return True                           # the reader sees it go, and discards it
        return wait.get()

    def _retire(self, srv: "ServerConn") -> None:
        """The reader, at the ReadyForQuery that answered UNLISTEN *: back to the pool."""
        self.retiring = None
        self.reader = None
        if srv.stream.rbuf:                       # more came after it: not clean
            self.pool.discard(srv, "LISTEN connection not clean")
        else:
            self.pool.release(srv)

    def _read(self, srv: "ServerConn", owed: deque) -> None:
        """The reader greenlet: notifications, and the answers to the hub's commands."""
        reason = "server closed the connection"
        try:
            while True:
                mtype, body = srv.stream.read_message()
                if mtype == 0x41:                 # 'A' NotificationResponse
                    self._notify(body)
                elif mtype == 0x5A and owed:      # 'Z'
                    owed.popleft().set(True)
                    if self.retiring is srv and not owed:
                        self._retire(srv)
                        return
                elif mtype == 0x45:               # 'E': a FATAL says why it goes
                    fields = protocol.parse_error_fields(body)
                    reason = f"{fields.get('V', 'ERROR')} {fields.get('C', '?')} {fields.get('M', '')}"
                    log.warning("LISTEN connection to %r: %s", self, reason)
        except gevent.GreenletExit:
            return
        except (ConnectionClosed, OSError, protocol.ProtocolError) as exc:
            if reason == "server closed the connection" and str(exc):
                reason = str(exc)
        if self.srv is srv:
            self._lost(srv, reason, owed)
        elif self.retiring is srv:                # lost while being given back
            self.retiring = None
            self._forget_server(srv, reason, owed)

    def _fail_server(self, srv: "ServerConn", reason: str) -> None:
        """A command could not be sent (not the reader's greenlet): stop the reader
        first, so that no greenlet is left waiting on a closed socket."""
        reader, self.reader = self.reader, None
        if reader is not None:
            gevent.kill(reader)
        self._lost(srv, reason, self.owed)

    def _lost(self, srv: "ServerConn", reason: str, owed: deque) -> None:
        log.warning("LISTEN connection to %r lost (%s): opening it again", self, reason)
        self._forget_server(srv, f"LISTEN connection lost: {reason}", owed)
        self._reopen_later()

    def _forget_server(self, srv: "ServerConn", reason: str, owed: deque) -> None:
        """The server is gone or going: commands awaiting it are told (False)."""
        if self.srv is srv:
            self.srv, self.listening = None, set()
        while owed:
            owed.popleft().set(False)
        self.pool.discard(srv, reason)

    def _reopen_later(self) -> None:
        if not self.reopening and not self.closed:
            self.reopening = True
            gevent.spawn(self._reopen)

    def _reopen(self) -> None:
        """Open a server again and LISTEN on every channel (a greenlet of its own)."""
        try:
            while not self.closed and self.channels:
                try:
                    if self.sync():
                        break
                except PoolerError as exc:        # no server yet (or closed): wait, retry
                    if self.closed:
                        return
                    log.warning("LISTEN connection to %r: cannot open it: %s", self, exc.message)
                except (ConnectionClosed, OSError) as exc:
                    log.warning("LISTEN connection to %r: cannot open it: %s", self, exc)
                gevent.sleep(REOPEN_PAUSE)
            else:
                return
            log.info("LISTEN connection to %r open again: listening on %d channels",
                     self, len(self.listening))
        finally:
            self.reopening = False

    def restart(self, reason: str) -> None:
        """RECONNECT, PAUSE, a reload that moved the database: give up the server now and
        open another (its channels LISTENed again). Never blocks."""
        if self.srv is None or self.closed:
            return
        gevent.spawn(self._restart, reason)

    def _restart(self, reason: str) -> None:
        with self.lock:
            srv = self.srv
            if srv is None:
                return
            gevent.kill(self.reader)
            self.reader = None
            log.info("LISTEN connection to %r closing (%s): opening it again", self, reason)
            self._forget_server(srv, reason, self.owed)
        self._reopen_later()

    def close(self, reason: str) -> None:
        """The pool is closing (shutdown, KILL, database removed): forget every channel
        and close the server. Never blocks."""
        self.closed = True
        self.channels.clear()
        self.of_client.clear()
        self.backlog.clear()
        if self.timer is not None:
            self.timer.close()
            self.timer = None
        srv, reader = self.srv, self.reader
        self.srv = self.reader = None
        if srv is not None:
            gevent.spawn(self._close_server, srv, reader, reason, self.owed)

    def _close_server(self, srv: "ServerConn", reader, reason: str, owed: deque) -> None:
        if reader is not None:
            gevent.kill(reader)
        self._forget_server(srv, reason, owed)

    # -- delivery ------------------------------------------------------------------

    def _notify(self, body: bytes) -> None:
        """A NotificationResponse: queue it for every client listening on its channel."""
        channel, _ = protocol.read_cstr(body, 4)
        members = self.channels.get(channel)
        if not members:
            return
        msg = protocol.message(b"A", body)
        for client in list(members):
            queue = self.backlog.get(client)
            if queue is None:
                queue = self.backlog[client] = deque()
            elif len(queue) >= MAX_UNDELIVERED:
                self.leave(client)
                client.kill(PoolerError("53400", "too many undelivered notifications"))
                continue
            queue.append(msg)
        if not self.scheduled:
            self.scheduled = True
            self.loop.run_callback(self._deliver)

    def _deliver(self) -> None:
        """Push what is queued, in order, to every client at a message boundary (a loop
        callback); what cannot go now waits for the next RETRY tick."""
        self.scheduled = False
        backlog = self.backlog
        for client, queue in list(backlog.items()):
            while queue and push(client, queue[0]):
                queue.popleft()
            if not queue:
                backlog.pop(client, None)
        if backlog and not self.closed:
            if self.timer is None:
                self.timer = self.loop.timer(RETRY, RETRY)
                self.timer.start(self._deliver)
        elif self.timer is not None:
            self.timer.close()
            self.timer = None
