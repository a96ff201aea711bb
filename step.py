"""One training step under autocast and ``torch.compile``, with the ladder of compile modes.

``CompiledStep`` owns what the step and evaluation call: the model compiled with CUDA graphs
(``mode="reduce-overhead"``), or plainly compiled, or run eagerly. The first steps of a compiled
mode are its proof: a failure there (Inductor, Triton, a CUDA-graph capture) moves to the next mode
and redoes the step, and the time they take is compile time, not training time. It reports through
return values (``StepResult``, ``EvalModels``): the caller decides what to say and where.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import nn

PROOF_STEPS = 3  # steps a compiled mode must run (CUDA graphs record on the 2nd) before it is trusted


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy with probability targets (mixup + label smoothing), computed in float32."""
    return torch.sum(-targets * F.log_softmax(logits.float(), dim=-1), dim=-1).mean()


def synced_time(device: torch.device) -> float:
    """``time.perf_counter()`` once the device has finished its queued work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def compile_modes(
    use_compile: bool, device: torch.device, cuda_graphs: Optional[bool], autotune: bool = False
) -> list[str]:
    """The ``torch.compile`` modes to try in order: CUDA graphs first when compiling on CUDA (unless
    ``cuda_graphs`` is False), then plain compile; empty when not compiling (eager). ``autotune`` (CUDA)
    puts Inductor's autotuned mode first (with or without CUDA graphs, as they are chosen)."""
    graphs = use_compile and device.type == "cuda" and cuda_graphs is not False
    tuned = use_compile and device.type == "cuda" and autotune
    first = ["max-autotune" if graphs else "max-autotune-no-cudagraphs"] if tuned else []
    return first + (["reduce-overhead"] if graphs else []) + (["default"] if use_compile else [])


def configure_process(device: torch.device, compile_cache: Optional[Path]) -> None:
    """The process-wide settings a training run makes, all here: Inductor's kernel cache in
    ``compile_cache`` (None: left as it is), so a second process of the same shapes starts in seconds;
    and on CUDA, TF32 for the few float32 matmuls (the loss, the head under fp16). They affect every
    later compile and matmul of this process, not only this run's."""
    if compile_cache is not None:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(Path(compile_cache).resolve())
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def compile_notes(cfg, modes: list[str], device: torch.device) -> list[str]:
    """What to say when a compile setting of ``cfg`` cannot act with these ``modes`` on ``device``."""
    notes = []
    if cfg.autotune and not any(m.startswith("max-autotune") for m in modes):
        notes.append("autotune=True has no effect here: it needs torch.compile on a CUDA device")
    if cfg.cuda_graphs and "reduce-overhead" not in modes:
        notes.append(
            f"cuda_graphs=True has no effect here: CUDA graphs need torch.compile on a CUDA device, and "
            f"this run {'is compiled without them' if modes else 'runs eagerly'} on {device}"
        )
    return notes


class CompileClock:
    """The one account of the seconds a session spends compiling (and recording CUDA graphs), whatever
    compiled: the training step's proof steps, the augmentation's first batch, the first evaluation of
    compiled models. An epoch's training and evaluation seconds leave it out; the CSV's
    ``compile_seconds`` is its growth over the epoch."""

    def __init__(self):
        self.seconds = 0.0

    def charge(self, seconds: float) -> None:
        self.seconds += seconds

    def since(self, mark: float) -> float:
        """Seconds charged since ``seconds`` was ``mark``."""
        return self.seconds - mark


SDPA_BACKENDS = {
    "flash": "FLASH_ATTENTION",
    "cudnn": "CUDNN_ATTENTION",
    "efficient": "EFFICIENT_ATTENTION",
    "math": "MATH",
}


def attention_backend(name: str):
    """A context in which ``F.scaled_dot_product_attention`` uses only the backend ``name`` ("auto": any,
    as PyTorch chooses). Entered around training and evaluation, so compiled graphs trace with it."""
    import contextlib

    if name == "auto":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel(getattr(SDPBackend, SDPA_BACKENDS[name]))


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


class StepResult(NamedTuple):
    loss: torch.Tensor  # float32 scalar on the device (not synced)
    correct: torch.Tensor  # correct predictions in the batch, on the device
    compile_seconds: float  # spent compiling in this call (0 once the mode is proven)
    note: str  # what changed, e.g. a fallback to the next mode; "" normally


class EvalModels(NamedTuple):
    model: nn.Module  # what evaluation calls for the trained weights
    ema: Optional[nn.Module]  # what it calls for the EMA weights (None without EMA)


