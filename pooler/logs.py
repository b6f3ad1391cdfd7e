"""Logging: one line per event, as text or JSON (as CloudNativePG's pooler logs).

Messages are written by the code that knows what is secret; this module only
formats. Nothing here ever receives a password: the config is logged through
Config.redacted().
"""
from __future__ import annotations

import json
import logging
import logging.handlers
import os
import sys
import time


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "pid": record.process,
            "msg": record.getMessage(),
        }
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out)


TEXT_FORMAT = "%(asctime)s.%(msecs)03d %(process)d %(levelname)s %(message)s"


def setup(log_format: str = "text", logfile: str = "", verbose: int = 0, quiet: bool = False) -> None:
    """Configure the root logger (called again on reload; handlers are replaced)."""
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
        h.close()
    handlers: list[logging.Handler] = []
    if logfile:
        # Reopened when logrotate moves the file away (every process checks on its own
        # next line), so rotation needs no signal; PgBouncer's habit of a SIGHUP after
        # rotating stays harmless.
        handlers.append(logging.handlers.WatchedFileHandler(logfile))
    if not quiet or not logfile:
        handlers.append(logging.StreamHandler(sys.stderr))
    fmt: logging.Formatter = JsonFormatter() if log_format == "json" else \
        logging.Formatter(TEXT_FORMAT, "%Y-%m-%d %H:%M:%S")
    for h in handlers:
        h.setFormatter(fmt)
        root.addHandler(h)
    root.setLevel(logging.DEBUG if verbose >= 2 else logging.INFO)
    if quiet and not logfile:
        root.setLevel(logging.WARNING)
    os.environ.setdefault("PYTHONUNBUFFERED", "1")


def flush_and_exit(code: int) -> None:
    """Leave at once (os._exit: no cleanup handlers), after flushing the log handlers."""
    for h in logging.getLogger().handlers:
        try:
            h.flush()
        except Exception:
            pass
    os._exit(code)
