"""The hot loop: moves bytes between one client and the server linked to it.

Both directions read big chunks into a preallocated buffer, walk message
headers only, and forward whole chunks with one send. A message body is
looked at only for the few types that carry state the pooler must follow:

client -> server
  Q, F, S   each will be answered by exactly one ReadyForQuery: counted in
            `sent`, so a pipelining client keeps its server until every one is
            answered (`recv` == `sent`).
  P B D C   extended-protocol messages: `unsynced` until the next Sync, so a
            half-built batch never loses its server. With statement
            rewriting on, P/B/D/C are rewritten (prepared.py).
  X         Terminate: never forwarded to a pooled server.
server -> client
  Z         ReadyForQuery: transaction status; release point.
  S         ParameterStatus: the client's tracked parameters follow it.
  1 3       ParseComplete / CloseComplete: swallowed when the pooler asked.
  C         CommandComplete: DISCARD ALL / DEALLOCATE ALL empty the server's
            statement cache.
  G         CopyInResponse: a Sync during COPY IN is ignored by the server,
            so it is not counted.
A message that straddles two reads is forwarded in pieces (`c_skip` /
`s_skip` bytes still to pass) unless it is one of the types above, whose
whole body is waited for (they are small, except Parse/Bind, for which the
buffer grows).
"""
from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

from pooler.wire import protocol
from pooler.wire.netio import ConnectionClosed, DualWait
from pooler.pooling.pool import PoolError
from pooler.pooling.prepared import ClientStatements, is_forget_all
from pooler.errors import PoolerError
from pooler.pooling.clientstate import ClientState

if TYPE_CHECKING:
    from pooler.pooling.client import Client
    from pooler.pooling.server import ServerConn

log = logging.getLogger("pooler.relay")

CLIENT_BUF = 65536
# Client read buffers are lent per chunk, not owned per client: an idle client
# holds no buffer, so 10,000 idle clients do not cost 10,000 x 64 KB.
_free_bufs: list[tuple[bytearray, memoryview]] = []
MAX_FREE_BUFS = 256
unpack_i32 = protocol.unpack_i32

# What a client message type means to the relay.
K_OTHER, K_COUNTED, K_SYNC, K_EXT, K_REWRITE, K_TERMINATE, K_COPY_END = range(7)
CLIENT_KIND = bytearray(256)
for _t in b"QF":
    CLIENT_KIND[_t] = K_COUNTED
CLIENT_KIND[ord("S")] = K_SYNC
for _t in b"PBDCEH":
    CLIENT_KIND[_t] = K_EXT
CLIENT_KIND[ord("X")] = K_TERMINATE
for _t in b"cf":
    CLIENT_KIND[_t] = K_COPY_END
REWRITE_KIND = bytearray(256)
for _t in b"PBDC":
    REWRITE_KIND[_t] = 1

# Server message types whose body the relay needs in full. CommandComplete
# ('C') and ParseComplete/CloseComplete ('1'/'3') only matter when prepared
# statements are tracked, so plain relays skip them.
SERVER_INTEREST = bytearray(256)
for _t in b"ZSG":
    SERVER_INTEREST[_t] = 1
SERVER_INTEREST_PS = bytearray(SERVER_INTEREST)
for _t in b"13C":
    SERVER_INTEREST_PS[_t] = 1

STATUS_IDLE = ord("I")
SESSION, TRANSACTION, STATEMENT = "session", "transaction", "statement"


class ClientKill(PoolerError):
    """Raised into a client's greenlet to disconnect it with an error (timeouts, admin KILL)."""


