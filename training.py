"""Training: builders (model, data, augmentation, optimizer), the schedule and loss, and the ``Trainer``.

The notebook drives it as a short loop::

    trainer = Trainer(cfg, data)
    trainer.resume()
    for epoch in trainer.remaining_epochs():
        trainer.run_epoch(epoch)

Everything a resumed run needs is in ``checkpoint/<run>_latest.pth`` (run_files.py): model, EMA,
optimizer, scaler, step, epoch, best accuracy, config and every RNG state the run uses. The
learning rate is a pure function of the global step, so nothing else is needed to continue exactly.
An epoch that raised (a Jupyter interrupt, divergence, a full disk) is never continued from memory:
the next ``resume``/``remaining_epochs``/``run_epoch`` restores the last checkpoint first.
"""

from __future__ import annotations

import copy
import json
import math
import time
from pathlib import Path
from typing import Iterator, Optional

import torch
import torch.nn.functional as F
from torch import nn

import utils
from config import NORM_NAMES, Config, norm_layer
from data import CLASSES, CifarTensors, DeviceLoader, Mixup, TrainAugment, load_cifar10
from models import ViT, alphas, count_parameters
from randomaug import RandAugment
from run_files import (
    CHECKPOINT_FORMAT,
    CheckpointWriter,
    ConfigMismatchError,
    RunLock,
    append_csv,
    atomic_write,
    check_same_run,
    check_writable,
    load_checkpoint,
    set_aside,
    snapshot,
    temp_files,
    truncate_csv,
)

MAX_WARMUP_FRACTION = 0.1  # warmup never takes more than this share of the run (short runs still learn)
PROGRESS_EVERY = 50  # steps between progress-bar updates: the only host syncs inside an epoch
CPU_ESTIMATE_STEPS = 3  # steps timed on a CPU before the time per epoch is estimated
RESEED_STRIDE = 1_000_003  # loader seed after a device-type change: seed * stride + epoch
EMA_WARMUP = 10  # EMA decay ramps as (1 + n) / (EMA_WARMUP + n) over the first updates
COMPILE_PROOF_STEPS = 3  # steps a compiled model must run (CUDA graphs record on the 2nd) before it is trusted


class DivergenceError(RuntimeError):
    """The loss or the weights became NaN or infinite; nothing of that epoch was saved."""


def build_model(cfg: Config) -> ViT:
    return ViT(
        img_size=32,
        patch_size=cfg.patch_size,
        num_classes=len(CLASSES),
        dim=cfg.dim,
        depth=cfg.depth,
        heads=cfg.heads,
        mlp_ratio=cfg.mlp_ratio,
        norm_layer=norm_layer(cfg),
        drop_path=cfg.drop_path,
        dropout=cfg.dropout,
        pool=cfg.pool,
        attn_init=cfg.attn_init,
    )


def build_augment(cfg: Config, compile: bool = False) -> TrainAugment:
    randaug = (
        RandAugment(cfg.randaug_ops, cfg.randaug_magnitude, cfg.randaug_magnitude_std, prob=cfg.randaug_prob)
        if cfg.randaugment and cfg.randaug_ops > 0
        else None
    )
    return TrainAugment(cfg.crop_padding, cfg.hflip, randaug, compile=compile)


def load_data(cfg: Config) -> CifarTensors:
    """CIFAR-10 on the config's device, downloading it into ``data_dir`` if allowed and needed."""
    device = utils.resolve_device(cfg.device)
    return load_cifar10(
        cfg.data_dir, device, download=cfg.download, train_subset=cfg.train_subset, test_subset=cfg.test_subset
    )


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on weight matrices (ndim >= 2) only; not on biases, norms/DyT parameters,
    the positional embedding or the cls token."""
    skip = model.no_weight_decay() if hasattr(model, "no_weight_decay") else set()
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.ndim >= 2 and name not in skip else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, cfg: Config, device: torch.device) -> torch.optim.AdamW:
    kwargs = {"fused": True} if device.type == "cuda" else {}
    return torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.999), **kwargs)


def warmup_steps(cfg: Config, steps_per_epoch: int) -> int:
    """``warmup_epochs`` in steps, capped at ``MAX_WARMUP_FRACTION`` of the run (a 3-epoch trial
    would otherwise never leave a 10-epoch warmup)."""
    total = cfg.epochs * steps_per_epoch
    return min(round(cfg.warmup_epochs * steps_per_epoch), round(MAX_WARMUP_FRACTION * total))


def lr_at(step: int, total_steps: int, warmup_steps: int, peak: float, floor: float) -> float:
    """Linear warmup to ``peak`` over ``warmup_steps``, then cosine to ``floor`` at ``total_steps``.

    A pure function of the global step: resuming needs only the step. Changing ``epochs`` changes
    ``total_steps``, which re-draws the cosine over the new length: raised before the run ends, it
    continues as if planned that long; raised after, the learning rate goes back up to the longer
    schedule's value at that step (a warm restart); lowered, the rest of the cosine is compressed."""
    if step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    progress = min((step - warmup_steps) / max(total_steps - warmup_steps, 1), 1.0)
    return floor + (peak - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy with probability targets (mixup + label smoothing), computed in float32."""
    return torch.sum(-targets * F.log_softmax(logits.float(), dim=-1), dim=-1).mean()


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 matrix products natively (AVX512-BF16 or AMX)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def amp_dtype(cfg: Config, device: torch.device) -> Optional[torch.dtype]:
    """The autocast dtype. ``"auto"``: bf16 on CUDA where supported, else fp16 (with a GradScaler);
    float32 elsewhere, since autocast on a CPU is slower than float32 unless it has native bf16."""
    if cfg.amp == "off" or (cfg.amp == "auto" and device.type != "cuda"):
        return None
    if cfg.amp == "fp16" or (cfg.amp == "auto" and not torch.cuda.is_bf16_supported()):
        return torch.float16
    return torch.bfloat16


class StepForward(nn.Module):
    """What a training step computes before its backward pass, as one module: the model under
    autocast, the float32 loss and the number of correct predictions (against the soft targets'
    largest class). Compiling this module rather than the model alone puts the loss and the metric
    inside the compiled region (and inside its CUDA graphs), instead of ~20 separate kernel
    launches per step around it. Run eagerly, it computes exactly what the three did apart."""

    def __init__(self, model: nn.Module, device_type: str, amp_dtype: Optional[torch.dtype]):
        super().__init__()
        self.model = model
        self.device_type = device_type
        self.amp_dtype = amp_dtype

    def forward(self, x: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.autocast(self.device_type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
            logits = self.model(x)
        loss = soft_cross_entropy(logits, targets)
        correct = (logits.argmax(-1) == targets.argmax(-1)).sum()
        return loss, correct


class EMA:
    """An exponential moving average of a model's weights, updated on the device after every step.

    The decay ramps up as ``min(decay, (1 + n) / (EMA_WARMUP + n))`` after ``n`` updates, so the
    average is not dominated by the random initial weights."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.module = copy.deepcopy(model).eval().requires_grad_(False)
        self._ema = list(self.module.parameters())
        self._live = list(model.parameters())

    @torch.no_grad()
    def update(self, updates: int) -> None:
        decay = min(self.decay, (1 + updates) / (EMA_WARMUP + updates))
        torch._foreach_lerp_(self._ema, self._live, 1.0 - decay)


class Trainer:
    """Owns the model, optimizer, loaders and run state of one config on one dataset.

    Args:
        cfg: the run's config.
        data: CIFAR-10 on the training device (``load_data``).
        show_progress: progress bars (Jupyter widgets, or text in a terminal).
        print_epochs: one line per epoch on screen (the log file gets it either way).
    """

    def __init__(self, cfg: Config, data: CifarTensors, show_progress: bool = True, print_epochs: bool = True):
        self.cfg = cfg
        self.data = data
        self.device = data.x_train.device
        self.show_progress = show_progress
        self.print_epochs = print_epochs
        self.use_compile = cfg.compile if cfg.compile is not None else self.device.type == "cuda"
        graphs = self.use_compile and self.device.type == "cuda" and cfg.cuda_graphs is not False
        # torch.compile modes to try in order; a mode whose first steps fail gives way to the next.
        self.compile_modes = (["reduce-overhead"] if graphs else []) + (["default"] if self.use_compile else [])
        self.compile_seconds = 0.0  # spent compiling (and recording CUDA graphs) in this session
        if self.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True  # the few float32 matmuls (loss, head under fp16)
            torch.backends.cudnn.allow_tf32 = True
        self.amp_dtype = amp_dtype(cfg, self.device)
        self.steps_per_epoch = len(data.x_train) // cfg.batch_size
        self.total_steps = cfg.epochs * self.steps_per_epoch
        self.warmup_steps = warmup_steps(cfg, self.steps_per_epoch)
        self.paths = {
            "latest": Path(cfg.checkpoint_dir) / f"{cfg.name}_latest.pth",
            "best": Path(cfg.checkpoint_dir) / f"{cfg.name}_best.pth",
            "lock": Path(cfg.checkpoint_dir) / f"{cfg.name}.lock",
            "csv": Path(cfg.log_dir) / f"{cfg.name}.csv",
            "log": Path(cfg.log_dir) / f"{cfg.name}.log",
            "config": Path(cfg.log_dir) / f"{cfg.name}_config.json",
            "plot": Path(cfg.plot_dir) / f"{cfg.name}_training.png",
        }
        self.lock = RunLock(self.paths["lock"])
        self.writer = CheckpointWriter()
        self._build_state()
        self._resumed = False  # resume() has looked for this run's checkpoint (the lock is held)
        self._interrupted = False  # an epoch started and did not finish: memory is not a checkpoint
        self._epoch_wall_seconds: list[float] = []  # epochs trained by this trainer, for "time left"
        self._cpu_estimate_due = self.device.type == "cpu"
        if self.device.type == "cpu":
            self._say(
                f"WARNING: training on the CPU ({torch.get_num_threads()} threads), not a GPU. The time per "
                f"epoch is estimated after the first {CPU_ESTIMATE_STEPS} steps. The default model needs days "
                f"here; the README's 'On a CPU' settings finish in minutes."
            )
        if self.device.type == "cpu" and self.amp_dtype == torch.bfloat16 and not cpu_has_native_bf16():
            self._say(
                "WARNING: amp='bf16' on a CPU without native bf16 makes matrix products several times slower "
                "than float32; amp='auto' or 'off' uses float32."
            )

    def _build_state(self) -> None:
        """Model, optimizer, EMA, loaders and counters as a fresh run starts them (seeded)."""
        cfg = self.cfg
        torch.manual_seed(cfg.seed)
        self.model = build_model(cfg).to(self.device)
        self._use_compile_mode(self.compile_modes[0] if self.compile_modes else None)
        self.ema = EMA(self.model, cfg.ema_decay) if cfg.ema_decay > 0 else None
        self.compiled_ema = (
            torch.compile(self.ema.module, dynamic=False) if self.ema is not None and self.use_compile else None
        )
        self.optimizer = build_optimizer(self.model, cfg, self.device)
        self._params = [p for g in self.optimizer.param_groups for p in g["params"]]
        # The learning rate lives on the device; each step fills it from lr_at() with a kernel (no copy,
        # no sync), so a compiled or captured optimizer step reads it instead of baking in a constant.
        # float64 on the CPU gives bit-identical steps to a Python-float lr (tests/test_training.py).
        self.lr = torch.full((), cfg.lr, dtype=torch.float64 if self.device.type == "cpu" else torch.float32)
        self.lr = self.lr.to(self.device)
        for g in self.optimizer.param_groups:
            g["lr"] = self.lr
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)
        self.augment = build_augment(cfg, compile=self.use_compile)
        self._augment_compiled = False
        d = self.data
        self.train_loader = DeviceLoader(
            d.x_train, d.y_train, cfg.batch_size, shuffle=True, augment=self.augment, seed=cfg.seed
        )
        self.test_loader = DeviceLoader(d.x_test, d.y_test, cfg.eval_batch_size, shuffle=False)
        n_clean = min(cfg.clean_train_images, len(d.x_train))
        self.clean_train_loader = (
            DeviceLoader(d.x_train[:n_clean], d.y_train[:n_clean], cfg.eval_batch_size, shuffle=False)
            if n_clean
            else None
        )
        self.mixup = Mixup(
            cfg.mixup_alpha,
            cfg.cutmix_alpha,
            label_smoothing=cfg.label_smoothing,
            num_classes=len(CLASSES),
            seed=cfg.seed,
        )
        self.epoch = 0  # completed epochs
        self.step = 0  # completed optimizer steps
        self.best_acc = 0.0
        self.best_epoch = 0
        self.best_weights = "raw"  # which weights scored best_acc: "raw" or "ema"

    # --- state -------------------------------------------------------------------------------

    @property
    def num_parameters(self) -> int:
        return count_parameters(self.model)

    def state_dict(self) -> dict:
        return {
            "format": CHECKPOINT_FORMAT,
            "config": self.cfg.to_dict(),
            "model": self.model.state_dict(),
            "ema": self.ema.module.state_dict() if self.ema is not None else {},
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "epoch": self.epoch,
            "step": self.step,
            "best_acc": self.best_acc,
            "best_epoch": self.best_epoch,
            "best_weights": self.best_weights,
            "rng": {
                "device_type": self.device.type,
                "torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
                "loader": self.train_loader.state_dict(),
                "mixup": self.mixup.state_dict(),
            },
            "torch_version": str(torch.__version__),
        }

    def load_state_dict(self, state: dict) -> str:
        """Restore a ``state_dict()``; returns a note when the random streams could not be restored
        exactly (a checkpoint from another device type: a GPU generator's state means nothing to a
        CPU one, so the loader is re-seeded from the seed and epoch instead)."""
        self.model.load_state_dict(state["model"])
        if self.ema is not None:
            self.ema.module.load_state_dict(state["ema"])
        self.optimizer.load_state_dict(state["optimizer"])
        for g in self.optimizer.param_groups:  # the saved lr is a copy: point every group at the live one
            g["lr"] = self.lr
        if self.scaler.is_enabled() and state["scaler"]:  # an amp change (bf16 <-> fp16) starts a fresh scaler
            self.scaler.load_state_dict(state["scaler"])
        self.epoch, self.step = int(state["epoch"]), int(state["step"])
        self.best_acc, self.best_epoch = float(state["best_acc"]), int(state["best_epoch"])
        self.best_weights = state.get("best_weights", "raw")
        rng = state["rng"]
        torch.set_rng_state(rng["torch"])
        self.mixup.load_state_dict(rng["mixup"])
        if rng["device_type"] != self.device.type:
            self.train_loader.generator.manual_seed(self.cfg.seed * RESEED_STRIDE + self.epoch)
            return (
                f"checkpoint written on {rng['device_type']}, resumed on {self.device.type}: "
                f"the loader's random stream is re-seeded, so batches differ from an uninterrupted run"
            )
        if rng["cuda"] and torch.cuda.is_available() and len(rng["cuda"]) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(rng["cuda"])
        self.train_loader.load_state_dict(rng["loader"])
        return ""

    def resume(self) -> Optional[int]:
        """Continue from ``<run>_latest.pth`` if it exists: returns its epoch, or None for a fresh start.

        The first call checks the output folders are writable, takes the run's lock and removes temp
        files that a killed save left. After an interrupted epoch it restores the last checkpoint
        (or the initial state). Refuses (``ConfigMismatchError``) a checkpoint of another config,
        naming the fields; an unreadable file raises ``CheckpointError``. CSV rows past the
        checkpoint's epoch (trained but not checkpointed before a crash) and damaged lines are dropped."""
        if self._resumed and not self._interrupted:
            return self.epoch or None
        notes = []
        if not self._resumed:
            for folder in dict.fromkeys((self.cfg.checkpoint_dir, self.cfg.log_dir, self.cfg.plot_dir)):
                check_writable(folder)
            self.lock.acquire()
            for what in ("latest", "best"):  # a trainer of this run built earlier in this process may be saving
                CheckpointWriter.wait_for(self.paths[what])
            stale = [t for p in self.paths.values() for t in temp_files(p)]
            for t in stale:
                t.unlink(missing_ok=True)
            if stale:
                notes.append(f"removed {len(stale)} temp file(s) of an interrupted save")
        if self._interrupted:
            self.writer.wait()
            self._build_state()
            notes.append("restored after an interrupted epoch (its in-memory state was discarded)")
            self._interrupted = False
        path = self.paths["latest"]
        if not path.exists():
            for what in ("csv", "best"):  # an earlier run's files: kept under dated names, never overwritten
                if self.paths[what].exists() and (what != "csv" or self.paths["csv"].stat().st_size):
                    notes.append(f"earlier {what} moved to {set_aside(self.paths[what], 'orphaned')}")
            self._start_session(f"fresh start (no {path})", notes)
            return None
        state = load_checkpoint(path, "latest", self.paths["best"])
        check_same_run(state, self.cfg, path)
        if int(state["step"]) != int(state["epoch"]) * self.steps_per_epoch:
            raise ConfigMismatchError(
                f"{path} has {state['step']} steps for {state['epoch']} epochs, but this data "
                f"gives {self.steps_per_epoch} steps per epoch (different dataset size?)"
            )
        notes.append(self.load_state_dict(state))
        past, damaged = truncate_csv(self.paths["csv"], self.epoch)
        notes.append(f"dropped {past} CSV rows past it" if past else "")
        notes.append(f"dropped {damaged} damaged CSV line(s) (NUL bytes or a partial row)" if damaged else "")
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
        self._start_session(
            f"resumed from {path} at epoch {self.epoch}/{self.cfg.epochs} (best test acc "
            f"{100 * self.best_acc:.2f}% at epoch {self.best_epoch})",
            notes,
        )
        return self.epoch

    def remaining_epochs(self) -> Iterator[int]:
        """1-based numbers of the epochs still to train (resuming or restoring first when needed,
        so a trainer built anew can never overwrite a run's checkpoint from epoch 0)."""
        self.resume()
        return iter(range(self.epoch + 1, self.cfg.epochs + 1))

    def status(self) -> str:
        """One line on where the run stands."""
        cfg = self.cfg
        best = (
            f"best test accuracy {100 * self.best_acc:.2f}% at epoch {self.best_epoch}"
            + (" (EMA weights)" if self.best_weights == "ema" else "")
            if self.best_epoch
            else "no epoch trained yet"
        )
        if self.epoch > cfg.epochs:
            return (
                f"finished: {self.epoch} epochs trained, more than epochs = {cfg.epochs} (it was lowered after "
                f"training); {best}"
            )
        if self.epoch == cfg.epochs:
            return f"finished: {self.epoch} of {cfg.epochs} epochs trained; {best}"
        return f"stopped after {self.epoch} of {cfg.epochs} epochs; {best}"

    # --- one epoch -----------------------------------------------------------------------------

    def _use_compile_mode(self, mode: Optional[str]) -> None:
        """Compile the model with ``mode`` (``None``: run it eagerly); set what the steps call."""
        self.compile_mode = mode
        step_forward = StepForward(self.model, self.device.type, self.amp_dtype)
        # Two compiled callables over the same modules: the training step's forward (model, loss,
        # metric) and the model alone for evaluation (its eval batch is a second shape).
        self.compiled_model = torch.compile(self.model, dynamic=False, mode=mode) if mode else None
        self.forward_model = self.model if self.compiled_model is None else self.compiled_model  # what eval calls
        self.step_forward = torch.compile(step_forward, dynamic=False, mode=mode) if mode else step_forward
        self._unproven_steps = COMPILE_PROOF_STEPS if mode else 0
        self._eval_compiled = False

    def _fall_back(self, error: Exception) -> None:
        """The compiled model failed in its first steps: use the next compile mode (CUDA graphs ->
        plain compile -> eager) and say so once."""
        modes = self.compile_modes
        following = modes[modes.index(self.compile_mode) + 1 :] if self.compile_mode in modes else []
        fallback = following[0] if following else None
        self._say(
            f"note: torch.compile(mode={self.compile_mode!r}) failed ({type(error).__name__}: "
            f"{str(error).splitlines()[0] if str(error) else ''}); continuing with "
            + (f"mode={fallback!r}" if fallback else "the model run eagerly")
        )
        self._use_compile_mode(fallback)

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None)

    def _set_lr(self, lr: float) -> None:
        self.lr.fill_(lr)

    def train_step(self, x: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One optimizer step on a prepared batch (soft targets); returns the loss and the number of
        correct predictions, as device tensors (unsynced).

        The first steps of a compiled model are timed as compile time (with a sync each), and a
        failure there falls back to the next compile mode and redoes the step."""
        self._set_lr(lr_at(self.step, self.total_steps, self.warmup_steps, self.cfg.lr, self.cfg.min_lr))
        if not self._unproven_steps:
            return self._step(x, targets)
        start = self._synced_time()
        self._optimizer_stepped = False
        try:
            out = self._step(x, targets)
        except Exception as e:  # an Inductor, Triton or CUDA-graph failure must not stop the run
            if self._optimizer_stepped:  # not a compile failure: the step itself went wrong
                raise
            self.compile_seconds += self._synced_time() - start
            self._fall_back(e)
            return self.train_step(x, targets)
        self._unproven_steps -= 1
        self.compile_seconds += self._synced_time() - start
        return out

    def _augment_compiling(self) -> bool:
        return self.augment.compiled is not None and not self._augment_compiled

    def _synced_time(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def _step(self, x: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.optimizer.zero_grad(set_to_none=True)
        if self.compile_mode == "reduce-overhead":
            torch.compiler.cudagraph_mark_step_begin()  # the previous step's graph outputs are done with
        loss, correct = self.step_forward(x, targets)
        self.scaler.scale(loss).backward()
        if self.cfg.grad_clip > 0:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self._params, self.cfg.grad_clip, foreach=self.device.type == "cuda")
        self.scaler.step(self.optimizer)
        self._optimizer_stepped = True
        self.scaler.update()
        if self.ema is not None:
            self.ema.update(self.step)
        self.step += 1
        return loss, correct

    def train_epoch(self) -> dict:
        """One pass over the training set; metrics stay on the device (no per-step sync). Raises
        ``DivergenceError`` if the loss or the weights are no longer finite."""
        self.model.train()
        compiling_before = self.compile_seconds
        loss_sum = torch.zeros((), device=self.device)
        correct = torch.zeros((), device=self.device)
        first_bad_step = torch.full((), -1, dtype=torch.long, device=self.device)
        seen = 0
        bar = (
            utils.progress_bar(self.steps_per_epoch, f"epoch {self.epoch + 1}", leave=False, unit="step")
            if self.show_progress
            else None
        )
        start = fetched = self._synced_time() if self._augment_compiling() else time.perf_counter()
        for i, (x, y) in enumerate(self.train_loader):
            if i == 0 and self._augment_compiling():  # the first batch compiles the augmentation
                self._augment_compiled = True
                self.compile_seconds += self._synced_time() - fetched
            x, targets = self.mixup(x, y)
            loss, step_correct = self.train_step(x, targets)
            loss = loss.detach()
            first_bad_step = torch.where((first_bad_step < 0) & ~torch.isfinite(loss), self.step, first_bad_step)
            seen += len(y)
            loss_sum += loss * len(y)
            correct += step_correct
            if self._cpu_estimate_due and i + 1 == min(CPU_ESTIMATE_STEPS, self.steps_per_epoch):
                self._cpu_estimate_due = False
                per_epoch = (time.perf_counter() - start) / (i + 1) * self.steps_per_epoch
                left = self.cfg.epochs - self.epoch
                self._say(
                    f"CPU estimate: about {utils.duration(per_epoch)} per epoch of training, "
                    f"{utils.duration(per_epoch * left)} for the {left} epoch(s) left (evaluation not included)."
                )
            if bar is not None:
                bar.update(1)
                if (i + 1) % PROGRESS_EVERY == 0 or i + 1 == self.steps_per_epoch:
                    rate = seen / (time.perf_counter() - start)
                    bar.set_postfix(
                        loss=f"{loss_sum.item() / seen:.3f}", acc=f"{correct.item() / seen:.3f}", img_s=f"{rate:,.0f}"
                    )
        weights_finite = torch.stack([torch.isfinite(n) for n in torch._foreach_norm(self._params)]).all()
        train_loss, train_acc, bad, finite = (
            v.item() for v in (loss_sum / seen, correct / seen, first_bad_step, weights_finite)
        )
        compiling = self.compile_seconds - compiling_before
        seconds = time.perf_counter() - start - compiling
        if bar is not None:
            bar.close()
        if bad >= 0 or not math.isfinite(train_loss) or not finite:
            self._diverged(bad, train_loss)
        return {
            "lr": float(self.lr),
            "train_loss": train_loss,
            "train_acc": train_acc,
            "train_seconds": seconds,
            "compile_seconds": compiling,
            "images_per_second": seen / seconds,
        }

    def _diverged(self, bad_step: int, loss: float) -> None:
        epoch = self.epoch + 1
        where = (
            f"first non-finite loss at step {bad_step} (epoch {(bad_step - 1) // self.steps_per_epoch + 1})"
            if bad_step >= 0
            else "the weights are no longer finite"
        )
        last = (
            f"The last good checkpoint is {self.paths['latest']} (epoch {self.epoch})"
            if self.paths["latest"].exists()
            else "No epoch had finished, so there is no checkpoint"
        )
        self._write_log(f"DIVERGED in epoch {epoch}: mean loss {loss}; {where}")
        raise DivergenceError(
            f"training diverged in epoch {epoch}: mean loss {loss}, {where}. Nothing of this epoch was saved. "
            f"{last}; running the training cell again restores it, but the same settings will diverge again. "
            f"To try again, start a new run (another run_name) with a lower lr, or grad_clip > 0."
        )

    @torch.no_grad()
    def predict(
        self, model: Optional[nn.Module] = None, loader: Optional[DeviceLoader] = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Logits (float32) and labels of ``loader`` (default: the test set) under ``model``
        (default: the model being trained), and the summed cross-entropy.

        Every forward pass has ``eval_batch_size`` rows (the last batch is zero-padded), so a
        compiled model sees one shape."""
        net = self.forward_model if model is None else model
        net.eval()
        outs, labels = [], []
        bs = self.cfg.eval_batch_size
        for x, y in loader or self.test_loader:
            n = len(x)
            if n < bs:
                x = torch.cat([x, x.new_zeros((bs - n,) + x.shape[1:])])
            with self._autocast():
                outs.append(net(x)[:n].float().clone())  # a CUDA graph's output is overwritten by its next replay
            labels.append(y)
        logits, labels = torch.cat(outs), torch.cat(labels)
        return logits, labels, F.cross_entropy(logits, labels, reduction="sum")

    def evaluate(self) -> dict:
        """Test loss and accuracy (and of the EMA weights), and accuracy on unaugmented training images.

        If the first evaluation with compiled models fails (an Inductor or CUDA-graph failure in the
        eval graph), evaluation goes on with the models run eagerly, said once; training keeps its
        compiled step."""
        compiled = self.forward_model is not self.model or self.compiled_ema is not None
        if not compiled or self._eval_compiled:
            return self._evaluate()
        try:
            return self._evaluate()
        except Exception as e:  # the first compiled evaluation: a compile failure must not stop the run
            self._say(
                f"note: the compiled evaluation failed ({type(e).__name__}: "
                f"{str(e).splitlines()[0] if str(e) else ''}); evaluating with the models run eagerly"
            )
            self.forward_model, self.compiled_ema = self.model, None
            return self._evaluate()

    def _evaluate(self) -> dict:
        scored = {}
        models = [("", self.forward_model)]
        if self.ema is not None:
            models.append(("ema_", self.ema.module if self.compiled_ema is None else self.compiled_ema))
        for prefix, model in models:
            logits, labels, loss_sum = self.predict(model)
            scored[f"{prefix}test_loss"] = loss_sum / len(labels)
            scored[f"{prefix}test_acc"] = (logits.argmax(-1) == labels).float().mean()
        if self.clean_train_loader is not None:
            logits, labels, _ = self.predict(loader=self.clean_train_loader)
            scored["train_clean_acc"] = (logits.argmax(-1) == labels).float().mean()
        values = torch.stack(list(scored.values())).tolist()  # one host sync
        return dict(zip(scored, values))

    def confusion_matrix(self, model: Optional[nn.Module] = None) -> torch.Tensor:
        """(10, 10) counts, true class per row, of ``model`` (default: the trained one) on the test set."""
        logits, labels, _ = self.predict(model)
        k = len(CLASSES)
        idx = labels * k + logits.argmax(-1)
        return torch.bincount(idx, minlength=k * k).reshape(k, k).cpu()

    def run_epoch(self, epoch: int) -> dict:
        """Train epoch ``epoch`` (must be the next one), evaluate, log, checkpoint; returns the CSV row.

        If the previous epoch was interrupted, the last checkpoint is restored first."""
        if self._interrupted:
            self.resume()
        if not self._resumed:
            raise RuntimeError("call resume() (or iterate remaining_epochs()) before run_epoch()")
        if epoch != self.epoch + 1:
            raise ValueError(f"epoch {epoch} is not the next one (completed: {self.epoch})")
        self.lock.heartbeat()  # refuses if a newer trainer took this run over
        self._interrupted = True  # until this epoch is logged and its checkpoint submitted
        wall = time.perf_counter()
        stats = self.train_epoch()
        start = time.perf_counter()
        stats.update(self.evaluate())
        if self.compiled_model is not None and not self._eval_compiled:  # the first evaluation compiles
            self._eval_compiled = True
            stats["compile_seconds"] += time.perf_counter() - start
            self.compile_seconds += time.perf_counter() - start
            stats["eval_seconds"] = 0.0
        else:
            stats["eval_seconds"] = time.perf_counter() - start
        self.epoch = epoch
        if self.step != epoch * self.steps_per_epoch:  # never save a state that resume would refuse
            raise RuntimeError(f"internal error: step {self.step} after epoch {epoch} of {self.steps_per_epoch} steps")
        candidates = [(stats["test_acc"], "raw")]
        if self.ema is not None:
            candidates.append((stats["ema_test_acc"], "ema"))
        acc, weights = max(candidates)
        improved = acc > self.best_acc
        if improved:
            self.best_acc, self.best_epoch, self.best_weights = acc, epoch, weights
        start = time.perf_counter()
        self.writer.wait()  # the previous epoch's files are on disk (raises its error, if any)
        latest = snapshot(self.state_dict())
        best = self._best_state(epoch) if improved else None
        stats["checkpoint_seconds"] = time.perf_counter() - start
        row = self._csv_row(epoch, stats)
        append_csv(self.paths["csv"], row)
        self._epoch_wall_seconds.append(time.perf_counter() - wall - stats["compile_seconds"])
        self._say(self._epoch_line(epoch, stats), echo=self.print_epochs)
        self.writer.submit(([(self.paths["best"], best)] if best else []) + [(self.paths["latest"], latest)])
        if epoch >= self.cfg.epochs:
            self.writer.wait()
        self._interrupted = False
        return row

    def _best_state(self, epoch: int) -> dict:
        source = self.ema.module if self.best_weights == "ema" else self.model
        return {
            "format": CHECKPOINT_FORMAT,
            "config": self.cfg.to_dict(),
            "model": snapshot(source.state_dict()),
            "weights": self.best_weights,
            "epoch": epoch,
            "test_acc": self.best_acc,
        }

    def _csv_row(self, epoch: int, stats: dict) -> dict:
        row = {"epoch": epoch, "lr": stats["lr"], "train_loss": stats["train_loss"], "train_acc": stats["train_acc"]}
        if self.clean_train_loader is not None:
            row["train_clean_acc"] = stats["train_clean_acc"]
        row.update(test_loss=stats["test_loss"], test_acc=stats["test_acc"])
        if self.ema is not None:
            row.update(ema_test_loss=stats["ema_test_loss"], ema_test_acc=stats["ema_test_acc"])
        for key in ("train_seconds", "eval_seconds", "checkpoint_seconds", "compile_seconds", "images_per_second"):
            row[key] = stats[key]
        row.update({f"alpha_{name}": v for name, v in alphas(self.model).items()})
        return row

    def _epoch_line(self, epoch: int, stats: dict) -> str:
        left = self.cfg.epochs - epoch
        recent = sorted(self._epoch_wall_seconds[-5:])[len(self._epoch_wall_seconds[-5:]) // 2]
        clean = f" clean {100 * stats['train_clean_acc']:.1f}%" if "train_clean_acc" in stats else ""
        ema = f" ema {100 * stats['ema_test_acc']:.2f}%" if "ema_test_acc" in stats else ""
        return (
            f"epoch {epoch:4d}/{self.cfg.epochs} lr {stats['lr']:.2e} | train loss {stats['train_loss']:.4f} "
            f"acc {100 * stats['train_acc']:.1f}%{clean} | test loss {stats['test_loss']:.4f} acc "
            f"{100 * stats['test_acc']:.2f}%{ema} (best {100 * self.best_acc:.2f}% @ {self.best_epoch}) | "
            f"{stats['train_seconds'] + stats['eval_seconds'] + stats['checkpoint_seconds']:.1f}s"
            + (f" (+{stats['compile_seconds']:.0f}s compiling)" if stats["compile_seconds"] >= 0.5 else "")
            + " | "
            f"left ~{utils.duration(recent * left)}"
        )

    def best_model(self) -> tuple[ViT, dict]:
        """A separate copy of the model with the best checkpoint's weights (the model being trained
        is left alone, so training can continue), and that checkpoint's epoch, accuracy and weights."""
        state = load_checkpoint(self.paths["best"], "best")
        check_same_run(state, self.cfg, self.paths["best"])
        model = build_model(self.cfg).to(self.device)
        model.load_state_dict(state["model"])
        info = {"epoch": state["epoch"], "test_acc": state["test_acc"], "weights": state.get("weights", "raw")}
        return model.eval(), info

    @property
    def title(self) -> str:
        cfg = self.cfg
        return f"{cfg.name}: {NORM_NAMES[cfg.norm]} ViT (dim {cfg.dim}, depth {cfg.depth}, patch {cfg.patch_size})"

    # --- text log ------------------------------------------------------------------------------

    def _write_log(self, line: str) -> None:
        if self._resumed:  # only the lock holder writes
            with open(self.paths["log"], "a") as f:
                f.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {line}\n")

    def _say(self, line: str, echo: bool = True) -> None:
        """Log ``line`` and print it (unless ``echo`` is off)."""
        self._write_log(line)
        if echo:
            (utils.tqdm.write if self.show_progress else print)(line)

    def _start_session(self, how: str, notes: list[str]) -> None:
        """Mark the run as resumed and write the session header (config JSON, environment, model)."""
        first = not self._resumed
        self._resumed = True
        notes = [n for n in notes if n]
        if not first:
            self._say(f"=== {how}" + "".join(f"; {n}" for n in notes))
            return
        atomic_write(
            self.paths["config"], lambda tmp: Path(tmp).write_text(json.dumps(self.cfg.to_dict(), indent=2) + "\n")
        )
        env = utils.environment_report(self.device)
        self._write_log(f"=== session: {how}")
        for note in notes:
            self._say(f"note: {note}")
        self._write_log("environment: " + ", ".join(f"{k}={v}" for k, v in env.items()))
        self._write_log(
            f"model: {NORM_NAMES[self.cfg.norm]} ViT, {self.num_parameters:,} parameters, compile mode="
            f"{self.compile_mode}, amp={self.amp_dtype}, steps/epoch={self.steps_per_epoch}, "
            f"warmup steps={self.warmup_steps}"
        )
        self._write_log("config: " + json.dumps(self.cfg.to_dict()))
