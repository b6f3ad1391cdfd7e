"""Every message kind between the master and the workers, and the one way to send and receive one.

The master makes the sockets before any fork (master.py): one AF_UNIX datagram
socketpair per worker position, whose sending end every worker holds, and one
"inbox" pair from the workers to the master. This module only frames, sends and
reassembles; what a body means is up to the handler of its kind.

Framing: every datagram carries a HEADER (kind, message id, sender pid, chunk
index, chunk count) and at most CHUNK bytes of the body, so a message of any
size is one or more datagrams and the receiver hands on whole messages only. The
sender pid (not its worker position) names the sender, so that a respawned
worker's message ids cannot be mistaken for its predecessor's half-sent ones.

No gevent here: the master imports this module too. A worker passes gevent's
wait_write so that a full queue blocks only the sending greenlet.
"""
from __future__ import annotations

import itertools
import os
import select
import socket
import struct
import time
from typing import Callable, Iterator

# -- message kinds (one byte each; direction: body) -----------------------------------------------

KICK = b"K"          # master or worker -> worker: "look at shared memory now"; empty body
CANCEL = b"C"        # worker -> the worker owning a client cancel key: CANCEL_BODY (pid, key)
ADMIN = b"A"         # worker -> every other worker: an admin command to run, pickled (cmd, arg)
SNAP_REQUEST = b"Q"  # worker -> every other worker: pickled (requester position, request id)
SNAP_REPLY = b"R"    # worker -> requester: pickled (request id, sender position, snapshot dict)
RELOAD = b"H"        # master -> every worker: pickled (config generation, validated Config)
SET = b"S"           # worker -> master inbox: an admin SET to keep for later workers, pickled (key, text)
MOVE = b"M"          # worker -> worker: an idle server's socket (SCM_RIGHTS) and its state, pickled
KEEP = b"P"          # worker -> master inbox: client sockets (SCM_RIGHTS) to keep, pickled records
FORGET = b"F"        # worker -> master inbox: kept clients that closed, pickled (pid, ids)
ADOPT = b"O"         # master -> worker: a dead worker's idle clients (SCM_RIGHTS), pickled records

CANCEL_BODY = struct.Struct("=ii")

# -- framing ----------------------------------------------------------------------------------------

HEADER = struct.Struct("=cIIHH")   # kind, message id, sender pid, chunk index, chunk count
CHUNK = 60000                      # body bytes per datagram (well under the socket buffer)
MAX_DATAGRAM = HEADER.size + CHUNK
MAX_CHUNKS = 0xFFFF                # the count field: messages up to ~3.9 GB
STALE_PARTIAL = 30.0               # a message still incomplete after this is dropped (sender died)
SEND_TIMEOUT = 2.0                 # a receiver that does not drain its queue for this long is skipped
MAX_FDS = 32                       # descriptors taken with one datagram (send_fds' batches)

_message_ids = itertools.count(1)

WaitWrite = Callable[[int, float], None]


class ChannelFull(OSError):
    """The receiver's queue stayed full for the whole timeout (the message may be partly sent)."""


def _select_wait_write(fd: int, timeout: float) -> None:
    """Block the process until `fd` is writable (the master: no gevent there)."""
    select.select([], [fd], [], timeout)


