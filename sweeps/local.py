"""The local backend: a sweep's runs (sweeps/runs.py) trained in child processes on this machine.

``run_sweep`` calls ``train_run`` in child processes (``python -m sweeps --one``), ``per_gpu`` at a time
on every visible GPU (or ``per_gpu`` at a time on the CPU), and writes the table. Running the same sweep
again continues every unfinished run and skips the finished ones.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

import torch

import utils
from config import Config, with_overrides
from data import ensure_cifar10
from runs import history
from runs.files import RunPaths
from runs.history import read_csv
from sweeps.runs import (
    DONE,
    check_folders,
    check_sweep_name,
    clash_message,
    run_result,
    trained_with_another_config,
    write_results,
)

POLL_SECONDS = 0.5
ROOT = Path(__file__).resolve().parent.parent  # the project: where ``python -m sweeps`` is found


def _done(cfg: Config) -> bool:
    return run_result(cfg)["status"] in DONE


def _slots(per_gpu: int) -> list[Optional[int]]:
    """One entry per concurrent run: a GPU index, or None for the CPU."""
    gpus = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    return [g for g in gpus for _ in range(per_gpu)] if gpus else [None] * per_gpu


def _launch(cfg: Config, gpu: Optional[int], per_process_threads: int) -> subprocess.Popen:
    env = dict(os.environ)
    if gpu is not None:
        env["CUDA_VISIBLE_DEVICES"] = str(gpu)
        cfg = with_overrides(cfg, {"device": "auto"})  # the one visible GPU
    else:
        env["OMP_NUM_THREADS"] = str(cfg.cpu_threads or per_process_threads)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)  # finds sweeps
    Path(cfg.log_dir).mkdir(parents=True, exist_ok=True)
    with open(RunPaths.of(cfg).output, "a") as out:  # the child keeps its own copy of the file
        # Same working directory as this process, so relative folders in the config mean the same there.
        return subprocess.Popen(
            [sys.executable, "-m", "sweeps", "--one", json.dumps(cfg.to_dict())],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
        )


class SweepInterrupted(KeyboardInterrupt):
    """The stop button (or Ctrl-C) while a sweep's children train: each was stopped after its last
    finished epoch. Still a ``KeyboardInterrupt``; Jupyter shows these few lines, not a traceback."""

    def __init__(self, stopped: list[tuple[str, int, int]]):
        runs = [f"  {name}: {saved} of {epochs} epochs saved" for name, saved, epochs in stopped]
        self.message = "\n".join(
            [f"Stopped; {len(stopped)} run(s) were training and stopped after their last finished epoch:", *runs]
            + ["Finished runs are kept. Run this cell (or the same command) again to continue the others."]
        )
        super().__init__(self.message)

    def _render_traceback_(self) -> list[str]:
        return [f"SweepInterrupted: {self.message}"]


class ChildProgress:
    """A line per epoch a running child finishes (its epoch, test accuracy and time left), read from
    the CSV it writes, so a sweep on a slow machine shows more than "started"."""

    def __init__(self, cfg: Config):
        self.cfg, self.csv, self.size = cfg, RunPaths.of(cfg).csv, -1
        self.said = len(read_csv(self.csv)) if self.csv.exists() else 0  # rows of an earlier session: not news

    def lines(self) -> list[str]:
        size = self.csv.stat().st_size if self.csv.exists() else 0
        if size == self.size:
            return []
        self.size = size
        rows = read_csv(self.csv) if size else []
        new, self.said = rows[self.said :], max(self.said, len(rows))
        out = []
        for row in new:
            try:
                epoch, acc = int(row[history.EPOCH]), 100 * float(row[history.TEST_ACC])
                seconds = sum(float(row[k] or 0) for k in history.TIME_COLUMNS[:3])
            except (KeyError, ValueError):  # a row being written: read again at the next poll
                self.said -= 1
                break
            left = utils.duration(seconds * (self.cfg.epochs - epoch))
            out.append(f"    {self.cfg.name}: epoch {epoch}/{self.cfg.epochs}, test {acc:.2f}%, ~{left} left")
        return out


def run_sweep(
    runs: list[tuple[Config, dict]],
    per_gpu: int = 1,
    name: str = "sweep",
    progress: str = "lines",
    cpu_threads: int = 0,
):
    """Train ``runs`` (from ``grid``) in child processes, ``per_gpu`` at a time per GPU; returns
    the table (``results``) as a pandas DataFrame and writes it with the group statistics.
    ``progress``: ``"lines"`` (a line per started and ended run) or ``"off"``. ``cpu_threads``: the
    count this process chose (``Trainer.pace``), handed to children on the CPU one at a time whose
    config does not set one; several at a time share the cores.

    Raises ``ValueError`` before training anything if a run's files were written by another config."""
    if per_gpu < 1:
        raise ValueError(f"per_gpu must be >= 1, got {per_gpu}")
    check_sweep_name(name)
    check_folders(runs)
    clashes = trained_with_another_config(runs)
    if clashes:
        raise ValueError(clash_message(clashes))
    say = print if progress != "off" else (lambda *_: None)
    for data_dir, download in {(c.data_dir, c.download) for c, _ in runs}:
        ensure_cifar10(data_dir, download)  # downloaded once, not by every child
    pending = [(c, o) for c, o in runs if not _done(c)]
    say(f"{name}: {len(runs)} runs, {len(runs) - len(pending)} finished already, {len(pending)} to train")
    slots = _slots(per_gpu)
    threads = max(1, (os.cpu_count() or 1) // len(slots))
    inherited = cpu_threads if len(slots) == 1 else 0
    running: dict[int, tuple[subprocess.Popen, Config]] = {}
    watched: dict[str, ChildProgress] = {}
    try:
        while pending or running:
            for slot in [s for s in range(len(slots)) if s not in running]:
                if not pending:
                    break
                cfg, _ = pending.pop(0)
                if slots[slot] is None and inherited and not cfg.cpu_threads:
                    cfg = with_overrides(cfg, {"cpu_threads": inherited})  # may change within a run: same files
                watched[cfg.name] = ChildProgress(cfg)
                running[slot] = (_launch(cfg, slots[slot], threads), cfg)
                where = f"GPU {slots[slot]}" if slots[slot] is not None else "CPU"
                say(f"  started {cfg.name} on {where}")
            time.sleep(POLL_SECONDS)
            for slot, (proc, cfg) in list(running.items()):
                ended = proc.poll() is not None  # asked first: an ended child's last row is read below
                for line in watched[cfg.name].lines():
                    say(line)
                if ended:
                    del running[slot]
                    say(f"  {cfg.name}: exit code {proc.returncode}")
    except BaseException as error:  # an interrupt stops the children too; their runs resume next time
        for proc, _ in running.values():
            proc.send_signal(signal.SIGINT)
        try:
            for proc, _ in running.values():
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()
        except KeyboardInterrupt:  # interrupted again while waiting: stop the children now
            for proc, _ in running.values():
                proc.kill()
        if isinstance(error, KeyboardInterrupt):
            saved = [(c.name, run_result(c)["epochs"], c.epochs) for _, c in running.values()]
            raise SweepInterrupted(saved) from None
        raise
    return write_results(runs, name)
