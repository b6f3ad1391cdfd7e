"""Protocol-level prepared statements under transaction and statement pooling.

A client's named statement lives in the client (name -> the Parse's query and
parameter types). A server keeps an LRU of the statements prepared on it,
keyed by that query-and-types text, under pooler-chosen names. When a client's
Bind or Describe names a statement, the relay makes sure its current server
has it (injecting a Parse if not) and rewrites the name.

The client must see exactly the responses a single server would give, so
every Parse and Close the relay sends records what to do with its answer
(ParseComplete '1' / CloseComplete '3'): pass it on, or swallow it because the
pooler injected the request. Answers arrive in request order, so a FIFO is
enough. After an ErrorResponse the server skips to the next Sync and those
requests are never answered: at ReadyForQuery every entry of that batch is
dropped, and a Parse that never completed is taken out of the server's cache
(and a client's Parse out of its names); a skipped Close is undone: the
client's name comes back, a statement the pooler meant to close stays cached.
"""
from __future__ import annotations

import itertools
from collections import OrderedDict, deque

from pooler.wire import protocol

_names = itertools.count(1)
NOOP_CLOSE_NAME = b"_pooler_noop"   # never prepared: closing it is a no-op that still answers '3'
PARSE_DONE, CLOSE_DONE = ord("1"), ord("3")
UNDO_CLIENT_PARSE, UNDO_CLIENT_CLOSE, UNDO_SERVER_CLOSE = range(3)   # see ServerStatements.on_ready


class Counters:
    """Prepared-statement statistics, counted where PgBouncer's src/prepare.c counts:
    `client_parses` a client's Parse of a named statement; `server_parses` a Parse the
    pooler sends for a statement the server does not have yet (at the client's Parse,
    or before a Bind / Describe on another server); `binds` a client's Bind of a named
    statement. The unnamed statement is the client's and the server's business: none
    of them counts it. (ServerStatements.cache says what a server has.)"""
    __slots__ = ("client_parses", "server_parses", "binds")

    def __init__(self) -> None:
        self.client_parses = 0
        self.server_parses = 0
        self.binds = 0


class ServerStatements:
    """What one server connection has prepared, and the answers it owes."""
    __slots__ = ("cache", "expect")

    def __init__(self) -> None:
        self.cache: OrderedDict[bytes, bytes] = OrderedDict()   # query+types -> server name
        # [batch, kind ('1' or '3'), forward to client?, key of a Parse or None(, undo)]
        # undo (optional): what to put back if the request is never answered, see on_ready.
        self.expect: deque[list] = deque()

    def clear(self) -> None:
        """The server forgot everything (DISCARD ALL / DEALLOCATE ALL / reset)."""
        self.cache.clear()

    def on_answer(self, kind: int) -> bool:
        """A '1' or '3' arrived: True when the client should see it."""
        expect = self.expect
        if not expect:
            return True
        entry = expect.popleft()
        if entry[1] != kind:
            raise protocol.ProtocolError("server answers out of step with the pooler's requests")
        return entry[2]

    def on_ready(self, batch: int) -> None:
        """ReadyForQuery for `batch`: requests of that batch still unanswered were skipped."""
        expect = self.expect
        undos = None
        while expect and expect[0][0] <= batch:
            entry = expect.popleft()
            if entry[3] is not None and self.cache.get(entry[3]) is not None:
                # The Parse never ran (an earlier error skipped it).
                del self.cache[entry[3]]
            if len(entry) > 4:
                undos = undos or []
                undos.append(entry[4])
        for undo in reversed(undos or ()):            # last request first
            if undo[0] == UNDO_CLIENT_PARSE:           # the client's name was never created
                if undo[1].get(undo[2]) == undo[3]:
                    del undo[1][undo[2]]
            elif undo[0] == UNDO_CLIENT_CLOSE:         # the client's statement still exists
                undo[1].setdefault(undo[2], undo[3])
            elif undo[1] not in self.cache:            # the server still has this statement
                self.cache[undo[1]] = undo[2]
                self.cache.move_to_end(undo[1], last=False)


