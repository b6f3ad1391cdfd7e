"""Cooperative I/O on raw non-blocking sockets.

The relay reads and writes with the C-level socket object directly and waits
on gevent's loop watchers itself: gevent's socket wrapper costs a Python-level
call chain on every recv/send, and the relay does two of each per query.
Handshakes (startup, authentication) use the buffered message reader below;
they are not on the hot path.
"""
from __future__ import annotations

import _socket
import errno
import os

from gevent import getcurrent
from gevent.hub import get_hub

from pooler.wire import protocol

READ, WRITE = 1, 2


_epolls: list[int] | None = None       # this process's epoll fds (libev's), found once


def _epoll_fds() -> list[int]:
    global _epolls
    if _epolls is None:
        found = []
        for name in os.listdir("/proc/self/fd"):
            try:
                if os.readlink(f"/proc/self/fd/{name}") == "anon_inode:[eventpoll]":
                    found.append(int(name))
            except OSError:
                pass
        _epolls = found
    return _epolls


def forget_fd(fd: int) -> None:
    """Take `fd` out of the loop's epoll set before closing this process's copy of a
    socket that lives on in another process (a server moved to another worker over
    SCM_RIGHTS). epoll drops an entry only when the open file is released, which the
    other process prevents: the stale entry would go on reporting the socket's traffic
    here under the old fd number, and libev, meeting events it cannot place, rebuilds
    its epoll set, aborting the worker ("I/O watcher with invalid fd") if any started
    watcher's fd is closed by then. libev itself never deletes (it relies on close)."""
    for ep in _epoll_fds():
        # (a C call: gevent's monkey-patching takes select.epoll away; ENOENT, not
        # registered, is nothing to forget)
        _libc().epoll_ctl(ep, _EPOLL_CTL_DEL, fd, None)


_EPOLL_CTL_DEL = 2
_libc_handle = None


def _libc():
    global _libc_handle
    if _libc_handle is None:
        import ctypes
        _libc_handle = ctypes.CDLL(None, use_errno=True)
    return _libc_handle


def disarm(watcher) -> None:
    """Leave a read watcher started, with a callback that only stops it, instead of
    stopping it. libev removes an fd from epoll lazily: a watcher stopped across a
    loop iteration and started again costs a failed EPOLL_CTL_ADD (EEXIST), one
    syscall per transaction for every client that waited for a server. A disarmed
    watcher never switches into the greenlet; if its socket becomes readable while
    nobody waits on it, it fires once and stops (the old cost, only then)."""
    watcher.start(watcher.stop)


class ConnectionClosed(Exception):
    """The peer closed the connection (or it broke) while we expected data."""


