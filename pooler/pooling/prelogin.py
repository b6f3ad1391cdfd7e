"""A connection before its first packet: a socket and a few bytes, no greenlet.

The listener accepts in the hub (listener.py) and an
`Arrival` collects the first packet (SSLRequest, GSSENCRequest, CancelRequest
or the startup packet: all length-prefixed) in a read-watcher callback. Only
once the packet is whole does the connection get a greenlet, which logs the
client in (Client.serve). So a connection that trickles bytes (slowloris) or
sends nothing costs its socket and ~1 KB, not a parked greenlet and buffers;
the worker holds at most `client_login_max_pending` of them, and the janitor
closes those older than client_login_timeout, counted from accept.
"""
from __future__ import annotations

import logging
import time
from typing import Callable

from pooler.wire import protocol
from pooler.wire.netio import Stream, disarm

log = logging.getLogger("pooler.client")

# A full worker evicts its oldest arrival to make room only if that one has had
# this long to send its first packet: a real client sends it within a round trip,
# so a storm of new connections never evicts itself.
EVICT_AFTER = 1.0
TOO_MANY = "too many connections still logging in (client_login_max_pending)"


class Arrival:
    """One accepted connection whose first packet is not complete yet."""

    __slots__ = ("stream", "peer", "since", "buf", "on_ready", "on_gone")

    def __init__(self, stream: Stream, peer: str, on_ready: Callable, on_gone: Callable) -> None:
        self.stream = stream
        self.peer = peer
        self.since = time.monotonic()
        self.buf = bytearray()
        self.on_ready = on_ready         # on_ready(arrival): the packet is whole
        self.on_gone = on_gone           # on_gone(arrival): closed before that

    def start(self) -> None:
        """Read what is there already; else wait in a callback for the rest."""
        if not self._read():
            self.stream.rw.start(self._on_readable)

    def _on_readable(self) -> None:
        if self._read():
            disarm(self.stream.rw)

    def _read(self) -> bool:
        """Take what the socket has. True when this arrival is done (handed on, or
        closed). Bytes past the first packet go on with it, as the login's own reads
        would have taken them: the login refuses plaintext sent behind an SSLRequest."""
        s = self.stream
        while True:
            try:
                chunk = s.sock.recv(8192)
            except (BlockingIOError, InterruptedError):
                return False
            except OSError:
                chunk = b""
            if not chunk:
                self.close()
                return True
            buf = self.buf
            buf += chunk
            if len(buf) < 4:
                continue
            length = protocol.unpack_i32(buf, 0)[0]
            # A bad length goes on too: the login refuses it with PostgreSQL's words.
            if len(buf) >= length or not 8 <= length <= protocol.MAX_STARTUP_LEN:
                s.rbuf += buf
                self.buf = None
                self.on_ready(self)
                return True

    def refuse(self, sqlstate: str, message: str) -> None:
        """Answer with a FATAL error and close (never blocks: a small write or nothing)."""
        try:
            self.stream.sock.send(protocol.error_response(sqlstate, message, "FATAL"))
        except OSError:
            pass
        self.close()

    def close(self) -> None:
        self.stream.close()
        self.on_gone(self)


class Arrivals:
    """The worker's connections that have not sent a whole first packet yet."""

    __slots__ = ("pending", "spawn_login", "max_pending", "evicted", "expired")

    def __init__(self, spawn_login: Callable[[Stream, str, float], None], max_pending: int) -> None:
        self.pending: dict[Arrival, None] = {}    # insertion order is age order
        self.spawn_login = spawn_login
        self.max_pending = max_pending
        self.evicted = 0
        self.expired = 0

    def accept(self, stream: Stream, peer: str) -> None:
        """A new connection (called in the hub: must not block)."""
        arrival = Arrival(stream, peer, self._ready, self._gone)
        if self.max_pending and len(self.pending) >= self.max_pending and not self._evict_oldest():
            arrival.refuse("53300", TOO_MANY)
            return
        self.pending[arrival] = None
        arrival.start()

    def _evict_oldest(self) -> bool:
        oldest = next(iter(self.pending))
        if time.monotonic() - oldest.since < EVICT_AFTER:
            return False
        self.evicted += 1
        log.info("closing connection from %s: no startup packet after %.1fs and %d others "
                 "waiting (client_login_max_pending)", oldest.peer,
                 time.monotonic() - oldest.since, len(self.pending))
        oldest.refuse("53300", TOO_MANY)
        return True

    def _ready(self, arrival: Arrival) -> None:
        self.pending.pop(arrival, None)
        self.spawn_login(arrival.stream, arrival.peer, arrival.since)

    def _gone(self, arrival: Arrival) -> None:
        self.pending.pop(arrival, None)

    def expire(self, now: float, timeout: float) -> None:
        """Close arrivals older than client_login_timeout (the janitor calls this)."""
        if not timeout:
            return
        for arrival in list(self.pending):
            if now - arrival.since <= timeout:
                break                    # age order: the rest are younger
            self.expired += 1
            arrival.refuse("08P01", "client_login_timeout")

    def close_all(self) -> None:
        for arrival in list(self.pending):
            arrival.close()
