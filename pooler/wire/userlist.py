"""PgBouncer's auth_file (userlist.txt): parsing and loading user -> secret."""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)


def _parse_quoted(line: str, pos: int) -> tuple[str, int] | None:
    """Parse a "quoted" field starting at line[pos] == '"'.

    A doubled quote inside the field is a literal quote.  Returns the field
    and the index just after its closing quote, or None if unterminated."""
    out = []
    i = pos + 1
    while i < len(line):
        ch = line[i]
        if ch == '"':
            if i + 1 < len(line) and line[i + 1] == '"':
                out.append('"')
                i += 2
                continue
            return "".join(out), i + 1
        out.append(ch)
        i += 1
    return None


def _parse_userlist_line(line: str) -> tuple[str, str] | None:
    """One userlist line -> (user, secret), or None if malformed."""
    pos = len(line) - len(line.lstrip())
    if pos >= len(line) or line[pos] != '"':
        return None
    first = _parse_quoted(line, pos)
    if first is None:
        return None
    user, pos = first
    rest = line[pos:]
    stripped = rest.lstrip()
    # The two fields must be separated by whitespace.
    if not stripped or stripped == rest or stripped[0] != '"':
        return None
    second = _parse_quoted(stripped, 0)
    if second is None or not user:
        return None
    # Anything after the second field is ignored, as PgBouncer does.
    return user, second[0]


def parse_userlist(text: str) -> tuple[dict[str, str], list[int]]:
    """Parse PgBouncer auth_file content.

    Returns ({user: secret}, [1-based numbers of malformed lines]).  Blank
    lines and lines starting with ';' or '#' are ignored; if a user appears
    twice the last entry wins."""
    users: dict[str, str] = {}
    bad: list[int] = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        stripped = line.strip()
        if not stripped or stripped[0] in ";#":
            continue
        entry = _parse_userlist_line(line)
        if entry is None:
            bad.append(lineno)
            continue
        users[entry[0]] = entry[1]
    return users, bad


def load_userlist(path: str) -> dict[str, str]:
    """Read a PgBouncer userlist.txt; malformed lines are skipped with a
    warning (by line number only, since a line may hold a secret)."""
    # surrogateescape: a stray non-UTF-8 byte must not make the whole file
    # unreadable, and authsecret.to_bytes() restores such bytes exactly.
    with open(path, encoding="utf-8", errors="surrogateescape") as fh:
        users, bad = parse_userlist(fh.read())
    for lineno in bad:
        log.warning("%s:%d: malformed userlist line skipped", path, lineno)
    return users
