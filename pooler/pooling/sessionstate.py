"""Session state under transaction pooling: settings that follow a client, and pins.

Under transaction and statement pooling a client's session-level state must
look as if it kept one server. The relay step reports a Query or Parse that
may change session state (relaystep_py.session_text: starting with SET,
RESET, DISCARD, DECLARE, CREATE, DROP, CLOSE, PREPARE, DEALLOCATE, LISTEN,
UNLISTEN or a comment, a second statement after a `;`, a call of an
advisory-lock function or of set_config); `on_text` notes the custom names it
sets and, unless it is a lone SET LOCAL / SET TRANSACTION, marks the
transaction (`Step.sess_seen`). Every other transaction costs nothing here.

At the release point of a marked transaction (ReadyForQuery `I` answering the
last request) the pooler does not guess what the statements did: it asks the
server, in one round trip (`PROBE`), which settings the session now has from
SET (pg_settings.source = 'session', plus role and session_authorization,
which pg_settings does not list) and whether it holds state that cannot be
moved to another server. So the transaction's outcome is followed exactly: a
SET in a block that rolled back, SET LOCAL, RESET, RESET ALL, DISCARD ALL, a
failed SET, `SET a=1; SELECT ...` all read back as PostgreSQL left them.

- Settings: the client keeps name -> value (`ClientSession.settings`), each
  server the values it has (`ServerConn.sess`). When a client gets a server
  the difference is applied with one batch (`diff_sql`: RESET what the server
  has and the client does not, set_config() of the rest, values quoted as
  literals, names as identifiers) together with the tracked parameters
  (params.py). A server goes back to the pool with its values; only what
  differs for the next client is changed. The tracked parameters are read
  back too, so a `SET search_path` (which PostgreSQL 15 does not report)
  follows the client.
- SQL-level prepared statements travel as settings do (sqlprepare.py: read
  back, then replayed under the client's names where the client goes).
- Pins: a session advisory lock, a WITH HOLD cursor, a temporary table, a
  PREPARE text that cannot be replayed alone or a LISTEN keep the server linked to the
  client (a lone LISTEN between transactions never gets here with shared_listen on:
  listencmd.py answers it and notifyhub.py listens for the client) (`ClientSession.pin` names why, SHOW CLIENTS/SERVERS show it) until a
  later probe finds them gone or the client leaves (then DISCARD ALL). A
  database entry's `pinning: false` turns this off (the state then stays on
  the server for the next client, as in PgBouncer).
"""
from __future__ import annotations

import logging
import re
import time
from typing import TYPE_CHECKING

from pooler.wire import protocol
from pooler.pooling import sqlprepare
from pooler.pooling.params import quote_literal
from pooler.pooling.server import ServerError
from pooler.wire.netio import ConnectionClosed

if TYPE_CHECKING:
    from pooler.pooling.client import Client
    from pooler.pooling.relay import Relay
    from pooler.pooling.server import ServerConn

log = logging.getLogger("pooler.session")

# The settings a client has from SET and what pins its server, read in one query.
# Kinds: s setting, t tracked parameter (always read back), q SQL prepared statement
# (sqlprepare.py), p pin reason.
_PROBE_HEAD = (
    "SELECT 's', name, pg_catalog.current_setting(name) FROM pg_catalog.pg_settings "
    "WHERE source = 'session'"
    " UNION ALL SELECT 's', 'role', pg_catalog.current_setting('role') "
    "WHERE pg_catalog.current_setting('role') <> 'none'"
    " UNION ALL SELECT 's', 'session_authorization', pg_catalog.current_setting('session_authorization') "
    "WHERE pg_catalog.current_setting('session_authorization') <> {login}"
    " UNION ALL SELECT 't', name, pg_catalog.current_setting(name) FROM pg_catalog.pg_settings "
    "WHERE pg_catalog.lower(name) = ANY ({tracked})"
    " UNION ALL SELECT 'q', name, statement FROM pg_catalog.pg_prepared_statements "
    "WHERE from_sql")
