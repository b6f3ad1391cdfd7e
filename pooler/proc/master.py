"""Process model. With `workers: 1` the pooler is one process that serves
clients itself (the cheap path); with more, a prefork master (an "arbiter", in
gunicorn's manner) binds the listeners, creates the shared-memory segment and
forks gevent workers that share the sockets.

The master never imports gevent's monkey patching and never touches client
traffic. Its loop sleeps on a self-pipe woken by signals, and on each turn
reaps dead workers (giving their pool slots back through shared memory),
respawns them (rate-limited when they crash at boot), kills hung ones (stale
heartbeat) and handles queued signals:

    SIGHUP   reload: validate the file, then send the new config to every worker
    SIGTERM  shutdown once every client has left; SIGINT shutdown once every server
             is released (both bounded by shutdown_timeout, see Worker._shutdown);
             a second SIGTERM/SIGINT, or SIGQUIT, exits at once
    SIGUSR1  pause all pools / SIGUSR2 resume (a flag in shared memory)
"""
from __future__ import annotations

import argparse
import logging
import os
import pickle
import select
import signal
import socket
import sys
import time
from collections import deque

from pooler import logs
from pooler.proc import channel, clientorphans, shm
from pooler.pooling import relaystep
from pooler.logs import flush_and_exit
from pooler.config.converters import ConfigError
from pooler.config.load import load_config
from pooler.config.model import Config
from pooler.config.settings import RESTART_ONLY
from pooler.proc.listen import bind_listeners

log = logging.getLogger("pooler.master")

HUNG_TIMEOUT = 10.0       # a worker whose heartbeat is older is killed
BOOT_WINDOW = 5.0         # dying sooner than this after a spawn counts as a crash loop
MAX_BACKOFF = 30.0
KILL_GRACE = 5.0          # after shutdown_timeout, before SIGKILL
LOOP_PERIOD = 0.5
ORPHAN_RETRY = 0.02      # a dead worker's idle clients not yet handed over: look again soon
MASTER_SEND_TIMEOUT = 0.5  # per datagram: the master's loop must not stall on a stuck worker
ROUTED_BY_MASTER = (signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2)
MASTER_SIGNALS = (signal.SIGHUP, signal.SIGTERM, signal.SIGINT, signal.SIGQUIT,
                  signal.SIGUSR1, signal.SIGUSR2, signal.SIGCHLD)


def load_or_exit(path: str) -> Config:
    try:
        return load_config(path)
    except ConfigError as exc:
        for e in exc.errors:
            print(e, file=sys.stderr)
        raise SystemExit(1)


def serve(args: argparse.Namespace) -> int:
    # Until the handlers are in place (after binding, forking), a reload or pause signal
    # is ignored rather than fatal (their default action ends the process).
    for sig in ROUTED_BY_MASTER:
        signal.signal(sig, signal.SIG_IGN)
    config_path = os.path.abspath(args.config)
    cfg = load_or_exit(config_path)
    if args.workers is not None:
        cfg.workers = args.workers
    if args.daemon and not cfg.logfile:
        print("-d/--daemon needs a logfile in the config (stderr is closed)", file=sys.stderr)
        return 1
    if cfg.logfile:
        cfg.logfile = os.path.abspath(cfg.logfile)
    pidfile = os.path.abspath(cfg.pidfile) if cfg.pidfile else ""
    logs.setup(cfg.log_format, cfg.logfile, max(cfg.verbose, args.verbose), args.quiet,
               cli_verbose=args.verbose)
    try:
        listeners = bind_listeners(cfg)
    except OSError as exc:
        log.error("cannot listen on %s port %d: %s", cfg.listen_addr, cfg.listen_port,
                  exc.strerror or exc)
        return 1
    if args.daemon:
        daemonize()
    if pidfile and not write_pidfile(pidfile):
        return 1
    try:
        if args.user:
            switch_user(args.user)
        log.info("listening on %s port %d (pool_mode=%s, workers=%d, %s)", cfg.listen_addr,
                 cfg.listen_port, cfg.pool_mode, cfg.effective_workers(), relaystep.describe())
        if cfg.effective_workers() == 1:
            return run_single(cfg, listeners, config_path, args.workers)
        arbiter = Arbiter(cfg, config_path, listeners, args.workers)
        arbiter.pidfile = pidfile
        return arbiter.run()
    finally:
        if pidfile:
            remove_pidfile(pidfile)


