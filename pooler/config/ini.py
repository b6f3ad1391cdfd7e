"""pgbouncer.ini as a second reader of the same typed Config (one validator, two readers).

PgBouncer's file rules, as PgBouncer 1.18-1.2x applies them:

  * `[section]` headers; `key = value` lines; leading whitespace is ignored;
  * a line whose first non-blank character is `;` or `#` is a comment, and those
    characters are NOT special later in a line (`a = b ; c` has value `b ; c`);
  * values are taken verbatim: quotes are part of the value (PgBouncer keeps
    them too); an empty value is allowed; the last duplicate wins;
  * `%include FILE` reads another file in place (relative to the working
    directory, like PgBouncer; we also try the including file's directory);
  * [databases] and [users] keys may be "double quoted" identifiers; values are
    libpq-style connection strings (`key=value key='quoted value'`).

The [pgbouncer] keys are mapped onto the YAML keys (same names, except
auth_type/auth_file/auth_query/auth_user/auth_dbname -> auth.*), strings are given their
YAML types, [databases]/[users]/[peers] become the YAML sections of those
names, and the result goes through validate.parse_config. PgBouncer
settings the pooler does not implement are WARNINGs naming the setting;
unknown keys are errors naming the key and the value.

The keys the pooler implements come from settings.py; this module declares only
what is PgBouncer's alone (settings it does not implement, its [users] zeros).
"""
from __future__ import annotations

import difflib
import logging
import os
import re
import sys
from dataclasses import dataclass, field
from typing import Any

from pooler.config import settings
from pooler.config.converters import INT_RE, ConfigError, guess, parse_connstr
from pooler.config.model import Config
from pooler.config.settings import INI_NAMES, SECRET_NAMES, coerce, ini_spelling
from pooler.config.validate import parse_config

log = logging.getLogger("pooler.ini")

# --------------------------------------------------------------------------- key tables

# PgBouncer settings the pooler does not implement -> values that behave the same here
# (no warning for those). Every other value is reported as a WARNING by name.
UNSUPPORTED: dict[str, frozenset[str]] = {
    k: frozenset(v.split()) for k, v in {
        "user": "", "unix_socket_mode": "0777 777", "unix_socket_group": "",
        "disable_pqexec": "0", "application_name_add_host": "0",
        "conffile": "", "service_name": "", "job_name": "",
        "syslog": "0", "syslog_ident": "",
        "syslog_facility": "", "log_stats": "0 1", "server_fast_close": "0",
        "autodb_idle_timeout": "", "dns_max_ttl": "", "dns_nxdomain_ttl": "",
        "dns_zone_check_period": "0", "resolv_conf": "", "cancel_wait_timeout": "",
        "suspend_timeout": "", "pkt_buf": "",
        "max_packet_size": "", "listen_backlog": "", "sbuf_loopcnt": "",
        "tcp_defer_accept": "", "tcp_socket_buffer": "0", "tcp_keepcnt": "0",
        "tcp_keepidle": "0", "tcp_keepintvl": "0", "tcp_user_timeout": "0",
        "auth_ldap_options": "",
        # TLS tuning: PgBouncer's defaults are what the pooler does (TLS 1.2+, OpenSSL's
        # default ciphers and curves); other values are warned.
        "client_tls_protocols": "secure", "client_tls_ciphers": "fast default",
        "client_tls13_ciphers": "", "client_tls_ecdhcurve": "auto", "client_tls_dheparams": "auto",
        "server_tls_protocols": "secure", "server_tls_ciphers": "fast default",
        "server_tls13_ciphers": "",
    }.items()
}
# [databases] connection-string keys: ours (settings.DATABASE), and PgBouncer's that we
# do not implement.
DB_KEYS = frozenset(k.name for k in settings.DATABASE)
DB_ALIASES = settings.aliases(settings.DATABASE)
DB_INTS = settings.int_names(settings.DATABASE)
DB_UNSUPPORTED = {"client_encoding", "datestyle", "timezone", "target_session_attrs"}
# [databases] values that mean "not set" in PgBouncer (the user's or global one applies).
DB_UNSET = {"query_wait_timeout": "-1"}
# [users] settings (settings.USER), and PgBouncer's that we do not implement -> their
# values that behave the same here (no warning for those).
USER_KEYS = frozenset(k.name for k in settings.USER)
USER_INTS = settings.int_names(settings.USER)
# PgBouncer treats 0 (its default) in [users] as "not set": the global setting applies.
# In the YAML an explicit 0 turns the limit off for the user, so these 0s are dropped.
USER_ZERO_IS_UNSET = {"max_user_connections", "max_user_client_connections", "query_timeout",
                      "query_wait_timeout", "idle_transaction_timeout", "transaction_timeout",
                      "client_idle_timeout"}
