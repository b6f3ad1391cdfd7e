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
        # `extra={"fields": {...}}`: structured keys (the sidecar's access and audit
        # lines) next to the message; they never replace the ones above.
        for key, value in (getattr(record, "fields", None) or {}).items():
            out.setdefault(key, value)
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out)


TEXT_FORMAT = "%(asctime)s.%(msecs)03d %(process)d %(levelname)s %(message)s"

# What setup() was last called with, and the command line's part of it (-v, -q), so
# that a reload can re-apply the config's log settings without losing the flags.
_applied: tuple | None = None
_cli = {"verbose": 0, "quiet": False, "base": ""}


def setup(log_format: str = "text", logfile: str = "", verbose: int = 0, quiet: bool = False,
          *, cli_verbose: int | None = None) -> None:
    """Configure the root logger (called again on reload; handlers are replaced).

    `cli_verbose`: the -v count from the command line (remembered for reapply);
    a relative `logfile` is taken from the directory the pooler started in."""
    global _applied
    if cli_verbose is not None:
        _cli.update(verbose=cli_verbose, quiet=quiet, base=os.getcwd())
    if logfile and _cli["base"]:
        logfile = os.path.join(_cli["base"], logfile)
    _applied = (log_format, logfile, verbose, quiet)
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


def reapply(log_format: str, logfile: str, verbose: int) -> bool:
    """A reloaded config's log settings (with the command line's -v / -q): replace the
    handlers only if something changed. True when it did."""
    if logfile and _cli["base"]:
        logfile = os.path.join(_cli["base"], logfile)
    wanted = (log_format, logfile, max(verbose, _cli["verbose"]), _cli["quiet"])
    if _applied is None or wanted == _applied:
        return False
    setup(*wanted)
    logging.getLogger("pooler").info("log settings reloaded (format %s, logfile %s, verbose %d)",
                                     log_format, logfile or "-", wanted[2])
    return True


def flush_and_exit(code: int) -> None:
    """Leave at once (os._exit: no cleanup handlers), after flushing the log handlers."""
    for h in logging.getLogger().handlers:
        try:
            h.flush()
        except Exception:
            pass
    os._exit(code)