# -- process set-up -------------------------------------------------------------------------


def daemonize() -> None:
    """Detach: fork twice (no controlling terminal can come back), new session,
    stdio to /dev/null. Paths were made absolute before the chdir."""
    if os.fork():
        os._exit(0)
    os.setsid()
    if os.fork():
        os._exit(0)
    os.chdir("/")
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    if devnull > 2:
        os.close(devnull)


def switch_user(name: str) -> None:
    """Drop root after binding (so privileged ports and root-owned files still work)."""
    import pwd
    try:
        pw = pwd.getpwnam(name)
    except KeyError:
        raise SystemExit(f"-u {name}: no such user")
    if os.getuid() == pw.pw_uid:
        return
    if os.getuid() != 0:
        raise SystemExit(f"-u {name}: only root can switch user")
    os.initgroups(name, pw.pw_gid)
    os.setgid(pw.pw_gid)
    os.setuid(pw.pw_uid)
    log.info("running as user %s (uid %d)", name, pw.pw_uid)


def write_pidfile(path: str) -> bool:
    """Refuse to start over a live pooler's pidfile; replace a stale one."""
    try:
        with open(path) as f:
            old = int(f.read().strip() or 0)
        if old and old != os.getpid():
            os.kill(old, 0)
            log.error("pidfile %s names running process %d; is the pooler already running?", path, old)
            return False
    except (OSError, ValueError):
        pass                                   # no file, garbage, or a dead pid
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        f.write(f"{os.getpid()}\n")
    os.replace(tmp, path)
    return True


def remove_pidfile(path: str) -> None:
    try:
        with open(path) as f:
            if int(f.read().strip() or 0) != os.getpid():
                return                         # someone else's by now
        os.unlink(path)
    except (OSError, ValueError):
        pass


def reload_config(path: str, workers_override: int | None, old: Config) -> Config | None:
    """Load and validate; None (logged) if invalid. Settings that need a restart
    (settings.RESTART_ONLY) keep their old value, with a warning."""
    try:
        new = load_config(path)
    except ConfigError as exc:
        log.error("RELOAD failed, keeping the old config: %s", "; ".join(exc.errors))
        return None
    if workers_override is not None:
        new.workers = workers_override
    for name in RESTART_ONLY:
        if getattr(new, name) != getattr(old, name):
            log.warning("RELOAD: %s changed; it takes effect after a restart", name)
            setattr(new, name, getattr(old, name))
    return new


# -- one process ------------------------------------------------------------------------------


def run_single(cfg: Config, listeners: list, config_path: str, workers_override: int | None) -> int:
    """One process serving clients itself; signals handled in the gevent loop."""
    from gevent import monkey
    monkey.patch_all()
    from pooler.admin.console import AdminConsole
    from pooler.admin.local import LocalPooler
    from pooler.pooling.worker import Worker
    from pooler.proc.signals import serve_until_stopped

    worker = Worker(cfg, listeners)
    worker.config_path = config_path
    pooler = LocalPooler(worker)
    worker.admin = AdminConsole(worker, pooler)
    worker.start()

    def reload() -> None:
        new = reload_config(config_path, workers_override, worker.cfg)
        if new is not None:
            worker.apply_config(new)
            log.info("RELOAD: config reloaded from %s", config_path)

    def pause(on: bool) -> None:
        """SIGUSR1 / SIGUSR2: the console's PAUSE / RESUME."""
        log.info("%s all pools (%s)", "pausing" if on else "resuming", "SIGUSR1" if on else "SIGUSR2")
        pooler.control("PAUSE" if on else "RESUME", None)

    code = serve_until_stopped(worker, reload, pause, second_exits=True)
    log.info("shutdown complete")
    return code


# -- prefork master --------------------------------------------------------------------------------