PGBOUNCER_UNIX_DIR = "/tmp"     # PgBouncer's default unix_socket_dir (ours is "")
PGBOUNCER_PEER_PORT = 6432      # PgBouncer's port for a [peers] entry without one
MAX_INCLUDE_DEPTH = 10


# --------------------------------------------------------------------------- reading


@dataclass
class Entry:
    value: str
    where: str          # "file:line"


@dataclass
class IniFile:
    sections: dict[str, dict[str, Entry]] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)


def read_ini(path: str) -> IniFile:
    """Sections of a pgbouncer.ini (following %include), or the syntax errors found."""
    out = IniFile()
    _read_into(out, path, None, 0)
    return out


def _read_into(out: IniFile, path: str, section: str | None, depth: int) -> str | None:
    try:
        with open(path, encoding="utf-8", errors="surrogateescape") as f:
            lines = f.read().splitlines()
    except OSError as e:
        out.errors.append(f"{path}: cannot read config file: {e.strerror or e}")
        return section
    for lineno, raw in enumerate(lines, 1):
        where = f"{path}:{lineno}"
        line = raw.strip()
        if not line or line[0] in ";#":
            continue
        if line.startswith("%include"):
            section = _include(out, path, line, where, section, depth)
        elif line.startswith("["):
            section = _section(out, line, where)
        elif section is None:
            out.errors.append(f"{where}: a setting outside any [section]: {_show(line)}")
        else:
            _setting(out, section, line, where)
    return section


def _include(out: IniFile, path: str, line: str, where: str, section: str | None,
             depth: int) -> str | None:
    target = line[len("%include"):].strip()
    if not target:
        out.errors.append(f"{where}: %include needs a file name")
        return section
    if depth >= MAX_INCLUDE_DEPTH:
        out.errors.append(f"{where}: %include nested too deep (include loop?)")
        return section
    if not os.path.isabs(target) and not os.path.exists(target):
        beside = os.path.join(os.path.dirname(os.path.abspath(path)), target)
        target = beside if os.path.exists(beside) else target
    return _read_into(out, target, section, depth + 1)


def _section(out: IniFile, line: str, where: str) -> str | None:
    if not line.endswith("]"):
        out.errors.append(f"{where}: syntax error in section header: {_show(line)}")
        return None
    name = line[1:-1].strip().lower()
    if name not in ("pgbouncer", "databases", "users", "peers"):
        out.errors.append(f"{where}: unknown section [{name}] "
                          "(allowed: [databases], [users], [pgbouncer], [peers])")
        return None
    out.sections.setdefault(name, {})
    return name


def _setting(out: IniFile, section: str, line: str, where: str) -> None:
    key, sep, value = _split_key(line)
    if not sep or not key:
        out.errors.append(f"{where}: syntax error, expected 'key = value': {_show(line)}")
        return
    if section == "pgbouncer":
        key = key.lower()
    # Re-inserting moves a repeated key to its last position: last duplicate wins.
    entries = out.sections[section]
    entries.pop(key, None)
    entries[key] = Entry(value.strip(), where)


def _split_key(line: str) -> tuple[str, str, str]:
    """`key = value`, where the key may be a "double quoted" identifier ("" = ")."""
    if line.startswith('"'):
        m = re.match(r'"((?:[^"]|"")*)"\s*(=?)(.*)', line, re.S)
        if not m:
            return "", "", ""
        return m.group(1).replace('""', '"'), m.group(2), m.group(3)
    key, sep, value = line.partition("=")
    return key.strip(), sep, value


