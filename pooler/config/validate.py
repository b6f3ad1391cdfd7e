"""Validation: YAML data -> Config, with every error reported in one pass.

Driven by the key tables of settings.py (key -> converter), so that every bad key is
reported instead of failing on the first. Every error reads
``<key path>: <bad value repr> is not valid: <what is allowed>``.
"""
from __future__ import annotations

import difflib
import os
import re
from typing import Any

from pooler.config import hba, settings
from pooler.config.converters import ConfigError, Converter, Invalid, host_list, parse_connstr
from pooler.config.model import AuthConfig, Config, DatabaseEntry, PeerEntry, PoolEntry, UserEntry
from pooler.config.settings import ADMIN_DB, MAX_PEER_ID, SECTIONS, int_names
from pooler.wire import tls        # stdlib ssl only at import; no gevent in the master
from pooler.wire.tls import TLS_FILE_KEYS

_GLOBAL = settings.converters(settings.GLOBAL)
_AUTH = settings.converters(settings.AUTH)
_DATABASE = settings.converters(settings.DATABASE)
_DB_ALIASES = settings.aliases(settings.DATABASE)
_USER = settings.converters(settings.USER)
_POOL = settings.converters(settings.POOL)
_PEER = settings.converters(settings.PEER)
_POOL_NAME_RE = re.compile(r"[A-Za-z0-9_-]{3,60}")
# A secret inside a connection string: `password=...` (quoted or not).
_SECRET_IN_TEXT = re.compile(
    "((?:" + "|".join(sorted(settings.SECRET_NAMES)) + r")\s*=\s*)('(?:[^'\\]|\\.)*'|\S+)")

# --------------------------------------------------------------------------- error text


def _join(path: str, key: Any) -> str:
    return f"{path}.{key}" if path else str(key)


def _bad(path: str, value: Any, allowed: str) -> str:
    # Passwords must never reach logs, not even in an error message.
    secret = any(path.endswith("." + name) for name in settings.SECRET_NAMES)
    shown = "'***'" if secret else _short_repr(value)
    return f"{path}: {shown} is not valid: {allowed}"


def _short_repr(value: Any) -> str:
    text = repr(value)
    text = _SECRET_IN_TEXT.sub(r"\1***", text)
    return text if len(text) <= 80 else text[:77] + "..."


def _unknown(path: str, key: Any, allowed: list[str]) -> str:
    # A short list is worth printing whole; for the ~40 top-level keys, a guess helps more.
    if len(allowed) <= 20:
        return f"{path}: unknown key (allowed: {', '.join(allowed)})"
    guesses = difflib.get_close_matches(str(key), allowed, n=3, cutoff=0.7)
    hint = f"did you mean {' or '.join(guesses)}?" if guesses else "see the config reference"
    return f"{path}: unknown key ({hint})"


def _convert(data: dict, table: dict[str, Converter], path: str, errors: list[str],
             sections: tuple[str, ...] = (), hints: tuple[str, ...] = ()) -> dict[str, Any]:
    """Convert every known key of ``data`` with its table converter; collect errors.

    ``sections`` are keys parsed elsewhere; ``hints`` are extra names an unknown key may
    be a misspelling of (e.g. PgBouncer's flat ``auth_type`` for our ``auth.type``).
    """
    out: dict[str, Any] = {}
    for key, value in data.items():
        kpath = _join(path, key)
        if key in sections:
            continue
        conv = table.get(key)
        if conv is None:
            errors.append(_unknown(kpath, key, [*table, *sections, *hints]))
            continue
        try:
            out[key] = conv(value)
        except Invalid as e:
            errors.append(_bad(kpath, value, e.allowed))
    return out


def _mapping(raw: Any, path: str, what: str, errors: list[str]) -> dict | None:
    """``raw`` as a dict (None counts as empty), or None after recording an error."""
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        errors.append(_bad(path, raw, what))
        return None
    return raw


