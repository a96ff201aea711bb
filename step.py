"""One training step under autocast and ``torch.compile``, with the ladder of compile modes.

``CompiledStep`` owns what the step and evaluation call: the model compiled with CUDA graphs
(``mode="reduce-overhead"``), or plainly compiled, or run eagerly. The first steps of a compiled
mode are its proof: a failure there (Inductor, Triton, a CUDA-graph capture) moves to the next mode
and redoes the step, and the time they take is compile time, not training time. It reports through
return values (``StepResult``, ``EvalModels``): the caller decides what to say and where.
"""

from __future__ import annotations

import atexit
import hashlib
import os
import re
import shutil
import socket
import tempfile
import time
from pathlib import Path
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import nn

from runs.files import check_writable
from runs.lock import process_alive
from utils import first_line

SAFE_PATH = re.compile(r"[A-Za-z0-9_./+=@,:-]+")  # a path the compiler's command line takes as it is
PROOF_STEPS = 3  # steps a compiled mode must run (CUDA graphs record on the 2nd) before it is trusted


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy with probability targets (mixup + label smoothing), computed in float32."""
    return torch.sum(-targets * F.log_softmax(logits.float(), dim=-1), dim=-1).mean()


def synced_time(device: torch.device) -> float:
    """``time.perf_counter()`` once the device has finished its queued work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


AUTOTUNE_MIN_SMS = 68  # Inductor tunes matrix products only on cards with this many SMs (is_big_gpu)


def autotune_skipped(device: torch.device) -> str:
    """Why ``autotune`` cannot act on this CUDA card ("" where it can): Inductor's max-autotune tunes no
    matrix product on a card with fewer than ``AUTOTUNE_MIN_SMS`` SMs (a T4 has 40, an L4 58), so there it
    would only add compile time."""
    if device.type != "cuda":
        return ""
    props = torch.cuda.get_device_properties(device)
    if torch.version.hip or props.multi_processor_count >= AUTOTUNE_MIN_SMS:
        return ""
    return (
        f"autotune=True is off on {props.name}: its {props.multi_processor_count} SMs are fewer than the "
        f"{AUTOTUNE_MIN_SMS} Inductor needs to tune matrix products, so it would only add compile time"
    )


def attention_unavailable(name: str, device: torch.device) -> str:
    """Why the ``attention`` backend ``name`` has no kernel on ``device`` ("" when it has one, or when
    PyTorch chooses: "auto", "math"), with what to use instead."""
    if name in ("auto", "math"):
        return ""
    instead = "use attention='auto' (PyTorch picks the fastest kernel the device has) or 'math'"
    if device.type == "cpu":
        return (
            "" if name == "flash" else f"attention={name!r} has no CPU kernel (a CPU has 'flash' and 'math'): {instead}"
        )
    if device.type != "cuda":
        return ""
    major, minor = torch.cuda.get_device_capability(device)
    needs = {"flash": (8, 0), "cudnn": (8, 0), "efficient": (5, 0)}[name]
    if (major, minor) < needs:
        card = torch.cuda.get_device_name(device)
        return (
            f"attention={name!r} needs compute capability {needs[0]}.{needs[1]} or newer, and {card} has "
            f"{major}.{minor}: {instead}"
        )
    return ""


def compile_modes(
    use_compile: bool, device: torch.device, cuda_graphs: Optional[bool], autotune: bool = False
) -> list[str]:
    """The ``torch.compile`` modes to try in order: CUDA graphs first when compiling on CUDA (unless
    ``cuda_graphs`` is False), then plain compile; empty when not compiling (eager). ``autotune`` (CUDA,
    on a card large enough for it: ``autotune_skipped``) puts Inductor's autotuned mode first (with or
    without CUDA graphs, as they are chosen)."""
    graphs = use_compile and device.type == "cuda" and cuda_graphs is not False
    tuned = use_compile and device.type == "cuda" and autotune and not autotune_skipped(device)
    first = ["max-autotune" if graphs else "max-autotune-no-cudagraphs"] if tuned else []
    return first + (["reduce-overhead"] if graphs else []) + (["default"] if use_compile else [])