_PROBE_PINS = (
    " UNION ALL SELECT 'p', 'advisory lock', NULL WHERE EXISTS (SELECT 1 FROM pg_catalog.pg_locks "
    "WHERE locktype = 'advisory' AND pid = pg_catalog.pg_backend_pid())"
    " UNION ALL SELECT 'p', 'WITH HOLD cursor', NULL WHERE EXISTS (SELECT 1 FROM pg_catalog.pg_cursors)"
    " UNION ALL SELECT 'p', 'temporary table', NULL WHERE EXISTS (SELECT 1 FROM pg_catalog.pg_class "
    "WHERE relnamespace = pg_catalog.pg_my_temp_schema())"
    " UNION ALL SELECT 'p', 'LISTEN', NULL WHERE EXISTS (SELECT 1 FROM pg_catalog.pg_listening_channels())")
# Applied in this order: the session user first (it may reset the role), then the role.
_FIRST = ("session_authorization", "role")


_NONE: dict[str, str] = {}   # shared by every client without SET values: never changed


class ClientSession:
    """One client's session state beyond the tracked parameters (small when unused:
    an idle client's memory counts)."""
    __slots__ = ("settings", "key", "pin", "custom")

    def __init__(self) -> None:
        self.settings: dict[str, str] = _NONE   # name (as pg_settings spells it) -> value
        self.key: tuple = ()                 # settings as a comparable value (in Client.tsig)
        self.pin = ""                        # why the server stays linked ("" : it does not)
        self.custom: set[str] | None = None  # custom (dotted) names the client has set

    def set_settings(self, settings: dict[str, str]) -> None:
        self.settings = settings or _NONE
        self.key = tuple(sorted(settings.items()))


# Custom settings (`SET app.tenant = ...`) are placeholders pg_settings does not list, so
# their names come from the statement texts the step reports (EV_SESSION).
_PART = r'(?:"(?:[^"]|"")+"|[A-Za-z_][A-Za-z0-9_$]*)'
_CUSTOM_SET = re.compile(r"(?i)\b(?:re)?set\s+(?:session\s+|local\s+)?(" + _PART +
                         r"(?:\s*\.\s*" + _PART + r")+)")
_CUSTOM_CALL = re.compile(r"(?i)set_config\s*\(\s*'((?:[^']|'')+\.(?:[^']|'')+)'")
_CUSTOM_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_$]*(?:\.[A-Za-z_][A-Za-z0-9_$]*)+")  # as PostgreSQL's
MAX_CUSTOM = 1000          # a bound on what one client can make the pooler remember


def _canon_part(part: str) -> str:
    part = part.strip()
    if part.startswith('"'):
        return part[1:-1].replace('""', '"')
    return part.lower()


def note_text(session: ClientSession, text: str) -> None:
    """A statement that may change session state: remember the custom setting names it
    sets (SET / RESET x.y, set_config('x.y', ...)) for the probe to read back."""
    s = text
    names = [".".join(_canon_part(p) for p in re.findall(_PART, m)) for m in _CUSTOM_SET.findall(s)]
    names += [m.replace("''", "'").lower() for m in _CUSTOM_CALL.findall(s)]
    for name in names:
        if _CUSTOM_NAME.fullmatch(name):
            if session.custom is None:
                session.custom = set()
            if len(session.custom) < MAX_CUSTOM:
                session.custom.add(name)


# A lone DISCARD ALL: PostgreSQL's UNLISTEN * is part of it, so the shared listener
# (notifyhub.py) must drop the client's channels too.
_DISCARD_ALL = re.compile(r"(?is)\s*discard\s+all\s*;?\s*")
STATUS_IDLE = ord("I")

# One statement with an effect that ends with the transaction: no read-back needed.
_LOCAL_ONLY = re.compile(r"(?is)\s*set\s+(?:local|transaction|constraints)\b[^;]*;?\s*")


