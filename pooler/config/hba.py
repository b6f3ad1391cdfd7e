"""auth_hba_file (pg_hba.conf format) and auth_ident_file (pg_ident.conf), as PgBouncer reads them.

Parsed and validated when the config is loaded (validate.py), so a bad file is a
config error naming file:line at start, and a RELOAD with a bad file keeps the old
config (rules included). The parsed rules travel inside the Config (pickled to the
workers), so every worker matches against the same rules the master validated.

What PgBouncer supports, and so what is accepted here (its config.md, auth_hba_file):
  * line types local, host, hostssl, hostnossl;
  * database: all, sameuser, replication, names, comma lists, @file;
  * user: all, names, comma lists, @file (no +group: PgBouncer has no groups);
  * address: all, an address with /CIDR, or an address and a mask column;
  * methods trust, reject, md5, password, scram-sha-256, cert, peer; option map=.
Anything else is an error naming the line, rather than a rule that silently never
matches (PostgreSQL also refuses to load such a file).
"""
from __future__ import annotations

import ipaddress
import os
import re
from dataclasses import dataclass, field

METHODS = ("trust", "reject", "md5", "password", "scram-sha-256", "cert", "peer")
LINE_TYPES = ("local", "host", "hostssl", "hostnossl")
Network = ipaddress.IPv4Network | ipaddress.IPv6Network
_TOKEN = re.compile(r'"((?:[^"]|"")*)"|([^\s,"]+)|(,)')


class HbaError(ValueError):
    """A problem in an hba or ident file; the message starts with file:line."""


@dataclass(frozen=True)
class Names:
    """A database or user column: keywords (all, sameuser, replication) and names."""
    all: bool = False
    sameuser: bool = False
    replication: bool = False
    names: frozenset[str] = frozenset()

    def match(self, value: str, user: str, replication: bool) -> bool:
        if replication:
            # A walsender connection matches only `replication` (PostgreSQL's rule).
            return self.replication
        return self.all or (self.sameuser and value == user) or value in self.names


@dataclass(frozen=True)
class Rule:
    where: str                       # file:line, for the log line of a match
    kind: str                        # local / host / hostssl / hostnossl
    databases: Names
    users: Names
    network: Network | None          # None: all
    method: str
    map: str | None = None


@dataclass(frozen=True)
class IdentLine:
    system: str                      # a name, or a regex when it started with '/'
    regex: bool
    pg_user: str                     # may hold \1 when system is a regex; "all": any


@dataclass
class Hba:
    """The rules of an auth_hba_file and the maps of an auth_ident_file."""
    rules: list[Rule] = field(default_factory=list)
    maps: dict[str, list[IdentLine]] = field(default_factory=dict)

    def match(self, addr: str, is_tls: bool, database: str, user: str,
              replication: bool = False) -> Rule | None:
        """The first rule for a client (addr "unix" or "ip:port"); None: no rule applies."""
        ip = None if addr == "unix" else ipaddress.ip_address(addr.rsplit(":", 1)[0].strip("[]"))
        for r in self.rules:
            if ip is None:
                if r.kind != "local":
                    continue
            elif r.kind == "local" or (r.kind == "hostssl" and not is_tls) or \
                    (r.kind == "hostnossl" and is_tls):
                continue
            if ip is not None and r.network is not None:
                # an IPv4 client on a dual-stack socket (::ffff:a.b.c.d) matches IPv4 lines
                cand = ip.ipv4_mapped if isinstance(ip, ipaddress.IPv6Address) and \
                    ip.ipv4_mapped is not None and r.network.version == 4 else ip
                if cand.version != r.network.version or cand not in r.network:
                    continue
            if not r.databases.match(database, user, replication):
                continue
            if not r.users.match(user, user, False):
                continue
            return r
        return None

    def mapped(self, map_name: str, system_user: str, pg_user: str) -> bool:
        """Whether ident map `map_name` lets `system_user` log in as `pg_user`."""
        for line in self.maps.get(map_name, ()):
            if line.regex:
                m = re.search(line.system, system_user)
                if m is None:
                    continue
                target = line.pg_user
                if m.groups():
                    target = target.replace("\\1", m.group(1) or "")
            elif line.system != system_user:
                continue
            else:
                target = line.pg_user
            if target == "all" or target == pg_user:
                return True
        return False


