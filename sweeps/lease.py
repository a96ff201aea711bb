"""One trainer per run across a cluster's nodes: a lease object in the storage, kept alive by a heartbeat.

pyarrow offers no exclusive create on an object store (no ``O_EXCL``, no conditional write), so the lock
file of runs/lock.py becomes a lease: ``checkpoint/<run>.lease`` holds the holder's token, Ray node, host
and a beat counter that a background thread raises every ``heartbeat_seconds``. A trial takes the lease
when there is none, or when the one there did not change for ``WATCH_BEATS`` heartbeats (its node was
lost), watched on this process's monotonic clock: the clocks of two machines are never compared. It
writes its record, reads it back, and goes on only if its own token is there.

What that guarantees: a lease that beats is never taken over; the run of a lost node is taken over about
``WATCH_BEATS`` heartbeats after its last beat. What it does not: two trials that read "free" at the same
instant may both write and both read their own record back if their writes and reads interleave. So the
holder also reads the lease before each epoch's push (``check``) and stops, writing nothing more, once
another token is there. Ray never runs one trial twice at once; this matters for two sweeps started
by hand on one storage at the same moment, or a node that comes back after it was given up for lost.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from typing import Optional

from runs.lock import RunLockedError
from sweeps.storage import Storage, StorageError

WATCH_BEATS = 2.5  # heartbeats without a change after which a lease counts as abandoned


class StorageLease:
    """The lease of run ``run`` for a trial on Ray node ``node`` (module docstring)."""

    def __init__(self, storage: Storage, run: str, node: str):
        self.storage, self.run, self.node = storage, run, node
        self.key = storage.key("checkpoint", f"{run}.lease")
        self.token = uuid.uuid4().hex
        self.beat = 0
        self.held = False
        self.taken_by: Optional[dict] = None  # another holder's record, seen by the heartbeat
        self.error: Optional[BaseException] = None  # the heartbeat's last failure (it tries again)
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    @property
    def heartbeat_seconds(self) -> float:
        return self.storage.spec.heartbeat_seconds

    def _record(self) -> dict:
        return {"token": self.token, "node": self.node, "host": socket.gethostname(), "pid": os.getpid(),
                "beat": self.beat, "time": time.strftime("%Y-%m-%d %H:%M:%S")}  # fmt: skip

    def _read(self) -> Optional[dict]:
        return self.storage.read_json(self.key, f"reading run {self.run}'s lease")

    def _write(self) -> None:
        self.storage.put_bytes(json.dumps(self._record()).encode(), self.key, f"writing run {self.run}'s lease")

    @staticmethod
    def describe(record: Optional[dict]) -> str:
        record = record or {}
        return f"node {str(record.get('node', '?'))[:12]} (host {record.get('host', '?')})"

    def acquire(self, wait: float = 0.0) -> str:
        """Take the lease, waiting up to ``wait`` seconds for a live holder to finish or go silent
        (``RunLockedError`` if it still beats then); returns a note when a lost node's lease was taken over."""
        seen, note = self._read(), ""
        deadline = time.monotonic() + wait
        while seen is not None:
            now = self._watch(seen)
            if now == seen:  # silent for the whole watch: its node is lost
                watched = WATCH_BEATS * self.heartbeat_seconds
                note = f"took over the lease of {self.describe(seen)}, which did not beat for {watched:.0f} s"
                break
            if now is not None and time.monotonic() >= deadline:
                raise RunLockedError(
                    f"run {self.run} is being trained on {self.describe(now)}: its lease {self.key} beats. Two "
                    f"trainers would mix their epochs; stop that sweep first, or give this run another run_name."
                )
            seen = now  # released (None), or beating: watched again
        self._write()
        back = self._read()
        if (back or {}).get("token") != self.token:
            raise RunLockedError(f"run {self.run}'s lease was taken at the same moment by {self.describe(back)}")
        self.held = True
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._keep_alive, name=f"lease-{self.run}", daemon=True)
        self._thread.start()
        return note

    def _watch(self, seen: dict) -> Optional[dict]:
        """The lease's record as soon as it differs from ``seen`` (None: it was released), or ``seen`` if
        it did not change for ``WATCH_BEATS`` heartbeats."""
        end = time.monotonic() + WATCH_BEATS * self.heartbeat_seconds
        while time.monotonic() < end:
            time.sleep(min(1.0, self.heartbeat_seconds / 4))
            now = self._read()
            if now != seen:
                return now
        return seen

    def _keep_alive(self) -> None:
        while not self._stop.wait(self.heartbeat_seconds):
            try:
                now = self._read()
                if (now or {}).get("token") not in (self.token, None):
                    self.taken_by = now
                    return
                self.beat += 1
                self._write()
                self.error = None
            except (StorageError, OSError) as e:  # tried again at the next beat; check() and the pushes judge
                self.error = e

    def check(self) -> None:
        """Before a push: ``RunLockedError`` if another trial holds the lease now (this one then writes
        nothing more)."""
        now = self.taken_by or self._read()
        if (now or {}).get("token") not in (self.token, None):
            self.release(delete=False)
            raise RunLockedError(
                f"run {self.run}'s lease was taken over by {self.describe(now)} (this trial's node was thought "
                f"lost); this trial writes nothing more"
            )

    def release(self, delete: bool = True) -> None:
        """Stop the heartbeat and, when ``delete`` and the lease is still this trial's, delete it."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()
        if delete and self.held:
            try:
                if (self._read() or {}).get("token") == self.token:
                    self.storage.delete(self.key, f"releasing run {self.run}'s lease")
            except StorageError:
                pass  # unreachable: the lease stops beating, and the next trial takes it over after the watch
        self.held = False
