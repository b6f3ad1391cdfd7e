"""Admin commands that change state, applied to ONE worker's local objects.

The admin console validates a command, then calls `worker.control(cmd, arg)`.
In one process that is `apply_control(worker, cmd, arg)`; with several
workers the process model fans it out, so each worker runs apply_control on
its own pools and clients. Everything here must therefore be idempotent and
must not raise for input the console has accepted.

Commands and their local effect (PgBouncer semantics):

  PAUSE [db]     no new server assignments (clients wait); servers are closed
                 as they are released, so PAUSE completes when none is left
  SUSPEND        like PAUSE, but servers are kept (no buffers to flush here)
  RESUME [db]    undo PAUSE / SUSPEND / KILL; waiting clients go on
  DISABLE db     refuse new client logins to db;  ENABLE db undoes it
  RECONNECT [db] close each server when it is next released
  KILL [db]      drop the clients and servers of db now; db stays paused
  KILL_CLIENT id drop one client (id as SHOW CLIENTS shows it)
  WAIT_CLOSE [db] nothing local: the console waits for RECONNECT to finish
  SHUTDOWN [WAIT_FOR_SERVERS | WAIT_FOR_CLIENTS]
  SET key=value  a validated runtime setting;  RELOAD  re-read the config file
"""
from __future__ import annotations

import logging
import weakref
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

import gevent

from pooler.pooling.relay import ClientKill

if TYPE_CHECKING:
    from pooler.pooling.pool import Pool
    from pooler.pooling.worker import Worker

log = logging.getLogger("pooler.admin")

CLOSER_PERIOD = 0.05
NO_PAUSE, PAUSE, SUSPEND = "none", "pause", "suspend"


@dataclass
class AdminState:
    """Admin flags of one worker beyond pausing.

    Pausing itself lives on the worker (`worker.paused`, `worker.paused_dbs`,
    shared with SIGUSR1/SIGUSR2 and the prefork master) and is applied to the
    pools by workerproc.apply_pause: one place for the check.
    """
    suspended: bool = False             # SUSPEND (a pause that keeps its servers)
    disabled_dbs: set[str] = field(default_factory=set)
    shutdown_mode: str | None = None
    # RECONNECT: servers to close when released -> their real creation time
    # (srv.created is set to -inf so that the pool's lifetime check closes them).
    close_needed: "weakref.WeakKeyDictionary" = field(default_factory=weakref.WeakKeyDictionary)
    closer: gevent.Greenlet | None = None


def state_of(worker: "Worker") -> AdminState:
    """The worker's AdminState (created on first use)."""
    state = getattr(worker, "admin_state", None)
    if state is None:
        state = worker.admin_state = AdminState()
    return state


def pause_mode(worker: "Worker") -> str:
    """'none', 'pause' or 'suspend' (SHOW STATE); per-database pauses are not a mode."""
    if not worker.paused:
        return NO_PAUSE
    return SUSPEND if state_of(worker).suspended else PAUSE


def state_dict(worker: "Worker") -> dict:
    """The flags as plain data, for snapshots."""
    state = state_of(worker)
    return {"pause_mode": pause_mode(worker), "paused_dbs": sorted(worker.paused_dbs),
            "disabled_dbs": sorted(state.disabled_dbs), "shutdown_mode": state.shutdown_mode}


def is_paused(worker: "Worker", db: str | None) -> bool:
    """Is the whole pooler (db None) or database `db` under PAUSE/SUSPEND/KILL?"""
    return worker.paused if db is None else (worker.paused or db in worker.paused_dbs)


def is_disabled(worker: "Worker", dbname: str) -> bool:
    return dbname in state_of(worker).disabled_dbs


# --------------------------------------------------------------------------- dispatch

def apply_control(worker: "Worker", cmd: str, arg: str | None) -> None:
    """Apply one (already validated) admin command to this worker's local state."""
    handler = _HANDLERS.get(cmd.upper())
    if handler is None:
        raise ValueError(f"unknown control command {cmd!r}")
    handler(worker, arg or None)


def _pause(worker: "Worker", db: str | None) -> None:
    if db:
        _set_pause(worker, worker.paused, worker.paused_dbs | {db})
    else:
        state_of(worker).suspended = False
        _set_pause(worker, True, worker.paused_dbs)


def _suspend(worker: "Worker", _arg: str | None) -> None:
    state_of(worker).suspended = True
    _set_pause(worker, True, worker.paused_dbs)


def _resume(worker: "Worker", db: str | None) -> None:
    if db:
        _set_pause(worker, worker.paused, worker.paused_dbs - {db})
    else:
        state_of(worker).suspended = False
        _set_pause(worker, False, set())


def _disable(worker: "Worker", db: str | None) -> None:
    if db:
        state_of(worker).disabled_dbs.add(db)


def _enable(worker: "Worker", db: str | None) -> None:
    if db:
        state_of(worker).disabled_dbs.discard(db)