class CompileCache:
    """Inductor's kernel cache folder for this process (None: Inductor's own default), and its repair.

    A cache can be damaged (a kernel half-written by a killed process, a full disk, a flipped byte). A
    damaged kernel either raises when it is loaded, or crashes the process outright (a corrupt shared
    library). So: a compile that fails while the cache is in use moves the folder aside once, clears the
    in-memory caches and tries again from scratch (``repair``); and while this process compiles, a marker
    file names it (``begin``/``end``), so that the next process finding the marker of a dead process (it
    crashed, or was killed, while compiling) moves the cache aside before compiling anything."""

    def __init__(self, path: Optional[Path], note: str = ""):
        self.path = path
        self.note = note  # what to say once: where the cache is, or that it was moved aside
        self.repaired = False
        self._marker: Optional[Path] = None

    def _move_aside(self) -> Path:
        self.repaired = True
        aside = self.path.with_name(f"{self.path.name}.{time.strftime('%Y%m%d-%H%M%S')}.damaged")
        self.path.rename(aside)
        return aside

    def repair(self, error: BaseException) -> str:
        """Move the cache aside after ``error`` (once per process); returns what to say ("" when nothing
        was done: no cache of ours, or repaired already, so the caller falls back instead)."""
        if self.path is None or self.repaired or not self.path.exists():
            return ""
        aside = self._move_aside()
        from torch._inductor.utils import clear_inductor_caches

        clear_inductor_caches()
        torch._dynamo.reset()
        return (
            f"compiling failed ({first_line(error)}) with the kernel cache {self.path}, which may be damaged: it was "
            f"moved to {aside} (delete it when you like) and compiling starts afresh"
        )

    def check_for_crashes(self) -> str:
        """Before any compile: move the cache aside if a process of this host died while compiling with it."""
        if self.path is None or not self.path.is_dir():
            return ""
        for marker in self.path.glob(".compiling-*"):
            host, _, pid = marker.name[len(".compiling-") :].rpartition("-")
            if host == socket.gethostname() and pid.isdigit() and not process_alive(int(pid)):
                aside = self._move_aside()
                return (
                    f"process {pid} stopped while compiling with the kernel cache {self.path} (a crash, or it was "
                    f"killed), so its kernels may be damaged: the cache was moved to {aside}; compiling starts afresh"
                )
        return ""

    def begin(self, compiling: bool = True) -> str:
        """This process starts compiling with the cache (``compiling``: its first epoch of a compiled run).
        Returns what to say ("" normally): a cache that can no longer be written (made read-only, or
        replaced by a file, since the run started) leaves the run compiling without the crash marker."""
        if compiling and self.path is not None and self._marker is None:
            marker = self.path / f".compiling-{socket.gethostname()}-{os.getpid()}"
            try:
                self.path.mkdir(parents=True, exist_ok=True)
                marker.touch()
            except OSError as e:
                return (
                    f"the kernel cache {self.path} cannot be written now ({first_line(e)}): compiling goes on, "
                    f"and whatever Inductor cannot store there it compiles again next time"
                )
            self._marker = marker
            atexit.register(self.end)
        return ""

    def end(self) -> None:
        """This process's compiles are done (its first epoch is recorded), or it exits cleanly."""
        if self._marker is not None:
            self._marker.unlink(missing_ok=True)
            self._marker = None


_compiled_variant: Optional[str] = None  # what this process last compiled (compile_variant), if anything


def compile_variant(attention: str, modes: list[str]) -> str:
    """What changes the code torch.compile generates, as a folder name: the torch version, the attention
    backend, the compile modes (autotune and CUDA graphs among them) and Inductor's combo kernels. Each
    variant keeps its own kernel cache, and a process that compiled one variant resets Dynamo before
    compiling another: otherwise a second model compiles nothing and runs the first one's graph
    (measured: attention="math" after "flash" ran the flash kernel)."""
    import torch._inductor.config as inductor

    parts = [
        f"torch-{torch.__version__}",
        f"attention-{attention}",
        "+".join(modes),
        f"combo-{int(inductor.combo_kernels)}",
    ]
    return re.sub(r"[^A-Za-z0-9_.+=-]", "_", "_".join(parts))


