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
    log/tb/<run>/                 TensorBoard's copy of the CSV's numbers (tensorboard=True)
    plots/<run>_<what>.png        figures
"""

from __future__ import annotations

import itertools
import json
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from config import Config
from runs.atomic import atomic_copy, atomic_write, temp_files
from runs.checkpoints import (
    BestRecord,
    CheckpointError,
    CheckpointWriter,
    ConfigMismatchError,
    best_summary,
    check_same_run,
    load_checkpoint,
)
from runs.history import append_csv, repair_csv
from runs.lock import RunLock
from runs.tensorboard_log import TensorBoardLog


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
    def tensorboard(self) -> Path:
        """TensorBoard's event files of the run (``tensorboard=True``)."""
        return self.log_dir / "tb" / self.name

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
        self.best = BestRecord()  # the run's best epoch so far (restore_best, consider)
        self.test_images = 0  # how many test images an accuracy counts (0: compare them as floats)
        self.board = TensorBoardLog(self.paths.tensorboard) if cfg.tensorboard else None  # checks the package now
        self.checkpointed: Optional[int] = None  # the epoch of the latest checkpoint written or being written
        self.after_save: Optional[Callable[[int], None]] = None  # called with the epoch once its files are on disk
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
            if self.board is not None:
                self.board.close()
            self.lock.release()
            self.opened = self.session = False

    def set_aside_earlier(self) -> list[str]:
        """A fresh start: an earlier run's best and CSV are kept under dated names, never overwritten."""
        notes = []
        self.best = BestRecord()
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

    def best_record(self) -> tuple[Optional[BestRecord], str]:
        """The best file's record (None if there is none), and a note. A best file that is unreadable
        or of another config is set aside (kept, not overwritten later)."""
        if not self.paths.best.exists():
            return None, ""
        try:
            return best_summary(self.read_best()), ""
        except (CheckpointError, ConfigMismatchError) as e:
            aside = set_aside(self.paths.best, "unusable")
            return None, f"the best checkpoint could not be used ({str(e).split('. ')[0]}); moved to {aside}"

    def restore_best(self, latest: dict) -> str:
        """Set ``best`` on resuming from checkpoint ``latest`` so that it, the best file and the CSV agree,
        whatever instant a crash came at; returns a note when they did not.

        The latest checkpoint is written first and then copied to the best file, so a crash in between
        leaves a latest that records itself as the best epoch and a best file of an earlier epoch (or
        none, or a temp file that ``open`` removed): the copy is made now. A best file that beats
        latest's record (an older latest put back by hand) stays the best. A record whose weights are
        nowhere (its epoch is neither the best file's nor latest's) gives way to the best file's."""
        recorded = best_summary(latest)
        on_disk, note = self.best_record()
        if on_disk is not None and (on_disk.epoch == recorded.epoch or self.better(on_disk.acc, recorded.acc)):
            self.best = on_disk
            if on_disk.epoch != recorded.epoch:
                note = _join(
                    note,
                    f"{self.paths.best} (epoch {on_disk.epoch}, {100 * on_disk.acc:.2f}%) is better than what the "
                    f"latest checkpoint recorded: it stays the best, replaced only by a better epoch",
                )
            return note
        if recorded.epoch and recorded.epoch == int(latest["epoch"]):  # the copy to best was cut off
            atomic_copy(self.paths.latest, self.paths.best)
            self.best = recorded
            return _join(note, f"made {self.paths.best} from the latest checkpoint (epoch {recorded.epoch}, the best): "
                         f"its copy had been cut off")  # fmt: skip
        if recorded.epoch:  # the best epoch's weights are in neither file
            self.best = on_disk or BestRecord()
            kept = f"epoch {on_disk.epoch} ({100 * on_disk.acc:.2f}%) stays the best" if on_disk else "none is kept"
            return _join(note, f"the best checkpoint of epoch {recorded.epoch} is missing, so {kept}; a better epoch "
                         f"replaces it")  # fmt: skip
        self.best = recorded
        return note

    def better(self, acc: float, than: float) -> bool:
        """Whether accuracy ``acc`` beats ``than`` at the precision accuracies are measured: whole
        images of ``test_images`` (a float32 and a float64 of one count are a tie)."""
        n = self.test_images
        return round(acc * n) > round(than * n) if n else acc > than

    def consider(self, epoch: int, scores: list[tuple[float, str]]) -> bool:
        """Keep the best of ``scores`` ((accuracy, "raw" or "ema") of epoch ``epoch``) as the run's best
        when it beats the best so far; returns whether it did (the epoch's checkpoint is then copied to best)."""
        acc, source = max(scores)
        if not self.better(acc, self.best.acc):
            return False
        self.best = BestRecord(acc, epoch, source)
        return True

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
        with open(self.paths.log, "a", encoding="utf-8", errors="backslashreplace") as f:
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
            with open(self.paths.log, "a", encoding="utf-8", errors="backslashreplace") as f:
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
        snapshot) and, when ``best``, its copy as the best checkpoint, then ``after_save(epoch)``. The lock
        is checked first: nothing is written by a trainer that lost the run. ``final``: wait for this save too.
        Returns a note if the lock file had to be taken again."""
        note = self.check_lock()
        self.writer.wait()
        append_csv(self.paths.csv, row)
        if self.board is not None:
            self.board.write(row)
        epoch = int(row["epoch"])
        then = (lambda: self.after_save(epoch)) if self.after_save is not None else None
        self.writer.submit(self.paths.latest, latest, (self.paths.best,) if best else (), then)
        self.checkpointed = epoch
        if final:
            self.writer.wait()
        return note


def _join(*notes: str) -> str:
    return "; ".join(n for n in notes if n)
