"""The worker's accept loop: a read watcher on each listening socket, in the hub.

gevent's StreamServer would wrap each accepted socket in a gevent socket that
the worker then unwraps again (2 getsockname, 3 fcntl and a dozen Python calls
per connection, measured under `pgbench -C`). Here the listening socket's own
accept gives the fd and the peer's address, and the connection goes on as a
plain socket to `on_accept` (made non-blocking by netio.Stream), which must not
block. Several workers share one listening socket, so one wake-up takes at
most `max_accept` connections and the others get their turn.
"""
from __future__ import annotations

import _socket
import errno
import logging
import socket
from typing import Callable

from gevent import get_hub

from pooler.wire.netio import disarm

log = logging.getLogger("pooler.worker")

# Out of fds or memory: accepting again at once would spin on the same error.
_PAUSE_ERRNOS = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)
PAUSE_AFTER_ERROR = 0.1


class Listener:
    """Accepts on one listening socket (TCP or Unix) while started."""

    __slots__ = ("socket", "raw", "family", "watcher", "on_accept", "max_accept", "timer",
                 "closed")

    def __init__(self, sock: socket.socket, on_accept: Callable[[_socket.socket, str], None],
                 max_accept: int = 100) -> None:
        self.socket = sock
        # The C-level socket: the master binds stdlib sockets before gevent patches
        # the socket module, but a gevent socket (tests, embedding) works too.
        self.raw = getattr(sock, "_sock", sock)
        self.family = sock.family
        sock.setblocking(False)
        self.watcher = get_hub().loop.io(sock.fileno(), 1)
        self.on_accept = on_accept
        self.max_accept = max_accept
        self.timer = None
        self.closed = False

    def start(self) -> None:
        self.watcher.start(self._on_readable)

    def close(self) -> None:
        """Stop accepting and close this process's copy of the socket."""
        if self.closed:
            return
        self.closed = True
        disarm(self.watcher)
        if self.timer is not None:
            self.timer.stop()
        self.socket.close()

    def _on_readable(self) -> None:
        accept, family = self.raw._accept, self.family
        tcp = family != _socket.AF_UNIX
        for _ in range(self.max_accept):
            try:
                fd, addr = accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in _PAUSE_ERRNOS:
                    self._pause(exc)
                    return
                continue            # e.g. ECONNABORTED: that one is gone, the next may not be
            sock = _socket.socket(family, _socket.SOCK_STREAM, 0, fd)   # netio.Stream: non-blocking
            if tcp:
                sock.setsockopt(_socket.IPPROTO_TCP, _socket.TCP_NODELAY, 1)
                peer = f"{addr[0]}:{addr[1]}"
            else:
                peer = "unix"
            try:
                self.on_accept(sock, peer)
            except Exception:        # one connection's failure must not stop the listener
                log.exception("accepting a connection from %s failed", peer)
                sock.close()

    def _pause(self, exc: OSError) -> None:
        log.warning("accept failed (%s): not accepting for %.1fs", exc, PAUSE_AFTER_ERROR)
        disarm(self.watcher)
        if self.timer is None:
            self.timer = get_hub().loop.timer(PAUSE_AFTER_ERROR)
        self.timer.start(self._resume)

    def _resume(self) -> None:
        if not self.closed:
            self.watcher.start(self._on_readable)