def _database_spec(raw: Any, path: str, errors: list[str]) -> dict | None:
    """A database entry's settings as a dict, from a mapping or a connection string."""
    spec = _entry_spec(raw, path, errors, int_names(settings.DATABASE),
                       "a connection string like 'host=... port=... dbname=...'")
    if spec is None:
        return None
    return {_DB_ALIASES.get(k, k): v for k, v in spec.items()}


def _entry_spec(raw: Any, path: str, errors: list[str], ints: frozenset[str],
                example: str) -> dict | None:
    """An entry's settings from a mapping or a ``key=value ...`` connection string."""
    if isinstance(raw, str):
        try:
            spec: dict[str, Any] = dict(parse_connstr(raw))
        except ValueError:
            errors.append(_bad(path, raw, example))
            return None
        # Connection strings carry only text; numbers are converted here so that the
        # same table validates both forms (and 'abc' still reports as 'abc').
        for key in ints & spec.keys():
            if re.fullmatch(r"-?\d+", spec[key]):
                spec[key] = int(spec[key])
        return spec
    return _mapping(raw, path, "a mapping of settings, or a connection string", errors)


def _parse_databases(raw: Any, errors: list[str]) -> dict[str, DatabaseEntry]:
    section = _mapping(raw, "databases", "a mapping of database name to settings", errors)
    out: dict[str, DatabaseEntry] = {}
    for name, spec_raw in (section or {}).items():
        path = _join("databases", name)
        if not isinstance(name, str) or not name or name == ADMIN_DB:
            errors.append(_bad(path, name, f"a non-empty name other than {ADMIN_DB!r}"))
            continue
        spec = _database_spec(spec_raw, path, errors)
        if spec is not None:
            values = _convert(spec, _DATABASE, path, errors)
            if _hosts_fit(values, path, errors):
                out[name] = DatabaseEntry(name=name, **values)
    return out


def _hosts_fit(values: dict, path: str, errors: list[str]) -> bool:
    """A host list and a port list must pair up (one port, or one per host)."""
    try:
        host_list(values.get("host", "127.0.0.1"), values.get("port", 5432))
    except Invalid as exc:
        key = "host" if exc.allowed.startswith("a host") else "port"
        errors.append(_bad(_join(path, key), values.get(key), exc.allowed))
        return False
    return True


def _parse_users(raw: Any, errors: list[str]) -> dict[str, UserEntry]:
    """users: {name: {pool_mode, pool_size, ...} or "pool_mode=... pool_size=..."}."""
    section = _mapping(raw, "users", "a mapping of user name to settings", errors)
    out: dict[str, UserEntry] = {}
    for name, spec_raw in (section or {}).items():
        path = _join("users", name)
        if not isinstance(name, str) or not name:
            errors.append(_bad(path, name, "a non-empty user name"))
            continue
        spec = _entry_spec(spec_raw, path, errors, int_names(settings.USER),
                           "a connection string like 'pool_mode=session pool_size=5'")
        if spec is not None:
            out[name] = UserEntry(name=name, **_convert(spec, _USER, path, errors))
    return out


def _parse_pools(raw: Any, databases: set[str], errors: list[str]) -> dict[str, PoolEntry]:
    section = _mapping(raw, "pools", "a mapping of pool name to settings", errors)
    out: dict[str, PoolEntry] = {}
    for name, spec_raw in (section or {}).items():
        path = _join("pools", name)
        if not isinstance(name, str) or not _POOL_NAME_RE.fullmatch(name):
            errors.append(_bad(path, name, "a pool name of 3 to 60 characters from A-Z a-z 0-9 _ -"))
        elif name in databases or name == ADMIN_DB:
            errors.append(_bad(path, name, f"a name not already used by databases or {ADMIN_DB!r}"))
        spec = _mapping(spec_raw, path, "a mapping of pool settings", errors)
        if spec is None:
            continue
        values = _convert(spec, _POOL, path, errors)
        if "database" not in spec:
            errors.append(f"{path}.database: is required (a database name of 1 to 40 characters)")
        elif "database" in values and values["database"] not in databases and "*" not in databases:
            errors.append(_bad(f"{path}.database", values["database"],
                               "a key of databases (or any name when databases has a '*' entry)"))
        if "database" in values:
            out[name] = PoolEntry(name=name, **values)
    return out