_SECRET_IN_LINE = re.compile("((?:" + "|".join(sorted(SECRET_NAMES)) + r")\s*=\s*)(\S+)")


def _show(text: str) -> str:
    # Never echo a whole line that may carry a password.
    text = _SECRET_IN_LINE.sub(r"\1***", text)
    return repr(text if len(text) <= 80 else text[:77] + "...")


# --------------------------------------------------------------------------- mapping


@dataclass
class Converted:
    data: dict[str, Any]
    warnings: list[str]
    errors: list[str]
    origins: dict[str, str]      # Config path -> "file:line: [section] key", for errors


def convert(path: str) -> Converted:
    """A pgbouncer.ini as the dict parse_config takes, with warnings and errors."""
    ini = read_ini(path)
    out = Converted({}, [], list(ini.errors), {})
    pgb = ini.sections.get("pgbouncer", {})
    _map_globals(pgb, out)
    unix_dir = pgb["unix_socket_dir"].value if "unix_socket_dir" in pgb else PGBOUNCER_UNIX_DIR
    _map_databases(ini.sections.get("databases", {}), unix_dir, out)
    _map_users(ini.sections.get("users", {}), out)
    _map_peers(ini.sections.get("peers", {}), out)
    return out


def _map_globals(entries: dict[str, Entry], out: Converted) -> None:
    for key, entry in entries.items():
        label = f"{entry.where}: [pgbouncer] {key}"
        path = INI_NAMES.get(key)
        if path is not None:
            _put(out.data, path, coerce(path, entry.value))
            out.origins[path] = label
        elif key in UNSUPPORTED:
            if entry.value not in UNSUPPORTED[key]:
                out.warnings.append(f"{label} = {entry.value!r}: not supported by pooler; ignored")
        else:
            out.errors.append(f"{label} = {_show(entry.value)}: unknown setting"
                              f"{guess(key, [*INI_NAMES, *UNSUPPORTED])}")
    if "unix_socket_dir" not in entries:
        out.data["unix_socket_dir"] = PGBOUNCER_UNIX_DIR    # PgBouncer's default
    if "listen_addr" not in entries:
        out.warnings.append("[pgbouncer] listen_addr is not set: PgBouncer would listen on the "
                            f"Unix socket only; pooler also listens on {Config.listen_addr}")


def _put(data: dict, path: str, value: Any) -> None:
    head, _, tail = path.partition(".")
    if tail:
        data.setdefault(head, {})[tail] = value
    else:
        data[head] = value


def _map_databases(entries: dict[str, Entry], unix_dir: str, out: Converted) -> None:
    dbs: dict[str, dict[str, Any]] = {}
    for name, entry in entries.items():
        label = f"{entry.where}: [databases] {name}"
        out.origins[f"databases.{name}"] = label
        spec = _connstr(entry, label, out)
        if spec is None:
            continue
        dbs[name] = _database(spec, label, out)
        if "host" not in dbs[name]:
            # PgBouncer: no host means the Unix socket in unix_socket_dir.
            dbs[name]["host"] = unix_dir or PGBOUNCER_UNIX_DIR
    if entries:
        out.data["databases"] = dbs


def _connstr(entry: Entry, label: str, out: Converted) -> dict[str, str] | None:
    """The key=value pairs of a [databases]/[peers] value; None (error noted) if malformed."""
    try:
        return parse_connstr(entry.value)
    except ValueError as e:
        out.errors.append(f"{label}: cannot parse connection string ({e})")
        return None


def _database(spec: dict[str, str], label: str, out: Converted) -> dict[str, Any]:
    db: dict[str, Any] = {}
    for key, value in spec.items():
        key = DB_ALIASES.get(key.lower(), key.lower())
        if DB_UNSET.get(key) == value.strip():
            continue
        if key in DB_KEYS:
            db[key] = int(value) if key in DB_INTS and INT_RE.fullmatch(value) else value
        elif key in DB_UNSUPPORTED:
            out.warnings.append(f"{label}: {key} is not supported by pooler; ignored")
        else:
            shown = "***" if _secret_like(key) else _show(value)
            out.errors.append(f"{label}: unknown connection parameter {key} = {shown}"
                              f"{guess(key, [*DB_KEYS, *DB_ALIASES, *DB_UNSUPPORTED])}")
    return db