class Stream:
    """One socket with a read buffer for message-at-a-time handshakes."""

    __slots__ = ("sock", "fd", "hub", "rw", "ww", "rbuf", "closed", "peer")

    def __init__(self, sock: _socket.socket, peer: str = "") -> None:
        sock.setblocking(False)
        self.sock = sock
        self.fd = sock.fileno()
        self.hub = get_hub()
        loop = self.hub.loop
        self.rw = loop.io(self.fd, READ)
        self.ww = None            # made when a send first has to wait (most never do)
        self.rbuf = bytearray()   # bytes read by read_message() but not yet consumed
        self.closed = False
        self.peer = peer

    # -- raw I/O ------------------------------------------------------------

    def wait_readable(self) -> None:
        """Park until the socket is readable (cheaper than hub.wait: no Waiter object).
        A TLS socket (wire/tls.TlsSocket) may hold decrypted bytes the fd does not
        announce: then it is readable now."""
        sock = self.sock
        if type(sock) is not _socket.socket and sock.pending():     # a tls.TlsSocket
            return
        rw = self.rw
        rw.start(getcurrent().switch)
        try:
            self.hub.switch()
        finally:
            disarm(rw)

    def recv_into(self, buf: bytearray | memoryview, nbytes: int = 0) -> int:
        """Read what is available (waiting if nothing is); 0 means EOF."""
        while True:
            try:
                return self.sock.recv_into(buf, nbytes)
            except BlockingIOError:
                self.hub.wait(self.rw)
            except InterruptedError:
                continue
            except OSError as exc:
                if exc.errno in (errno.ECONNRESET, errno.EPIPE, errno.ETIMEDOUT, errno.EBADF):
                    return 0
                raise

    def try_recv_into(self, buf: memoryview) -> int:
        """Non-blocking read: -1 when nothing is there yet, 0 on EOF."""
        try:
            return self.sock.recv_into(buf)
        except (BlockingIOError, InterruptedError):
            return -1
        except OSError as exc:
            if exc.errno in (errno.ECONNRESET, errno.EPIPE, errno.ETIMEDOUT, errno.EBADF):
                return 0
            raise

    def sendall(self, data: bytes | bytearray | memoryview) -> None:
        """Write everything, waiting for the socket to drain when it is full."""
        sock = self.sock
        try:
            n = sock.send(data)
        except (BlockingIOError, InterruptedError):
            n = 0
        except OSError as exc:
            raise ConnectionClosed(str(exc)) from exc
        if n == len(data):
            return
        view = memoryview(data)[n:]
        ww = self.ww
        if ww is None:
            ww = self.ww = self.hub.loop.io(self.fd, WRITE)
        while view:
            self.hub.wait(ww)
            try:
                n = sock.send(view)
            except (BlockingIOError, InterruptedError):
                continue
            except OSError as exc:
                raise ConnectionClosed(str(exc)) from exc
            view = view[n:]

    def sendmsg(self, parts: list) -> None:
        """Gather-write several buffers with as few syscalls as possible."""
        if len(parts) == 1:
            self.sendall(parts[0])
            return
        total = sum(len(p) for p in parts)
        try:
            n = self.sock.sendmsg(parts)
        except (BlockingIOError, InterruptedError):
            n = 0
        except OSError as exc:
            raise ConnectionClosed(str(exc)) from exc
        if n == total:
            return
        # Rare: the socket buffer filled up. Finish with the plain path.
        self.sendall(b"".join(bytes(p) for p in parts)[n:])

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.rw.close()
        if self.ww is not None:
            self.ww.close()
        try:
            self.sock.close()
        except OSError:
            pass

    # -- handshake helpers (buffered) ------------------------------------------

    def _fill(self, need: int) -> None:
        chunk = bytearray(8192)
        while len(self.rbuf) < need:
            n = self.recv_into(chunk)
            if n == 0:
                raise ConnectionClosed("connection closed by peer")
            self.rbuf += chunk[:n]

    def read_exact(self, n: int) -> bytes:
        self._fill(n)
        out = bytes(self.rbuf[:n])
        del self.rbuf[:n]
        return out

    def read_message(self, max_len: int = 1 << 30) -> tuple[int, bytes]:
        """One typed message: (type byte as int, body)."""
        self._fill(5)
        mtype = self.rbuf[0]
        length = protocol.unpack_i32(self.rbuf, 1)[0]
        if length < 4 or length > max_len:
            raise protocol.ProtocolError(f"invalid message length {length}")
        self._fill(1 + length)
        body = bytes(self.rbuf[5:1 + length])
        del self.rbuf[:1 + length]
        return mtype, body

    def take_buffered(self) -> bytes:
        """Bytes read ahead during the handshake, for the relay to process first."""
        out = bytes(self.rbuf)
        self.rbuf.clear()
        return out


def connect_tcp(host: str, port: int, timeout: float) -> _socket.socket:
    """Connect cooperatively to host:port (or a Unix socket dir when host starts with '/')."""
    import gevent.socket as gsocket
    if host.startswith("/"):
        s = gsocket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
        s.settimeout(timeout or None)
        s.connect(f"{host}/.s.PGSQL.{port}")
    else:
        s = gsocket.create_connection((host, port), timeout=timeout or None)
        s.setsockopt(_socket.IPPROTO_TCP, _socket.TCP_NODELAY, 1)
    return raw_from_gevent(s)


def raw_from_gevent(gsock) -> _socket.socket:
    """Take the OS socket out of a gevent socket (as StreamServer hands them to us)."""
    family = gsock.family
    fd = gsock.detach()
    raw = _socket.socket(family, _socket.SOCK_STREAM, 0, fd)
    if family in (_socket.AF_INET, _socket.AF_INET6):
        raw.setsockopt(_socket.IPPROTO_TCP, _socket.TCP_NODELAY, 1)
    return raw