class ClientStatements:
    """A client's named statements and the rewriting of its messages."""
    __slots__ = ("names", "limit", "counters")

    def __init__(self, limit: int, counters: Counters) -> None:
        self.names: dict[bytes, bytes] = {}     # client's statement name -> query+types
        self.limit = limit                      # max_prepared_statements per server
        self.counters = counters

    # Each rewrite_* gets the whole message (type, length, body) and the batch
    # number its answers belong to, and returns the bytes to send instead, or
    # None to send the message unchanged.

    def rewrite_parse(self, msg: memoryview, srv: ServerStatements, batch: int) -> bytes | None:
        end = _cstr_end(msg, 5)
        name = bytes(msg[5:end])
        if not name:
            srv.expect.append([batch, PARSE_DONE, True, None])
            return None
        tail = bytes(msg[end + 1:])
        self.names[name] = tail
        self.counters.client_parses += 1
        out = []
        sname = srv.cache.get(tail)
        if sname is not None:
            # Already prepared on this server: re-prepare it so the client's
            # ParseComplete comes from the server, in order with everything else.
            # Not a server parse for SHOW STATS: PgBouncer, which answers such a Parse
            # itself, counts none, and the server had the statement already.
            out.append(protocol.close_statement(sname))
            srv.expect.append([batch, CLOSE_DONE, False, None, (UNDO_SERVER_CLOSE, tail, sname)])
            srv.cache.move_to_end(tail)
        else:
            sname = self._new_name(srv, tail, batch, out)
            self.counters.server_parses += 1
        out.append(protocol.parse_msg(sname, tail))
        srv.expect.append([batch, PARSE_DONE, True, tail, (UNDO_CLIENT_PARSE, self.names, name, tail)])
        return b"".join(out)

    def rewrite_bind(self, msg: memoryview, srv: ServerStatements, batch: int) -> bytes | None:
        portal_end = _cstr_end(msg, 5)
        stmt_end = _cstr_end(msg, portal_end + 1)
        name = bytes(msg[portal_end + 1:stmt_end])
        if not name:
            return None
        self.counters.binds += 1        # before the lookup: an unknown name counts too (PgBouncer)
        pre, sname = self._ensure(name, srv, batch)
        if sname is None:
            return None                 # unknown to us: let the server report it
        body = bytes(msg[5:portal_end + 1]) + sname + bytes(msg[stmt_end:])
        return pre + protocol.message(b"B", body)

    def rewrite_describe(self, msg: memoryview, srv: ServerStatements, batch: int) -> bytes | None:
        name = _statement_target(msg)
        if not name:
            return None
        pre, sname = self._ensure(name, srv, batch)
        if sname is None:
            return None
        return pre + protocol.message(b"D", b"S" + sname + b"\0")

    def rewrite_close(self, msg: memoryview, srv: ServerStatements, batch: int) -> bytes | None:
        entry = [batch, CLOSE_DONE, True, None]
        srv.expect.append(entry)
        name = _statement_target(msg)
        if not name:
            return None
        # The server copy stays cached for other clients; the client still
        # gets its CloseComplete, from a Close of a name that never exists.
        tail = self.names.pop(name, None)
        if tail is not None:
            entry.append((UNDO_CLIENT_CLOSE, self.names, name, tail))
        return protocol.close_statement(NOOP_CLOSE_NAME)

    # -- helpers --------------------------------------------------------------

    def _ensure(self, name: bytes, srv: ServerStatements, batch: int) -> tuple[bytes, bytes | None]:
        """(messages to send first, server name) for the client's statement `name`."""
        tail = self.names.get(name)
        if tail is None:
            return b"", None
        sname = srv.cache.get(tail)
        if sname is not None:
            srv.cache.move_to_end(tail)
            return b"", sname
        out: list[bytes] = []
        sname = self._new_name(srv, tail, batch, out)
        out.append(protocol.parse_msg(sname, tail))
        srv.expect.append([batch, PARSE_DONE, False, tail])
        self.counters.server_parses += 1
        return b"".join(out), sname

    def _new_name(self, srv: ServerStatements, tail: bytes, batch: int, out: list[bytes]) -> bytes:
        """Pick a server name for `tail`, evicting the least recently used statement if full."""
        cache = srv.cache
        while len(cache) >= self.limit:
            key, old = cache.popitem(last=False)
            out.append(protocol.close_statement(old))
            srv.expect.append([batch, CLOSE_DONE, False, None, (UNDO_SERVER_CLOSE, key, old)])
        sname = b"_pl_%d" % next(_names)
        cache[tail] = sname
        return sname


def _statement_target(msg: memoryview) -> bytes | None:
    """The statement name of a Describe/Close aimed at a statement ('S'); None for a portal."""
    if msg[5] != ord("S"):
        return None
    return bytes(msg[6:_cstr_end(msg, 6)])


def _cstr_end(msg: memoryview, start: int) -> int:
    """Index of the NUL that ends the C string starting at `start`."""
    end = bytes(msg[start:]).find(b"\0")
    if end < 0:
        raise protocol.ProtocolError("message string not terminated")
    return start + end


def is_forget_all(tag: bytes) -> bool:
    """CommandComplete tags after which the server has dropped every prepared statement."""
    return tag.startswith(b"DISCARD ALL") or tag.startswith(b"DEALLOCATE ALL")


def rewrite(relay) -> None:
    """The relay's EV_REWRITE: swap the current P/B/D/C message for its server-side
    form (or drop it), keeping the bytes before it for the send."""
    step = relay.step
    t = step.cbuf[step.msg]
    view = step.cview[step.msg:step.mend]
    stmts, sstmts, batch = relay.stmts, relay.server.stmts, step.send + 1
    if t == protocol.P:
        new = stmts.rewrite_parse(view, sstmts, batch)
    elif t == protocol.B:
        new = stmts.rewrite_bind(view, sstmts, batch)
    elif t == protocol.D:
        new = stmts.rewrite_describe(view, sstmts, batch)
    else:
        new = stmts.rewrite_close(view, sstmts, batch)
    step.want_z = True               # the server owes answers the relay must follow
    if new is not None:
        parts = relay.parts
        if parts is None:
            parts = relay.parts = []
        parts.append(step.cut())
        parts.append(new)