class Slot:
    """One worker position: its current process and its crash history."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.pid = 0
        self.started = 0.0
        self.quick_deaths = 0
        self.spawn_at = 0.0          # not before this (crash-loop back-off)
        self.killed_hung = False


class Arbiter:
    def __init__(self, cfg: Config, config_path: str, listeners: list[socket.socket],
                 workers_override: int | None) -> None:
        self.cfg = cfg
        self.config_path = config_path
        self.listeners = listeners
        self.workers_override = workers_override
        self.pid = os.getpid()
        n = cfg.effective_workers()
        self.slots = [Slot(i) for i in range(n)]
        self.seg = shm.Segment.create(n, nslots=slots_for(cfg), cancel_cap=cancel_cap_for(cfg))
        # One datagram channel per worker position, made before any fork so that every
        # worker (and a respawned one) holds every sending end: (send, receive).
        self.channels = [socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM) for _ in range(n)]
        for a, _ in self.channels:
            a.setblocking(False)
        # Workers tell the master about console SETs here, so that a worker spawned
        # later starts with them too: (send end for the workers, receive end).
        self.inbox = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        for end in self.inbox:
            end.setblocking(False)
        self.inbox_reader = channel.Assembler()
        # Copies of the workers' long-lived client sockets, and where each client stands
        # (clientorphans.py): a dead worker's idle clients go on in another worker.
        self.orphans = clientorphans.Orphans(clientorphans.Flags(n, cancel_cap_for(cfg)))
        self.signals: deque[int] = deque()
        self.wake_r, self.wake_w = os.pipe()
        os.set_blocking(self.wake_r, False)
        os.set_blocking(self.wake_w, False)
        self.stopping = ""           # "", "SIGTERM", "SIGINT" or "admin"
        self.stop_deadline = 0.0
        self.pidfile = ""            # removed on an immediate exit too

    # -- main loop ------------------------------------------------------------------------

    def run(self) -> int:
        self._install_signals()
        log.info("master pid %d: %d workers, shared memory %s (%d KiB)", self.pid, len(self.slots),
                 self.seg.path, self.seg.lay.size // 1024)
        try:
            while True:
                self._read_inbox()
                if not self.stopping:
                    self._spawn_due()
                self._sleep()
                self._reap()
                self.orphans.hand_over(self.channels, [s.index for s in self._live()])
                while self.signals:
                    self._handle(self.signals.popleft())
                if self.stopping:
                    if not self._live():
                        break
                    if time.monotonic() > self.stop_deadline:
                        self._kill_all(signal.SIGKILL, "did not stop in time")
                        self.stop_deadline = float("inf")       # once is enough
                elif self.seg.state() & shm.STATE_SHUTDOWN:
                    self._admin_shutdown()
                else:
                    self._kill_hung()
        finally:
            self._cleanup()
        log.info("shutdown complete")
        return 0

    def _live(self) -> list[Slot]:
        return [s for s in self.slots if s.pid]

    def _sleep(self) -> None:
        """Until a signal arrives, or LOOP_PERIOD (hung-worker and back-off checks)."""
        timeout = LOOP_PERIOD
        due = [s.spawn_at for s in self.slots if not s.pid and not self.stopping]
        if due:
            timeout = max(0.0, min(timeout, min(due) - time.monotonic()))
        if self.signals:
            timeout = 0
        elif self.orphans.waiting:
            timeout = min(timeout, ORPHAN_RETRY)
        try:
            select.select([self.wake_r, self.inbox[1]], [], [], timeout)
        except InterruptedError:
            pass
        try:
            while os.read(self.wake_r, 4096):
                pass
        except BlockingIOError:
            pass

    def _install_signals(self) -> None:
        for sig in MASTER_SIGNALS:
            signal.signal(sig, self._on_signal)
        signal.set_wakeup_fd(self.wake_w)

    def _on_signal(self, signum: int, frame) -> None:
        if signum != signal.SIGCHLD:
            self.signals.append(signum)

    def _handle(self, sig: int) -> None:
        if sig == signal.SIGHUP:
            self.reload()
        elif sig in (signal.SIGTERM, signal.SIGINT):
            self.stop(signal.Signals(sig))
        elif sig == signal.SIGQUIT:
            self._exit_now("SIGQUIT")
        elif sig in (signal.SIGUSR1, signal.SIGUSR2):
            self.pause(sig == signal.SIGUSR1)

    def pause(self, on: bool) -> None:
        """SIGUSR1 is the console's PAUSE, SIGUSR2 its RESUME (which also resumes paused
        databases); workers follow the flags in shared memory within a tick."""
        seg = self.seg
        log.info("%s all pools (%s)", "pausing" if on else "resuming", "SIGUSR1" if on else "SIGUSR2")
        disabled = seg.dbs_with(shm.FLAG_DISABLED)
        if on:
            seg.set_admin_flags(True, False, seg.paused_dbs(), disabled)
        else:
            seg.set_admin_flags(False, False, set(), disabled)
        for slot in self._live():        # look now, not at the next idle tick
            try:
                channel.send(self.channels[slot.index][0], channel.KICK, timeout=0)
            except OSError:
                pass                     # a full queue: that worker is awake anyway

    # -- workers ----------------------------------------------------------------------------------

    def _spawn_due(self) -> None:
        now = time.monotonic()
        for slot in self.slots:
            if not slot.pid and now >= slot.spawn_at:
                self.spawn(slot)

    def spawn(self, slot: Slot) -> None:
        self.seg.worker_started(slot.index, 0)      # heartbeat from now: boot grace
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                code = self._child(slot.index)
            except BaseException:
                log.exception("worker %d failed", slot.index)
            finally:
                flush_and_exit(code)          # never return into the master's code
        slot.pid = pid
        slot.started = time.monotonic()
        slot.killed_hung = False
        self.seg.worker_set(slot.index, shm.W_PID, pid)

    def _child(self, index: int) -> int:
        """In the forked worker: undo the master's signal set-up, patch, serve."""
        signal.set_wakeup_fd(-1)
        for sig in MASTER_SIGNALS:
            # The master owns reload and pause: a `pkill -HUP pooler` (or -USR1) reaches
            # the workers too, whose default action would be to die.
            signal.signal(sig, signal.SIG_IGN if sig in ROUTED_BY_MASTER else signal.SIG_DFL)
        os.close(self.wake_r)
        os.close(self.wake_w)
        from gevent import monkey
        monkey.patch_all()
        from pooler.proc.workerproc import worker_main
        return worker_main(self.cfg, self.config_path, self.listeners, self.seg, index,
                           self.channels, self.pid, self.inbox[0], self.orphans.flags)

    def _reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            slot = next((s for s in self.slots if s.pid == pid), None)
            if slot is not None:
                self._worker_exited(slot, status)

    def _worker_exited(self, slot: Slot, status: int) -> None:
        """Give back what it held, settle its kept clients, then schedule its replacement."""
        self._read_inbox()                   # what it said before it died comes first
        crashed = not self.stopping and (os.WIFSIGNALED(status) or os.WEXITSTATUS(status) != 0)
        self.orphans.worker_exited(slot.pid, slot.index, crashed)
        self.seg.retire_worker(slot.index)
        slot.pid = 0
        how = describe_status(status)
        if self.stopping:
            log.info("worker %d %s", slot.index, how)
            return
        lived = time.monotonic() - slot.started
        slot.quick_deaths = slot.quick_deaths + 1 if lived < BOOT_WINDOW else 0
        delay = 0.0 if slot.quick_deaths <= 1 else min(MAX_BACKOFF, 0.5 * 2 ** (slot.quick_deaths - 2))
        slot.spawn_at = time.monotonic() + delay
        if delay:
            log.error("worker %d %s after %.1fs (%d quick deaths in a row); respawning in %.1fs",
                      slot.index, how, lived, slot.quick_deaths, delay)
        else:
            log.warning("worker %d %s; respawning", slot.index, how)

    def _kill_hung(self) -> None:
        now = shm.now_us()
        for slot in self._live():
            age = (now - self.seg.worker_get(slot.index, shm.W_HEARTBEAT)) / 1e6
            if age > HUNG_TIMEOUT and not slot.killed_hung:
                log.error("worker %d (pid %d) has not run its loop for %.0fs: killing it",
                          slot.index, slot.pid, age)
                slot.killed_hung = True
                self._signal(slot, signal.SIGKILL)

    def _signal(self, slot: Slot, sig: int) -> None:
        try:
            os.kill(slot.pid, sig)
        except ProcessLookupError:
            pass

    def _kill_all(self, sig: int, why: str, level: int = logging.WARNING) -> None:
        for slot in self._live():
            log.log(level, "worker %d (pid %d) %s: sending %s", slot.index, slot.pid, why,
                    signal.Signals(sig).name)
            self._signal(slot, sig)

    def _read_inbox(self) -> None:
        """Console SETs run by the workers: apply them to the config new workers get
        (a RELOAD replaces it with the file's, as it does in the workers)."""
        from pooler.config.runtime import runtime_setting
        for kind, body, fds in self.inbox_reader.drain(self.inbox[1]):
            if kind == channel.KEEP:
                self.orphans.on_keep(body, fds)
                continue
            channel.close_fds(fds)          # only KEEP brings descriptors
            if kind == channel.FORGET:
                self.orphans.on_forget(body)
                continue
            if kind != channel.SET:
                log.warning("unknown message from a worker: %r", kind)
                continue
            key, text = pickle.loads(body)
            try:
                self.cfg = runtime_setting(self.cfg, key, text)
            except ConfigError as exc:    # validated by the worker already; be safe
                log.error("SET %s from a worker not kept for new workers: %s", key, exc)
                continue
            # The workers re-apply log settings on SET; so does the master, as on RELOAD.
            logs.reapply(self.cfg.log_format, self.cfg.logfile, self.cfg.verbose)

    # -- reload / stop ------------------------------------------------------------------------

    def reload(self) -> None:
        new = reload_config(self.config_path, self.workers_override, self.cfg)
        if new is None:
            return
        self.cfg = new                   # workers spawned from now on start with it
        logs.reapply(new.log_format, new.logfile, new.verbose)
        gen = self.seg.bump_config_gen()
        body = pickle.dumps((gen, new))
        for slot in self._live():
            self._send(slot, channel.RELOAD, body, "RELOAD")
        log.info("RELOAD: config from %s validated and sent to %d workers (generation %d)",
                 self.config_path, len(self._live()), gen)

    def _send(self, slot: Slot, kind: bytes, body: bytes, what: str) -> None:
        """A control message to a worker; its queue holds only a few datagrams
        (net.unix.max_dgram_qlen), so wait briefly while it drains."""
        try:
            channel.send(self.channels[slot.index][0], kind, body, timeout=MASTER_SEND_TIMEOUT)
        except channel.ChannelFull:
            log.error("%s: worker %d does not read its control channel", what, slot.index)
        except OSError as exc:
            log.error("%s: could not reach worker %d: %s", what, slot.index, exc)

    def stop(self, sig: signal.Signals) -> None:
        """SIGTERM / SIGINT: the workers shut down (each bounded by shutdown_timeout);
        a second one, or one during an admin SHUTDOWN, exits at once."""
        if self.stopping:
            self._exit_now("second shutdown signal")
        self.stopping = sig.name
        limit = self.cfg.shutdown_timeout
        self.stop_deadline = time.monotonic() + limit + KILL_GRACE if limit else float("inf")
        log.info("got %s, shutting down: stopping %d workers", sig.name, len(self._live()))
        self.seg.set_state(shm.STATE_SHUTDOWN, True)
        for sock in self.listeners:      # the workers close theirs: nothing accepts any more
            sock.close()
        self._kill_all(sig, "stopping", logging.INFO)

    def _admin_shutdown(self) -> None:
        """A worker ran the console's SHUTDOWN: every worker stops by itself; respawn
        nobody, refuse new connections, exit when the last one is gone."""
        log.info("SHUTDOWN from the admin console: waiting for %d workers", len(self._live()))
        self.stopping = "admin"
        self.stop_deadline = float("inf")
        for sock in self.listeners:
            sock.close()

    def _exit_now(self, why: str) -> None:
        log.warning("%s: exiting now", why)
        for slot in self._live():
            self._signal(slot, signal.SIGKILL)
        self._cleanup()
        if self.pidfile:
            remove_pidfile(self.pidfile)
        flush_and_exit(0 if why == "SIGQUIT" else 1)

    def _cleanup(self) -> None:
        self.orphans.close_all()
        self.seg.unlink()


def describe_status(status: int) -> str:
    if os.WIFSIGNALED(status):
        return f"was killed by {signal.Signals(os.WTERMSIG(status)).name}"
    return f"exited with code {os.WEXITSTATUS(status)}"


def slots_for(cfg: Config) -> int:
    """Slot-table size: every pool uses up to 3 keys (pool, database, user), and
    every [users] entry one more (its client count)."""
    return max(shm.DEFAULT_SLOTS, 8 * (len(cfg.databases) + len(cfg.pools) + len(cfg.users)))


def cancel_cap_for(cfg: Config) -> int:
    """Cancel keys per worker: room for max_client_conn (doubled, for reloads raising it)."""
    return max(1024, 2 * cfg.max_client_conn)