def _map_peers(entries: dict[str, Entry], out: Converted) -> None:
    """[peers] `1 = host=... port=...`: PgBouncer's default port 6432 when none is
    given; pool_size (in-flight cancels per peer) is accepted and ignored."""
    peers: dict[Any, dict[str, Any]] = {}
    for name, entry in entries.items():
        key: Any = int(name) if name.isdigit() else name
        label = f"{entry.where}: [peers] {name}"
        out.origins[f"peers.{key}"] = label
        spec = _connstr(entry, label, out)
        if spec is None:
            continue
        peer: dict[str, Any] = {"port": PGBOUNCER_PEER_PORT}
        for k, value in spec.items():
            k = k.lower()
            if k == "host":
                peer["host"] = value
            elif k == "port":
                peer["port"] = int(value) if INT_RE.fullmatch(value) else value
            elif k == "pool_size":
                out.warnings.append(f"{label}: pool_size is not supported by pooler; ignored")
            else:
                out.errors.append(f"{label}: unknown connection parameter {k} = {_show(value)} "
                                  "(allowed: host, port, pool_size)")
        peers[key] = peer
    if entries:
        out.data["peers"] = peers


def _secret_like(key: str) -> bool:
    """A misspelled `password` still holds a password: never echo its value."""
    return any(w in key for w in ("pass", "pw", "secret")) or \
        bool(difflib.get_close_matches(key, sorted(SECRET_NAMES), n=1, cutoff=0.6))


def _map_users(entries: dict[str, Entry], out: Converted) -> None:
    """[users] `alice = pool_mode=session pool_size=5`: into the YAML `users` section."""
    users: dict[str, dict[str, Any]] = {}
    for name, entry in entries.items():
        label = f"{entry.where}: [users] {name}"
        out.origins[f"users.{name}"] = label
        spec = _connstr(entry, label, out)
        if spec is not None:
            users[name] = _user(spec, label, out)
    if entries:
        out.data["users"] = users


def _user(spec: dict[str, str], label: str, out: Converted) -> dict[str, Any]:
    user: dict[str, Any] = {}
    for key, value in spec.items():
        key = key.lower()
        if key in USER_KEYS:
            if key in USER_ZERO_IS_UNSET and _is_zero(value):
                continue
            user[key] = int(value) if key in USER_INTS and INT_RE.fullmatch(value) else value
        else:
            out.errors.append(f"{label}: unknown setting {key} = {_show(value)}"
                              f"{guess(key, sorted(USER_KEYS))}")
    return user


def _is_zero(text: str) -> bool:
    """'0', '0.0', '0s', '0ms': a zero number or duration."""
    return re.fullmatch(r"\+?0+(\.0*)?\s*(us|ms|s|min|m|h|d)?", text.strip()) is not None


# --------------------------------------------------------------------------- loading


def load_ini(path: str) -> Config:
    """Read, map and validate a pgbouncer.ini; ConfigError lists every problem."""
    conv = convert(path)
    errors = list(conv.errors)
    try:
        cfg = parse_config(conv.data, source_path=os.path.abspath(path))
    except ConfigError as e:
        errors += [translate(err, conv.origins) for err in e.errors]
        cfg = None
    if errors:
        raise ConfigError(errors)
    for w in conv.warnings:
        _warn(w)
    return cfg


def translate(error: str, origins: dict[str, str]) -> str:
    """'databases.app.pool_size: ...' -> 'f.ini:3: [databases] app: pool_size: ...'."""
    for path in sorted(origins, key=len, reverse=True):
        if error.startswith(path + ":"):
            error = origins[path] + error[len(path):]
            break
        if error.startswith(path + "."):
            error = origins[path] + ": " + error[len(path) + 1:]
            break
    return ini_spelling(error)


def _warn(message: str) -> None:
    # At start-up logging is not configured yet: write the WARNING ourselves.
    if logging.getLogger().handlers:
        log.warning("%s", message)
    else:
        print(f"WARNING {message}", file=sys.stderr)