def on_text(relay: "Relay") -> None:
    """The step reported a statement that may change session state (EV_SESSION, or a
    Parse being rewritten with `sess_hit`): note the custom names it sets, and ask for
    the state to be read back at the release point unless its effect is local."""
    step = relay.step
    step.sess_hit = False
    body = bytes(step.cview[step.msg + 5:step.mend])
    if step.cbuf[step.msg] == 0x50:                     # Parse: name, then the text
        body = body[body.find(0) + 1:]
    whole = b"\0" in body                              # else a hit for being cut short
    text = body.split(b"\0", 1)[0].decode("utf-8", "replace")
    note_text(relay.client.session, text)
    hub = relay.pool.listen_hub
    # (outside a block only: inside one, DISCARD ALL fails and changes nothing)
    if hub is not None and whole and step.status == STATUS_IDLE and _DISCARD_ALL.fullmatch(text):
        hub.unlisten(relay.client, None)
    if not (whole and _LOCAL_ONLY.fullmatch(text)):
        step.sess_seen = True


def quote_ident(name: str) -> str:
    """A setting name as SQL: each dotted part a quoted identifier (`"app"."x"`)."""
    return ".".join('"' + part.replace('"', '""') + '"' for part in name.split("."))


def diff_sql(server: dict[str, str], client: dict[str, str]) -> list[str]:
    """Statements that turn a server's session settings into the client's (one batch),
    with the DEALLOCATEs of prepared statements the client has not (sqlprepare.py;
    its PREPAREs run after the batch, each alone: a search_path may matter to them)."""
    out = [f"RESET {quote_ident(k)}" for k in server
           if k not in client and not sqlprepare.is_statement(k)]
    sets = [k for k in _FIRST if k in client and server.get(k) != client[k]]
    sets += sorted(k for k, v in client.items() if k not in _FIRST and server.get(k) != v
                   and not sqlprepare.is_statement(k))
    if sets:
        out.append("SELECT " + ", ".join(
            f"pg_catalog.set_config({quote_literal(k)}, {quote_literal(client[k])}, false)"
            for k in sets))
    return out + sqlprepare.diff_sql(server, client)[0]


def _text_array(items) -> str:
    """A text[] literal of `items`, safely quoted."""
    inner = ",".join('"' + t.replace("\\", "\\\\").replace('"', '\\"') + '"' for t in items)
    return quote_literal("{" + inner + "}") + "::pg_catalog.text[]"


def probe_sql(login_user: str, tracked: list[str], custom, pins: bool) -> str:
    sql = _PROBE_HEAD.format(login=quote_literal(login_user), tracked=_text_array(tracked))
    if custom:
        sql += (" UNION ALL SELECT 's', n, pg_catalog.current_setting(n, true) FROM "
                f"pg_catalog.unnest({_text_array(sorted(custom))}) n "
                "WHERE pg_catalog.current_setting(n, true) <> ''")
    return sql + _PROBE_PINS if pins else sql


def query_rows(srv: "ServerConn", sql: str) -> list[tuple]:
    """Run one simple query on an idle server and return its rows (text, None for NULL);
    ServerError after ReadyForQuery if the server refused it."""
    s = srv.stream
    s.sendall(protocol.query(sql))
    rows: list[tuple] = []
    error: ServerError | None = None
    while True:
        mtype, body = s.read_message()
        if mtype == ord("D"):
            rows.append(_data_row(body))
        elif mtype == ord("Z"):
            if error is not None:
                raise error
            return rows
        elif mtype == ord("E"):
            fields = protocol.parse_error_fields(body)
            error = ServerError(fields.get("C", "XX000"), fields.get("M", "query failed"), fields)
        elif mtype == ord("S"):
            name, pos = protocol.read_cstr(body, 0)
            srv.params[name], _ = protocol.read_cstr(body, pos)


def _data_row(body: bytes) -> tuple:
    n = int.from_bytes(body[0:2], "big")
    pos, out = 2, []
    for _ in range(n):
        ln = protocol.unpack_i32(body, pos)[0]
        pos += 4
        if ln < 0:
            out.append(None)
        else:
            out.append(body[pos:pos + ln].decode("utf-8", "replace"))
            pos += ln
    return tuple(out)