def _parse_peers(raw: Any, errors: list[str]) -> dict[int, PeerEntry]:
    """peers: {peer_id: {host, port} or "host=... port=..."}; this pooler's own
    peer_id may be listed (ignored, as PgBouncer does) so that every peer can
    share one peers list."""
    section = _mapping(raw, "peers", "a mapping of peer id to {host, port}", errors)
    out: dict[int, PeerEntry] = {}
    for key, spec_raw in (section or {}).items():
        path = _join("peers", key)
        peer_id = key if isinstance(key, int) and not isinstance(key, bool) else \
            int(key) if isinstance(key, str) and key.strip().isdigit() else None
        if peer_id is None or not 1 <= peer_id <= MAX_PEER_ID:
            errors.append(_bad(path, key, f"a peer id from 1 to {MAX_PEER_ID}"))
            continue
        if peer_id in out:
            errors.append(_bad(path, key, "a peer id listed once"))
            continue
        if isinstance(spec_raw, str):
            try:
                spec: dict | None = dict(parse_connstr(spec_raw))
            except ValueError:
                spec = None
                errors.append(_bad(path, spec_raw, "a connection string like 'host=... port=...'"))
            for k in int_names(settings.PEER) & (spec or {}).keys():
                if re.fullmatch(r"-?\d+", spec[k]):
                    spec[k] = int(spec[k])
        else:
            spec = _mapping(spec_raw, path, "a mapping with host and port, or a connection string",
                            errors)
        if spec is None:
            continue
        values = _convert(spec, _PEER, path, errors)
        missing = [k for k in _PEER if k not in spec]
        for k in missing:
            what = "address, or Unix socket directory" if k == "host" else "port"
            errors.append(f"{path}.{k}: is required (the peer's {what})")
        if not missing and len(values) == len(_PEER):
            out[peer_id] = PeerEntry(peer_id=peer_id, **values)
    return out


def _parse_auth(raw: Any, base_dir: str, errors: list[str]) -> AuthConfig:
    section = _mapping(raw, "auth", "a mapping with keys " + ", ".join(_AUTH), errors)
    section = section or {}
    values = _convert(section, _AUTH, "auth", errors)
    auth = AuthConfig(**values)
    type_is_bad = "type" in section and "type" not in values
    if auth.file is not None:
        # Relative to the config file, so the pooler works from any working directory.
        auth.file = os.path.normpath(os.path.join(base_dir, auth.file))
        if not os.path.isfile(auth.file):
            # Not _bad(): its 80-character cut would drop the file name from a long path.
            errors.append(f"auth.file: {auth.file!r} is not valid: an existing userlist file")
    elif auth.type not in ("trust", "hba", "cert") and auth.user is None and not type_is_bad:
        # (hba and cert may need no password at all: trust / peer / cert lines)
        errors.append(f"auth.file: is required when auth.type is {auth.type!r} "
                      "(a userlist.txt; or set auth.user to look passwords up with auth.query)")
    _parse_hba(auth, base_dir, errors)
    return auth


def _parse_hba(auth: AuthConfig, base_dir: str, errors: list[str]) -> None:
    """auth.hba_file / auth.ident_file: made absolute like auth.file and, when auth.type
    is hba, parsed now, so that a bad line is a config error naming file:line (at start,
    check-config, and a RELOAD, which then keeps the old config)."""
    for key in ("hba_file", "ident_file"):
        path = getattr(auth, key)
        if path is not None:
            setattr(auth, key, os.path.normpath(os.path.join(base_dir, path)))
    if auth.type != "hba":
        return
    if auth.hba_file is None:
        errors.append("auth.hba_file: is required when auth.type is 'hba' (a pg_hba.conf-style file)")
        return
    try:
        auth.hba = hba.load(auth.hba_file, auth.ident_file)
    except hba.HbaError as exc:
        errors.append(f"auth.hba_file: {exc}")


