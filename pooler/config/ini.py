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
names, and the result goes through config.parse_config. PgBouncer
settings the pooler does not implement are WARNINGs naming the setting;
unknown keys are errors naming the key and the value.

This module also owns the PgBouncer view of a Config at run time: the names,
formats and `changeable` flags of SHOW CONFIG, and SET's validation.
"""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import logging
import os
import re
import sys
from dataclasses import dataclass, field
from typing import Any

import yaml

from pooler.config.model import TLS_KEYS, AuthConfig, Config, ConfigError, parse_config, parse_connstr

log = logging.getLogger("pooler.ini")

# --------------------------------------------------------------------------- key tables

_NOT_SETTINGS = ("auth", "databases", "pools", "users", "peers", "source_path")
AUTH_KEYS = {"auth_type": "auth.type", "auth_file": "auth.file",
             "auth_query": "auth.query", "auth_user": "auth.user", "auth_dbname": "auth.dbname"}
# ini key -> Config attribute path ("auth.type" for the auth section).
SETTINGS: dict[str, str] = {
    **{f.name: f.name for f in dataclasses.fields(Config) if f.name not in _NOT_SETTINGS},
    **AUTH_KEYS,
}
# Bound at start (sockets, processes, log handlers): SET refuses them, SHOW CONFIG says "no".
RESTART_ONLY = frozenset({"listen_addr", "listen_port", "unix_socket_dir", "workers",
                          "so_reuseport", "peer_id", "pidfile", "logfile", "log_format"})

# PgBouncer settings the pooler does not implement -> values that behave the same here
# (no warning for those). Every other value is reported as a WARNING by name.
UNSUPPORTED: dict[str, frozenset[str]] = {
    k: frozenset(v.split()) for k, v in {
        "user": "", "unix_socket_mode": "0777 777", "unix_socket_group": "",
        "max_db_client_connections": "0",
        "disable_pqexec": "0", "application_name_add_host": "0",
        "conffile": "", "service_name": "", "job_name": "", "auth_hba_file": "",
        "auth_ident_file": "", "syslog": "0", "syslog_ident": "",
        "syslog_facility": "", "log_stats": "0 1", "server_fast_close": "0",
        "autodb_idle_timeout": "", "dns_max_ttl": "", "dns_nxdomain_ttl": "",
        "dns_zone_check_period": "0", "resolv_conf": "", "cancel_wait_timeout": "",
        "transaction_timeout": "0", "suspend_timeout": "", "pkt_buf": "",
        "max_packet_size": "", "listen_backlog": "", "sbuf_loopcnt": "",
        "tcp_defer_accept": "", "tcp_socket_buffer": "0", "tcp_keepcnt": "0",
        "tcp_keepidle": "0", "tcp_keepintvl": "0", "tcp_user_timeout": "0",
        "query_wait_notify": "", "auth_ldap_options": "",
        # TLS tuning: PgBouncer's defaults are what the pooler does (TLS 1.2+, OpenSSL's
        # default ciphers and curves); other values are warned.
        "client_tls_protocols": "secure", "client_tls_ciphers": "fast default",
        "client_tls13_ciphers": "", "client_tls_ecdhcurve": "auto", "client_tls_dheparams": "auto",
        "server_tls_protocols": "secure", "server_tls_ciphers": "fast default",
        "server_tls13_ciphers": "",
    }.items()
}
# [databases] connection-string keys: ours, and PgBouncer's that we do not implement.
DB_KEYS = {"host", "port", "dbname", "user", "password", "pool_mode", "pool_size",
           "min_pool_size", "reserve_pool_size", "max_db_connections", "connect_query",
           "application_name", "auth_user", "auth_query", "auth_dbname"}
DB_ALIASES = {"reserve_pool": "reserve_pool_size"}
DB_INTS = {"port", "pool_size", "min_pool_size", "reserve_pool_size", "max_db_connections"}
DB_UNSUPPORTED = {"client_encoding", "datestyle",
                  "timezone", "max_db_client_connections", "server_lifetime",
                  "load_balance_hosts", "target_session_attrs", "query_wait_timeout"}
# [users] settings (PgBouncer 1.24's names), and PgBouncer's that we do not implement
# -> their values that behave the same here (no warning for those).
USER_KEYS = {"pool_mode", "pool_size", "reserve_pool_size", "max_user_connections",
             "max_user_client_connections", "query_timeout", "query_wait_timeout",
             "idle_transaction_timeout", "client_idle_timeout"}
USER_INTS = {"pool_size", "reserve_pool_size", "max_user_connections",
             "max_user_client_connections"}
# PgBouncer treats 0 (its default) in [users] as "not set": the global setting applies.
# In the YAML an explicit 0 turns the limit off for the user, so these 0s are dropped.
USER_ZERO_IS_UNSET = {"max_user_connections", "max_user_client_connections", "query_timeout",
                      "query_wait_timeout", "idle_transaction_timeout", "client_idle_timeout"}
USER_UNSUPPORTED = {"transaction_timeout": frozenset({"0"})}
PGBOUNCER_UNIX_DIR = "/tmp"     # PgBouncer's default unix_socket_dir (ours is "")
PGBOUNCER_PEER_PORT = 6432      # PgBouncer's port for a [peers] entry without one
MAX_INCLUDE_DEPTH = 10

_TYPES: dict[str, str] = {
    **{f.name: str(f.type) for f in dataclasses.fields(Config)},
    **{f"auth.{f.name}": str(f.type) for f in dataclasses.fields(AuthConfig)},
}
_INT_RE = re.compile(r"[+-]?\d+")
_BOOLS = {"1": True, "0": False, "on": True, "off": False, "true": True, "false": False,
          "yes": True, "no": False}


def coerce(path: str, text: str) -> Any:
    """An ini/SET string as the YAML type of the setting at `path`.

    A string that does not fit stays a string, so the validator reports it
    with the value as written ("default_pool_size: 'abc' is not valid: ...").
    """
    text = text.strip()
    kind = _TYPES.get(path, "str")
    if kind == "int":
        return int(text) if _INT_RE.fullmatch(text) else text
    if kind == "bool":
        return _BOOLS.get(text.lower(), text)
    if kind == "list[str]":
        return [p.strip() for p in text.split(",") if p.strip()]
    if "None" in kind:
        return text or None
    return text        # str, and durations ("1.5", "30s") parse from text


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


def _show(text: str) -> str:
    # Never echo a whole line that may carry a password.
    text = re.sub(r"(password\s*=\s*)(\S+)", r"\1***", text)
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
        path = SETTINGS.get(key)
        if path is not None:
            _put(out.data, path, coerce(path, entry.value))
            out.origins[path] = label
        elif key in UNSUPPORTED:
            if entry.value not in UNSUPPORTED[key]:
                out.warnings.append(f"{label} = {entry.value!r}: not supported by pooler; ignored")
        else:
            out.errors.append(f"{label} = {_show(entry.value)}: unknown setting"
                              f"{_guess(key, [*SETTINGS, *UNSUPPORTED])}")
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


def _guess(key: str, names: list[str]) -> str:
    found = difflib.get_close_matches(key, names, n=2, cutoff=0.75)
    return f" (did you mean {' or '.join(found)}?)" if found else ""


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
        if key in DB_KEYS:
            db[key] = int(value) if key in DB_INTS and _INT_RE.fullmatch(value) else value
        elif key in DB_UNSUPPORTED:
            out.warnings.append(f"{label}: {key} is not supported by pooler; ignored")
        else:
            shown = "***" if _secret_like(key) else _show(value)
            out.errors.append(f"{label}: unknown connection parameter {key} = {shown}"
                              f"{_guess(key, [*DB_KEYS, *DB_ALIASES, *DB_UNSUPPORTED])}")
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
                peer["port"] = int(value) if _INT_RE.fullmatch(value) else value
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
        bool(difflib.get_close_matches(key, ["password"], n=1, cutoff=0.6))


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
            user[key] = int(value) if key in USER_INTS and _INT_RE.fullmatch(value) else value
        elif key in USER_UNSUPPORTED:
            if value not in USER_UNSUPPORTED[key]:
                out.warnings.append(f"{label}: {key} = {value!r}: not supported by pooler; ignored")
        else:
            out.errors.append(f"{label}: unknown setting {key} = {_show(value)}"
                              f"{_guess(key, [*USER_KEYS, *USER_UNSUPPORTED])}")
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
        errors += [_translate(err, conv.origins) for err in e.errors]
        cfg = None
    if errors:
        raise ConfigError(errors)
    for w in conv.warnings:
        _warn(w)
    return cfg


def _translate(error: str, origins: dict[str, str]) -> str:
    """'databases.app.pool_size: ...' -> 'f.ini:3: [databases] app: pool_size: ...'."""
    for path in sorted(origins, key=len, reverse=True):
        if error.startswith(path + ":"):
            error = origins[path] + error[len(path):]
            break
        if error.startswith(path + "."):
            error = origins[path] + ": " + error[len(path) + 1:]
            break
    return _auth_names(error)


def _auth_names(text: str) -> str:
    return re.sub(r"\bauth\.(type|file|query|user|dbname)\b", r"auth_\1", text)


def _warn(message: str) -> None:
    # At start-up logging is not configured yet: write the WARNING ourselves.
    if logging.getLogger().handlers:
        log.warning("%s", message)
    else:
        print(f"WARNING {message}", file=sys.stderr)


# --------------------------------------------------------------------------- run time


def runtime_setting(cfg: Config, key: str, text: str) -> Config:
    """`cfg` with one setting changed by its PgBouncer name (admin SET); validated.

    Raises ConfigError naming the setting when the key is unknown, fixed until
    restart, or the value is invalid.
    """
    key = key.strip().lower()
    path = SETTINGS.get(key)
    if path is None:
        raise ConfigError([f"unknown parameter: {key}{_guess(key, list(SETTINGS))}"])
    if key in RESTART_ONLY:
        raise ConfigError([f"{key} cannot be changed while running (changeable = no)"])
    value = coerce(path, text)
    try:
        if path.startswith("auth."):
            auth = dataclasses.asdict(cfg.auth)
            auth[path[len("auth."):]] = value
            return dataclasses.replace(cfg, auth=parse_config({"auth": auth}).auth)
        if path in TLS_KEYS:
            # The TLS keys are checked together (a mode needs its files): validate the
            # current set with this one changed, and take them all.
            tls = {k: getattr(cfg, k) for k in TLS_KEYS}
            tls[path] = value
            parsed = parse_config({**tls, "auth": {"type": "trust"}}, source_path=cfg.source_path)
            return dataclasses.replace(cfg, **{k: getattr(parsed, k) for k in TLS_KEYS})
        parsed = parse_config({path: value, "auth": {"type": "trust"}})
    except ConfigError as e:
        raise ConfigError([_auth_names(err) for err in e.errors]) from None
    return dataclasses.replace(cfg, **{path: getattr(parsed, path)})


def config_rows(cfg: Config, conffile: str | None) -> list[tuple[str, str | None, str | None, str]]:
    """SHOW CONFIG rows (key, value, default, changeable), PgBouncer names, sorted by key.

    Values come from Config.redacted(), so a secret can never show here.
    """
    current = _flat(cfg.redacted())
    default = _flat(Config().redacted())
    rows = [(key, format_value(current.get(path)), format_value(default.get(path)),
             "no" if key in RESTART_ONLY else "yes")
            for key, path in SETTINGS.items()]
    rows.append(("conffile", conffile, None, "yes"))
    return sorted(rows)


def _flat(data: dict) -> dict[str, Any]:
    out = {k: v for k, v in data.items() if k not in _NOT_SETTINGS}
    out.update({f"auth.{k}": v for k, v in (data.get("auth") or {}).items()})
    return out


def format_value(value: Any) -> str | None:
    """A setting as PgBouncer prints it: booleans 1/0, whole seconds without '.0'."""
    if value is None:
        return None
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, float):
        return str(int(value)) if value.is_integer() else repr(value)
    if isinstance(value, list):
        return ",".join(str(v) for v in value)
    return str(value)


# --------------------------------------------------------------------------- convert-ini


def to_yaml_data(path: str) -> tuple[dict[str, Any], list[str]]:
    """The YAML equivalent of a pgbouncer.ini (validated), and its warnings."""
    conv = convert(path)
    load_errors: list[str] = list(conv.errors)
    try:
        parse_config(conv.data, source_path=os.path.abspath(path))
    except ConfigError as e:
        load_errors += [_translate(err, conv.origins) for err in e.errors]
    if load_errors:
        raise ConfigError(load_errors)
    data = dict(conv.data)
    auth = data.get("auth")
    if auth and auth.get("file"):
        # Relative auth_file means "next to the ini"; keep meaning it wherever the YAML goes.
        base = os.path.dirname(os.path.abspath(path))
        data["auth"] = {**auth, "file": os.path.normpath(os.path.join(base, auth["file"]))}
    for key in TLS_KEYS:
        if key.endswith("_file") and data.get(key):      # the same for the TLS files
            base = os.path.dirname(os.path.abspath(path))
            data[key] = os.path.normpath(os.path.join(base, data[key]))
    return data, conv.warnings


def main(argv: list[str] | None = None) -> int:
    """`pooler convert-ini FILE.ini [-o OUT.yaml]`: write the equivalent YAML config."""
    p = argparse.ArgumentParser(prog="pooler convert-ini",
                                description="Convert a pgbouncer.ini into the pooler's YAML config.")
    p.add_argument("ini", help="pgbouncer.ini to convert")
    p.add_argument("-o", "--output", help="YAML file to write (default: standard output)")
    args = p.parse_args(argv)
    try:
        data, warnings = to_yaml_data(args.ini)
    except ConfigError as e:
        for err in e.errors:
            print(err, file=sys.stderr)
        print(f"{args.ini}: {len(e.errors)} error(s)", file=sys.stderr)
        return 1
    for w in warnings:
        print(f"WARNING {w}", file=sys.stderr)
    text = f"# converted from {os.path.abspath(args.ini)} by pooler convert-ini\n" + \
        yaml.safe_dump(data, sort_keys=False, default_flow_style=False)
    if args.output:
        with open(args.output, "w", encoding="utf-8") as f:
            f.write(text)
        print(f"{args.output}: written", file=sys.stderr)
    else:
        sys.stdout.write(text)
    return 0
