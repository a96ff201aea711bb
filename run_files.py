"""A run's files: atomic checkpoints, the per-epoch CSV, the run lock, and the checks that a file
belongs to this run.

Names are ``<checkpoint_dir>/<run>_latest.pth`` (every epoch, everything a resume needs),
``<checkpoint_dir>/<run>_best.pth`` (the best weights), ``<checkpoint_dir>/<run>.lock`` (who is
training the run now), ``<log_dir>/<run>.csv`` (one row per epoch, appended), ``<log_dir>/<run>.log``
(the text log) and ``<log_dir>/<run>_config.json``.
"""

from __future__ import annotations

import csv
import errno
import io
import json
import os
import shutil
import socket
import tempfile
import threading
import time
import uuid
import weakref
import zipfile
from pathlib import Path
from typing import Callable, Optional

import torch

from config import Config, config_differences

CHECKPOINT_FORMAT = 1
LOCK_STALE_SECONDS = 30 * 60  # a lock from another host whose heartbeat is older than this is taken over


class ConfigMismatchError(ValueError):
    """A checkpoint was written by a run with another model/data/recipe config."""


class CheckpointError(RuntimeError):
    """A checkpoint file cannot be read, or cannot be used the way it was asked for."""


class RunLockedError(RuntimeError):
    """Another live process (or another trainer in this one) is training the same run."""


def check_same_run(state: dict, cfg: Config, path: str | Path) -> None:
    """Raise ``ConfigMismatchError`` naming each field in which checkpoint ``state`` differs from ``cfg``."""
    diff = config_differences(state["config"], cfg)
    if diff:
        lines = "; ".join(f"{k}: checkpoint {a!r} vs now {b!r}" for k, (a, b) in diff.items())
        raise ConfigMismatchError(
            f"{path} belongs to a run with another config ({lines}). Set those values back to use it, "
            f"or give this run another run_name (or checkpoint_dir) to start a new one."
        )


# --- atomic files ------------------------------------------------------------------------------


def temp_files(path: str | Path) -> list[Path]:
    """The temp files ``atomic_write`` leaves beside ``path`` when its process is killed mid-write."""
    path = Path(path)
    return sorted(path.parent.glob(f".{path.name}.*.tmp")) if path.parent.is_dir() else []


def atomic_write(path: str | Path, write: Callable[[str], None], size_hint: int = 0) -> None:
    """Call ``write(tmp_path)``, then move the temp file over ``path`` in one ``os.replace``.

    A crash or an exception during ``write`` leaves the previous ``path`` intact (the temp file is
    removed on error). A full disk raises ``OSError(ENOSPC)`` saying how much space the save needs
    (``size_hint`` bytes for the new file, written beside the old one before it is replaced)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        free = shutil.disk_usage(path.parent).free
        if isinstance(e, (OSError, RuntimeError)) and (
            getattr(e, "errno", None) == errno.ENOSPC or (size_hint and free < size_hint)
        ):
            raise OSError(
                errno.ENOSPC,
                f"the disk holding {path.parent} is full ({free / 2**20:,.0f} MiB free) while saving {path.name}: "
                f"an atomic save needs about {size_hint / 2**20:,.0f} MiB free there (the new file is written "
                f"beside the old one, then replaces it). The files already there are intact. Free some space, "
                f"or point this folder's setting at another disk, then run again ({type(e).__name__}: {e})",
            ) from e
        raise


def _tensor_bytes(obj) -> int:
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(v) for v in obj)
    return 0


def save_checkpoint(path: str | Path, state: dict) -> None:
    """Atomically write ``state`` (a temp file in the same folder, then ``os.replace``)."""
    atomic_write(path, lambda tmp: torch.save(state, tmp), size_hint=_tensor_bytes(state) + 2**20)


def snapshot(obj):
    """A copy of a (nested) state dict whose tensors are on the CPU and no longer shared with the
    training state, so it can be written while training goes on."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: snapshot(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [snapshot(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(snapshot(v) for v in obj)
    return obj


