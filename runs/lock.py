"""One writer per run: a lock file that names the process training the run, kept fresh by a timer.

``<checkpoint_dir>/<run>.lock`` holds JSON: the holder's pid, host, a random token and a heartbeat
(Unix time), rewritten every ``HEARTBEAT_SECONDS`` by a background thread while the lock is held,
however long an epoch takes. The thread survives a failed write (it tries again next time) and puts
back a lock file deleted by hand; it stops only when another trainer's token is in the file.

Another trainer takes the lock over only when it is stale: its process is gone (same host), it was
taken by this very process (a trainer built anew in a notebook replaces the old one), or, from another
host (two Colab sessions on one Drive folder), its heartbeat has stopped changing. Clocks are never
compared to decide that a live holder is dead: a heartbeat that looks fresh by this host's clock is
trusted at once; one that looks old, or lies in the future (hosts whose clocks disagree, a clock set
back), is watched for ``WATCH_SECONDS`` on this process's monotonic clock, and taken over only if it did
not change. The holder recognises its own token whatever its heartbeat says, checks the file before
each write, and stops, writing nothing, if the run was taken over or its heartbeat could not be written
for ``STALE_SECONDS / 2``.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
import weakref
from pathlib import Path
from typing import Optional

from runs.atomic import atomic_write

STALE_SECONDS = 30 * 60  # another host's heartbeat this old (by our clock) is watched to see if it still beats
HEARTBEAT_SECONDS = 60.0  # how often the holder refreshes its heartbeat (far below STALE_SECONDS)
WATCH_SECONDS = 2.5 * HEARTBEAT_SECONDS  # how long a doubtful heartbeat is watched before it counts as stopped
HALF_WRITTEN_SECONDS = 5  # an empty lock file older than this was left by a writer that died mid-write
PID_MAX = 2**22  # Linux's largest pid_max


class RunLockedError(RuntimeError):
    """Another live process (or another trainer in this one) is training the same run."""


class DamagedLockError(RunLockedError):
    """The lock file holds something no trainer writes; it says how to clear it."""


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a killed child that was not reaped yet is a zombie: gone for our purposes
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def _holder_info(token: str) -> str:
    return json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "token": token, "heartbeat": time.time()})


def _read_holder(path: Path) -> Optional[dict]:
    """The lock file's JSON object; None if it is gone; ``{}`` if it holds anything else."""
    try:
        holder = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}
    return holder if isinstance(holder, dict) else {}


def _read_token(path: Path) -> Optional[str]:
    return (_read_holder(path) or {}).get("token")


def _release(path: Path, token: str, stop: threading.Event) -> None:
    stop.set()
    try:
        if _read_token(path) == token:
            path.unlink()
    except OSError:
        pass


def _create(path: Path, token: str) -> bool:
    """Create the lock file with this holder's record; False if another process created it first."""
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as f:
        f.write(_holder_info(token))
    return True


class Heartbeat:
    """What the heartbeat thread saw, for the holder's ``check()``: when it last wrote (monotonic), its
    last error, whether it put back a deleted file, and who took the run over."""

    def __init__(self):
        self.last_ok = time.monotonic()
        self.error: Optional[OSError] = None
        self.recreated = False
        self.taken_by: Optional[dict] = None


def _keep_fresh(path: Path, token: str, stop: threading.Event, every: float, beat: Heartbeat) -> None:
    """Rewrite the heartbeat every ``every`` seconds while the file is ours; put it back if it was
    deleted; try again after a failed read or write; stop when another token is in the file."""
    while not stop.wait(every):
        try:
            holder = _read_holder(path)
            if holder is None:
                beat.recreated |= _create(path, token)
                continue  # created (the next beat refreshes it), or someone else was faster: seen next time
            if holder.get("token") not in (token, None):
                beat.taken_by = holder
                return
            if holder.get("token") == token:  # content no trainer wrote is left alone for check() to report
                atomic_write(path, lambda tmp: Path(tmp).write_text(_holder_info(token)))
                beat.last_ok, beat.error = time.monotonic(), None
        except OSError as e:  # a full or unreachable folder: tried again next time; check() judges
            beat.error = e