def configure_process(
    device: torch.device, compile_cache: Optional[Path], cpu_threads: int = 0, variant: str = ""
) -> CompileCache:
    """The process-wide settings a training run makes, all here. ``variant`` (``compile_variant``; ""
    for an eager run): with ``compile_cache`` the kernels are kept in its folder for that variant, so a
    second process of the same shapes starts in seconds; without, every cache is off and compiling starts
    from scratch. A process that compiled another variant before is reset first. On a CPU,
    ``cpu_threads`` torch threads (0: left as they are); on CUDA, TF32 for the few float32 matmuls (the
    loss, the head under fp16). They affect every later compile and matmul of this process, not only
    this run's. The C++ compiler's command line breaks on a path with a space or a quote, so such a
    folder's cache lives in a folder of its own under the system's temp folder (``CompileCache.note``
    says so)."""
    global _compiled_variant
    cache = CompileCache(None)
    if variant and compile_cache is not None:
        path = (Path(compile_cache) / variant).resolve()
        if not SAFE_PATH.fullmatch(str(path)):
            safe = Path(tempfile.gettempdir()) / "dyt_cifar10_compile_cache" / hashlib.sha1(bytes(path)).hexdigest()
            cache.note = (
                f"the compile cache is kept in {safe}, not {path}: the C++ compiler torch.compile runs cannot take "
                f"a path with spaces or quotes"
            )
            path = safe
        cache.path = path
        unusable = ""
        try:
            check_writable(path)
            cache.note = "; ".join(n for n in (cache.note, cache.check_for_crashes()) if n)
        except PermissionError as e:  # not a folder this process can write in
            unusable = first_line(e.__cause__ or e)
        except OSError as e:  # moving a crashed process's cache aside failed
            unusable = first_line(e)
        if unusable:
            cache = CompileCache(
                None,
                f"the compile cache {path} cannot be used ({unusable}): this run compiles into a fresh folder "
                f"of its own, removed at exit (set compile_cache=False to say so, or make the folder writable)",
            )
            compile_cache = None
    if variant:
        import torch._inductor.config as inductor

        if _compiled_variant is not None and (variant != _compiled_variant or compile_cache is None):
            torch._dynamo.reset()  # another variant's (or a cached) graph must not be reused
        _compiled_variant = variant
        inductor.force_disable_caches = compile_cache is None
        if compile_cache is None:  # kernels are still written somewhere: a folder no other run reads, gone at exit
            fresh = tempfile.mkdtemp(prefix="dyt_cifar10_fresh_compile_")
            atexit.register(shutil.rmtree, fresh, ignore_errors=True)
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = fresh
        else:
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(cache.path)
    if device.type == "cpu" and cpu_threads:
        torch.set_num_threads(cpu_threads)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return cache