class CheckpointWriter:
    """Writes checkpoints in a background thread, one at a time, in order.

    ``submit`` waits for the previous write (raising its error, if any) and starts the next;
    ``wait`` blocks until everything submitted is on disk. ``load_checkpoint`` waits for pending
    writes of the file it reads, so a reader in this process never sees an older file than a
    writer here has submitted."""

    _pending: dict[Path, threading.Thread] = {}  # file -> the thread writing it (this process)

    def __init__(self, background: bool = True):
        self.background = background
        self._thread: Optional[threading.Thread] = None
        self._error: Optional[BaseException] = None

    def submit(self, writes: list[tuple[Path, dict]]) -> None:
        self.wait()
        if not self.background:
            for path, state in writes:
                save_checkpoint(path, state)
            return

        def run():
            try:
                for path, state in writes:
                    save_checkpoint(path, state)
            except BaseException as e:  # reported by the next submit() or wait()
                self._error = e

        self._thread = threading.Thread(target=run, name="checkpoint-writer")  # not a daemon: exit waits
        for path, _ in writes:
            CheckpointWriter._pending[Path(path).resolve()] = self._thread
        self._thread.start()

    def wait(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    @classmethod
    def wait_for(cls, path: str | Path) -> None:
        thread = cls._pending.pop(Path(path).resolve(), None)
        if thread is not None:
            thread.join()


def checkpoint_kind(state: dict) -> str:
    """``"latest"`` (resumable: optimizer, step, RNG states) or ``"best"`` (weights only)."""
    return "latest" if {"optimizer", "step", "rng"} <= set(state) else "best"


def load_checkpoint(path: str | Path, kind: Optional[str] = None, best_path: Optional[str | Path] = None) -> dict:
    """Load a checkpoint with ``weights_only=True`` after checking the CRC32 of every record.

    A corrupt or truncated file raises ``CheckpointError`` that says what to do (and never touches
    ``best_path``); ``kind`` (``"latest"`` or ``"best"``) refuses a file of the other kind."""
    path = Path(path)
    CheckpointWriter.wait_for(path)
    try:
        with zipfile.ZipFile(path) as z:  # torch.load itself does not check the records' CRC32s
            bad = z.testzip()
        if bad is not None:
            raise zipfile.BadZipFile(f"record {bad} fails its CRC32 check")
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as e:  # zipfile errors, RuntimeError, EOFError, UnpicklingError ...
        keep = (
            f" The best checkpoint {best_path} is untouched, and a fresh start keeps it (set aside under a dated name)."
            if best_path and Path(best_path).exists()
            else ""
        )
        raise CheckpointError(
            f"{path} cannot be read: corrupt, truncated or not a plain checkpoint ({type(e).__name__}: {e}).{keep} "
            f"Move it away to start this run afresh, or put a good checkpoint in its place to resume from it."
        ) from e
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT or "config" not in state:
        raise CheckpointError(f"{path} is not a checkpoint of this project (format {CHECKPOINT_FORMAT}).")
    found = checkpoint_kind(state)
    if kind == "latest" and found == "best":
        raise CheckpointError(
            f"{path} is a best-model checkpoint (the weights of epoch {state.get('epoch')}, no optimizer state, "
            f"step or random states), so a run cannot resume from it. Put the run's own latest checkpoint back "
            f"in its place; or move this file away to start the run afresh (an existing best checkpoint is "
            f"then set aside under a dated name, not overwritten). To keep training from these weights, "
            f"start a new run (another run_name)."
        )
    if kind == "best" and found != "best":
        raise CheckpointError(f"{path} is a resumable (latest) checkpoint, not a best-model checkpoint.")
    return state


def set_aside(path: Path, why: str) -> Optional[Path]:
    """Rename ``path`` to ``<stem>.<time>.<why><suffix>`` beside it (nothing is deleted)."""
    if not path.exists():
        return None
    aside = path.with_name(f"{path.stem}.{time.strftime('%Y%m%d-%H%M%S')}.{why}{path.suffix}")
    path.replace(aside)
    return aside


def check_writable(folder: str | Path) -> None:
    """Raise ``PermissionError`` naming ``folder`` if a file cannot be created in it."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        raise PermissionError(
            f"cannot write in {folder} ({type(e).__name__}: {e}). Training writes a checkpoint and a log "
            f"row there every epoch: make it writable, or choose another folder."
        ) from e


# --- the run lock ------------------------------------------------------------------------------


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


def _release(path: Path, token: str) -> None:
    try:
        if json.loads(path.read_text()).get("token") == token:
            path.unlink()
    except (OSError, ValueError):
        pass


class RunLock:
    """One writer per run: a lock file holding the pid, host and a token of its holder.

    Taken over when stale: its process is gone (same host), it was taken by this very process (a
    trainer built anew in a notebook replaces the old one, whose next save then refuses), or its
    heartbeat is older than ``LOCK_STALE_SECONDS`` (another host, e.g. two Colab sessions on one
    Drive folder). Released when the holder is garbage-collected or its process exits."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.token = uuid.uuid4().hex
        self.held = False

    def _read(self) -> Optional[dict]:
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return None

    def _info(self) -> str:
        return json.dumps(
            {"pid": os.getpid(), "host": socket.gethostname(), "token": self.token, "heartbeat": time.time()}
        )

    def _stale(self, holder: Optional[dict]) -> bool:
        if holder is None:  # unreadable or half-written: its writer died between open and write
            return time.time() - self.path.stat().st_mtime > 5
        if holder.get("host") == socket.gethostname():
            return holder.get("pid") == os.getpid() or not _process_alive(int(holder.get("pid", -1)))
        return time.time() - float(holder.get("heartbeat", 0)) > LOCK_STALE_SECONDS

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(10):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self._read()
                if self._stale(holder):
                    self.path.unlink(missing_ok=True)
                    continue
                since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(holder.get("heartbeat", 0))))
                raise RunLockedError(
                    f"this run is being trained by process {holder.get('pid')} on host {holder.get('host')} "
                    f"(alive at {since}; lock file {self.path}). Two writers would mix their epochs in one "
                    f"CSV and checkpoint. Stop that process first (another notebook tab, a papermill run, "
                    f"another Colab session on the same Drive folder), or give this run another run_name."
                ) from None
            with os.fdopen(fd, "w") as f:
                f.write(self._info())
            self.held = True
            weakref.finalize(self, _release, self.path, self.token)
            return
        raise RunLockedError(f"could not take the lock {self.path}: other processes keep taking it")

    def check(self) -> None:
        """Raise ``RunLockedError`` if another trainer has taken this run over since ``acquire``."""
        holder = self._read()
        if not self.held or holder is None or holder.get("token") != self.token:
            who = f"process {holder.get('pid')} on {holder.get('host')}" if holder else "nobody (lock file gone)"
            raise RunLockedError(
                f"this trainer no longer holds {self.path} (now: {who}): a trainer for the same run was "
                f"built after it. Use the newest trainer; this one writes nothing more."
            )

    def heartbeat(self) -> None:
        self.check()
        atomic_write(self.path, lambda tmp: Path(tmp).write_text(self._info()))