# --------------------------------------------------------------------------- reading


def _lines(path: str) -> list[tuple[int, list[tuple[str, bool]]]]:
    """(line number, tokens) of the non-empty lines; a token is (text, quoted); ','
    separators are kept as (',', False) so comma lists can be rebuilt."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise HbaError(f"{path}: cannot read: {e.strerror or e}") from None
    except UnicodeDecodeError:
        raise HbaError(f"{path}: not UTF-8 text") from None
    out = []
    for n, raw in enumerate(text.splitlines(), 1):
        line = _strip_comment(raw)
        toks: list[tuple[str, bool]] = []
        pos = 0
        while True:
            while pos < len(line) and line[pos].isspace():
                pos += 1
            if pos >= len(line):
                break
            m = _TOKEN.match(line, pos)
            if m is None:
                raise HbaError(f"{path}:{n}: unterminated quoted string")
            if m.group(1) is not None:
                toks.append((m.group(1).replace('""', '"'), True))
            elif m.group(3):
                toks.append((",", False))
            else:
                toks.append((m.group(2), False))
            pos = m.end()
        if toks:
            out.append((n, toks))
    return out


def _strip_comment(line: str) -> str:
    """Everything before a '#' outside double quotes."""
    quoted = False
    for i, ch in enumerate(line):
        if ch == '"':
            quoted = not quoted
        elif ch == "#" and not quoted:
            return line[:i]
    return line


def _columns(toks: list[tuple[str, bool]], where: str) -> list[list[tuple[str, bool]]]:
    """Whitespace-separated columns, each a comma list of tokens."""
    cols: list[list[tuple[str, bool]]] = []
    joined = False
    for tok in toks:
        if tok == (",", False):
            if not cols or joined:
                raise HbaError(f"{where}: misplaced comma")
            joined = True
            continue
        if joined:
            cols[-1].append(tok)
            joined = False
        else:
            cols.append([tok])
    if joined:
        raise HbaError(f"{where}: list ends with a comma")
    return cols


def _names(col: list[tuple[str, bool]], what: str, where: str, base: str, depth: int = 0) -> Names:
    keywords = {"all": False, "sameuser": False, "replication": False}
    allowed = ("all", "sameuser", "replication") if what == "database" else ("all",)
    names: set[str] = set()
    for text, quoted in col:
        if not quoted and text in allowed:
            keywords[text] = True
        elif not quoted and text.startswith("@"):
            names |= _include(text[1:], where, base, depth)
        elif not quoted and what == "user" and text.startswith("+"):
            raise HbaError(f"{where}: group names are not supported ({text}): "
                           "PgBouncer has no groups")
        elif not quoted and text in ("samerole", "samegroup"):
            raise HbaError(f"{where}: {text} is not supported")
        else:
            names.add(text)
    return Names(keywords["all"], keywords["sameuser"], keywords["replication"], frozenset(names))


def _include(name: str, where: str, base: str, depth: int) -> set[str]:
    """@file: names separated by whitespace or commas (relative to the hba file's directory)."""
    if depth > 10:
        raise HbaError(f"{where}: @file nested too deep")
    path = os.path.join(base, name)
    out: set[str] = set()
    for _n, toks in _lines(path):
        for text, _ in toks:
            if text != ",":
                out.add(text)
    return out


def _network(cols: list[list[tuple[str, bool]]], where: str) -> tuple[Network | None, int]:
    """The address column (and the mask column after it, if used); returns (network, columns used)."""
    text = cols[0][0][0]
    if len(cols[0]) > 1:
        raise HbaError(f"{where}: only one address per line")
    if text == "all":
        return None, 1
    if text in ("samehost", "samenet"):
        raise HbaError(f"{where}: {text} is not supported")
    try:
        if "/" in text:
            return ipaddress.ip_network(text, strict=False), 1
        addr = ipaddress.ip_address(text)
    except ValueError:
        raise HbaError(f"{where}: invalid IP address \"{text}\" (host names are not supported)") \
            from None
    if len(cols) < 2:
        raise HbaError(f"{where}: address \"{text}\" has neither a CIDR mask nor a mask column")
    mask = cols[1][0][0]
    try:
        net = ipaddress.ip_network(f"{addr}/{mask}", strict=False)
    except ValueError:
        raise HbaError(f"{where}: invalid IP mask \"{mask}\"") from None
    return net, 2


def parse_hba(path: str) -> list[Rule]:
    """The rules of an auth_hba_file; HbaError naming file:line for the first problem."""
    rules = []
    base = os.path.dirname(os.path.abspath(path))
    for n, toks in _lines(path):
        where = f"{path}:{n}"
        cols = _columns(toks, where)
        kind = cols[0][0][0]
        if kind not in LINE_TYPES:
            raise HbaError(f"{where}: unsupported connection type \"{kind}\" "
                           f"(one of {', '.join(LINE_TYPES)})")
        need = 4 if kind == "local" else 5
        if len(cols) < need:
            raise HbaError(f"{where}: missing fields (type database user"
                           f"{'' if kind == 'local' else ' address'} method)")
        dbs = _names(cols[1], "database", where, base)
        users = _names(cols[2], "user", where, base)
        rest = cols[3:]
        network = None
        if kind != "local":
            network, used = _network(rest, where)
            rest = rest[used:]
        if not rest:
            raise HbaError(f"{where}: missing authentication method")
        method = rest[0][0][0]
        if method not in METHODS:
            raise HbaError(f"{where}: unsupported authentication method \"{method}\" "
                           f"(one of {', '.join(METHODS)})")
        map_name = None
        for col in rest[1:]:
            opt = col[0][0]
            key, eq, value = opt.partition("=")
            if key != "map" or not eq or not value:
                raise HbaError(f"{where}: unsupported option \"{opt}\" (only map=NAME)")
            if method not in ("peer", "cert"):
                raise HbaError(f"{where}: map= is only for the peer and cert methods")
            map_name = value
        if method == "peer" and kind != "local":
            raise HbaError(f"{where}: peer works only on local (Unix socket) lines")
        if method == "cert" and kind not in ("hostssl",):
            raise HbaError(f"{where}: cert works only on hostssl lines")
        rules.append(Rule(where, kind, dbs, users, network, method, map_name))
    return rules


def parse_ident(path: str) -> dict[str, list[IdentLine]]:
    """Maps of an auth_ident_file: MAPNAME SYSTEM-USER PG-USER lines."""
    maps: dict[str, list[IdentLine]] = {}
    for n, toks in _lines(path):
        where = f"{path}:{n}"
        words = [t for t in toks if t != (",", False)]
        if len(words) != 3:
            raise HbaError(f"{where}: expected MAPNAME SYSTEM-USERNAME PG-USERNAME")
        (name, _), (system, quoted), (pg_user, _) = words
        regex = system.startswith("/") and not quoted
        if regex:
            system = system[1:]
            try:
                re.compile(system)
            except re.error as e:
                raise HbaError(f"{where}: invalid regular expression \"{system}\": {e}") from None
        maps.setdefault(name, []).append(IdentLine(system, regex, pg_user))
    return maps


def load(hba_file: str, ident_file: str | None) -> Hba:
    """Both files, checked together: a map= naming a map the ident file lacks is an error."""
    rules = parse_hba(hba_file)
    maps = parse_ident(ident_file) if ident_file else {}
    for r in rules:
        if r.map is not None and r.map not in maps:
            raise HbaError(f"{r.where}: map \"{r.map}\" is not in auth_ident_file"
                           f" ({ident_file or 'not set'})")
    return Hba(rules, maps)
