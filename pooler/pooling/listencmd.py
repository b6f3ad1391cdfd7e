"""A client's lone LISTEN / UNLISTEN, answered by the pooler (shared LISTEN).

Under transaction and statement pooling with `shared_listen` on, a client that
holds no server and sends a simple Query that is exactly one `LISTEN name`,
`UNLISTEN name` or `UNLISTEN *` gets its answer from the pooler: the pool's
NotifyHub (notifyhub.py) listens on the channel for it, and no server is linked.
The relay's link event (EV_LINK) looks at one byte of the text first
(`FIRST`); only a text starting like one of these is parsed, strictly: anything
else (two statements, a LISTEN in a transaction block, a text not all in the
buffer, a name PostgreSQL would truncate or fold differently, non-ASCII) takes
the ordinary path, where LISTEN pins a server (sessionstate.py).
"""
from __future__ import annotations

import re
import time
from typing import TYPE_CHECKING

from pooler.wire import protocol
from pooler.pooling import notifyhub

if TYPE_CHECKING:
    from pooler.pooling.relay import Relay

LISTEN, UNLISTEN = "LISTEN", "UNLISTEN"
NAMEDATALEN = 64               # PostgreSQL truncates a name to 63 bytes
_QUERY = 0x51

# The first byte of a text that may be a LISTEN / UNLISTEN: its letters, a blank, or
# the start of a comment. Every other query costs the relay this one lookup.
FIRST = bytearray(256)
for _c in b"lLuU \t\n\r\f-/":
    FIRST[_c] = 1

_BLANKS = " \t\n\r\f"          # PostgreSQL 15's scanner: [ \t\n\r\f]
_WORD = re.compile(r"[A-Za-z_][A-Za-z0-9_$]*")
_QUOTED = re.compile(r'"((?:[^"]|"")+)"')
# Not a ColId: reserved and type/function-name keywords (PostgreSQL's kwlist.h).
_NOT_COLID = frozenset("""
all analyse analyze and any array as asc asymmetric both case cast check collate column
constraint create current_catalog current_date current_role current_time current_timestamp
current_user default deferrable desc distinct do else end except false fetch for foreign
from grant group having in initially intersect into lateral leading limit localtime
localtimestamp not null offset on only or order placing primary references returning
select session_user some symmetric table then to trailing true union unique user using
variadic when where window with authorization binary collation concurrently cross
current_schema freeze full ilike inner is isnull join left like natural notnull outer
overlaps right similar tablesample verbose""".split())


def _skip(text: str, pos: int) -> int:
    """Past blanks and comments (`--` to the line end, nested `/* */`); -1 for a
    comment that does not end."""
    n = len(text)
    while pos < n:
        if text[pos] in _BLANKS:
            pos += 1
        elif text.startswith("--", pos):
            nl = text.find("\n", pos)
            pos = n if nl < 0 else nl + 1
        elif text.startswith("/*", pos):
            depth, pos = 1, pos + 2
            while depth:
                close = text.find("*/", pos)
                if close < 0:
                    return -1
                open_ = text.find("/*", pos, close)
                if open_ >= 0:
                    depth, pos = depth + 1, open_ + 2
                else:
                    depth, pos = depth - 1, close + 2
        else:
            break
    return pos


def _name(text: str, pos: int) -> tuple[str | None, int]:
    """A channel name at `pos` as PostgreSQL stores it (unquoted: folded to lower
    case); None if it is not one the pooler takes."""
    m = _QUOTED.match(text, pos)
    if m:
        name = m.group(1).replace('""', '"')
    else:
        m = _WORD.match(text, pos)
        if not m or m.group().lower() in _NOT_COLID:
            return None, pos
        name = m.group().lower()
    if len(name.encode()) >= NAMEDATALEN:
        return None, pos
    return name, m.end()


def parse(text: str) -> tuple[str, str | None] | None:
    """(LISTEN, name), (UNLISTEN, name) or (UNLISTEN, None) for `UNLISTEN *`, when
    `text` is exactly that one statement (blanks, comments, one trailing `;`)."""
    if not text.isascii():
        return None
    pos = _skip(text, 0)
    m = _WORD.match(text, pos) if pos >= 0 else None
    if m is None or m.group().upper() not in (LISTEN, UNLISTEN):
        return None
    verb = m.group().upper()
    pos = _skip(text, m.end())
    if pos < 0:
        return None
    if verb == UNLISTEN and text.startswith("*", pos):
        name, pos = None, pos + 1
    else:
        name, pos = _name(text, pos)
        if name is None:
            return None
    pos = _skip(text, pos)
    if 0 <= pos < len(text) and text[pos] == ";":
        pos = _skip(text, pos + 1)
    return (verb, name) if pos == len(text) else None


def command(relay: "Relay") -> tuple[str, str | None] | None:
    """The link event's message as a shared LISTEN command, or None (the ordinary path):
    a Query wholly in the buffer whose text parse() takes."""
    step = relay.step
    buf, m, mend = step.cbuf, step.msg, step.mend
    if buf[m] != _QUERY or mend > step.end or buf[mend - 1] != 0:
        return None
    raw = bytes(buf[m + 5:mend - 1])
    if b"\0" in raw:
        return None
    return parse(raw.decode("ascii", "replace"))


def serve(relay: "Relay") -> int:
    """The relay's job J_LISTEN (the client's greenlet; may block while the hub opens
    its server): do the command, answer it as PostgreSQL would, and go on with what
    the client sent after it. Returns the next job."""
    verb, name = command(relay)
    step, client = relay.step, relay.client
    if verb == LISTEN:
        notifyhub.hub_of(relay.pool).listen(client, name)
    elif relay.pool.listen_hub is not None:       # else it listens on nothing: done
        relay.pool.listen_hub.unlisten(client, name)
    relay.cs.sendall(protocol.command_complete(verb) + protocol.ready_for_query(b"I"))
    relay.last_active = time.monotonic()
    buf, mend, end = step.cbuf, step.mend, step.end
    rest = end - mend
    buf[:rest] = bytes(buf[mend:end])
    step.cend = rest
    return relay.client_events(step.client_start())