# --- the CSV -------------------------------------------------------------------------------------


def read_csv(path: str | Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def append_csv(path: str | Path, row: dict) -> None:
    """Append one row, writing the header first when the file is new or empty. A row with columns
    the file lacks (a run continued by a newer version) first rewrites the file with the union of
    both (atomically; older rows get empty cells), so no column is shifted or lost."""
    path = Path(path)
    header = []
    if path.exists() and path.stat().st_size:
        with open(path, newline="") as f:
            header = next(csv.reader(f), [])
    if header and not set(row) <= set(header):
        fields = header + [k for k in row if k not in header]
        old = read_csv(path)

        def rewrite(tmp: str) -> None:
            with open(tmp, "w", newline="") as out:
                w = csv.DictWriter(out, fieldnames=fields, restval="")
                w.writeheader()
                w.writerows(old + [row])

        atomic_write(path, rewrite)
        return
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=header or list(row), restval="")
        if not header:
            writer.writeheader()
        writer.writerow(row)


def truncate_csv(path: str | Path, last_epoch: int) -> tuple[int, int]:
    """Keep the rows of epochs 1..``last_epoch`` (atomically). Returns (rows past it dropped,
    damaged lines dropped): a line of NUL bytes or a partial row, as a power cut can leave."""
    path = Path(path)
    if not path.exists():
        return 0, 0
    lines = path.read_bytes().decode("utf-8", errors="replace").splitlines()
    if not lines:
        return 0, 0
    fields = next(csv.reader([lines[0].replace("\0", "")]), [])
    keep, past, damaged = [], 0, 0
    for line in lines[1:]:
        values = next(csv.reader([line]), []) if "\0" not in line else []
        if len(values) != len(fields) or not values[0].isdigit():
            damaged += bool(line.strip())
            continue
        if int(values[0]) > last_epoch:
            past += 1
        else:
            keep.append(values)
    if (past, damaged) == (0, 0) and fields and fields[0] == "epoch":
        return 0, 0

    def write(tmp: str) -> None:
        buf = io.StringIO()
        w = csv.writer(buf)
        w.writerow(fields)
        w.writerows(keep)
        Path(tmp).write_text(buf.getvalue())

    atomic_write(path, write)
    return past, damaged
