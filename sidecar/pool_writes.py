"""Changing managed pools (POST, PATCH, DELETE /pools): validated, saved, reloaded.

A change is checked against the request rules here, then against the whole
config as the pooler will see it (the main YAML with the candidate overlay,
pooler/config/load.py), then written to the overlay `<stem>.pools.yaml` next
to the config -- the operator's own file is never rewritten -- and applied by
RELOAD on the admin console. A create or resize must also fit the PostgreSQL
server's max_connections (capacity.py). Writes are serialised (an in-process lock for
concurrent requests, flock for other processes) and atomic (a temp file in the
same directory, fsync, rename, fsync of the directory): a failed write leaves
the old overlay whole.

Request bodies take DigitalOcean's field names (`name`, `db`, `user`, `mode`,
`size`) or Aiven's (`pool_name`, `database`, `username`, `pool_mode`,
`pool_size`).
"""
from __future__ import annotations

import errno
import fcntl
import logging
import os
import re
import stat
import tempfile
import threading
import time
from contextlib import contextmanager
from typing import Any, Callable, Iterator

import yaml

from pooler.config.converters import ConfigError
from pooler.config.load import (is_ini, load_with_overlay, overlay_path, read_overlay,
                                read_yaml)
from pooler.config.model import Config
from pooler.config.settings import ADMIN_DB, POOL_MODES

from .capacity import CapacityGuard
from .console import Console, ConsoleError
from .httperrors import Refusal

log = logging.getLogger("sidecar")

NAME_RE = re.compile(r"[a-z0-9_-]{3,60}")
MAX_SIZE = 10000                # the config's bound on a pool's size
LOCK_WAIT = 10.0                # seconds to wait for another process's write
# Our field name -> Aiven's spelling of it.
ALIASES = {"name": "pool_name", "db": "database", "user": "username", "mode": "pool_mode",
           "size": "pool_size"}
CREATE_FIELDS = ("name", "db", "user", "mode", "size")
PATCH_FIELDS = ("size", "mode", "user")
DEFAULT_MODE, DEFAULT_SIZE = "transaction", 10      # the config's defaults for a pool
HEADER = ("# Written by pooler-sidecar (POST/PATCH/DELETE /pools); merged after the main\n"
          "# config: an entry replaces the main file's entry, null removes it.\n")


# --------------------------------------------------------------------------- requests


def create_request(body: Any) -> dict[str, Any]:
    """A POST body -> {name, db, user, mode, size}; Refusal naming the field at fault."""
    fields = _fields(body, CREATE_FIELDS)
    for required in ("name", "db"):
        if required not in fields:
            raise Refusal(422, "is required", field=required)
    name = fields["name"]
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise Refusal(422, "3 to 60 characters from a-z 0-9 _ -", field="name")
    db = fields["db"]
    if not isinstance(db, str) or not 1 <= len(db) <= 40:
        raise Refusal(422, "a database name of 1 to 40 characters", field="db")
    return {"name": name, "db": db, "user": _user(fields.get("user")),
            "mode": _mode(fields.get("mode", DEFAULT_MODE)),
            "size": _size(fields.get("size", DEFAULT_SIZE))}


def patch_request(body: Any) -> dict[str, Any]:
    """A PATCH body -> the changes, a subset of {size, mode, user}."""
    fields = _fields(body, PATCH_FIELDS)
    if not fields:
        raise Refusal(422, f"nothing to change: give one of {', '.join(PATCH_FIELDS)}")
    check = {"size": _size, "mode": _mode, "user": _user}
    return {k: check[k](v) for k, v in fields.items()}


def _fields(body: Any, allowed: tuple[str, ...]) -> dict[str, Any]:
    """The body's fields under our names (Aiven's accepted); unknown ones refused."""
    if not isinstance(body, dict):
        raise Refusal(400, "the body must be a JSON object", field="body")
    by_alias = {ALIASES[k]: k for k in allowed}
    out: dict[str, Any] = {}
    for key, value in body.items():
        ours = key if key in allowed else by_alias.get(key)
        if ours is None:
            names = ", ".join(f"{k} ({ALIASES[k]})" for k in allowed)
            raise Refusal(422, f"unknown field (allowed: {names})", field=key)
        if ours in out:
            raise Refusal(422, f"given twice, as {ours} and {ALIASES[ours]}", field=ours)
        out[ours] = value
    return out