def send(sock: socket.socket, kind: bytes, body: bytes = b"", *, timeout: float = SEND_TIMEOUT,
         wait_write: WaitWrite = _select_wait_write) -> None:
    """Send one message of any size on a non-blocking datagram socket.

    Each datagram waits up to `timeout` for room in the receiver's queue (it holds
    only a few datagrams: net.unix.max_dgram_qlen); 0 tries once. Raises
    ChannelFull when it stays full, OSError when the receiver is gone."""
    count = max(1, -(-len(body) // CHUNK))
    if count > MAX_CHUNKS:
        raise ValueError(f"control message too large ({len(body)} bytes)")
    msg_id = next(_message_ids) & 0xFFFFFFFF
    pid = os.getpid()
    view = memoryview(body)
    for index in range(count):
        datagram = HEADER.pack(kind, msg_id, pid, index, count) + view[index * CHUNK:(index + 1) * CHUNK]
        _send_datagram(sock, datagram, timeout, wait_write)


def send_fd(sock: socket.socket, kind: bytes, body: bytes, fd: int, *,
            timeout: float = SEND_TIMEOUT, wait_write: WaitWrite = _select_wait_write) -> None:
    """One single-datagram message that carries a file descriptor (SCM_RIGHTS): the
    receiver gets its own copy of the fd with the message (Assembler.drain)."""
    send_fds(sock, kind, body, [fd], timeout=timeout, wait_write=wait_write)


def send_fds(sock: socket.socket, kind: bytes, body: bytes, fds: list[int], *,
             timeout: float = SEND_TIMEOUT, wait_write: WaitWrite = _select_wait_write) -> None:
    """send_fd with up to MAX_FDS descriptors in the one datagram."""
    if len(body) > CHUNK:
        raise ValueError(f"a message with descriptors must fit one datagram ({len(body)} bytes)")
    if not 0 < len(fds) <= MAX_FDS:
        raise ValueError(f"{len(fds)} descriptors in one message (1 to {MAX_FDS})")
    datagram = HEADER.pack(kind, next(_message_ids) & 0xFFFFFFFF, os.getpid(), 0, 1) + body
    _send_datagram(sock, datagram, timeout, wait_write, fds)


def _send_datagram(sock: socket.socket, datagram: bytes, timeout: float,
                   wait_write: WaitWrite, fds: list[int] | None = None) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if fds:
                socket.send_fds(sock, [datagram], fds)
            else:
                sock.send(datagram)
            return
        except BlockingIOError:
            left = deadline - time.monotonic()
            if left <= 0:
                raise ChannelFull("the receiver's queue is full") from None
            try:
                wait_write(sock.fileno(), left)
            except socket.timeout:
                pass


class Assembler:
    """The receiving side: datagrams in, whole (kind, body) messages out."""

    def __init__(self) -> None:
        # (sender pid, message id) -> (first seen, chunks); a message whose sender died
        # or gave up half-way is dropped after STALE_PARTIAL.
        self.partial: dict[tuple[int, int], tuple[float, list[bytes | None]]] = {}

    def feed(self, datagram: bytes) -> tuple[bytes, bytes] | None:
        """The message this datagram completes, or None (more chunks to come, or junk)."""
        if len(datagram) < HEADER.size:
            return None
        kind, msg_id, pid, index, count = HEADER.unpack_from(datagram)
        chunk = datagram[HEADER.size:]
        if count == 1:
            return kind, chunk
        if index >= count:
            return None
        now = time.monotonic()
        key = (pid, msg_id)
        entry = self.partial.get(key)
        if entry is None:
            self._drop_stale(now)
            entry = self.partial[key] = (now, [None] * count)
        chunks = entry[1]
        chunks[index] = chunk
        if any(c is None for c in chunks):
            return None
        del self.partial[key]
        return kind, b"".join(chunks)       # type: ignore[arg-type]

    def _drop_stale(self, now: float) -> None:
        for key in [k for k, (since, _) in self.partial.items() if now - since > STALE_PARTIAL]:
            del self.partial[key]

    def drain(self, sock: socket.socket) -> Iterator[tuple[bytes, bytes, list[int]]]:
        """Every message completed by what is queued on the non-blocking `sock` now, with
        the descriptors its datagram carried (send_fd; the caller owns and closes them)."""
        while True:
            try:
                datagram, fds, _flags, _addr = socket.recv_fds(sock, MAX_DATAGRAM, MAX_FDS)
            except BlockingIOError:
                return
            msg = self.feed(datagram)
            if msg is not None:
                yield msg[0], msg[1], fds
            else:
                close_fds(fds)


def close_fds(fds: list[int]) -> None:
    """Descriptors that arrived with a message nobody takes them from."""
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass
