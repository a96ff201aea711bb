"""Training: the ``Trainer``, which puts a run together from recipe.py's parts and trains it epoch by epoch.

The notebook drives it as a short loop::

    trainer = Trainer(cfg, data)
    trainer.resume()
    for epoch in trainer.remaining_epochs():
        trainer.run_epoch(epoch)

The ``Trainer`` keeps the maths (model, optimizer, EMA, loaders, an epoch of training, evaluation);
the compiled step is ``step.CompiledStep``, the run's files ``runs.files.RunFiles``. Everything a
resumed run needs is in the latest checkpoint: model, EMA, optimizer, scaler, step, epoch, best
accuracy, config and every RNG state. The learning rate is a pure function of the global step, so
nothing else is needed to continue exactly. An epoch that raised (a Jupyter interrupt, divergence, a
full disk) is never continued from memory: the next ``resume``/``remaining_epochs``/``run_epoch``
restores the last checkpoint first.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Iterator, Optional

import torch

import figures
import utils
from config import CPU_SETTING, NORM_NAMES, Config, with_overrides
from data import CifarTensors
from evaluation import Evaluator
from models import ViT, alphas, count_parameters, gains
from recipe import build_model, build_run, cpu_has_native_bf16, training_macs
from runs import history
from runs.checkpoints import CHECKPOINT_FORMAT, BestRecord, ConfigMismatchError, best_summary, best_weights, snapshot
from runs.console import Console, live_curves, status_line
from runs.files import RunFiles
from step import (
    CompileClock,
    CompiledStep,
    CpuPace,
    attention_backend,
    attention_unavailable,
    compile_modes,
    compile_notes,
    compile_variant,
    configure_process,
    synced_time,
)

RESEED_STRIDE = 1_000_003  # loader seed after a device-type change: seed * stride + epoch


class TrainingInterrupted(KeyboardInterrupt):
    """The stop button (or Ctrl-C) during an epoch. Still a ``KeyboardInterrupt``, so "Run All" stops;
    IPython shows ``_render_traceback_()`` (what happened and what to do) instead of torch's traceback."""

    def __init__(self, epoch: int, step: int, steps: int, latest: Path, saved_epoch: Optional[int]):
        where = (
            f"the last checkpoint is {latest} (epoch {saved_epoch})"
            if saved_epoch is not None
            else "no epoch had finished, so the run starts again from its beginning"
        )
        if saved_epoch == epoch:  # the stop came after the epoch's checkpoint was handed to the writer
            self.message = f"Stopped after epoch {epoch} was saved; nothing is lost ({where}). "
        else:
            self.message = (
                f"Stopped in epoch {epoch} at step {step} of {steps}; that epoch's progress is discarded and {where}. "
            )
        self.message += "Run this cell again to resume."
        super().__init__(self.message)

    def _render_traceback_(self) -> list[str]:
        return [f"TrainingInterrupted: {self.message}"]


class DivergenceError(RuntimeError):
    """The loss or the weights became NaN or infinite; nothing of that epoch was saved."""

    @classmethod
    def at(cls, epoch: int, steps_per_epoch: int, bad_step: int, loss: float, latest: Path) -> DivergenceError:
        """The error for epoch ``epoch``: ``bad_step`` is the first step with a non-finite loss (-1:
        the loss stayed finite, the weights did not)."""
        where = (
            f"first non-finite loss at step {bad_step} (epoch {(bad_step - 1) // steps_per_epoch + 1})"
            if bad_step >= 0
            else "the weights are no longer finite"
        )
        last = (
            f"The last good checkpoint is {latest} (epoch {epoch - 1})"
            if latest.exists()
            else "No epoch had finished, so there is no checkpoint"
        )
        return cls(
            f"training diverged in epoch {epoch}: mean loss {loss}, {where}. Nothing of this epoch was saved. "
            f"{last}; running the training cell again restores it, but the same settings will diverge again. "
            f"To try again, start a new run (another run_name) with a lower lr, or grad_clip > 0."
        )