def _reconnect(worker: "Worker", db: str | None) -> None:
    state = state_of(worker)
    for pool in _pools(worker, db):
        for srv in list(pool.active) + list(pool.idle):
            if srv not in state.close_needed:
                state.close_needed[srv] = srv.created
                srv.created = float("-inf")     # "lifetime over": closed at release
        pool.close_all("RECONNECT")
    _ensure_closer(worker)


def _kill(worker: "Worker", db: str | None) -> None:
    names = [db] if db else sorted({p.name for p in worker.pools.values()} | set(worker.cfg.databases))
    _set_pause(worker, worker.paused, worker.paused_dbs | {n for n in names if n != "*"})
    for client in list(worker.clients):
        pool = client.pool
        if pool is not None and pool.name in names:
            _kill_client(client, "57P01", "killed by admin command KILL")
    for pool in _pools(worker, db):
        pool.close_all("KILL")


def _kill_one(worker: "Worker", arg: str | None) -> None:
    from pooler.admin.snapshot import global_id
    for client in list(worker.clients):
        if arg is not None and str(global_id(worker.worker_id, client.id)) == arg.strip():
            _kill_client(client, "57P01", "admin forced disconnect")


def _kill_client(client, sqlstate: str, message: str) -> None:
    log.info("C-%d %s closing because: %s", client.id, client._who(), message)
    client.glet.kill(ClientKill(sqlstate, message), block=False)


def _wait_close(worker: "Worker", _db: str | None) -> None:
    _ensure_closer(worker)


def _set(worker: "Worker", arg: str | None) -> None:
    from pooler.config.runtime import runtime_setting
    key, _, text = (arg or "").partition("=")
    worker.apply_config(runtime_setting(worker.cfg, key, text))
    log.info("SET %s=%s", key, text)


def _reload(worker: "Worker", _arg: str | None) -> None:
    from pooler.config.converters import ConfigError
    from pooler.config.load import load_config
    try:
        cfg = load_config(worker.config_path)
    except ConfigError as exc:
        log.error("RELOAD failed, keeping the old config: %s", "; ".join(exc.errors))
        return
    worker.apply_config(cfg)
    log.info("RELOAD: config reloaded from %s", worker.config_path)


# --------------------------------------------------------------------------- shutdown

def _shutdown(worker: "Worker", mode: str | None) -> None:
    """SHUTDOWN: now; or once servers are released; or once clients have gone.
    The same shutdown as the signals' (SIGINT, SIGTERM), bounded by shutdown_timeout;
    the process exits when it is done."""
    from pooler.pooling.worker import STOP_CLIENTS, STOP_NOW, STOP_SERVERS
    mode = (mode or "").upper() or None
    state_of(worker).shutdown_mode = mode or "IMMEDIATE"
    announce = getattr(worker, "announce_shutdown", None)    # prefork: tell the master
    if announce is not None:
        announce()
    worker.stop({None: STOP_NOW, "WAIT_FOR_SERVERS": STOP_SERVERS,
                 "WAIT_FOR_CLIENTS": STOP_CLIENTS}[mode])


# --------------------------------------------------------------------------- helpers

def _pools(worker: "Worker", db: str | None) -> list["Pool"]:
    return [p for p in list(worker.pools.values()) if db is None or p.name == db]


def _set_pause(worker: "Worker", paused: bool, paused_dbs: set[str]) -> None:
    """Record the pause flags and apply them to the pools (waking resumed waiters)."""
    from pooler.proc.workerproc import apply_pause
    apply_pause(worker, paused, paused_dbs)
    _ensure_closer(worker)


def _ensure_closer(worker: "Worker") -> None:
    state = state_of(worker)
    if state.closer is None or state.closer.dead:
        state.closer = gevent.spawn(_closer, worker)


def _closer(worker: "Worker") -> None:
    """Close servers of paused pools and RECONNECT-marked servers as they go idle."""
    while True:
        if not _close_idle(worker):
            return
        gevent.sleep(CLOSER_PERIOD)


def _close_idle(worker: "Worker") -> bool:
    """One pass; False when there is nothing left to wait for."""
    state = state_of(worker)
    pending = False
    closing = worker.paused and not state.suspended
    for pool in list(worker.pools.values()):
        if pool.paused and (closing or pool.name in worker.paused_dbs):
            pool.close_all("pause mode")
            pending = pending or pool.total > 0
        for srv in list(pool.idle):
            if srv in state.close_needed:
                pool.discard(srv, "RECONNECT")
        pending = pending or any(s in state.close_needed and not s.closed for s in list(pool.active))
    return pending


_HANDLERS: dict[str, Callable[["Worker", str | None], None]] = {
    "PAUSE": _pause, "SUSPEND": _suspend, "RESUME": _resume,
    "DISABLE": _disable, "ENABLE": _enable, "RECONNECT": _reconnect,
    "KILL": _kill, "KILL_CLIENT": _kill_one, "WAIT_CLOSE": _wait_close,
    "SHUTDOWN": _shutdown, "SET": _set, "RELOAD": _reload,
}

__all__ = ["AdminState", "apply_control", "state_of", "state_dict", "pause_mode", "is_paused",
           "is_disabled"]