def _check_auth_dbnames(auth: AuthConfig, databases: dict[str, DatabaseEntry],
                       errors: list[str]) -> None:
    """auth.dbname / a database's auth_dbname name a database entry, as in PgBouncer."""
    allowed = "the name of a database entry (or any name when databases has a '*' entry)"
    wanted = [("auth.dbname", auth.dbname)] + \
        [(f"databases.{n}.auth_dbname", e.auth_dbname) for n, e in databases.items()]
    for path, name in wanted:
        # (no databases at all: a partial config, e.g. the admin console's SET)
        if name is not None and databases and name not in databases and "*" not in databases:
            errors.append(_bad(path, name, allowed))


def _check_tls(values: dict[str, Any], base_dir: str, errors: list[str]) -> None:
    """TLS files: made absolute (relative to the config file, as auth.file), required
    by the modes that need them, readable, and loadable (wire/tls.py builds the same
    contexts here, so a key that does not match its certificate is an error now, not
    at the first TLS login)."""
    for key in TLS_FILE_KEYS:
        if values.get(key):
            values[key] = os.path.normpath(os.path.join(base_dir, values[key]))
    client = values.get("client_tls_sslmode", "disable")
    server = values.get("server_tls_sslmode", "disable")
    need: list[tuple[str, str]] = []
    if client != "disable":
        need += [("client_tls_key_file", f"client_tls_sslmode is {client!r}"),
                 ("client_tls_cert_file", f"client_tls_sslmode is {client!r}")]
    if client in ("verify-ca", "verify-full"):
        need.append(("client_tls_ca_file", "client certificates are verified against it "
                                           f"(client_tls_sslmode is {client!r})"))
    if bool(values.get("server_tls_key_file")) != bool(values.get("server_tls_cert_file")):
        missing = "server_tls_key_file" if not values.get("server_tls_key_file") else \
            "server_tls_cert_file"
        need.append((missing, "the other half of the client certificate for servers is set"))
    before = len(errors)
    for key, why in need:
        if not values.get(key):
            errors.append(f"{key}: is required when {why}")
    for key in TLS_FILE_KEYS:
        path = values.get(key)
        if path and not os.access(path, os.R_OK):
            errors.append(f"{key}: {path!r} is not valid: a readable file")
    if len(errors) == before and (client != "disable" or server != "disable"):
        for key, problem in tls.check(values):
            errors.append(f"{key}: {problem}")


def parse_config(data: dict, source_path: str | None = None) -> Config:
    """Validate already-loaded YAML data; raises ConfigError listing every problem."""
    if not isinstance(data, dict):
        raise ConfigError([_bad(source_path or "(top level)", data,
                                "a mapping of settings at the top level")])
    errors: list[str] = []
    base_dir = os.path.dirname(os.path.abspath(source_path)) if source_path else os.getcwd()
    values = _convert(data, _GLOBAL, "", errors, sections=SECTIONS,
                      hints=tuple(f"auth.{k}" for k in _AUTH))
    auth = _parse_auth(data.get("auth"), base_dir, errors)
    databases = _parse_databases(data.get("databases"), errors)
    # Names as written, so a database entry with a bad value doesn't also make every
    # pool pointing at it look wrong.
    raw_dbs = data.get("databases")
    db_names = {k for k in raw_dbs if isinstance(k, str)} if isinstance(raw_dbs, dict) else set()
    pools = _parse_pools(data.get("pools"), db_names, errors)
    users = _parse_users(data.get("users"), errors)
    peers = _parse_peers(data.get("peers"), errors)
    _check_auth_dbnames(auth, databases, errors)
    _check_tls(values, base_dir, errors)
    if auth.type == "cert" and values.get("client_tls_sslmode", "disable") != "verify-full":
        # Without verification the certificate's CN would prove nothing; PgBouncer 1.18
        # refuses to start unless it is verify-full, so the same config works in both.
        errors.append("auth.type: 'cert' needs client_tls_sslmode verify-full (PgBouncer's rule)")
    if errors:
        raise ConfigError(errors)
    return Config(**values, auth=auth, databases=databases, pools=pools, users=users,
                  peers=peers, source_path=source_path)


