"""The relay's buffers: client read buffers lent per chunk, and growing a buffer
for a message the step must see whole.

Client read buffers are lent, not owned per client: an idle client holds no
buffer, so 10,000 idle clients do not cost 10,000 x 64 KB. The relay's
`_on_client` pops `free_bufs` itself (the hot path: no call); everything else
goes through these functions.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from pooler.wire import protocol

if TYPE_CHECKING:
    from pooler.pooling.relay import Relay

CLIENT_BUF = 65536
MAX_FREE_BUFS = 256
# (buffer, its memoryview) pairs of CLIENT_BUF bytes, ready to lend.
free_bufs: list[tuple[bytearray, memoryview]] = []
unpack_i32 = protocol.unpack_i32


def borrow(relay: "Relay") -> None:
    """Lend the relay's step a client buffer (a free one, else a new one)."""
    if free_bufs:
        buf, view = free_bufs.pop()
    else:
        buf = bytearray(CLIENT_BUF)
        view = memoryview(buf)
    relay.step.set_cbuf(buf, view)


def give_back(relay: "Relay") -> None:
    """The step's client buffer holds nothing more: back to the free list (a grown one
    is dropped, as is one beyond MAX_FREE_BUFS)."""
    step = relay.step
    buf = step.cbuf
    if buf is not None:
        if len(buf) == CLIENT_BUF and len(free_bufs) < MAX_FREE_BUFS:
            free_bufs.append((buf, step.cview))
        step.set_cbuf(None, None)


def grow_client_buf(relay: "Relay") -> None:
    """A message larger than the buffer (a big Parse/Bind being rewritten)."""
    step = relay.step
    buf, rest = step.cbuf, step.cend
    need = 1 + unpack_i32(buf, 1)[0]
    bigger = bytearray(max(need, 2 * len(buf)))
    bigger[:rest] = buf
    give_back(relay)
    step.set_cbuf(bigger, memoryview(bigger))


def grow_server_buf(relay: "Relay") -> None:
    """A message the step must see whole (ParameterStatus) is larger than the buffer."""
    step, srv = relay.step, relay.server
    rest = step.skept
    need = 1 + unpack_i32(srv.buf, 1)[0]
    bigger = bytearray(max(need, 2 * len(srv.buf)))
    bigger[:rest] = srv.buf
    srv.view.release()
    srv.buf, srv.view = bigger, memoryview(bigger)
    step.sbuf, step.sview = srv.buf, srv.view
