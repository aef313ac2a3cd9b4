"""Wake-ups for deploy long polls: how a long poll of `GET .../deploys/{id}?wait=N` learns sooner
that its deploy record changed.

A long poll always re-reads the deploy record from DynamoDB every `wait_check_*_seconds`: that
is the only way on Lambda, where the invocation that writes a sidecar's report shares no memory
with the one holding the long poll. Where one process serves every call (the embedded stack:
the API, ingest and the sidecars' reports), the store also signals `DeployWakeups` after each
write to a deploy record, and the long poll's pause between two reads ends at once. A wake-up
only shortens the pause: what the poll answers is still decided from what it reads, and a
signal missed (or never sent) is caught by the next read.
"""
from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator

Key = tuple[str, str]  # (deployment, deploy id)


class Waiter:
    """One long poll's view of its deploy's changes."""

    def wait(self, timeout: float) -> bool:
        """Pause up to `timeout` seconds; True when a change was signalled (since the last wait)."""
        raise NotImplementedError


class Sleeper(Waiter):
    """No wake-ups: the pause is a plain sleep (Lambda)."""

    def __init__(self, sleep: Callable[[float], None]) -> None:
        self._sleep = sleep

    def wait(self, timeout: float) -> bool:
        self._sleep(timeout)
        return False


class _Watch(Waiter):
    def __init__(self, cond: threading.Condition) -> None:
        self._cond = cond
        self.signalled = False

    def wait(self, timeout: float) -> bool:
        with self._cond:
            woke = self._cond.wait_for(lambda: self.signalled, timeout)
            self.signalled = False
            return woke


class DeployWakeups:
    """In-process: the deploy records this process changed, for the long polls waiting on them."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._watches: dict[Key, set[_Watch]] = {}

    def changed(self, deployment: str, deploy_id: str) -> None:
        """A write to the deploy record ended: wake the long polls watching it."""
        with self._cond:
            watches = self._watches.get((deployment, deploy_id))
            if not watches:
                return
            for w in watches:
                w.signalled = True
            self._cond.notify_all()

    @contextlib.contextmanager
    def watch(self, deployment: str, deploy_id: str) -> Iterator[Waiter]:
        """Changes signalled from now on, until the block ends (enter it before the first read)."""
        key, w = (deployment, deploy_id), _Watch(self._cond)
        with self._cond:
            self._watches.setdefault(key, set()).add(w)
        try:
            yield w
        finally:
            with self._cond:
                watches = self._watches.get(key)
                if watches is not None:
                    watches.discard(w)
                    if not watches:
                        del self._watches[key]

    def watching(self) -> int:
        """How many long polls are watching (for tests)."""
        with self._cond:
            return sum(len(w) for w in self._watches.values())
