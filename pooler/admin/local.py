"""The admin console's reach into a one-process pooler: this worker's snapshot, commands run here.

The console talks to "the pooler" through two calls, `snapshots()` and
`control(cmd, arg)`. With several worker processes the process layer supplies
an object with the same two calls that fans them out (proc/workerproc.Fanout).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

from pooler.admin.control import Control
from pooler.admin.snapshot import snapshot

if TYPE_CHECKING:
    from pooler.pooling.worker import Worker


class Pooler(Protocol):
    """What the console needs of the pooler as a whole."""

    def snapshots(self) -> list[dict]:
        """One plain snapshot (admin/snapshot.py) per worker process, by worker id."""

    def control(self, cmd: str, arg: str | None) -> None:
        """Apply a validated admin command (PAUSE, KILL, SET, ...) to every worker."""


class LocalPooler:
    """The whole pooler is this one worker."""

    def __init__(self, worker: "Worker") -> None:
        self.worker = worker
        self.local = Control(worker)

    def snapshots(self) -> list[dict]:
        return [snapshot(self.worker)]

    def control(self, cmd: str, arg: str | None) -> None:
        self.local.apply(cmd, arg)