class RunLock:
    """The lock of one run, held by one trainer (see the module docstring). Released when the
    trainer calls ``release()``, when the ``RunLock`` is garbage-collected, or when its process exits."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.token = uuid.uuid4().hex
        self.held = False
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self.beat = Heartbeat()

    def describe_damage(self, text: str) -> Optional[str]:
        """What is wrong with lock file content ``text`` (None if it is a holder's record)."""
        try:
            holder = json.loads(text)
        except ValueError:
            return "it is not JSON"
        if not isinstance(holder, dict):
            return "it is not a JSON object"
        pid, heartbeat = holder.get("pid"), holder.get("heartbeat")
        if not isinstance(pid, int) or isinstance(pid, bool) or not 0 < pid <= PID_MAX:
            return f"its pid {pid!r} is not a process id"
        if not isinstance(holder.get("host"), str) or not isinstance(holder.get("token"), str):
            return "it names no host or token"
        if not isinstance(heartbeat, (int, float)) or isinstance(heartbeat, bool) or heartbeat != heartbeat:
            return f"its heartbeat {heartbeat!r} is not a time"
        return None

    def _holder(self) -> Optional[dict]:
        """The holder's record; None for a file still being written (empty and young) or gone.
        Raises ``DamagedLockError`` for content no trainer writes."""
        try:
            text = self.path.read_text()
            age = time.time() - self.path.stat().st_mtime
        except FileNotFoundError:
            return None
        except OSError as e:
            raise DamagedLockError(f"cannot read the lock file {self.path} ({e}).") from e
        if not text.strip():
            if age > HALF_WRITTEN_SECONDS:  # its writer died between creating and writing it
                return {"stale": True}
            return None
        damage = self.describe_damage(text)
        if damage:
            raise DamagedLockError(
                f"the lock file {self.path} is damaged: {damage}. No trainer of this project wrote it this way. "
                f"If no notebook, papermill or sweep process is training this run now, delete {self.path} and "
                f"run again; otherwise stop that process first."
            )
        return json.loads(text)

    def _stale(self, holder: dict) -> bool:
        if holder.get("stale"):
            return True
        if holder["host"] == socket.gethostname():
            return holder["pid"] == os.getpid() or not process_alive(holder["pid"])
        if abs(time.time() - holder["heartbeat"]) <= STALE_SECONDS:  # fresh by this clock: alive
            return False
        return self._stopped_beating(holder)

    def _stopped_beating(self, holder: dict) -> bool:
        """Watch a doubtful heartbeat (old, or in the future, by this host's clock) for ``WATCH_SECONDS``
        on the monotonic clock: stopped if it never changed (nor the holder)."""
        end = time.monotonic() + WATCH_SECONDS
        while time.monotonic() < end:
            time.sleep(min(1.0, WATCH_SECONDS / 10))
            now = _read_holder(self.path)
            if now is None or now.get("token") != holder["token"]:
                return False  # released or taken meanwhile: acquire() looks again
            if now.get("heartbeat") != holder["heartbeat"]:
                return False  # it beats: alive, whatever the clocks say
        return True

    def held_elsewhere(self) -> Optional[dict]:
        """The record of another live trainer holding this lock (None if nobody does, or only a stale or
        damaged file is there), without taking it: what a sweep reports as "running elsewhere"."""
        try:
            holder = self._holder()
        except DamagedLockError:
            return None
        if holder is None or holder.get("stale") or holder.get("token") == self.token:
            return None
        if holder["host"] == socket.gethostname():
            return holder if holder["pid"] != os.getpid() and process_alive(holder["pid"]) else None
        return holder if abs(time.time() - holder["heartbeat"]) <= STALE_SECONDS else None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(10):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self._holder()
                if holder is None:  # being written right now, or gone again: look once more
                    time.sleep(0.05)
                    continue
                if self._stale(holder):
                    self.path.unlink(missing_ok=True)
                    continue
                since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder["heartbeat"]))
                raise RunLockedError(
                    f"this run is being trained by process {holder['pid']} on host {holder['host']} "
                    f"(alive at {since}; lock file {self.path}). Two writers would mix their epochs in one "
                    f"CSV and checkpoint. Stop that process first (another notebook tab, a papermill run, "
                    f"another Colab session on the same Drive folder), or give this run another run_name."
                ) from None
            with os.fdopen(fd, "w") as f:
                f.write(_holder_info(self.token))
            self._start_heartbeat()
            return
        raise RunLockedError(f"could not take the lock {self.path}: other processes keep taking it")

    def _start_heartbeat(self) -> None:
        self.held = True
        self._stop = threading.Event()
        self.beat = Heartbeat()
        weakref.finalize(self, _release, self.path, self.token, self._stop)
        # The thread holds no reference to this object, so garbage collection still releases the lock.
        self._thread = threading.Thread(
            target=_keep_fresh,
            args=(self.path, self.token, self._stop, HEARTBEAT_SECONDS, self.beat),
            name=f"lock-heartbeat-{self.path.name}",
            daemon=True,
        )
        self._thread.start()

    def stop_heartbeat(self) -> None:
        """Stop the heartbeat thread and wait for it (the lock stays held): for tests that fake a
        takeover, which a heartbeat under way could otherwise overwrite."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def check(self) -> str:
        """Before a write: raise ``RunLockedError`` if another trainer has taken this run over, or if the
        heartbeat could not be written for ``STALE_SECONDS / 2`` (another host could soon take it over).
        A lock file deleted by hand is taken again (nobody else holds it); returns a note saying so."""
        if not self.held:
            raise RunLockedError(f"this trainer does not hold {self.path}: call resume() first")
        note = ""
        if not self.path.exists() and _create(self.path, self.token) or self.beat.recreated:
            self.beat.recreated = False
            note = f"the lock file {self.path} was deleted while this run trained; it is taken again"
        holder = _read_holder(self.path)
        if holder and holder.get("token") == self.token:  # ours, whatever time its heartbeat says
            silent = time.monotonic() - self.beat.last_ok
            if self.beat.error is not None and silent > STALE_SECONDS / 2:
                self._lose()
                raise RunLockedError(
                    f"this trainer could not refresh its lock {self.path} for {silent / 60:.0f} minutes "
                    f"({type(self.beat.error).__name__}: {self.beat.error}), so another process may take the run "
                    f"over. Nothing more is written; once the folder is writable again, run again to resume."
                )
            return note
        if holder == {}:
            holder = self._holder()  # content no trainer writes: raises DamagedLockError, naming what is wrong
        self._lose()
        who = f"process {holder['pid']} on {holder['host']}" if holder and "pid" in holder else "another trainer"
        raise RunLockedError(
            f"this trainer no longer holds {self.path} (now: {who}): a trainer for the same run was "
            f"built after it. Use the newest trainer; this one writes nothing more."
        )

    def _lose(self) -> None:
        self._stop.set()
        self.held = False

    def release(self) -> None:
        if self.held:
            _release(self.path, self.token, self._stop)
            self.held = False
