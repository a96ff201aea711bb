"""What a training run shows while it runs: lines on screen and in the log, progress bars, and the
time estimates (the CPU estimate after the first steps, time left on every epoch line)."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Callable, Optional

import torch

import utils
from runs import history as h

MODES = ("bars", "lines", "off")  # progress bars and lines / a line per epoch (headless) / nothing on screen
PROGRESS_EVERY = 50  # steps between progress-bar updates: the only host syncs inside an epoch
LIVE_EVERY_SECONDS = 10.0  # the live figure is redrawn after an epoch at most this often (and after the last)


HEAVY_ON_A_CPU = 100  # a CPU run this many times the CPU setting's size (hours or more): the warning says so
LINE_WIDTH = 110  # characters an output line may take before a notebook wraps it


def status_line(epoch: int, epochs: int, best_acc: float, best_epoch: int, best_source: str) -> str:
    """One line on where a run stands: finished (and how to train longer) or stopped, and its best."""
    best = (
        f"best test accuracy {100 * best_acc:.2f}% at epoch {best_epoch}"
        + (" (EMA weights)" if best_source == "ema" else "")
        if best_epoch
        else "no epoch trained yet"
    )
    if epoch > epochs:
        return (
            f"finished: {epoch} epochs trained, more than epochs = {epochs} (it was lowered after training); "
            f"{best}. To train longer, raise epochs and run the notebook again"
        )
    if epoch == epochs:
        longer = "To train longer, raise epochs and run the notebook again"
        return f"finished: {epoch} of {epochs} epochs trained; {best}. {longer}"
    return f"stopped after {epoch} of {epochs} epochs; {best}"


def live_curves(progress: str, path, draw: Callable) -> Optional[LiveCurves]:
    """Curves redrawn in place after epochs, when bars are on in a Jupyter kernel someone watches;
    ``draw(csv, png)`` writes the figure (``figures.plot_progress``, passed in by the trainer)."""
    if progress != "bars" or not utils.live_jupyter():
        return None
    from IPython.display import display

    return LiveCurves(draw, path, display)


class Console:
    """Says lines (screen and log) and draws the bars of one trainer.

    Args:
        mode: one of ``MODES``.
        log: writes a line to the run's text log (every line goes there, whatever the mode).
    """

    def __init__(self, mode: str, log: Callable[[str], None], live: Optional[LiveCurves] = None):
        assert mode in MODES, mode
        self.mode = mode
        self.log = log
        self.live = live  # the training curves redrawn in place (Jupyter with someone watching)
        self.epoch_seconds: list[float] = []  # wall seconds of each epoch trained here (compile time excluded)
        self._hardware_said = False
        self._bar: Optional[EpochBar] = None  # the bars open now, closed as stopped after a stop
        self._eval_bar = None

    def say(self, line: str, echo: bool = True) -> None:
        """Log ``line`` and show it (unless ``echo`` is off or the mode is ``"off"``)."""
        self.log(line)
        if echo and self.mode != "off":
            (utils.tqdm.write if self.mode == "bars" else print)(line)

    def notes(self, *notes: str) -> None:
        """Say each non-empty note as ``note: ...``."""
        for note in notes:
            if note:
                self.say(f"note: {note}")

    def hardware_warnings(
        self, device: torch.device, amp_dtype: Optional[torch.dtype], native_bf16: bool, size: float = 0.0
    ) -> None:
        """Said once, when training starts (not when nothing will train): a CPU is slow (a run of ``size``
        times the notebook's CPU setting, ``recipe.training_macs``, from ``HEAVY_ON_A_CPU`` up, is pointed
        to that setting), and bf16 without native support slower still; on a GPU, which autocast dtype runs
        (fp16 with a GradScaler on cards without native bf16, e.g. a T4)."""
        if self._hardware_said:
            return
        self._hardware_said = True
        if device.type == "cuda":
            name = torch.cuda.get_device_name(device)
            kind = "fp16 with a GradScaler" if amp_dtype == torch.float16 else str(amp_dtype).replace("torch.", "")
            major, minor = torch.cuda.get_device_capability(device)
            self.say(f"autocast: {kind} on {name} (compute capability {major}.{minor})")
        if device.type != "cpu":
            return
        threads = torch.get_num_threads()
        self.say(
            f"WARNING: training on the CPU ({utils.plural(threads, 'thread')}), not a GPU; the time per epoch is "
            f"estimated after the first steps."
        )
        if size >= HEAVY_ON_A_CPU:
            self.say(
                f"This run is {size:,.0f}x the notebook's CPU setting (docs/running.md, 'On a CPU') of 6-8 minutes."
            )
        if amp_dtype == torch.bfloat16 and not native_bf16:
            self.say(
                "WARNING: amp='bf16' on a CPU without native bf16 makes matrix products several times slower "
                "than float32; amp='auto' or 'off' uses float32."
            )

    def epoch_line(self, epoch: int, epochs: int, stats: dict, best_acc: float, best_epoch: int) -> None:
        """One line per epoch: losses, accuracies, the best epoch, seconds and the time left for the run
        (the learning rate is in the CSV and the schedule figure); split in two where it would pass
        ``LINE_WIDTH`` (a notebook's output width), and the compile seconds apart."""
        if h.TRAIN_CLEAN_ACC in stats:  # the unaugmented accuracy says more than the augmented batches' (in the CSV)
            train = f"train loss {stats[h.TRAIN_LOSS]:.3f} clean {100 * stats[h.TRAIN_CLEAN_ACC]:.1f}%"
        else:
            train = f"train loss {stats[h.TRAIN_LOSS]:.3f} acc {100 * stats[h.TRAIN_ACC]:.1f}%"
        ema = f" ema {100 * stats[h.EMA_TEST_ACC]:.2f}%" if h.EMA_TEST_ACC in stats else ""
        seconds = stats["train_seconds"] + stats["eval_seconds"] + stats["checkpoint_seconds"]
        best = "best" if best_epoch == epoch else f"best {100 * best_acc:.2f}% @ {best_epoch}"
        scores = (
            f"epoch {epoch:>{len(str(epochs))}}/{epochs} | {train} | test loss {stats[h.TEST_LOSS]:.3f} acc "
            f"{100 * stats[h.TEST_ACC]:.2f}%{ema} ({best})"
        )
        pace = f"{seconds:.0f}s, ~{self.time_left(epochs - epoch)} left"
        if len(scores) + 3 + len(pace) <= LINE_WIDTH:
            self.say(f"{scores} | {pace}")
        else:
            self.say(scores)
            self.say(f"{' ' * 6}{pace}")
        if stats["compile_seconds"] >= 0.5:
            self.say(f"{' ' * 6}(and {stats['compile_seconds']:.0f}s compiling, not counted in the epoch's time)")

    def epoch_bar(self, steps: int, epoch: int) -> Optional[EpochBar]:
        self._bar = EpochBar(steps, epoch) if self.mode == "bars" else None
        return self._bar

    def eval_bar(self, batches: int):
        """A short bar while the test set (and the clean training images) are scored; None unless bars."""
        if self.mode != "bars":
            return None
        self._eval_bar = utils.progress_bar(batches, "evaluating", leave=False, unit="batch")
        return self._eval_bar

    def stop_bars(self) -> None:
        """After a stop: the open bars say so and close where they stopped (Jupyter shows a closed,
        unfinished bar red), rather than stay blue as if training went on."""
        for bar in (self._bar.bar if self._bar is not None else None, self._eval_bar):
            if bar is not None and not getattr(bar, "disable", False) and bar.n < (bar.total or 0):
                bar.set_description(f"{bar.desc.split(' (')[0]} (stopped)", refresh=False)
                bar.close()
        self._bar = self._eval_bar = None

    def epoch_done(self, device: torch.device, stats: dict, epochs_left: int, csv_path) -> None:
        """After an epoch's line: on a CPU, the estimate again after the first epoch (evaluation and
        checkpoint included, warm-up steps behind); the live curves, when shown."""
        if device.type == "cpu" and len(self.epoch_seconds) == 1 and epochs_left:
            per_epoch = self.epoch_seconds[0]
            self.say(
                f"CPU estimate after the first epoch: {utils.duration(per_epoch)} per epoch (training "
                f"{utils.duration(stats['train_seconds'])}, evaluation {utils.duration(stats['eval_seconds'])}), "
                f"about {utils.duration(per_epoch * epochs_left)} for the {utils.plural(epochs_left, 'epoch')} left."
            )
        if self.live is not None:
            self.live.update(csv_path, final=epochs_left <= 0)

    def cpu_estimate(self, seconds_per_step: float, steps_per_epoch: int, epochs_left: int) -> None:
        per_epoch = seconds_per_step * steps_per_epoch
        self.say(
            f"CPU estimate: about {utils.duration(per_epoch)} per epoch of training, "
            f"{utils.duration(per_epoch * epochs_left)} for the {utils.plural(epochs_left, 'epoch')} left "
            f"(evaluation not included)."
        )

    def time_left(self, epochs_left: int) -> str:
        """The median of the last 5 epochs' wall time, times the epochs left."""
        recent = sorted(self.epoch_seconds[-5:])
        return utils.duration(recent[len(recent) // 2] * epochs_left) if recent else "?"


class EpochBar:
    """A progress bar over one epoch's steps, showing the running loss, accuracy and images per
    second every ``PROGRESS_EVERY`` steps (each update syncs with the device once)."""

    def __init__(self, steps: int, epoch: int):
        self.steps = steps
        self.bar = utils.progress_bar(steps, f"epoch {epoch}", leave=False, unit="step")
        self.start = time.perf_counter()

    def update(self, i: int, loss_sum, correct, seen: int) -> None:
        self.bar.update(1)
        if (i + 1) % PROGRESS_EVERY == 0 or i + 1 == self.steps:
            rate = seen / (time.perf_counter() - self.start)
            self.bar.set_postfix(
                loss=f"{loss_sum.item() / seen:.3f}", acc=f"{correct.item() / seen:.3f}", img_s=f"{rate:,.0f}"
            )

    def close(self) -> None:
        self.bar.close()


class LiveCurves:
    """The run's loss and accuracy curves, redrawn in place in the notebook (one figure, not one per
    epoch) after an epoch, at most every ``LIVE_EVERY_SECONDS`` and after the last one.

    Drawing (0.5-0.9 s a figure on a quiet CPU, several seconds on a busy one) happens in a thread of its
    own while the next epoch trains; only the last figure is drawn before ``update`` returns. A request
    made while a figure is drawn replaces any older one still waiting. The figure's place on the page is
    made in the calling thread (the earlier figure, or a line until the first is drawn); the drawing
    thread only updates it by its display id.

    A cell run again (the stop message asks for it), a restarted kernel or a second notebook on the same run
    gets a figure of its own: Jupyter cleared the earlier cell's output, so its display handle shows nothing.

    Args:
        draw: writes the figure of a CSV to a PNG path (``figures.plot_progress``).
        path: the PNG to write.
        display: IPython's ``display`` (injected, so it can be tested without a notebook).
        cell: which cell execution is running (IPython's execution count; injected for tests).
    """

    def __init__(self, draw: Callable, path, display: Callable, cell: Callable[[], object] = None):
        self.draw, self.path, self.display = draw, Path(path), display
        self.cell = cell or _execution_count
        self.handle = None
        self.handle_cell = None  # the execution whose output holds ``handle``
        self.last = -float("inf")
        self.error: Optional[BaseException] = None  # the last drawing that failed in the thread
        self._lock = threading.Lock()
        self._pending: Optional[tuple] = None  # (csv, handle) waiting for the drawing thread
        self._worker: Optional[threading.Thread] = None

    def update(self, csv_path, final: bool = False) -> None:
        now = time.monotonic()
        if not final and now - self.last < LIVE_EVERY_SECONDS:
            return
        self.last = now
        cell = self.cell()
        if self.handle is None or cell != self.handle_cell:
            self.handle, self.handle_cell = self.display(self._placeholder(), display_id=True), cell
        if final:
            self.wait()
            self._render(csv_path, self.handle)
            return
        with self._lock:
            self._pending = (csv_path, self.handle)
            if self._worker is None:
                self._worker = threading.Thread(target=self._drain, name="live curves", daemon=True)
                self._worker.start()

    def wait(self) -> None:
        """Until the drawing thread has drawn what it was asked to."""
        worker = self._worker
        if worker is not None:
            worker.join()

    def _placeholder(self):
        from IPython.display import Image, Markdown

        return Image(filename=str(self.path)) if self.path.exists() else Markdown("*(curves after this epoch)*")

    def _drain(self) -> None:
        while True:
            with self._lock:
                job, self._pending = self._pending, None
                if job is None:
                    self._worker = None
                    return
            try:
                self._render(*job)
            except Exception as e:  # a figure that fails must not stop training; the last one raises
                self.error = e

    def _render(self, csv_path, handle) -> None:
        from IPython.display import Image

        self.draw(csv_path, self.path)
        handle.update(Image(filename=str(self.path)))


def _execution_count():
    """IPython's count of executed cells (None outside IPython)."""
    shell = utils.ipython()
    return shell.execution_count if shell is not None else None