class CompiledStep:
    """Forward, backward, gradient clipping and the optimizer step, compiled with the first mode of
    ``modes`` that works.

    Args:
        model: the model being trained (its parameters are what ``optimizer`` steps).
        optimizer: the optimizer; its learning rate is set by the caller before each step.
        scaler: a ``GradScaler`` (enabled for fp16 only).
        grad_clip: maximum global gradient norm (0: off).
        amp_dtype: autocast dtype, or None for float32.
        modes: ``torch.compile`` modes to try in order (``compile_modes``); empty: eager.
        ema_module: the EMA copy of the model, compiled for evaluation alongside the model.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        scaler: torch.amp.GradScaler,
        grad_clip: float,
        amp_dtype: Optional[torch.dtype],
        modes: list[str],
        ema_module: Optional[nn.Module] = None,
    ):
        self.model = model
        self.optimizer = optimizer
        self.scaler = scaler
        self.grad_clip = grad_clip
        self.amp_dtype = amp_dtype
        self.device = next(model.parameters()).device
        self.params = [p for g in optimizer.param_groups for p in g["params"]]
        self.ema_module = ema_module
        self._optimizer_stepped = False
        self._use(list(modes))

    @property
    def mode(self) -> Optional[str]:
        """The compile mode in use (None: eager)."""
        return self.modes[0] if self.modes else None

    def _use(self, modes: list[str]) -> None:
        """Compile with ``modes[0]`` (eager when empty); the rest are the fallbacks."""
        self.modes = modes
        mode = self.mode
        forward = StepForward(self.model, self.device.type, self.amp_dtype)
        # Two compiled callables over the same modules: the step (model, loss, metric) and the model
        # alone for evaluation (its batch is a second shape).
        self._forward = torch.compile(forward, dynamic=False, mode=mode) if mode else forward
        self._eval = EvalModels(
            torch.compile(self.model, dynamic=False, mode=mode) if mode else self.model,
            self.ema_module if self.ema_module is None or not mode else torch.compile(self.ema_module, dynamic=False),
        )
        self._eval_proven = not mode
        self._unproven_steps = PROOF_STEPS if mode else 0

    def __call__(self, x: torch.Tensor, targets: torch.Tensor) -> StepResult:
        """One optimizer step on a prepared batch (soft targets). While the mode is unproven the
        step is timed as compile time (with a sync), and a failure before the optimizer stepped
        falls back to the next mode and redoes the step."""
        if not self._unproven_steps:
            return StepResult(*self._step(x, targets), 0.0, "")
        start = synced_time(self.device)
        self._optimizer_stepped = False
        try:
            loss, correct = self._step(x, targets)
        except Exception as e:  # an Inductor, Triton or CUDA-graph failure must not stop the run
            if self._optimizer_stepped:  # not a compile failure: the step itself went wrong
                raise
            failed = self.mode
            self._use(self.modes[1:])
            note = f"torch.compile(mode={failed!r}) failed ({_first_line(e)}); continuing with " + (
                f"mode={self.mode!r}" if self.mode else "the model run eagerly"
            )
            spent = synced_time(self.device) - start
            retry = self(x, targets)
            return StepResult(retry.loss, retry.correct, spent + retry.compile_seconds, _join(note, retry.note))
        self._unproven_steps -= 1
        return StepResult(loss, correct, synced_time(self.device) - start, "")

    def _step(self, x: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.optimizer.zero_grad(set_to_none=True)
        if self.mode in ("reduce-overhead", "max-autotune"):
            torch.compiler.cudagraph_mark_step_begin()  # the previous step's graph outputs are done with
        loss, correct = self._forward(x, targets)
        self.scaler.scale(loss).backward()
        if self.grad_clip > 0:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip, foreach=self.device.type == "cuda")
        self.scaler.step(self.optimizer)
        self._optimizer_stepped = True
        self.scaler.update()
        return loss.detach(), correct

    def eval_models(self) -> EvalModels:
        return self._eval

    @property
    def eval_proven(self) -> bool:
        """Whether an evaluation with ``eval_models()`` has completed (always, when eager)."""
        return self._eval_proven

    def eval_succeeded(self) -> None:
        self._eval_proven = True

    def eval_failed(self, error: Exception) -> str:
        """The first compiled evaluation failed: evaluation runs eagerly from now on (training keeps
        its compiled step). Returns what to say."""
        self._eval = EvalModels(self.model, self.ema_module)
        self._eval_proven = True
        return f"the compiled evaluation failed ({_first_line(error)}); evaluating with the models run eagerly"


def _first_line(error: Exception) -> str:
    text = str(error).splitlines()[0] if str(error) else ""
    return f"{type(error).__name__}: {text}"


def _join(*notes: str) -> str:
    return "; ".join(n for n in notes if n)
