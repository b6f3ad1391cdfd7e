"""SQL-level prepared statements (PREPARE / EXECUTE / DEALLOCATE) that follow a client
from server to server under transaction pooling.

They are session state like SET values, and travel the same way
(sessionstate.py): the read-back after a transaction that ran PREPARE,
DEALLOCATE or DISCARD lists the session's `pg_prepared_statements WHERE
from_sql` (name, and the PREPARE text the client sent); each is kept in the
client's settings under a key no parameter can have (`KEY_PREFIX` + name), so
Client.tsig, ServerConn.sess and the diff at the next server change cover
them too. When the client gets a server, its statements are made to match:
DEALLOCATE what the server has and the client has not (or has with another
text), then the client's own PREPARE texts, replayed under the client's names
(no rewriting: the server then has exactly what the client prepared, so
EXECUTE and DEALLOCATE need no help). A text that is more than one statement
(PostgreSQL records the whole query string: `PREPARE a AS ...; UPDATE ...`)
cannot be replayed alone: it pins the server instead ("SQL PREPARE").
"""
from __future__ import annotations

import re

KEY_PREFIX = "\0prepare:"          # settings key of a statement: never a parameter name
_START = re.compile(r"(?is)\s*prepare\b")


def key(name: str) -> str:
    return KEY_PREFIX + name


def is_statement(key_: str) -> bool:
    return key_.startswith(KEY_PREFIX)


def replayable(text: str) -> str | None:
    """The PREPARE text ready to run again (trailing ';' and blanks cut), or None when
    it holds more than the one PREPARE statement."""
    body = text.rstrip().rstrip(";").rstrip()
    if not _START.match(body) or _top_level_semicolon(body):
        return None
    return body


def _top_level_semicolon(sql: str) -> bool:
    """A ';' outside quotes, dollar quotes and comments."""
    i, n = 0, len(sql)
    while i < n:
        c = sql[i]
        if c == ";":
            return True
        if c in "'\"":
            i = sql.find(c, i + 1)           # '' and "" doubling: two quoted runs, same thing
            if i < 0:
                return True                  # not closed: not something to replay
        elif c == "-" and sql.startswith("--", i):
            i = sql.find("\n", i)
            if i < 0:
                return False
        elif c == "/" and sql.startswith("/*", i):
            depth, i = 1, i + 2
            while depth and i < n:
                if sql.startswith("/*", i):
                    depth, i = depth + 1, i + 2
                elif sql.startswith("*/", i):
                    depth, i = depth - 1, i + 2
                else:
                    i += 1
            continue
        elif c == "$":
            m = re.match(r"\$([A-Za-z_][A-Za-z0-9_]*)?\$", sql[i:])
            if m:
                end = sql.find(m.group(0), i + len(m.group(0)))
                if end < 0:
                    return True
                i = end + len(m.group(0))
                continue
        i += 1
    return False


def diff_sql(server: dict[str, str], client: dict[str, str]) -> tuple[list[str], list[str]]:
    """(DEALLOCATEs, PREPARE texts) that give a server the client's prepared statements
    (settings dicts of both: only the statement keys are looked at). Each PREPARE must
    run as a Query of its own: PostgreSQL records the whole query string as the
    statement's text, which the next read-back must find replayable."""
    drop = [f"DEALLOCATE {quote_ident_one(k[len(KEY_PREFIX):])}" for k, text in server.items()
            if is_statement(k) and client.get(k) != text]
    prepare = [text for k, text in client.items() if is_statement(k) and server.get(k) != text]
    return drop, prepare


def quote_ident_one(name: str) -> str:
    """A statement name as one quoted identifier (names may hold dots)."""
    return '"' + name.replace('"', '""') + '"'