class Trainer:
    """Owns the model, optimizer, EMA, loaders and run state of one config on one dataset.

    Args:
        cfg: the run's config.
        data: CIFAR-10 on the training device (``load_data``).
        progress: ``"bars"`` (progress bars and a line per epoch), ``"lines"`` (a line per epoch, for
            headless runs) or ``"off"`` (nothing on screen); the text log gets every line either way
            (``console.Console``).
    """

    def __init__(self, cfg: Config, data: CifarTensors, progress: str = "bars"):
        self.cfg = cfg
        self.data = data
        self.device = data.x_train.device
        self.files = RunFiles(cfg)
        missing = attention_unavailable(cfg.attention, self.device)
        if missing:  # before anything is built or written
            raise ValueError(missing)
        use_compile = cfg.compile if cfg.compile is not None else self.device.type == "cuda"
        self._compile_modes = compile_modes(use_compile, self.device, cfg.cuda_graphs, cfg.autotune)
        cache = self.paths.compile_cache if self._compile_modes and cfg.compile_cache else None
        variant = compile_variant(cfg.attention, self._compile_modes) if self._compile_modes else ""
        self.compile_cache = configure_process(self.device, cache, cfg.cpu_threads, variant)
        self.compile_clock = CompileClock()  # compiling (and recording CUDA graphs) in this session
        self._interrupted = False  # an epoch started and did not finish: memory is not a checkpoint
        self._stopped_in = 0  # the epoch the last stop came in
        # this run's size in units of the notebook's CPU setting (the CPU warning says it when large)
        self.size = training_macs(cfg, len(data.x_train)) / training_macs(with_overrides(Config(), CPU_SETTING))
        self.pace = CpuPace(choose=cfg.cpu_threads == 0) if self.device.type == "cpu" else None
        self._build_state()
        self.amp_dtype = self.parts.amp_dtype
        schedule = self.parts.schedule
        self.steps_per_epoch, self.total_steps, self.warmup_steps = (
            schedule.steps_per_epoch,
            schedule.total_steps,
            schedule.warmup_steps,
        )
        title = f"{cfg.name}: live"
        live = live_curves(progress, self.paths.figure("live"), lambda csv, png: figures.plot_progress(csv, png, title))
        self.console = Console(progress, self.files.log, live)
        self.evaluator = Evaluator(data, cfg.eval_batch_size, cfg.clean_train_images, self.amp_dtype)
        self.files.test_images = len(data.x_test)  # best epochs compared in whole images
        self.columns = self.csv_columns()  # read once: the model's layers never change
        self.console.notes(self.compile_cache.note, *compile_notes(cfg, self._compile_modes, self.device))

    def _build_state(self) -> None:
        """The run's parts (recipe.build_run), compiled step and counters as a fresh run starts them."""
        self.parts = p = build_run(self.cfg, self.data, bool(self._compile_modes), self.compile_cache.repair)
        self.model, self.ema, self.optimizer, self.lr, self.scaler = p.model, p.ema, p.optimizer, p.lr, p.scaler
        self.augment, self.train_loader, self.mixup = p.augment, p.train_loader, p.mixup
        self.compiled_step = CompiledStep(
            self.model,
            self.optimizer,
            self.scaler,
            self.cfg.grad_clip,
            p.amp_dtype,
            self._compile_modes,
            self.ema.module if self.ema is not None else None,
            self.compile_cache,
        )
        self._augment_compiled = False
        if self.pace is not None:
            self.pace.restart()
        self.epoch = 0  # completed epochs
        self.step = 0  # completed optimizer steps
        self.files.best = BestRecord()

    # --- state -------------------------------------------------------------------------------

    @property
    def paths(self):
        """Where this run's files are (``runs.files.RunPaths``)."""
        return self.files.paths

    @property
    def best(self) -> BestRecord:
        """The run's best epoch so far: accuracy, epoch and weights (kept by ``RunFiles``)."""
        return self.files.best

    @property
    def compile_mode(self) -> Optional[str]:
        return self.compiled_step.mode

    @property
    def num_parameters(self) -> int:
        return count_parameters(self.model)

    def state_dict(self) -> dict:
        return {
            "format": CHECKPOINT_FORMAT,
            "config": self.cfg.to_dict(),
            **self.parts.state_dict(self.device.type),
            "cpu_threads": self.pace.chosen if self.pace is not None else 0,  # a count chosen by timing, kept
            "epoch": self.epoch,
            "step": self.step,
            "best_acc": self.best.acc,
            "best_epoch": self.best.epoch,
            "best_source": self.best.source,
            "torch_version": str(torch.__version__),
        }

    def load_state_dict(self, state: dict) -> str:
        """Restore a ``state_dict()``; returns a note when the random streams could not be restored
        exactly (``RunParts.load_state_dict``)."""
        self.epoch, self.step = int(state["epoch"]), int(state["step"])
        self.files.best = best_summary(state)
        if self.pace is not None and not self.cfg.cpu_threads and state.get("cpu_threads"):
            self.pace.keep(int(state["cpu_threads"]))  # the count it trained with: resumes as it would have gone on
        return self.parts.load_state_dict(state, self.cfg.seed * RESEED_STRIDE + self.epoch)

    def resume(self) -> Optional[int]:
        """Continue from the latest checkpoint if it exists: returns its epoch, or None for a fresh start.

        The first call opens the run's files (folders checked, lock taken, temp files of a killed save
        removed). After an interrupted epoch it restores the last checkpoint (or the initial state); an
        error or interrupt during that restore leaves the trainer marked interrupted, so the next call
        restores again. Refuses (``ConfigMismatchError``) a checkpoint of another config, naming the
        fields; an unreadable file raises ``CheckpointError``. CSV rows past the checkpoint's epoch
        (trained but not checkpointed before a crash) and damaged lines are dropped."""
        if self.files.opened and not self._interrupted:
            return self.epoch or None
        notes = []
        if not self.files.opened:
            notes += self.files.open()
            if self.step:  # files closed after training (close()): what is on disk now is the truth
                self._interrupted = True
        restored = self._interrupted
        if self._interrupted:
            self.files.wait_for_saves()
            self._build_state()
            notes.append("restored after an interrupted epoch (its in-memory state was discarded)")
            if self.files.board is not None:  # reopened at the next row, purging steps past the checkpoint
                self.files.board.close()
        state = self.files.read_latest()
        self.files.checkpointed = int(state["epoch"]) if state is not None else None
        if state is None:
            notes += self.files.set_aside_earlier()
            if restored:
                self.console.say("starting again from epoch 1: no epoch had finished before the stop")
            self._interrupted = False
            self._start_session(f"fresh start (no {self.paths.latest})", notes)
            return None
        if int(state["step"]) != int(state["epoch"]) * self.steps_per_epoch:
            raise ConfigMismatchError(
                f"{self.paths.latest} has {state['step']} steps for {state['epoch']} epochs, but this data "
                f"gives {self.steps_per_epoch} steps per epoch (different dataset size?)"
            )
        notes.append(self.load_state_dict(state))
        notes.append(self.files.restore_best(state))  # the best file made to agree with it (crash, or by hand)
        notes += self.files.repair_csv(self.epoch, self.columns)
        saved_epochs = state["config"]["epochs"]
        if saved_epochs != self.cfg.epochs:
            notes.append(
                f"epochs changed from {saved_epochs} to {self.cfg.epochs}: the learning-rate cosine is re-drawn "
                f"for {self.cfg.epochs} epochs"
                + (
                    f"; {self.epoch} epochs are already trained, so there is nothing left to train"
                    if self.epoch >= self.cfg.epochs
                    else ""
                )
            )
        if restored:  # the training cell run again after a stop: say where it goes on (cell 5 said it before)
            again = "" if self.epoch >= self._stopped_in else " (the stopped epoch starts again)"
            self.console.say(f"resuming after epoch {self.epoch} of {self.cfg.epochs}{again}")
        self._interrupted = False  # only now: the restore is complete
        self._start_session(
            f"resumed from {self.paths.latest} at epoch {self.epoch}/{self.cfg.epochs} (best test acc "
            f"{100 * self.best.acc:.2f}% at epoch {self.best.epoch})",
            notes,
        )
        return self.epoch

    def remaining_epochs(self) -> Iterator[int]:
        """1-based numbers of the epochs still to train (resuming or restoring first when needed,
        so a trainer built anew can never overwrite a run's checkpoint from epoch 0)."""
        self.resume()
        return iter(range(self.epoch + 1, self.cfg.epochs + 1))

    def close(self) -> None:
        """Finish the last save and release the run (another process may train it now); a later
        ``resume()`` takes it again and reads what is then on disk."""
        self.files.close()

    def status(self) -> str:
        """One line on where the run stands."""
        return status_line(self.epoch, self.cfg.epochs, *self.best)

    # --- one epoch -----------------------------------------------------------------------------

    def _set_lr(self, lr: float) -> None:
        self.parts.set_lr(lr)

    def train_step(self, x: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One optimizer step on a prepared batch (soft targets) and the EMA update; returns the loss
        and the number of correct predictions, as device tensors (unsynced)."""
        self._set_lr(self.parts.schedule.at(self.step))
        out = self.compiled_step(x, targets)
        self.compile_clock.charge(out.compile_seconds)
        if out.note:  # a compile mode failed: the next one took over (kept if the state is rebuilt)
            self._compile_modes = self.compiled_step.modes
            self.console.say(f"note: {out.note}")
        if self.ema is not None:
            self.ema.update(self.step)
        self.step += 1
        return out.loss, out.correct

    def train_epoch(self) -> dict:
        """One pass over the training set; metrics stay on the device (no per-step sync). Raises
        ``DivergenceError`` if the loss or the weights are no longer finite."""
        self.model.train()
        self.mixup.enabled = not self.cfg.mixup_off_epoch or self.epoch < self.cfg.mixup_off_epoch  # 0-based, as timm
        compiling_before = self.compile_clock.seconds
        loss_sum = torch.zeros((), device=self.device)
        correct = torch.zeros((), device=self.device)
        first_bad_step = torch.full((), -1, dtype=torch.long, device=self.device)
        seen = 0
        self.console.hardware_warnings(
            self.device, self.amp_dtype, cpu_has_native_bf16(), self.size
        )  # once, if it trains
        if self.pace is not None:
            self.pace.epoch_start()
        bar = self.console.epoch_bar(self.steps_per_epoch, self.epoch + 1)
        augment_compiling = self.augment.compiled is not None and not self._augment_compiled  # a failure clears it
        self.console.notes(self.compile_cache.begin(bool(self._compile_modes) and not self.compiled_step.eval_proven))
        start = fetched = synced_time(self.device) if augment_compiling else time.perf_counter()
        for i, (x, y) in enumerate(self.train_loader):
            if i == 0 and augment_compiling:  # the first batch compiled the augmentation, or failed and fell back
                self._augment_compiled = True
                self.compile_clock.charge(synced_time(self.device) - fetched)
                self.console.notes(*self.augment.notes())
            x, targets = self.mixup(x, y)
            loss, step_correct = self.train_step(x, targets)
            first_bad_step = torch.where((first_bad_step < 0) & ~torch.isfinite(loss), self.step, first_bad_step)
            seen += len(y)
            loss_sum += loss * len(y)
            correct += step_correct
            paced = self.pace.step_end(self.compile_clock.seconds) if self.pace is not None else None
            if paced is not None:  # the first steps are timed: the thread count kept, the time estimated
                self.console.notes(paced[1])
                self.console.cpu_estimate(paced[0], self.steps_per_epoch, self.cfg.epochs - self.epoch)
            if bar is not None:
                bar.update(i, loss_sum, correct, seen)
        weights_finite = torch.stack([torch.isfinite(n) for n in torch._foreach_norm(self.compiled_step.params)]).all()
        train_loss, train_acc, bad, finite = (
            v.item() for v in (loss_sum / seen, correct / seen, first_bad_step, weights_finite)
        )
        compiling = self.compile_clock.since(compiling_before)
        seconds = time.perf_counter() - start - compiling
        if bar is not None:
            bar.close()
        if bad >= 0 or not math.isfinite(train_loss) or not finite:
            self._diverged(bad, train_loss)
        return {
            history.LR: float(self.lr),
            history.TRAIN_LOSS: train_loss,
            history.TRAIN_ACC: train_acc,
            "train_seconds": seconds,
            "compile_seconds": compiling,
            "images_per_second": seen / seconds,
        }

    def _diverged(self, bad_step: int, loss: float) -> None:
        error = DivergenceError.at(self.epoch + 1, self.steps_per_epoch, bad_step, loss, self.paths.latest)
        self.files.log(f"DIVERGED: {error}")
        raise error

    def evaluate(self) -> dict:
        """Test loss and accuracy (and of the EMA weights), and accuracy on unaugmented training images.

        If the first evaluation with compiled models fails (an Inductor or CUDA-graph failure in the
        eval graph), evaluation goes on with the models run eagerly, said once; training keeps its
        compiled step."""
        step = self.compiled_step
        if step.eval_proven:
            return self._evaluate()
        try:
            scored = self._evaluate()
        except Exception as e:  # the first compiled evaluation: a compile failure must not stop the run
            self.console.say("note: " + step.eval_failed(e))
            return self._evaluate()
        step.eval_succeeded()
        return scored

    def _evaluate(self) -> dict:
        model, ema = self.compiled_step.eval_models()
        bar = self.console.eval_bar(self.evaluator.batches(with_ema=ema is not None))
        try:
            return self.evaluator.scores(model, ema, on_batch=bar.update if bar is not None else None)
        finally:
            if bar is not None:
                bar.close()

    def run_epoch(self, epoch: int) -> dict:
        """Train epoch ``epoch`` (must be the next one), evaluate, keep the best, record; returns the
        CSV row. If the previous epoch was interrupted, the last checkpoint is restored first. The stop
        button raises ``TrainingInterrupted``: a ``KeyboardInterrupt`` that Jupyter shows as a few lines."""
        try:
            self._check_next(epoch)
            self._interrupted = True  # until this epoch is recorded
            wall = time.perf_counter()
            with attention_backend(self.cfg.attention):
                stats = self.train_epoch()
                stats.update(self._timed_evaluation())
            self.epoch = epoch
            scores = [(stats[history.TEST_ACC], "raw")] + ([(stats[history.EMA_TEST_ACC], "ema")] if self.ema else [])
            improved = self.files.consider(epoch, scores)  # the better of raw and EMA, if it beats the best
            row = self._record(stats, improved)
            self.compile_cache.end()  # this epoch's compiles finished: the cache holds whole kernels
            self.console.epoch_seconds.append(time.perf_counter() - wall - stats["compile_seconds"])
            self.console.epoch_line(self.epoch, self.cfg.epochs, stats, self.best.acc, self.best.epoch)
            self.console.epoch_done(self.device, stats, self.cfg.epochs - self.epoch, self.paths.csv)
        except TrainingInterrupted:
            raise
        except KeyboardInterrupt:
            trained = self.step % self.steps_per_epoch or (self.steps_per_epoch if self.epoch == epoch else 0)
            stop = TrainingInterrupted(epoch, trained, self.steps_per_epoch, self.paths.latest, self.files.checkpointed)
            self._stopped_in = epoch
            self.console.stop_bars()
            self.files.log(f"STOPPED: {stop.message}")  # the log tells the whole story
            raise stop from None
        self._interrupted = False
        return row

    def _check_next(self, epoch: int) -> None:
        if self._interrupted:
            self.resume()
        if not self.files.opened:
            raise RuntimeError("call resume() (or iterate remaining_epochs()) before run_epoch()")
        if epoch != self.epoch + 1:
            raise ValueError(f"epoch {epoch} is not the next one (completed: {self.epoch})")
        note = self.files.check_lock()  # refuses if a newer trainer took this run over
        self.console.notes(note)

    def _timed_evaluation(self) -> dict:
        """``evaluate()`` with its seconds; the first evaluation of compiled models is compile time."""
        compiling = not self.compiled_step.eval_proven
        start = time.perf_counter()
        stats = self.evaluate()
        seconds = time.perf_counter() - start
        if compiling:
            self.compile_clock.charge(seconds)
        return {**stats, "eval_seconds": 0.0 if compiling else seconds, "eval_compile_seconds": seconds * compiling}

    def _record(self, stats: dict, improved: bool) -> dict:
        if self.step != self.epoch * self.steps_per_epoch:  # never save a state that resume would refuse
            raise RuntimeError(f"internal error: step {self.step} after epoch {self.epoch}")
        stats["compile_seconds"] += stats.pop("eval_compile_seconds")
        start = time.perf_counter()
        self.files.wait_for_saves()  # the previous epoch's files are on disk (raises its error, if any)
        latest = snapshot(self.state_dict())
        stats["checkpoint_seconds"] = time.perf_counter() - start
        row = history.row(self.columns, self.epoch, stats, alphas(self.model), gains(self.model))
        note = self.files.record(row, latest, best=improved, final=self.epoch >= self.cfg.epochs)
        self.console.notes(note)
        return row

    def csv_columns(self) -> list[str]:
        """The CSV's columns for this config, in order."""
        clean, ema = self.evaluator.clean_train_loader is not None, self.ema is not None
        return history.columns(clean, ema, list(alphas(self.model)), list(gains(self.model)))

    def best_model(self) -> tuple[ViT, dict]:
        """A separate copy of the model with the best checkpoint's weights (the model being trained
        is left alone, so training can continue), and that checkpoint's epoch, accuracy and which
        weights they are (``source``: "raw" or "ema"). Callable between epochs: it waits for the last
        epoch's files, and builds the copy without drawing from the random numbers training goes on with."""
        self.files.wait_for_saves()  # the best copy of the epoch just trained is written in the background
        state = self.files.read_best()
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            model = build_model(self.cfg).to(self.device)  # its initial weights draw from the global generator
        model.load_state_dict(best_weights(state))
        best = best_summary(state)
        return model.eval(), {"epoch": best.epoch, "test_acc": best.acc, "source": best.source}

    @property
    def title(self) -> str:
        cfg = self.cfg
        return f"{cfg.name}: {NORM_NAMES[cfg.norm]} ViT (dim {cfg.dim}, depth {cfg.depth}, patch {cfg.patch_size})"

    # --- text log ------------------------------------------------------------------------------

    def _start_session(self, how: str, notes: list[str]) -> None:
        """The log's session line (the first time with the environment, model and config), then the notes."""
        env = utils.environment_report(self.device)
        self.files.start_session(
            how,
            [
                "environment: " + ", ".join(f"{k}={v}" for k, v in env.items()),
                f"model: {NORM_NAMES[self.cfg.norm]} ViT, {self.num_parameters:,} parameters, compile mode="
                f"{self.compile_mode}, amp={self.amp_dtype}, steps/epoch={self.steps_per_epoch}, "
                f"warmup steps={self.warmup_steps}",
                "config: " + json.dumps(self.cfg.to_dict()),
            ],
        )
        self.console.notes(*notes)
