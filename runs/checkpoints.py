"""Checkpoints: what a resumable checkpoint holds, written atomically in a background thread, read
back with every record's CRC32 checked, and the checks that a checkpoint belongs to this run."""

from __future__ import annotations

import threading
import zipfile
from pathlib import Path
from typing import Callable, NamedTuple, Optional

import torch

from config import Config, config_differences
from runs.atomic import atomic_copy, atomic_write

CHECKPOINT_FORMAT = 1
# What a resumable checkpoint must hold (the rng entry: its own keys); checked when it is read.
LATEST_KEYS = ("config", "model", "optimizer", "scaler", "epoch", "step", "best_acc", "best_epoch", "rng")
RNG_KEYS = ("torch", "loader", "mixup")  # and "device_type", which the first version did not write


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

    def submit(
        self, path: Path, state: dict, copies: tuple[Path, ...] = (), then: Optional[Callable[[], None]] = None
    ) -> None:
        """Save ``state`` to ``path``, then copy that file to each of ``copies``, then call ``then`` (in the
        same thread; its error is reported like a failed save)."""
        self.wait()

        def run():
            try:
                save_checkpoint(path, state)
                for copy in copies:
                    atomic_copy(path, copy)
                if then is not None:
                    then()
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


class BestRecord(NamedTuple):
    """What a run's best epoch scored: its test accuracy, its epoch (0: none yet) and which weights
    scored it (``"raw"``: the trained weights, ``"ema"``: their moving average)."""

    acc: float = 0.0
    epoch: int = 0
    source: str = "raw"


def best_summary(state: dict) -> BestRecord:
    """The best record a checkpoint holds: a latest checkpoint's run-so-far best, or what an old
    weights-only best file (an earlier version of this project) says of itself."""
    if checkpoint_kind(state) == "weights":
        return BestRecord(float(state["test_acc"]), int(state["epoch"]), state.get("weights", "raw"))
    return BestRecord(float(state["best_acc"]), int(state["best_epoch"]), state.get("best_source", "raw"))


def best_weights(state: dict) -> dict:
    """The weights of a best checkpoint that scored its record (the EMA weights where those did)."""
    ema = checkpoint_kind(state) == "latest" and best_summary(state).source == "ema"
    return state["ema"] if ema else state["model"]