def _size(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_SIZE:
        raise Refusal(422, f"an integer from 1 to {MAX_SIZE}", field="size")
    return value


def _mode(value: Any) -> str:
    if value not in POOL_MODES:
        raise Refusal(422, f"one of {', '.join(POOL_MODES)}", field="mode")
    return value


def _user(value: Any) -> str | None:
    """None: the pool serves whoever logs in (the inbound user)."""
    if value is not None and (not isinstance(value, str) or not 1 <= len(value) <= 64):
        raise Refusal(422, "a user name of 1 to 64 characters, or null for the inbound user",
                      field="user")
    return value


# --------------------------------------------------------------------------- writes


class PoolWriter:
    """Applies pool changes to the overlay of the config at `config_path`."""

    def __init__(self, config_path: str, console: Console, reload_timeout: float,
                 guard: CapacityGuard | None = None) -> None:
        self.config_path = config_path
        self.overlay = overlay_path(config_path)
        self.console = console
        self.reload_timeout = reload_timeout
        self.guard = guard or CapacityGuard()
        # Made here, not at import: in the sidecar process gevent has patched threading
        # by now, so concurrent requests wait cooperatively.
        self._lock = threading.Lock()

    def create(self, req: dict[str, Any]) -> list[str]:
        """Returns the warnings (a server whose capacity could not be checked)."""
        def change(cfg: Config, pools: dict[str, Any]) -> None:
            name = req["name"]
            if name in cfg.pools or name in cfg.databases or name == ADMIN_DB:
                what = "the admin console" if name == ADMIN_DB else \
                    "a pool" if name in cfg.pools else "a databases entry"
                raise Refusal(409, f"{name!r} is already taken by {what}", field="name")
            if req["db"] not in cfg.databases and "*" not in cfg.databases:
                raise Refusal(422, f"no databases entry named {req['db']!r}", field="db")
            pools[name] = _entry(req["db"], req["user"], req["mode"], req["size"])
        return self._apply(f"create pool {req['name']!r}", change)

    def update(self, name: str, changes: dict[str, Any]) -> list[str]:
        def change(cfg: Config, pools: dict[str, Any]) -> None:
            pool = self._existing(cfg, name)
            current = {"user": pool.user, "mode": pool.mode, "size": pool.size, **changes}
            pools[name] = _entry(pool.database, current["user"], current["mode"], current["size"])
        return self._apply(f"change pool {name!r} ({', '.join(sorted(changes))})", change)

    def delete(self, name: str) -> None:
        def change(cfg: Config, pools: dict[str, Any]) -> None:
            self._existing(cfg, name)
            if name in self._main_pools():
                pools[name] = None          # defined in the main file: the overlay removes it
            else:
                pools.pop(name, None)
        self._apply(f"delete pool {name!r}", change, check_capacity=False)

    # ------------------------------------------------------------------ internals

    def _existing(self, cfg: Config, name: str) -> Any:
        pool = cfg.pools.get(name)
        if pool is None:
            if name in cfg.databases:
                raise Refusal(409, f"{name!r} is a databases entry, not a managed pool: "
                                   f"change it in {self.config_path}", field="name")
            raise Refusal(404, f"no pool named {name!r}", field="name")
        return pool

    def _main_pools(self) -> dict:
        data = read_yaml(self.config_path)
        pools = data.get("pools") if isinstance(data, dict) else None
        return pools if isinstance(pools, dict) else {}

    def _apply(self, what: str, change: Callable[[Config, dict[str, Any]], None],
               check_capacity: bool = True) -> list[str]:
        """Under the locks: read, change, validate (capacity too), write, then RELOAD."""
        if is_ini(self.config_path):
            raise Refusal(409, f"the pooler config {self.config_path} is a pgbouncer.ini: the "
                               "pools API needs a YAML config (convert it with "
                               "`pooler convert-ini`), whose overlay it writes")
        with self._lock, self._file_lock():
            try:
                overlay = read_overlay(self.overlay) if os.path.exists(self.overlay) else {}
                cfg = load_with_overlay(self.config_path, overlay, self.overlay)
            except ConfigError as e:
                raise Refusal(409, "the current config is invalid; fix it first",
                              errors=e.errors) from None
            candidate = {**overlay, "pools": dict(overlay.get("pools") or {})}
            change(cfg, candidate["pools"])
            try:
                new = load_with_overlay(self.config_path, candidate, self.overlay)
            except ConfigError as e:
                raise Refusal(422, "; ".join(e.errors), errors=e.errors) from None
            warnings = self.guard.check(cfg, new) if check_capacity else []
            self._write(candidate)
            log.info("%s: saved in %s", what, self.overlay)
            try:
                self.console.command("RELOAD", timeout=self.reload_timeout)
            except ConsoleError as e:
                raise Refusal(503, f"saved in {self.overlay}, but RELOAD failed: {e}; "
                                   "POST /reload applies it", saved=True) from None
            return warnings

    @contextmanager
    def _file_lock(self) -> Iterator[None]:
        """flock on `<overlay>.lock`, polled (a blocking flock would stall gevent)."""
        path = self.overlay + ".lock"
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise Refusal(409, f"cannot write next to the config: {path}: "
                               f"{e.strerror or e}") from None
        try:
            deadline = time.monotonic() + LOCK_WAIT
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except OSError as e:
                    if e.errno not in (errno.EAGAIN, errno.EACCES):
                        raise
                    if time.monotonic() > deadline:
                        raise Refusal(503, f"{path} stayed locked for {LOCK_WAIT:g}s by "
                                           "another writer") from None
                    time.sleep(0.05)        # cooperative under gevent
            yield
        finally:
            os.close(fd)                    # releases the flock

    def _write(self, overlay: dict[str, Any]) -> None:
        """Replace the overlay atomically; on any failure the old one stays whole."""
        directory = os.path.dirname(self.overlay)
        text = HEADER + yaml.safe_dump(_pruned(overlay), sort_keys=True,
                                       default_flow_style=False)
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=".pools-", suffix=".tmp")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(text)
                f.flush()
                # Readable by whoever reads the main config (the pooler may be another user).
                os.fchmod(f.fileno(), stat.S_IMODE(os.stat(self.config_path).st_mode))
                os.fsync(f.fileno())
            os.replace(tmp, self.overlay)
        except OSError as e:
            _unlink(tmp)
            raise Refusal(409, f"cannot write {self.overlay}: {e.strerror or e}") from None
        _fsync_dir(directory)


def _entry(db: str, user: str | None, mode: str, size: int) -> dict[str, Any]:
    entry: dict[str, Any] = {"database": db, "mode": mode, "size": size}
    if user is not None:
        entry["user"] = user
    return entry


def _pruned(overlay: dict[str, Any]) -> dict[str, Any]:
    """Without empty sections, so that an overlay emptied by deletes reads as empty."""
    return {k: v for k, v in overlay.items() if v}


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def _fsync_dir(directory: str) -> None:
    """Make the rename itself durable."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
