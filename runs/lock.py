"""One writer per run: a lock file that names the process training the run, kept fresh by a timer.

``<checkpoint_dir>/<run>.lock`` holds JSON: the holder's pid, host, a random token and a heartbeat
(Unix time), rewritten every ``HEARTBEAT_SECONDS`` by a background thread while the lock is held,
however long an epoch takes. Another trainer takes the lock over only when it is stale: its process
is gone (same host), it was taken by this very process (a trainer built anew in a notebook replaces
the old one), or its heartbeat is older than ``STALE_SECONDS`` (another host, e.g. two Colab sessions
on one Drive folder). The holder checks the file before each write and stops if it was taken over.
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

STALE_SECONDS = 30 * 60  # a lock from another host whose heartbeat is older than this is taken over
HEARTBEAT_SECONDS = 60.0  # how often the holder refreshes its heartbeat (far below STALE_SECONDS)
HALF_WRITTEN_SECONDS = 5  # an empty lock file older than this was left by a writer that died mid-write
PID_MAX = 2**22  # Linux's largest pid_max


class RunLockedError(RuntimeError):
    """Another live process (or another trainer in this one) is training the same run."""


class DamagedLockError(RunLockedError):
    """The lock file holds something no trainer writes; it says how to clear it."""


def _process_alive(pid: int) -> bool:
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


def _read_token(path: Path) -> Optional[str]:
    try:
        holder = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return holder.get("token") if isinstance(holder, dict) else None


def _release(path: Path, token: str, stop: threading.Event) -> None:
    stop.set()
    try:
        if _read_token(path) == token:
            path.unlink()
    except OSError:
        pass


def _keep_fresh(path: Path, token: str, stop: threading.Event, every: float) -> None:
    """Rewrite the heartbeat every ``every`` seconds while the file is still ours."""
    while not stop.wait(every):
        try:
            if _read_token(path) != token:
                return
            atomic_write(path, lambda tmp: Path(tmp).write_text(_holder_info(token)))
        except OSError:  # a full or vanished folder: the next check() says what happened
            pass


class RunLock:
    """The lock of one run, held by one trainer (see the module docstring). Released when the
    trainer calls ``release()``, when the ``RunLock`` is garbage-collected, or when its process exits."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.token = uuid.uuid4().hex
        self.held = False
        self._stop = threading.Event()

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
        if heartbeat - time.time() > STALE_SECONDS:
            return (
                f"its heartbeat is {(heartbeat - time.time()) / 3600:.1f} h in the future (a wrong clock on the "
                f"host that wrote it), so it would never go stale"
            )
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
            return holder["pid"] == os.getpid() or not _process_alive(holder["pid"])
        return time.time() - holder["heartbeat"] > STALE_SECONDS

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
        weakref.finalize(self, _release, self.path, self.token, self._stop)
        # The thread holds no reference to this object, so garbage collection still releases the lock.
        threading.Thread(
            target=_keep_fresh,
            args=(self.path, self.token, self._stop, HEARTBEAT_SECONDS),
            name=f"lock-heartbeat-{self.path.name}",
            daemon=True,
        ).start()

    def check(self) -> str:
        """Before a write: raise ``RunLockedError`` if another trainer has taken this run over. A lock
        file deleted by hand is taken again (nobody else holds it); returns a note saying so."""
        if not self.held:
            raise RunLockedError(f"this trainer does not hold {self.path}: call resume() first")
        if not self.path.exists():
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:  # someone took it in between: refused below
                pass
            else:
                with os.fdopen(fd, "w") as f:
                    f.write(_holder_info(self.token))
                return f"the lock file {self.path} was deleted while this run trained; it is taken again"
        holder = self._holder()
        if holder is None or holder.get("token") != self.token:
            self._stop.set()
            self.held = False
            who = f"process {holder['pid']} on {holder['host']}" if holder and "pid" in holder else "another trainer"
            raise RunLockedError(
                f"this trainer no longer holds {self.path} (now: {who}): a trainer for the same run was "
                f"built after it. Use the newest trainer; this one writes nothing more."
            )
        return ""

    def release(self) -> None:
        if self.held:
            _release(self.path, self.token, self._stop)
            self.held = False
