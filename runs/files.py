"""A run's files: where they are (``RunPaths``), and how they change while it trains (``RunFiles``):
atomic checkpoints written in the background, the best checkpoint as a copy of the latest, the
per-epoch CSV, the text log, the run lock, and the checks that a file belongs to this run.

    checkpoint/<run>_latest.pth   every epoch: everything a resume needs
    checkpoint/<run>_best.pth     a copy of latest from the epoch that scored best
    checkpoint/<run>.lock         who is training the run now (runs/lock.py)
    checkpoint/compile_cache/     torch.compile's kernels, shared by the runs of this folder
    log/<run>.csv                 one row per epoch, appended
    log/<run>.log                 the text log
    log/<run>_config.json         the config
    log/<run>_result.json         a sweep's summary of the run (sweeps/)
    plots/<run>_<what>.png        figures
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import tempfile
import threading
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from config import Config, config_differences
from runs.atomic import atomic_copy, atomic_write, temp_files
from runs.lock import RunLock

CHECKPOINT_FORMAT = 1
# What a resumable checkpoint must hold (the rng entry: its own keys); checked when it is read.
LATEST_KEYS = ("config", "model", "optimizer", "scaler", "epoch", "step", "best_acc", "best_epoch", "rng")
RNG_KEYS = ("device_type", "torch", "loader", "mixup")


class ConfigMismatchError(ValueError):
    """A checkpoint was written by a run with another model/data/recipe config."""


class CheckpointError(RuntimeError):
    """A checkpoint file cannot be read, or cannot be used the way it was asked for."""


def check_same_run(state: dict, cfg: Config, path: str | Path) -> None:
    """Raise ``ConfigMismatchError`` naming each field in which checkpoint ``state`` differs from ``cfg``."""
    diff = config_differences(state["config"], cfg)
    if diff:
        lines = "; ".join(f"{k}: checkpoint {a!r} vs now {b!r}" for k, (a, b) in diff.items())
        raise ConfigMismatchError(
            f"{path} belongs to a run with another config ({lines}). Set those values back to use it, "
            f"or give this run another run_name (or checkpoint_dir) to start a new one."
        )


# --- checkpoints -------------------------------------------------------------------------------


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
    """Writes a checkpoint (and copies of it) in a background thread, one save at a time, in order.

    ``submit`` waits for the previous save (raising its error, if any) and starts the next;
    ``wait`` blocks until everything submitted is on disk. ``load_checkpoint`` waits for pending
    writes of the file it reads, so a reader in this process never sees an older file than a
    writer here has submitted."""

    _pending: dict[Path, threading.Thread] = {}  # file -> the thread writing it (this process)

    def __init__(self):
        self._thread: Optional[threading.Thread] = None
        self._error: Optional[BaseException] = None

    def submit(self, path: Path, state: dict, copies: tuple[Path, ...] = ()) -> None:
        """Save ``state`` to ``path``, then copy that file to each of ``copies``."""
        self.wait()

        def run():
            try:
                save_checkpoint(path, state)
                for copy in copies:
                    atomic_copy(path, copy)
            except BaseException as e:  # reported by the next submit() or wait()
                self._error = e

        self._thread = threading.Thread(target=run, name="checkpoint-writer")  # not a daemon: exit waits
        for p in (path, *copies):
            CheckpointWriter._pending[Path(p).resolve()] = self._thread
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
    """``"latest"`` (resumable: optimizer, step, RNG states) or ``"weights"`` (a best-model file of
    an earlier version of this project: weights only)."""
    return "latest" if {"optimizer", "step", "rng"} <= set(state) else "weights"


def load_checkpoint(path: str | Path, best_path: Optional[str | Path] = None, resumable: bool = True) -> dict:
    """Load a checkpoint with ``weights_only=True`` after checking the CRC32 of every record and, when
    ``resumable``, that it holds everything a resume reads.

    A corrupt, truncated or incomplete file raises ``CheckpointError`` that names it and says what to
    do (and never touches ``best_path``)."""
    path = Path(path)
    CheckpointWriter.wait_for(path)
    keep = (
        f" The best checkpoint {best_path} is untouched, and a fresh start keeps it (set aside under a dated name)."
        if best_path and Path(best_path).exists()
        else ""
    )
    advice = f"Move it away to start this run afresh, or put a good checkpoint in its place to resume from it.{keep}"
    try:
        with zipfile.ZipFile(path) as z:  # torch.load itself does not check the records' CRC32s
            bad = z.testzip()
        if bad is not None:
            raise zipfile.BadZipFile(f"record {bad} fails its CRC32 check")
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as e:  # zipfile errors, RuntimeError, EOFError, UnpicklingError ...
        raise CheckpointError(
            f"{path} cannot be read: corrupt, truncated or not a plain checkpoint ({type(e).__name__}: {e}). {advice}"
        ) from e
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT or "config" not in state:
        raise CheckpointError(f"{path} is not a checkpoint of this project (format {CHECKPOINT_FORMAT}). {advice}")
    if resumable and checkpoint_kind(state) == "weights":
        raise CheckpointError(
            f"{path} is a best-model checkpoint of an earlier version (the weights of epoch {state.get('epoch')}, no "
            f"optimizer state, step or random states), so a run cannot resume from it. Put the run's own latest "
            f"checkpoint back in its place; or move this file away to start the run afresh (an existing best "
            f"checkpoint is then set aside under a dated name, not overwritten). To keep training from these "
            f"weights, start a new run (another run_name)."
        )
    missing = [k for k in LATEST_KEYS if k not in state] if resumable else []
    rng = state.get("rng")
    missing += [f"rng.{k}" for k in RNG_KEYS if resumable and isinstance(rng, dict) and k not in rng]
    if resumable and not isinstance(rng, dict) and "rng" not in missing:
        missing.append("rng")
    if missing:
        raise CheckpointError(f"{path} lacks {', '.join(missing)}, which a resume needs. {advice}")
    return state


def best_summary(state: dict) -> tuple[float, int, str]:
    """(test accuracy, epoch, which weights: "raw" or "ema") of a best checkpoint, new or old format."""
    if checkpoint_kind(state) == "weights":
        return float(state["test_acc"]), int(state["epoch"]), state.get("weights", "raw")
    return float(state["best_acc"]), int(state["best_epoch"]), state.get("best_source", "raw")


def set_aside(path: Path, why: str) -> Optional[Path]:
    """Rename ``path`` to ``<stem>.<time>.<why><suffix>`` beside it (nothing is deleted, and an earlier
    set-aside file is never replaced: a second one in the same second gets ``-2``, ``-3``...)."""
    if not path.exists():
        return None
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for n in itertools.count(1):
        aside = path.with_name(f"{path.stem}.{stamp}{'' if n == 1 else f'-{n}'}.{why}{path.suffix}")
        try:  # a hard link fails if the name exists, so nothing is overwritten even in a race
            aside.hardlink_to(path)
        except FileExistsError:
            continue
        except OSError:  # no hard links here (some network drives): an exclusive create, then a rename
            try:
                aside.open("xb").close()
            except FileExistsError:
                continue
            path.replace(aside)
            return aside
        path.unlink()
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


def _header_is_sound(fields: list[str]) -> bool:
    return bool(fields) and fields[0] == "epoch" and all(f and f.isprintable() for f in fields)


def repair_csv(path: str | Path, last_epoch: int, columns: list[str]) -> tuple[int, int, bool]:
    """Keep the rows of epochs 1..``last_epoch`` (atomically). Returns (rows past it dropped, damaged
    lines dropped, header rebuilt): a line of NUL bytes or a partial row, as a power cut can leave, is
    damaged; a damaged header is rebuilt as ``columns`` (the trainer's own), keeping the rows that fit."""
    path = Path(path)
    if not path.exists():
        return 0, 0, False
    lines = path.read_bytes().decode("utf-8", errors="replace").splitlines()
    if not lines:
        return 0, 0, False
    fields = next(csv.reader([lines[0]]), []) if "\0" not in lines[0] else []
    rebuilt = not _header_is_sound(fields)
    body = lines[1:]
    if rebuilt:
        fields = list(columns)
        body = lines  # the first line may be a row whose header line was lost
    keep, past, damaged = [], 0, 0
    for line in body:
        values = next(csv.reader([line]), []) if "\0" not in line else []
        if len(values) != len(fields) or not values[0].isdigit():
            damaged += bool(line.strip()) and not (rebuilt and line is lines[0])
            continue
        if int(values[0]) > last_epoch:
            past += 1
        else:
            keep.append(values)
    if (past, damaged, rebuilt) == (0, 0, False):
        return 0, 0, False

    def write(tmp: str) -> None:
        buf = io.StringIO()
        w = csv.writer(buf)
        w.writerow(fields)
        w.writerows(keep)
        Path(tmp).write_text(buf.getvalue())

    atomic_write(path, write)
    return past, damaged, rebuilt


# --- one run's files ---------------------------------------------------------------------------


@dataclass(frozen=True)
class RunPaths:
    """Where a run's files are: the one place their names are spelled."""

    name: str
    checkpoint_dir: Path
    log_dir: Path
    plot_dir: Path

    @classmethod
    def of(cls, cfg: Config) -> RunPaths:
        return cls(cfg.name, Path(cfg.checkpoint_dir), Path(cfg.log_dir), Path(cfg.plot_dir))

    @property
    def latest(self) -> Path:
        return self.checkpoint_dir / f"{self.name}_latest.pth"

    @property
    def best(self) -> Path:
        return self.checkpoint_dir / f"{self.name}_best.pth"

    @property
    def lock(self) -> Path:
        return self.checkpoint_dir / f"{self.name}.lock"

    @property
    def csv(self) -> Path:
        return self.log_dir / f"{self.name}.csv"

    @property
    def log(self) -> Path:
        return self.log_dir / f"{self.name}.log"

    @property
    def config(self) -> Path:
        return self.log_dir / f"{self.name}_config.json"

    @property
    def result(self) -> Path:
        return self.log_dir / f"{self.name}_result.json"

    @property
    def output(self) -> Path:
        """What a sweep's child process prints."""
        return self.log_dir / f"{self.name}.out"

    def figure(self, what: str) -> Path:
        return self.plot_dir / f"{self.name}_{what}.png"

    @property
    def compile_cache(self) -> Path:
        """torch.compile's kernel cache, shared by every run with this checkpoint folder."""
        return self.checkpoint_dir / "compile_cache"


class RunFiles:
    """How a run's files change while one trainer trains it: opened (folders checked, the lock taken,
    temp files of a killed save removed), read (the latest checkpoint, the best record), repaired (the
    CSV), and written once per epoch by ``record``, which checks the lock before it writes."""

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.paths = RunPaths.of(cfg)
        self.lock = RunLock(self.paths.lock)
        self.writer = CheckpointWriter()
        self.opened = False  # the lock is held
        self.session = False  # the log's session line is written: lines go straight to the log
        self._unlogged: list[str] = []  # lines said before it, written after it

    def open(self) -> list[str]:
        """Check the folders, take the lock, clean up; returns notes for the log."""
        for folder in dict.fromkeys((self.cfg.checkpoint_dir, self.cfg.log_dir, self.cfg.plot_dir)):
            check_writable(folder)
        self.lock.acquire()
        self.opened = True
        for path in (self.paths.latest, self.paths.best):  # a trainer of this run in this process may be saving
            CheckpointWriter.wait_for(path)
        p = self.paths
        stale = [t for path in (p.latest, p.best, p.lock, p.csv, p.log, p.config) for t in temp_files(path)]
        for t in stale:
            t.unlink(missing_ok=True)
        return [f"removed {len(stale)} temp file(s) of an interrupted save"] if stale else []

    def close(self) -> None:
        """Wait for the last save, then release the lock (another process may train the run now)."""
        try:
            self.writer.wait()
        finally:
            self.lock.release()
            self.opened = self.session = False

    def set_aside_earlier(self) -> list[str]:
        """A fresh start: an earlier run's best and CSV are kept under dated names, never overwritten."""
        notes = []
        for path in (self.paths.csv, self.paths.best):
            if path.exists() and (path != self.paths.csv or path.stat().st_size):
                notes.append(f"earlier {path.name} moved to {set_aside(path, 'orphaned')}")
        return notes

    def read_latest(self) -> Optional[dict]:
        """The latest checkpoint (None if there is none), checked to belong to this run."""
        if not self.paths.latest.exists():
            return None
        state = load_checkpoint(self.paths.latest, self.paths.best)
        check_same_run(state, self.cfg, self.paths.latest)
        return state

    def read_best(self) -> dict:
        """The best checkpoint, checked to belong to this run (``FileNotFoundError`` if none)."""
        if not self.paths.best.exists():
            raise FileNotFoundError(f"no best checkpoint yet: {self.paths.best} (train at least one epoch)")
        state = load_checkpoint(self.paths.best, resumable=False)
        check_same_run(state, self.cfg, self.paths.best)
        return state

    def best_record(self) -> tuple[Optional[tuple[float, int, str]], str]:
        """(accuracy, epoch, weights) of the best checkpoint (None if there is none), and a note. A best
        file that is unreadable or of another config is set aside (kept, not overwritten later)."""
        if not self.paths.best.exists():
            return None, ""
        try:
            return best_summary(self.read_best()), ""
        except (CheckpointError, ConfigMismatchError) as e:
            aside = set_aside(self.paths.best, "unusable")
            return None, f"the best checkpoint could not be used ({str(e).split('. ')[0]}); moved to {aside}"

    def better_best(self, best_acc: float) -> tuple[Optional[tuple[float, int, str]], str]:
        """The best file's record when it beats ``best_acc`` (what a latest checkpoint put back by hand
        remembers), so the best file is replaced only by a better epoch; and a note."""
        on_disk, note = self.best_record()
        if on_disk is None or on_disk[0] <= best_acc:
            return None, note
        acc, epoch, _ = on_disk
        return on_disk, (
            f"{self.paths.best} (epoch {epoch}, {100 * acc:.2f}%) is better than what the latest checkpoint "
            f"recorded: it stays the best, replaced only by a better epoch"
        )

    def repair_csv(self, epoch: int, columns: list[str]) -> list[str]:
        past, damaged, rebuilt = repair_csv(self.paths.csv, epoch, columns)
        return [
            f"dropped {past} CSV rows past it" if past else "",
            f"dropped {damaged} damaged CSV line(s) (NUL bytes or a partial row)" if damaged else "",
            "rebuilt the CSV's damaged header from this trainer's columns" if rebuilt else "",
        ]

    def log(self, line: str) -> None:
        """Append a timestamped line to the text log; before the session line, keep it for then (only
        the lock holder writes)."""
        stamped = f"{time.strftime('%Y-%m-%d %H:%M:%S')} {line}"
        if not self.session:
            self._unlogged.append(stamped)
            return
        with open(self.paths.log, "a") as f:
            f.write(stamped + "\n")

    def start_session(self, how: str, header: list[str]) -> None:
        """The log's session line (``=== session: how``); the first time after ``open()`` also the config
        file and the ``header`` lines; then the lines said before it."""
        assert self.opened, "open() first"
        first = not self.session
        self.session = True
        if first:
            atomic_write(self.paths.config, lambda tmp: Path(tmp).write_text(json.dumps(self.cfg.to_dict(), indent=2)))
        self.log(f"=== {'session: ' if first else ''}{how}")
        for line in header if first else []:
            self.log(line)
        if self._unlogged:
            with open(self.paths.log, "a") as f:
                f.writelines(line + "\n" for line in self._unlogged)
            self._unlogged.clear()

    def check_lock(self) -> str:
        """Raise if another trainer took the run over; a note if the lock file had to be taken again."""
        return self.lock.check()

    def wait_for_saves(self) -> None:
        """Block until the previous epoch's checkpoint is on disk (raising its error, if any)."""
        self.writer.wait()

    def record(self, row: dict, latest: dict, best: bool, final: bool = False) -> str:
        """One epoch's files: the CSV row now, then in the background the latest checkpoint (a
        snapshot) and, when ``best``, its copy as the best checkpoint. The lock is checked first:
        nothing is written by a trainer that lost the run. ``final``: wait for this save too.
        Returns a note if the lock file had to be taken again."""
        note = self.check_lock()
        self.writer.wait()
        append_csv(self.paths.csv, row)
        self.writer.submit(self.paths.latest, latest, (self.paths.best,) if best else ())
        if final:
            self.writer.wait()
        return note
