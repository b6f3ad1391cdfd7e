"""Writing a message the client did not ask for (a NotificationResponse) into its
connection: only at a message boundary, and only when the socket takes it whole.

The relay owns the client's output: while a server is linked (a transaction, a
pin), a job runs, or a send is pending, the client may be in the middle of a
response, and a message put there would corrupt it. So `push` writes only to
an idle client, between transactions, which is where PostgreSQL itself delivers
notifications. And it never starts what it cannot finish without blocking: the
kernel's free send space (SO_SNDBUF minus TIOCOUTQ) must hold the message, else
the caller keeps it and tries again. Should the kernel still take only part of
it, the rest goes through the relay's own pending-send job (J_FLUSH_C), which
holds the client's input until it is out.
"""
from __future__ import annotations

import _socket
import fcntl
import socket
import struct
import termios
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pooler.pooling.client import Client

_OUTQ = struct.Struct("i")
_OUTQ_ZERO = bytes(_OUTQ.size)
# Linux reports SO_SNDBUF doubled (it counts its bookkeeping too); half of it is
# the payload the queue surely takes.
_SNDBUF_SHARE = 2
TLS_OVERHEAD = 256            # a TLS record's header, MAC and padding, generously


def at_boundary(client: "Client") -> bool:
    """Between transactions: logged in, not linked to a server, no job running, not
    queued for a server, nothing half sent, not in a block the pooler answers."""
    relay = client.relay
    return (relay is not None and not relay.ended and relay.server is None
            and relay.glet is None and relay.waiter is None and relay.synced is None
            and relay.failed is None and relay.step.pending is None)


def room(fd: int) -> int:
    """Bytes the send queue of socket `fd` surely takes now without blocking. (By fd:
    a TLS client's socket object has no getsockopt; a socket object borrowed over the
    fd and detached again reads it without closing or duplicating anything; the C
    `_socket.socket`, not gevent's, whose constructor and detach would make and drop
    io watchers for an fd the relay's own watchers are on.)"""
    try:
        queued = _OUTQ.unpack(fcntl.ioctl(fd, termios.TIOCOUTQ, _OUTQ_ZERO))[0]
        raw = _socket.socket(fileno=fd)
        try:
            size = raw.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)
        finally:
            raw.detach()
    except OSError:
        return 0
    return size // _SNDBUF_SHARE - queued


def overhead(client: "Client") -> int:
    """What the socket takes beyond the message itself (a TLS record's framing)."""
    return TLS_OVERHEAD if client.tls is not None else 0


def push(client: "Client", data: bytes) -> bool:
    """Write `data` (whole messages) to `client` now if that is safe; False: not now,
    keep it and try again later. True also when the client is gone (nothing to keep).
    Call from a loop callback (the hub's greenlet): a partial send starts a relay job."""
    if not at_boundary(client):
        return client.relay is not None and client.relay.ended
    stream = client.stream
    sock = stream.sock
    if room(stream.fd) < len(data) + overhead(client):
        return False
    try:
        n = sock.send(data)
    except (BlockingIOError, InterruptedError):
        return False
    except OSError:
        return True                   # the client is gone; its read watcher will see EOF
    if n < len(data):
        client.relay.push_rest(data[n:])
    return True
