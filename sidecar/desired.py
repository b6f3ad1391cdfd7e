"""The chart's declarative `paused: true|false` (CloudNativePG's Pooler semantics),
applied by the sidecar at start and whenever the value changes.

The value is a file (the ConfigMap's `paused` key, which the kubelet updates in
place). PAUSE waits for running queries to finish, new clients queue; RESUME
lets them through. Only a change of the file is acted on, so a manual
POST /pause or /resume stays in effect until the value changes again.
"""
from __future__ import annotations

import logging

from .console import Console, ConsoleError

log = logging.getLogger("sidecar")


def read_desired(path: str) -> bool | None:
    """True/False from the file ('true'/'false', any case), None if absent or unreadable."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read().strip().lower()
    except OSError:
        return None
    return {"true": True, "false": False}.get(text)


class DesiredPause:
    """Reconciles the pooler's pause state with the file, on change only."""

    def __init__(self, console: Console, path: str, timeout: float) -> None:
        self.console, self.path, self.timeout = console, path, timeout
        self.applied: bool | None = None        # the value last applied successfully

    def step(self) -> str | None:
        """Apply the file's value if it changed; returns the command sent, if any."""
        want = read_desired(self.path)
        if want is None or want == self.applied:
            return None
        try:
            state = {r["key"]: r["value"] for r in self.console.show("STATE")}
            if (state.get("paused") == "yes") == want:
                self.applied = want
                return None
            verb = "PAUSE" if want else "RESUME"
            self.console.command(verb, timeout=self.timeout)
        except ConsoleError as e:
            if not (e.timed_out and want):      # a PAUSE still waiting is in effect
                log.warning("paused=%s not applied yet: %s", want, e)
                return None
            verb = "PAUSE"
        self.applied = want
        log.info("paused=%s applied (%s)", want, verb)
        return verb

    def run(self, interval: float = 2.0) -> None:
        """Forever (a greenlet in the sidecar process)."""
        import gevent
        while True:
            self.step()
            gevent.sleep(interval)
