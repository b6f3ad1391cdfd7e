"""Signals in a worker process (or the one process), as PgBouncer's: SIGTERM waits for
clients, SIGINT for servers, SIGQUIT exits now; SIGHUP and SIGUSR1/2 where given."""
from __future__ import annotations

import logging
import signal
from typing import Callable

import gevent

from pooler.logs import flush_and_exit
from pooler.pooling.worker import STOP_CLIENTS, STOP_SERVERS, Worker

log = logging.getLogger("pooler.worker")

# SIGQUIT, or a second SIGTERM/SIGINT: leave at once, logs flushed, no cleanup.
exit_now = flush_and_exit

SIGNAL_LEVELS = {signal.SIGTERM: STOP_CLIENTS, signal.SIGINT: STOP_SERVERS}


def serve_until_stopped(worker: Worker, on_reload: Callable[[], None] | None,
                        on_pause: Callable[[bool], None] | None, second_exits: bool) -> int:
    """Install the worker's signal handlers and block until it has shut down.

    As PgBouncer: SIGTERM waits for clients to leave, SIGINT for servers to be
    released, SIGQUIT exits at once; both waits are bounded by shutdown_timeout.
    With `second_exits` (single process) a shutdown signal during a shutdown
    (also one begun by the admin console) exits at once; under a master the
    master does that, and a worker may see a signal twice (a terminal's Ctrl-C
    reaches the whole process group, then the master fans it out again), so
    there a repeat can only make the shutdown faster."""

    def terminate(sig: signal.Signals) -> None:
        if worker.stop_level and second_exits:
            log.warning("second shutdown signal (%s): exiting now", sig.name)
            exit_now(1)
        if not worker.stop_level:
            log.info("got %s, shutting down", sig.name)
        worker.stop(SIGNAL_LEVELS[sig])

    for sig in SIGNAL_LEVELS:
        gevent.signal_handler(sig, terminate, sig)
    gevent.signal_handler(signal.SIGQUIT, exit_now, 0)
    if on_reload is not None:
        gevent.signal_handler(signal.SIGHUP, on_reload)
    if on_pause is not None:
        gevent.signal_handler(signal.SIGUSR1, on_pause, True)
        gevent.signal_handler(signal.SIGUSR2, on_pause, False)
    worker.stopped.wait()
    return 0