def compile_notes(cfg, modes: list[str], device: torch.device) -> list[str]:
    """What to say when a compile setting of ``cfg`` cannot act with these ``modes`` on ``device``."""
    notes = []
    skipped = autotune_skipped(device) if cfg.autotune and modes else ""
    if skipped:
        notes.append(skipped)
    elif cfg.autotune and not any(m.startswith("max-autotune") for m in modes):
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
        cache: the kernel cache, repaired once (and the mode tried again) when a compile fails.
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
        cache: Optional[CompileCache] = None,
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
        self.cache = cache
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
            repaired = self.cache.repair(e) if self.cache is not None else ""
            if repaired:  # the same mode again, from a fresh cache
                self._use(self.modes)
                note = repaired
            else:
                failed = self.mode
                self._use(self.modes[1:])
                note = f"torch.compile(mode={failed!r}) failed ({first_line(e)}); continuing with " + (
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
        return f"the compiled evaluation failed ({first_line(error)}); evaluating with the models run eagerly"


def _join(*notes: str) -> str:
    return "; ".join(n for n in notes if n)


TRIAL_STEPS = 3  # steps timed at each candidate thread count on a CPU (after one untimed step)
LOSING = 3.0  # a trial count whose step takes this many times the best count's is dropped after that step


class CpuPace:
    """On a CPU: the first training steps' times, for the thread count and the time estimate.

    With ``choose`` and more than one torch thread, the first steps run at each candidate count (one,
    half of torch's threads, all of them), ``TRIAL_STEPS`` timed at each after an untimed one, and the
    fastest count is kept for the rest of the run: on a busy machine one thread was measured 6-9x faster
    than two, on an idle one two were faster. One thread goes first, as it is never far off; a later
    count whose step takes ``LOSING`` times the best so far is dropped after that step, so a loaded
    machine spends one slow step on it, not four. Thread counts change float sums, so a run whose count
    was chosen by timing is repeatable only with the same choice: a resumed run keeps its count (``keep``)."""

    def __init__(self, choose: bool):
        n = torch.get_num_threads()
        self.candidates = list(dict.fromkeys([1, max(1, n // 2), n])) if choose and n > 1 else [n]
        self.times: dict[int, list[float]] = {c: [] for c in self.candidates}
        self.dropped: dict[int, float] = {}  # counts stopped early: the step time that lost
        self.index = 0
        self.last: Optional[tuple[float, float]] = None  # (time, compile seconds) at the end of the last step
        self.untimed = True  # the next measured step is the first at its count
        self.done = False

    @property
    def chosen(self) -> int:
        """The thread count kept once the trial is over (0 before)."""
        return self.candidates[self.index] if self.done else 0

    def restart(self) -> None:
        """A fresh start of the run (after a stop during the trial): the trial again from its first count."""
        if not self.done:
            self.times, self.dropped = {c: [] for c in self.candidates}, {}
            self.index, self.last, self.untimed = 0, None, True
            torch.set_num_threads(self.candidates[0])

    def keep(self, threads: int) -> None:
        """Train with ``threads`` threads (a resumed run's own count), without a trial."""
        torch.set_num_threads(threads)
        self.candidates, self.times, self.dropped = [threads], {threads: []}, {}
        self.index, self.last, self.untimed = 0, None, True

    def epoch_start(self) -> None:
        self.last = None  # the step after an evaluation is not timed
        if not self.done and self.index == 0 and not self.times[self.candidates[0]]:
            torch.set_num_threads(self.candidates[0])  # the trial's first count

    def _medians(self) -> dict[int, float]:
        """The median step of each count timed in full so far (dropped counts never are)."""
        return {c: sorted(t)[len(t) // 2] for c, t in self.times.items() if len(t) >= TRIAL_STEPS}

    def step_end(self, compile_seconds: float) -> Optional[tuple[float, str]]:
        """Called after each training step (``compile_seconds``: the compile clock's total, left out of
        the times). Once the trial is over: (seconds a step at the kept count, a note on the choice or "")."""
        if self.done:
            return None
        now, current = time.perf_counter(), self.candidates[self.index]
        seconds = None if self.last is None else now - self.last[0] - (compile_seconds - self.last[1])
        self.last = (now, compile_seconds)
        if seconds is None:  # its start is unknown: this step is the count's untimed one
            self.untimed = False
            return None
        best = min(self._medians().values(), default=None)
        if best is not None and seconds > LOSING * best:  # losing already: no more steps at this count
            self.dropped[current] = seconds
        elif self.untimed:
            self.untimed = False
            return None
        else:
            self.times[current].append(seconds)
            if len(self.times[current]) < TRIAL_STEPS:
                return None
        if self.index + 1 < len(self.candidates):
            self.index += 1
            torch.set_num_threads(self.candidates[self.index])
            self.untimed = True  # the first step at a new count is not timed
            return None
        medians = self._medians()
        self.index = self.candidates.index(min(medians, key=medians.get))
        self.done = True
        torch.set_num_threads(self.chosen)
        if len(self.candidates) == 1:
            return medians[self.chosen], ""

        def said(c: int) -> str:
            threads = f"{c} thread{'s' * (c > 1)}"
            return (
                f"{threads} >{self.dropped[c]:.2f}s (dropped after one step)"
                if c in self.dropped
                else (f"{threads} {medians[c]:.2f}s")
            )

        return medians[self.chosen], (
            f"CPU threads: {self.chosen}, the fastest a step of {', '.join(map(said, self.candidates))} (timed on "
            f"the first steps); cpu_threads=N in overrides sets the count"
        )