class Relay:
    """Relay state of one client; the server link comes and goes with the pool mode."""

    def __init__(self, client: "Client") -> None:
        self.client = client
        self.cs = client.stream
        self.pool = client.pool
        self.stats = client.pool.stats
        self.mode = client.pool.route.pool_mode
        cfg = client.pool.cfg
        self.stmts: ClientStatements | None = None
        if self.mode != SESSION and cfg.max_prepared_statements > 0:
            self.stmts = ClientStatements(cfg.max_prepared_statements, self.stats.prepared)
        self.interest = SERVER_INTEREST if self.stmts is None else SERVER_INTEREST_PS
        self.server: ServerConn | None = None
        self.dual = DualWait(self.cs, self.cs)
        self.cbuf: bytearray | None = None     # lent while a chunk is processed (see _free_bufs)
        self.cview: memoryview | None = None
        self.cend = 0            # bytes kept at the start of cbuf (partial message)
        self.send = 0            # Q/F/S sent to the current server
        self.recv = 0            # ReadyForQuery received from it
        self.qmask = 0           # bit i: unanswered request recv+1+i is a Query (not a Sync)
        self.unsynced = False
        self.in_copy_in = False
        self.c_skip = 0
        self.s_skip = 0
        self.s_kept = 0        # server bytes kept at the start of server.buf
        self.status = STATUS_IDLE
        self.query_start = 0.0   # when the oldest unanswered request was sent
        self.xact_start = 0.0    # when the server was linked
        self.last_active = time.monotonic()

    # -- main loop -------------------------------------------------------------

    def run(self) -> None:
        """Relay until the client leaves; the finally clause returns or closes the server."""
        cs = self.cs
        early = cs.take_buffered()
        try:
            if early:
                self._borrow()
                self.cbuf[:len(early)] = early
                self.cend = len(early)
                if not self.on_client_data():
                    return
            while True:
                srv = self.server
                if srv is None:
                    # Wait first: after a transaction the client has usually sent
                    # nothing yet, and a failed recv costs a syscall and an exception.
                    cs.wait_readable()
                    if self.cbuf is None:
                        self._borrow()
                    n = cs.try_recv_into(self.cview[self.cend:])
                    if n == 0:
                        return
                    if n < 0:
                        continue
                    self.cend += n
                    self.last_active = time.monotonic()
                    if not self.on_client_data():
                        return
                elif self.dual.wait() == 1:
                    if self.cbuf is None:
                        self._borrow()
                    n = cs.try_recv_into(self.cview[self.cend:])
                    if n == 0:
                        return
                    if n > 0:
                        self.cend += n
                        if not self.on_client_data():
                            return
                else:
                    n = srv.stream.try_recv_into(srv.view[self.s_kept:])
                    if n == 0:
                        self._server_lost(srv)
                        return
                    if n > 0:
                        self.on_server_data(n)
        except ClientKill as exc:
            self.client.fatal(exc.sqlstate, str(exc))
        except PoolError as exc:
            self.client.fatal(exc.sqlstate, str(exc))
        except ConnectionClosed:
            pass
        except protocol.ProtocolError as exc:
            self.client.fatal("08P01", str(exc))
        finally:
            self.cend = 0
            self._give_back()
            self.unlink_at_exit()

    # -- client -> server ------------------------------------------------------

    def on_client_data(self) -> bool:
        """Forward what the client sent; False when the client is done (Terminate)."""
        buf = self.cbuf
        end = self.cend
        pos = 0
        skip = self.c_skip
        if skip:
            if skip >= end:
                self.c_skip = skip - end
                pos = end
            else:
                pos = skip
                self.c_skip = 0
        seg = 0                  # start of the bytes not yet queued for sending
        parts: list | None = None
        srv = self.server
        stmts = self.stmts
        kinds = CLIENT_KIND
        keep_going = True
        while end - pos >= 5:
            t = buf[pos]
            ln = unpack_i32(buf, pos + 1)[0]
            if ln < 4:
                raise protocol.ProtocolError(f"invalid message length {ln}")
            mend = pos + 1 + ln
            kind = kinds[t]
            if kind == K_TERMINATE:
                keep_going = False
                break
            if srv is None:
                srv = self.link()
            if kind == K_COUNTED or (kind == K_SYNC and not self.in_copy_in):
                if self.send == self.recv and self.send:
                    # (the first request's start was taken by link())
                    self.query_start = time.monotonic()
                if kind == K_COUNTED:
                    self.qmask |= 1 << (self.send - self.recv)
                self.send += 1
                self.unsynced = False
            elif kind == K_EXT:
                self.unsynced = True
                if stmts is not None and REWRITE_KIND[t]:
                    if mend > end:
                        break            # need the whole message to rewrite it
                    new = self._rewrite(t, self.cview[pos:mend], srv)
                    if new is not None:
                        if parts is None:
                            parts = []
                        if pos > seg:
                            parts.append(self.cview[seg:pos])
                        parts.append(new)
                        seg = mend
            elif kind == K_COPY_END:
                self.in_copy_in = False
            if mend > end:
                self.c_skip = mend - end
                pos = end
                break
            pos = mend
        # Send everything up to pos, keep a partial message for the next read.
        if srv is not None:
            if parts is None:
                if pos > seg:
                    srv.stream.sendall(self.cview[seg:pos])
            else:
                if pos > seg:
                    parts.append(self.cview[seg:pos])
                srv.stream.sendmsg(parts)
            self.stats.bytes_in += pos
        self._keep(pos, end)
        return keep_going

    def _keep(self, pos: int, end: int) -> None:
        """Move the unprocessed tail to the buffer start; grow for a large message."""
        rest = end - pos
        if rest and pos:
            self.cbuf[:rest] = bytes(self.cview[pos:end])
        self.cend = rest
        if not rest:
            self._give_back()
        elif rest >= 5 and rest == len(self.cbuf):
            need = 1 + unpack_i32(self.cbuf, 1)[0]
            bigger = bytearray(max(need, 2 * len(self.cbuf)))
            bigger[:rest] = self.cbuf
            self.cview.release()
            self.cbuf = bigger
            self.cview = memoryview(bigger)

    def _borrow(self) -> None:
        self.cbuf, self.cview = _free_bufs.pop() if _free_bufs else (b := bytearray(CLIENT_BUF), memoryview(b))

    def _give_back(self) -> None:
        buf = self.cbuf
        if buf is not None and len(buf) == CLIENT_BUF and len(_free_bufs) < MAX_FREE_BUFS:
            _free_bufs.append((buf, self.cview))
        self.cbuf = self.cview = None

    def _rewrite(self, t: int, msg: memoryview, srv: "ServerConn") -> bytes | None:
        batch = self.send + 1     # the Sync that will close this batch
        stmts = self.stmts
        if t == protocol.P:
            return stmts.rewrite_parse(msg, srv.stmts, batch)
        if t == protocol.B:
            return stmts.rewrite_bind(msg, srv.stmts, batch)
        if t == protocol.D:
            return stmts.rewrite_describe(msg, srv.stmts, batch)
        return stmts.rewrite_close(msg, srv.stmts, batch)

    # -- server -> client ------------------------------------------------------

    def on_server_data(self, n: int) -> None:
        srv = self.server
        buf = srv.buf
        end = self.s_kept + n
        pos = 0
        skip = self.s_skip
        if skip:
            if skip >= end:
                self.s_skip = skip - end
                pos = end
            else:
                pos = skip
                self.s_skip = 0
        seg = 0
        parts: list | None = None
        release = False
        refuse = False
        interest = self.interest
        while end - pos >= 5:
            t = buf[pos]
            mend = pos + 1 + unpack_i32(buf, pos + 1)[0]
            if interest[t]:
                if mend > end:
                    break
                drop = False
                if t == protocol.Z:
                    self.recv += 1
                    if self.qmask:
                        self.qmask >>= 1
                    status = buf[pos + 5]
                    self.status = status
                    self.stats.query_count += 1
                    if self.stmts is not None:
                        srv.stmts.on_ready(self.recv)
                    if self.recv == self.send:
                        now = time.monotonic()
                        self.stats.query_time += now - self.query_start
                        self.last_active = now
                        if status == STATUS_IDLE:
                            self.stats.xact_count += 1
                            if self.mode != SESSION and not self.unsynced and not self.c_skip:
                                release = True
                        elif self.mode == STATEMENT:
                            refuse = drop = True
                elif t == 0x53:                      # 'S' ParameterStatus
                    self.client.on_parameter_status(srv, bytes(buf[pos + 5:mend]))
                elif t == 0x31 or t == 0x33:         # '1' / '3'
                    if self.stmts is not None and srv.stmts.expect:
                        drop = not srv.stmts.on_answer(t)
                elif t == 0x43:                      # 'C'
                    if self.stmts is not None and buf[pos + 5] == 0x44 and \
                            is_forget_all(bytes(buf[pos + 5:mend])):
                        srv.stmts.clear()
                else:                                # 'G' CopyInResponse
                    self.in_copy_in = True
                    if self.send > self.recv and not self.qmask & 1:
                        # COPY from an Execute whose Sync was already sent: the server
                        # ignores Syncs during copy-in; the one after CopyDone counts.
                        self.send -= 1
                if drop:
                    if parts is None:
                        parts = []
                    if pos > seg:
                        parts.append(srv.view[seg:pos])
                    seg = mend
            if mend > end:
                self.s_skip = mend - end
                pos = end
                break
            pos = mend
        cs = self.cs
        if parts is None:
            if pos > seg:
                cs.sendall(srv.view[seg:pos])
        else:
            if pos > seg:
                parts.append(srv.view[seg:pos])
            if parts:
                cs.sendmsg(parts)
        self.stats.bytes_out += pos
        rest = end - pos
        if rest and pos:
            buf[:rest] = bytes(srv.view[pos:end])
        self.s_kept = rest
        if refuse:
            self._refuse_transaction(srv)
        elif release and not rest and not self.s_skip:
            self.unlink()

    def _refuse_transaction(self, srv: "ServerConn") -> None:
        """Statement mode: a statement opened a transaction. Roll it back, tell the client."""
        try:
            srv.run("ROLLBACK")
        except Exception:
            self.pool.discard(srv, "rollback failed in statement mode")
            self.server = None
            raise ClientKill("08P01", "server connection lost while refusing a transaction")
        self.status = STATUS_IDLE
        self.cs.sendall(protocol.error_response(
            "0A000", "transaction blocks not allowed in statement pooling mode") +
            protocol.ready_for_query(b"I"))
        self.unlink()

    # -- linking ------------------------------------------------------------------

    def link(self) -> "ServerConn":
        """Get a server from the pool and bring its parameters in line with the client's."""
        client = self.client
        client.state = ClientState.WAITING
        srv = self.pool.acquire(client)
        self.stats.server_assignment_count += 1
        client.state = ClientState.ACTIVE
        srv.client = client
        try:
            client.sync_parameters(srv)
        except Exception as exc:
            self.pool.discard(srv, f"could not set client parameters: {exc}")
            raise PoolError("08P01", f"could not apply client parameters on server: {exc}") from exc
        self.server = srv
        self.dual.b = srv.stream.rw
        self.send = self.recv = self.qmask = 0
        self.unsynced = False
        self.s_skip = 0
        self.s_kept = 0
        self.xact_start = self.query_start = time.monotonic()
        return srv

    def unlink(self) -> None:
        """Return a clean server to the pool (transaction / statement mode)."""
        srv = self.server
        self.server = None
        self.client.state = ClientState.IDLE
        now = time.monotonic()
        self.stats.xact_time += now - self.xact_start
        self.pool.release(srv, now)

    def unlink_at_exit(self) -> None:
        """The client is gone: reuse its server only if it is at a clean boundary."""
        srv = self.server
        if srv is None:
            return
        self.server = None
        clean = (self.send == self.recv and self.status == STATUS_IDLE and not self.unsynced
                 and not self.c_skip and not self.s_skip and not self.s_kept and not srv.closed)
        if not clean:
            if (self.send != self.recv or self.unsynced) and not srv.closed:
                srv.cancel()     # so the backend stops the abandoned query (query_timeout too)
            self.pool.discard(srv, "client disconnected while server was not ready")
            return
        reset = self.pool.cfg.server_reset_query
        if reset and (self.mode == SESSION or self.pool.cfg.server_reset_query_always):
            try:
                srv.run(reset)
                srv.stmts.clear()
            except Exception as exc:
                self.pool.discard(srv, f"server_reset_query failed: {exc}")
                return
        self.pool.release(srv)

    def _server_lost(self, srv: "ServerConn") -> None:
        self.server = None
        self.pool.discard(srv, "server conn crashed?")
        self.client.fatal("08006", "server conn crashed?")
