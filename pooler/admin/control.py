"""Admin commands that change state, applied to ONE worker's local objects.

The admin console validates a command, then hands it to the pooler it was
given (`pooler.control(cmd, arg)`). In one process that is `LocalPooler`
(admin/local.py), which runs `Control.apply` here; with several workers the
process layer fans it out, so each worker runs its own `Control.apply` on its
own pools and clients. Everything here must therefore be idempotent and
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
from typing import TYPE_CHECKING, Callable

import gevent

from pooler.admin.snapshot import global_id
from pooler.config.runtime import runtime_setting
from pooler.config.converters import ConfigError
from pooler.config.load import load_config
from pooler.pooling.relay import ClientKill
from pooler.pooling.worker import STOP_CLIENTS, STOP_NOW, STOP_SERVERS

if TYPE_CHECKING:
    from pooler.pooling.client import Client
    from pooler.pooling.pool import Pool
    from pooler.pooling.worker import Worker

log = logging.getLogger("pooler.admin")

CLOSER_PERIOD = 0.05


class Control:
    """The state-changing admin commands of one worker.

    The flags themselves (pause, suspend, disabled databases, shutdown mode) are
    the worker's; this object adds only the greenlet that closes servers as they
    are released after PAUSE or RECONNECT. `on_shutdown`, given by the process
    layer, is told of an admin SHUTDOWN before the worker stops (prefork: so the
    master respawns nobody)."""

    def __init__(self, worker: "Worker", on_shutdown: Callable[[], None] | None = None) -> None:
        self.worker = worker
        self.on_shutdown = on_shutdown
        self.closer: gevent.Greenlet | None = None
        self.handlers: dict[str, Callable[[str | None], None]] = {
            "PAUSE": self._pause, "SUSPEND": self._suspend, "RESUME": self._resume,
            "DISABLE": self._disable, "ENABLE": self._enable, "RECONNECT": self._reconnect,
            "KILL": self._kill, "KILL_CLIENT": self._kill_one, "WAIT_CLOSE": self._wait_close,
            "SHUTDOWN": self._shutdown, "SET": self._set, "RELOAD": self._reload,
        }

    def apply(self, cmd: str, arg: str | None) -> None:
        """Apply one (already validated) admin command to this worker's local state."""
        handler = self.handlers.get(cmd.upper())
        if handler is None:
            raise ValueError(f"unknown control command {cmd!r}")
        handler(arg or None)

    # -- pause ------------------------------------------------------------------------

    def _pause(self, db: str | None) -> None:
        w = self.worker
        if db:
            self._set_pause(w.paused, w.paused_dbs | {db})
        else:
            w.suspended = False
            self._set_pause(True, w.paused_dbs)

    def _suspend(self, _arg: str | None) -> None:
        self.worker.suspended = True
        self._set_pause(True, self.worker.paused_dbs)

    def _resume(self, db: str | None) -> None:
        w = self.worker
        if db:
            self._set_pause(w.paused, w.paused_dbs - {db})
        else:
            w.suspended = False
            self._set_pause(False, set())

    def _set_pause(self, paused: bool, paused_dbs: set[str]) -> None:
        """Record the pause flags and apply them to the pools (waking resumed waiters)."""
        self.worker.set_pause(paused, paused_dbs)
        self._ensure_closer()

    # -- databases and connections -------------------------------------------------------

    def _disable(self, db: str | None) -> None:
        if db:
            self.worker.disabled_dbs.add(db)

    def _enable(self, db: str | None) -> None:
        if db:
            self.worker.disabled_dbs.discard(db)

    def _reconnect(self, db: str | None) -> None:
        for pool in self._pools(db):
            pool.mark_close_needed("RECONNECT")
        self._ensure_closer()

    def _kill(self, db: str | None) -> None:
        w = self.worker
        names = [db] if db else sorted({p.name for p in w.pools.values()} | set(w.cfg.databases))
        self._set_pause(w.paused, w.paused_dbs | {n for n in names if n != "*"})
        for client in list(w.clients):
            pool = client.pool
            if pool is not None and pool.name in names:
                _kill_client(client, "57P01", "killed by admin command KILL")
        for pool in self._pools(db):
            pool.close_listen("KILL")
            pool.close_all("KILL")

    def _kill_one(self, arg: str | None) -> None:
        w = self.worker
        for client in list(w.clients):
            if arg is not None and str(global_id(w.worker_id, client.id)) == arg.strip():
                _kill_client(client, "57P01", "admin forced disconnect")

    def _wait_close(self, _db: str | None) -> None:
        self._ensure_closer()

    # -- configuration ------------------------------------------------------------------

    def _set(self, arg: str | None) -> None:
        key, _, text = (arg or "").partition("=")
        self.worker.apply_config(runtime_setting(self.worker.cfg, key, text))
        log.info("SET %s=%s", key, text)

    def _reload(self, _arg: str | None) -> None:
        w = self.worker
        try:
            cfg = load_config(w.config_path)
        except ConfigError as exc:
            log.error("RELOAD failed, keeping the old config: %s", "; ".join(exc.errors))
            return
        w.apply_config(cfg)
        log.info("RELOAD: config reloaded from %s", w.config_path)

    # -- shutdown -----------------------------------------------------------------------

    def _shutdown(self, mode: str | None) -> None:
        """SHUTDOWN: now; or once servers are released; or once clients have gone.
        The same shutdown as the signals' (SIGINT, SIGTERM), bounded by shutdown_timeout;
        the process exits when it is done."""
        mode = (mode or "").upper() or None
        self.worker.shutdown_mode = mode or "IMMEDIATE"
        if self.on_shutdown is not None:
            self.on_shutdown()
        self.worker.stop({None: STOP_NOW, "WAIT_FOR_SERVERS": STOP_SERVERS,
                          "WAIT_FOR_CLIENTS": STOP_CLIENTS}[mode])

    # -- closing servers as they are released -------------------------------------------

    def _pools(self, db: str | None) -> list["Pool"]:
        return [p for p in list(self.worker.pools.values()) if db is None or p.name == db]

    def _ensure_closer(self) -> None:
        if self.closer is None or self.closer.dead:
            self.closer = gevent.spawn(self._close_until_done)

    def _close_until_done(self) -> None:
        """Close servers of paused pools and RECONNECT-marked servers as they go idle."""
        while self._close_idle():
            gevent.sleep(CLOSER_PERIOD)

    def _close_idle(self) -> bool:
        """One pass; False when there is nothing left to wait for."""
        w = self.worker
        pending = False
        closing = w.paused and not w.suspended
        for pool in list(w.pools.values()):
            if pool.paused and (closing or pool.name in w.paused_dbs):
                pool.close_all("pause mode")
                pending = pending or pool.total > 0
            for srv in list(pool.idle):
                if srv.close_needed:
                    pool.discard(srv, "RECONNECT")
            pending = pending or any(s.close_needed and not s.closed for s in list(pool.active))
        return pending


def _kill_client(client: "Client", sqlstate: str, message: str) -> None:
    log.info("C-%d %s closing because: %s", client.id, client._who(), message)
    client.kill(ClientKill(sqlstate, message))
