"""Process model. With `workers: 1` the pooler is one process that serves
clients itself (the cheap path); with more, a prefork master binds the
listeners and forks gevent workers that share them."""
from __future__ import annotations

import argparse
import logging
import os
import signal
import sys

from . import logs
from .config import Config, ConfigError, load_config
from .listen import bind_listeners

log = logging.getLogger("pooler.master")


def load_or_exit(path: str) -> Config:
    try:
        return load_config(path)
    except ConfigError as exc:
        for e in exc.errors:
            print(e, file=sys.stderr)
        raise SystemExit(1)


def serve(args: argparse.Namespace) -> int:
    cfg = load_or_exit(args.config)
    if args.workers is not None:
        cfg.workers = args.workers
    logs.setup(cfg.log_format, cfg.logfile, max(cfg.verbose, args.verbose), args.quiet)
    listeners = bind_listeners(cfg)
    log.info("listening on %s port %d (pool_mode=%s, workers=%d)", cfg.listen_addr, cfg.listen_port,
             cfg.pool_mode, cfg.effective_workers())
    if cfg.pidfile:
        with open(cfg.pidfile, "w") as f:
            f.write(f"{os.getpid()}\n")
    try:
        return run_single(cfg, listeners, args.config)
    finally:
        if cfg.pidfile and os.path.exists(cfg.pidfile):
            os.unlink(cfg.pidfile)


def run_single(cfg: Config, listeners: list, config_path: str) -> int:
    """One process serving clients itself; signals handled in the gevent loop."""
    from gevent import monkey
    monkey.patch_all()
    import gevent
    from .worker import Worker

    worker = Worker(cfg, listeners)
    worker.config_path = config_path
    worker.start()
    done = gevent.event.Event()

    def reload() -> None:
        try:
            new = load_config(config_path)
        except ConfigError as exc:
            log.error("RELOAD failed, keeping the old config: %s", "; ".join(exc.errors))
            return
        worker.apply_config(new)
        log.info("RELOAD: config reloaded from %s", config_path)

    def terminate(graceful: bool) -> None:
        gevent.spawn(worker.shutdown, graceful).link(lambda _: done.set())

    gevent.signal_handler(signal.SIGHUP, reload)
    gevent.signal_handler(signal.SIGTERM, terminate, True)
    gevent.signal_handler(signal.SIGINT, terminate, False)
    done.wait()
    log.info("shutdown complete")
    return 0