def read_back(client: "Client", srv: "ServerConn") -> str:
    """Ask the linked server for the client's session state and record it (the client's
    settings, tracked parameters, the server's values); returns the pin reasons ("":
    none; always "" when pinning is off). Blocks: the client's greenlet only."""
    pool = client.pool
    canon = client.worker.tracked_canon
    pins = pool.route.pinning
    rows = query_rows(srv, probe_sql(pool.server_user, sorted(canon), client.session.custom, pins))
    settings: dict[str, str] = {}
    reasons: list[str] = []
    tparams, copied = client.tparams, False
    for kind, name, value in rows:
        if kind == "p":
            reasons.append(name)
        elif kind == "q":
            text = sqlprepare.replayable(value or "")
            if text is None:
                reasons.append("SQL PREPARE")      # more than a PREPARE: cannot be replayed
            else:
                settings[sqlprepare.key(name)] = text
        elif kind == "t" or name.lower() in canon:
            cname = canon.get(name.lower())
            if cname is None or kind != "t" or cname not in tparams:
                continue
            srv.params[cname] = value
            if tparams[cname] != value:
                if not copied:                   # shared between clients: copy first
                    tparams = client.tparams = dict(tparams)
                    copied = True
                tparams[cname] = value
        else:
            settings[name] = value
    client.session.set_settings(settings)
    srv.sess = settings
    client.tsig = client.signature()
    srv.tsig = client.tsig
    return ", ".join(reasons)


def discard_all(srv: "ServerConn", tracked: tuple[str, ...]) -> None:
    """Forget everything a departed client left on its server (pins included): DISCARD
    ALL, after which the server is as freshly logged in."""
    srv.run("DISCARD ALL")
    forgotten(srv, tracked)


def forgotten(srv: "ServerConn", tracked: tuple[str, ...]) -> None:
    """After DISCARD ALL on a server: no statements, no SET values; the tracked
    parameters are back at the login values, which the next sync sets as needed."""
    srv.stmts.clear()
    srv.sess = {}
    for name in tracked:
        srv.params.pop(name, None)
    srv.tsig = None


def after_reset_query(srv: "ServerConn", reset: str) -> None:
    """server_reset_query ran: a DISCARD ALL / RESET ALL took the SET values with it."""
    reset = reset.upper()
    if srv.sess and "ALL" in reset:
        # RESET ALL leaves prepared statements; DISCARD ALL takes them too.
        srv.sess = {} if "DISCARD" in reset else \
            {k: v for k, v in srv.sess.items() if sqlprepare.is_statement(k)}
        srv.tsig = None


def leave(client: "Client", srv: "ServerConn") -> None:
    """The client left at a clean point after session statements or while pinned:
    learn what it left on the server; DISCARD ALL if it cannot stay for another."""
    if read_back(client, srv):
        discard_all(srv, client.worker.tracked)


def at_release(relay: "Relay") -> bool:
    """The relay's job J_SESS, at a release point after session statements (greenlet):
    read the state back, then unlink unless something pins the server. False: the
    server went away meanwhile (the relay's J_LOST)."""
    srv, client = relay.server, relay.client
    relay.step.sess_seen = False
    try:
        pin = read_back(client, srv)
    except ConnectionClosed:
        return False
    except ServerError as exc:           # the server refused the probe: keep it, safely
        log.warning("C-%d could not read session state on %r: %s", client.id, srv, exc)
        pin = "session state unknown"
    except BaseException:                # killed (ClientKill, timeout) with the probe unread
        relay.server = None
        relay.step.unlink()
        relay.pool.discard(srv, "interrupted while reading session state")
        raise
    if pin != client.session.pin and relay.pool.cfg.verbose:
        log.info("C-%d %r pin: %s", client.id, srv, pin or "released")
    client.session.pin = pin
    if not pin:
        relay._unlink(time.monotonic())
    return True
