"""The compiled step (step.py) tested directly: its device-tensor inputs, the ladder of compile modes
with its fallback, compile time kept apart, the loss inside the compiled region, and evaluation's own
fallback. The CUDA-graph path itself needs a GPU (bench/benchmark.py); what a CPU can compare is here."""

import os
from pathlib import Path

import pytest
import torch

import recipe
import step
from config import Config
from conftest import QUIET, rows, tiny, train_all, without_time
from runs.files import RunPaths
from step import CompiledStep, StepForward, compile_modes, soft_cross_entropy
from training import Trainer


class FakeClock:
    """``time`` for step.py: each reading is one second after the last."""

    def __init__(self):
        self.now = 0.0

    def perf_counter(self):
        self.now += 1.0
        return self.now


class Broken(torch.nn.Module):
    """What torch.compile returns when Inductor (or a graph capture) fails at the first call."""

    def forward(self, *args, **kwargs):
        raise RuntimeError("inductor exploded\nlong traceback")


def _parts(seed=0):
    torch.manual_seed(seed)
    model = recipe.build_model(Config(dim=16, depth=1, heads=2, drop_path=0.0))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    x = torch.randn(8, 3, 32, 32)
    targets = torch.softmax(torch.randn(8, 10), -1)
    return model, optimizer, scaler, x, targets


def _weights(model):
    return [p.detach().clone() for p in model.parameters()]


def test_compile_modes_try_graphs_first_only_when_compiling_on_cuda():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert compile_modes(False, cuda, True) == []
    assert compile_modes(True, cpu, True) == ["default"]
    assert compile_modes(True, cuda, None) == ["reduce-overhead", "default"]
    assert compile_modes(True, cuda, False) == ["default"]


def test_a_failing_mode_falls_back_says_so_and_the_step_equals_an_eager_one(monkeypatch):
    model, optimizer, scaler, x, targets = _parts()
    eager = CompiledStep(model, optimizer, scaler, 1.0, None, [])
    reference = eager(x, targets)
    expected = _weights(model)

    model, optimizer, scaler, x, targets = _parts()
    monkeypatch.setattr(torch, "compile", lambda module, **kw: Broken())
    compiled = CompiledStep(model, optimizer, scaler, 1.0, None, ["reduce-overhead", "default"])
    out = compiled(x, targets)
    assert out.note == (
        "torch.compile(mode='reduce-overhead') failed (RuntimeError: inductor exploded); continuing with "
        "mode='default'; torch.compile(mode='default') failed (RuntimeError: inductor exploded); continuing "
        "with the model run eagerly"
    )
    assert compiled.mode is None and compiled.modes == [] and compiled.eval_models().model is model
    assert torch.equal(out.loss, reference.loss) and out.correct == reference.correct
    assert all(torch.equal(a, b) for a, b in zip(expected, _weights(model)))
    assert compiled(x, targets).note == ""


def test_an_error_after_the_optimizer_stepped_is_raised_not_taken_for_a_compile_failure(monkeypatch):
    model, optimizer, scaler, x, targets = _parts()
    monkeypatch.setattr(torch, "compile", lambda module, **kw: module)
    compiled = CompiledStep(model, optimizer, scaler, 1.0, None, ["default"])

    def broken_update():
        raise RuntimeError("the scaler broke")

    monkeypatch.setattr(scaler, "update", broken_update)
    with pytest.raises(RuntimeError, match="the scaler broke"):
        compiled(x, targets)
    assert compiled.mode == "default"


def test_proof_steps_are_compile_time_and_later_steps_are_not(monkeypatch):
    model, optimizer, scaler, x, targets = _parts()
    monkeypatch.setattr(torch, "compile", lambda module, **kw: module)
    monkeypatch.setattr(step, "time", FakeClock())
    compiled = CompiledStep(model, optimizer, scaler, 1.0, None, ["default"])
    seconds = [compiled(x, targets).compile_seconds for _ in range(step.PROOF_STEPS + 2)]
    assert seconds == [1.0] * step.PROOF_STEPS + [0.0, 0.0]
    assert [CompiledStep(*_parts()[:3], 1.0, None, [])(x, targets).compile_seconds] == [0.0]  # eager: none


@pytest.mark.parametrize("amp", [None, torch.bfloat16])
def test_step_forward_equals_model_loss_and_metric_apart(amp):
    torch.manual_seed(0)
    model = recipe.build_model(Config(dim=32, depth=1, heads=2, drop_path=0.0))
    x = torch.randn(8, 3, 32, 32)
    targets = torch.softmax(torch.randn(8, 10), -1)
    loss, correct = StepForward(model, "cpu", amp)(x, targets)
    loss.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    with torch.autocast("cpu", dtype=amp, enabled=amp is not None):
        logits = model(x)
    apart = soft_cross_entropy(logits, targets)
    apart.backward()
    assert torch.equal(loss, apart) and loss.dtype == torch.float32
    assert correct.item() == (logits.argmax(-1) == targets.argmax(-1)).sum().item()
    assert all(torch.equal(g, p.grad) for g, p in zip(grads, model.parameters()))


def test_soft_cross_entropy_equals_hard_for_one_hot():
    logits = torch.randn(5, 10)
    y = torch.tensor([1, 2, 3, 4, 5])
    torch.testing.assert_close(
        soft_cross_entropy(logits, torch.nn.functional.one_hot(y, 10).float()),
        torch.nn.functional.cross_entropy(logits, y),
    )


@pytest.mark.slow
def test_compiled_step_forward_matches_eager():
    # Inductor on the CPU: the loss and the metric inside the compiled region give the eager values.
    torch.manual_seed(0)
    model = recipe.build_model(Config(dim=32, depth=1, heads=2, drop_path=0.0)).eval()
    x = torch.randn(8, 3, 32, 32)
    targets = torch.softmax(4 * torch.randn(8, 10), -1)
    eager = StepForward(model, "cpu", None)
    compiled = torch.compile(eager, dynamic=False)
    (loss, correct), (ref_loss, ref_correct) = compiled(x, targets), eager(x, targets)
    assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-5) and correct.item() == ref_correct.item()


# --- through the trainer -------------------------------------------------------------------------


def test_device_tensor_lr_and_lambda_give_the_same_run_as_floats(cifar, tmp_path, reference_runs):
    tensors = reference_runs.get("mixup")
    assert tensors.optimizer.param_groups[0]["lr"] is tensors.lr and isinstance(tensors.lr, torch.Tensor)

    floats = Trainer(tiny(tmp_path / "b", **reference_runs.MIXUP), cifar, **QUIET)
    mixup = floats.mixup

    def set_lr(lr):
        for g in floats.optimizer.param_groups:
            g["lr"] = lr

    def mix_with_floats(x, y):
        lam, box = mixup.draw(x.shape[-2], x.shape[-1])
        return mixup.mix(x, y, lam, box)

    floats._set_lr = set_lr
    floats.mixup = mix_with_floats
    floats.resume()
    for epoch in range(1, floats.cfg.epochs + 1):
        floats.train_epoch()
        floats.epoch = epoch
    a, b = tensors.model.state_dict(), floats.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_lr_tensor_survives_a_resume(cifar, tmp_path):
    t = Trainer(tiny(tmp_path, epochs=2), cifar, **QUIET)
    t.resume()
    t.run_epoch(1)
    again = Trainer(tiny(tmp_path, epochs=2), cifar, **QUIET)
    again.resume()
    assert all(g["lr"] is again.lr for g in again.optimizer.param_groups)
    row = again.run_epoch(2)
    assert row["lr"] == pytest.approx(recipe.lr_at(again.step - 1, again.total_steps, again.warmup_steps, 1e-3, 1e-5))


def test_a_failing_compile_is_said_once_and_the_run_equals_an_eager_one(
    cifar, tmp_path, monkeypatch, capsys, reference_runs
):
    eager = reference_runs.get("default")
    monkeypatch.setattr(torch, "compile", lambda module, **kw: Broken())
    t = Trainer(tiny(tmp_path, compile=True), cifar, progress="lines")
    assert t.compile_mode == "default"
    train_all(t)
    out = capsys.readouterr().out
    assert out.count("torch.compile(mode='default') failed (RuntimeError: inductor exploded)") == 1
    assert t.compile_mode is None
    reference_runs.assert_same_run(eager, t)


def _compile_with_broken_eval(broken_eval):
    """A torch.compile stand-in: the training step runs eagerly, the model compiled for evaluation is
    ``broken_eval(module)``."""

    def fake(module, **kwargs):
        step_or_augment = isinstance(module, StepForward) or not isinstance(module, torch.nn.Module)
        return module if step_or_augment else broken_eval(module)

    return fake


def test_a_failing_compiled_evaluation_goes_on_eagerly_and_training_stays_compiled(
    cifar, tmp_path, monkeypatch, capsys
):
    overrides = dict(epochs=2, ema_decay=0.9)
    eager = Trainer(tiny(tmp_path / "eager", **overrides), cifar, **QUIET)
    train_all(eager)
    monkeypatch.setattr(torch, "compile", _compile_with_broken_eval(lambda m: Broken()))
    t = Trainer(tiny(tmp_path / "compiled", compile=True, **overrides), cifar, progress="lines")
    train_all(t)
    out = capsys.readouterr().out
    assert out.count("note: the compiled evaluation failed (RuntimeError: inductor exploded)") == 1
    assert t.compile_mode == "default" and t.compiled_step.eval_models() == (t.model, t.ema.module)
    assert without_time(rows(eager.paths.csv)) == without_time(rows(t.paths.csv))


def test_an_evaluation_error_after_the_first_is_raised(cifar, tmp_path, monkeypatch):
    failing = []

    class FailsLater(torch.nn.Module):
        def __init__(self, model):
            super().__init__()
            self.inner = model

        def forward(self, x):
            if failing:
                raise RuntimeError("out of memory")
            return self.inner(x)

    monkeypatch.setattr(torch, "compile", _compile_with_broken_eval(FailsLater))
    t = Trainer(tiny(tmp_path, epochs=2, compile=True), cifar, **QUIET)
    t.resume()
    t.run_epoch(1)
    failing.append(True)
    with pytest.raises(RuntimeError, match="out of memory"):
        t.run_epoch(2)


COMPILED_RUN = """
import json, sys
sys.path.insert(0, {root!r})
from config import Config
from recipe import load_data
from training import Trainer
cfg = Config.from_dict(json.loads(sys.argv[1]))
trainer = Trainer(cfg, load_data(cfg), progress="off")
for epoch in trainer.remaining_epochs():
    trainer.run_epoch(epoch)
trainer.close()
print("MODE", trainer.compile_mode, "EVAL_COMPILED", trainer.compiled_step.eval_models().model is not trainer.model)
print("COMPILE", trainer.compile_clock.seconds)
"""


@pytest.mark.slow
def test_compiled_runs_count_compile_time_once_and_a_second_process_reuses_the_kernels(fake_cifar, tmp_path):
    # torch.compile with Inductor on the CPU (a C++ compiler is needed): the compiled path end to end,
    # in two processes of the same shapes, as a sweep starts them.
    import json
    import subprocess
    import sys
    from pathlib import Path

    root = str(Path(__file__).resolve().parent.parent)
    env = {k: v for k, v in os.environ.items() if k != "TORCHINDUCTOR_CACHE_DIR"}
    seconds = []
    for run in ("first", "second"):
        cfg = tiny(tmp_path, epochs=2, compile=True, compile_cache=True, run_name=run, data_dir=str(fake_cifar),
                   download=False, randaugment=False, clean_train_images=0, depth=1, dropout=0.0,
                   drop_path=0.0)  # fmt: skip
        done = subprocess.run(
            [sys.executable, "-c", COMPILED_RUN.format(root=root), json.dumps(cfg.to_dict())],
            capture_output=True, text=True, timeout=600, env=env,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr[-2000:]
        seconds.append(float(done.stdout.split("COMPILE")[-1]))
        assert "MODE default EVAL_COMPILED True" in done.stdout  # no fallback: training and evaluation compiled
        first, second = rows(RunPaths.of(cfg).csv)
        assert float(first["compile_seconds"]) == pytest.approx(seconds[-1], rel=1e-6)
        assert float(second["compile_seconds"]) == 0.0 and float(first["train_seconds"]) > 0
        cache = tmp_path / "checkpoint" / "compile_cache"
        assert cache.is_dir() and any(cache.rglob("*")), "the kernels are kept next to the runs"
    assert seconds[1] < 0.5 * seconds[0], seconds  # a ratio of the two, not a time


@pytest.fixture
def inductor_caching():
    """Inductor's ``force_disable_caches`` off for the test and as it was after (monkeypatch's undo would
    delete the setting: Inductor's config module keeps it outside the module's ``__dict__``)."""
    import torch._inductor.config as inductor

    before = inductor.force_disable_caches
    inductor.force_disable_caches = False
    yield inductor
    inductor.force_disable_caches = before


def test_compile_cache_points_inductor_at_the_runs_folder_per_variant_or_turns_caching_off(
    cifar, tmp_path, monkeypatch, inductor_caching
):
    inductor = inductor_caching
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", "/elsewhere")
    Trainer(tiny(tmp_path / "b", compile=False, compile_cache=True), cifar, **QUIET)
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == "/elsewhere"  # eager: nothing touched
    Trainer(tiny(tmp_path / "a", compile=True, compile_cache=False), cifar, **QUIET)
    fresh = Path(os.environ["TORCHINDUCTOR_CACHE_DIR"])  # off: no cache read or written, a fresh folder
    assert inductor.force_disable_caches and fresh.name.startswith("dyt_cifar10_fresh_compile_")
    t = Trainer(tiny(tmp_path / "c", compile=True, compile_cache=True), cifar, **QUIET)
    variant = step.compile_variant("auto", ["default"])
    assert variant == f"torch-{torch.__version__}_attention-auto_default_combo-0"
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str((t.paths.compile_cache / variant).resolve())
    assert (
        t.paths.compile_cache == tmp_path / "c" / "checkpoint" / "compile_cache" and not inductor.force_disable_caches
    )
    others = {step.compile_variant("math", ["default"]), step.compile_variant("auto", ["max-autotune"]), variant}
    assert len(others) == 3  # each backend and mode its own folder


@pytest.mark.parametrize("spoil", ["cache is a file", "variant is a file", "variant takes no files"])
def test_an_unusable_compile_cache_falls_back_to_a_fresh_folder_with_one_line(
    cifar, tmp_path, monkeypatch, inductor_caching, spoil
):
    inductor = inductor_caching
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", "/elsewhere")
    cfg = tiny(tmp_path, compile=True, compile_cache=True)
    cache = RunPaths.of(cfg).compile_cache
    variant = cache / step.compile_variant("auto", ["default"])
    if spoil == "cache is a file":  # NotADirectoryError
        cache.parent.mkdir(parents=True)
        cache.write_text("not a folder")
    elif spoil == "variant is a file":  # FileExistsError
        cache.mkdir(parents=True)
        variant.write_text("not a folder")
    else:  # a folder in which nothing can be created, even by root (as a read-only one)
        cache.mkdir(parents=True)
        variant.symlink_to("/proc/self/fdinfo")
    t = Trainer(cfg, cifar, **QUIET)  # configure_process raised here before
    t.resume()  # the session starts: the notes said so far go in the text log
    t.close()
    fresh = Path(os.environ["TORCHINDUCTOR_CACHE_DIR"])
    assert fresh.name.startswith("dyt_cifar10_fresh_compile_") and inductor.force_disable_caches
    assert t.compile_cache.path is None
    notes = [line for line in RunPaths.of(cfg).log.read_text().splitlines() if "compile cache" in line]
    assert len(notes) == 1 and f"the compile cache {variant.resolve()} cannot be used" in notes[0]
    assert "compiles into a fresh folder" in notes[0]
    # a cache that stops taking files after the run started: begin says so instead of raising
    later = step.CompileCache(tmp_path / "later" / "cache")
    (tmp_path / "later").write_text("now a file")
    assert "cannot be written now" in later.begin() and later._marker is None


def test_the_fresh_compile_folder_of_a_run_without_a_cache_is_removed_when_its_process_ends(tmp_path):
    import subprocess
    import sys

    code = (
        f"import sys; sys.path.insert(0, {str(Path(__file__).resolve().parent.parent)!r}); import os, torch, step; "
        "step.configure_process(torch.device('cpu'), None, variant='v'); "
        "fresh = os.environ['TORCHINDUCTOR_CACHE_DIR']; open(os.path.join(fresh, 'kernel.py'), 'w').write('x'); "
        "print(fresh, os.path.isdir(fresh))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    fresh, existed = done.stdout.split()
    assert done.returncode == 0 and existed == "True" and "dyt_cifar10_fresh_compile_" in fresh
    assert not Path(fresh).exists()  # with what was compiled into it


def test_autotune_comes_first_on_cuda_and_is_said_to_do_nothing_elsewhere(cifar, tmp_path, capsys, monkeypatch):
    _card(monkeypatch, "NVIDIA H100 80GB HBM3")
    cuda = torch.device("cuda")
    assert compile_modes(True, cuda, None, autotune=True) == ["max-autotune", "reduce-overhead", "default"]
    assert compile_modes(True, cuda, False, autotune=True) == ["max-autotune-no-cudagraphs", "default"]
    assert compile_modes(False, cuda, None, autotune=True) == []
    assert compile_modes(True, torch.device("cpu"), None, autotune=True) == ["default"]
    Trainer(tiny(tmp_path, autotune=True), cifar, progress="lines")
    assert "autotune=True has no effect here" in capsys.readouterr().out


def test_the_attention_backend_is_the_one_asked_for(cifar, tmp_path):
    t = Trainer(tiny(tmp_path / "math", epochs=1, attention="math"), cifar, **QUIET)
    train_all(t)  # the math kernel exists everywhere
    assert t.epoch == 1
    with pytest.raises(ValueError, match="attention='cudnn' has no CPU kernel"):  # said before, not mid-epoch
        Trainer(tiny(tmp_path / "cudnn", epochs=1, attention="cudnn"), cifar, **QUIET)


ATTENTION_CHILD = """
import sys
sys.path[:0] = {path!r}
import torch
from torch.profiler import profile
from config import Config
from recipe import build_model
from step import StepForward, attention_backend, compile_variant, configure_process

torch.set_num_threads(1)


def attention_ops(backend, cache):
    configure_process(torch.device("cpu"), cache, variant=compile_variant(backend, ["default"]))
    torch.manual_seed(0)
    model = build_model(Config(dim=32, depth=1, heads=2, patch_size=8)).eval()
    forward = torch.compile(StepForward(model, "cpu", None))
    x, targets = torch.randn(4, 3, 32, 32), torch.eye(10)[:4]
    with attention_backend(backend):
        forward(x, targets)
        with profile() as p:
            forward(x, targets)
    return sorted({{e.name for e in p.events() if "flash" in e.name or e.name == "aten::bmm"}})


for backend in sys.argv[2:]:
    print(backend, attention_ops(backend, sys.argv[1] if sys.argv[1] != "-" else None))
"""


@pytest.mark.slow  # cold compiles in child processes
def test_the_attention_backend_asked_for_is_the_one_that_runs_in_one_process_and_across_two(tmp_path):
    import subprocess
    import sys

    child = ATTENTION_CHILD.format(path=sys.path)

    def run(cache, *backends):
        done = subprocess.run([sys.executable, "-c", child, cache, *backends], capture_output=True, text=True,
                              timeout=600)  # fmt: skip
        assert done.returncode == 0, done.stderr[-2000:]
        return [line for line in done.stdout.splitlines() if line.startswith(backends)]

    flash = "flash ['aten::_scaled_dot_product_flash_attention_for_cpu']"
    math = "math ['aten::bmm']"
    # One process, flash then math: without a Dynamo reset the second model ran the first one's graph.
    assert run(str(tmp_path / "cache"), "flash", "math") == [flash, math]
    # A new process with the same cache folder: math's kernels are its own, not flash's cached ones.
    assert run(str(tmp_path / "cache"), "math") == [math]
    assert run("-", "math", "flash") == [math, flash]  # compile_cache=False: from scratch, each its own


CARDS = {  # name: (compute capability, SMs), as torch.cuda reports them
    "Tesla T4": ((7, 5), 40),
    "NVIDIA L4": ((8, 9), 58),
    "NVIDIA A100-SXM4-40GB": ((8, 0), 108),
    "NVIDIA H100 80GB HBM3": ((9, 0), 132),
    "Tesla V100-SXM2-16GB": ((7, 0), 80),
}


def _card(monkeypatch, name):
    from types import SimpleNamespace

    capability, sms = CARDS[name]
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    props = SimpleNamespace(name=name, multi_processor_count=sms)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device=None: props)
    monkeypatch.setattr(torch.version, "hip", None)


@pytest.mark.parametrize("name", list(CARDS))
def test_attention_backends_and_autotune_follow_what_each_card_has(monkeypatch, name):
    _card(monkeypatch, name)
    cuda = torch.device("cuda")
    capability, sms = CARDS[name]
    for backend in ("flash", "cudnn"):
        said = step.attention_unavailable(backend, cuda)
        assert bool(said) == (capability < (8, 0)), (name, backend)
        if said:
            assert f"has {capability[0]}.{capability[1]}" in said and "use attention='auto'" in said
    assert step.attention_unavailable("efficient", cuda) == "" and step.attention_unavailable("auto", cuda) == ""
    modes = compile_modes(True, cuda, None, autotune=True)
    assert (modes[0] == "max-autotune") == (sms >= 68), (name, modes)  # a T4 or an L4 would tune no GEMM
    notes = step.compile_notes(Config(autotune=True), modes, cuda)
    assert bool(notes) == (sms < 68) and (not notes or f"its {sms} SMs are fewer than the 68" in notes[0])


def test_a_backend_the_cpu_lacks_stops_before_anything_is_written(cifar, tmp_path):
    with pytest.raises(ValueError, match="attention='efficient' has no CPU kernel .* use attention='auto'"):
        Trainer(tiny(tmp_path, attention="efficient"), cifar, **QUIET)
    assert not (tmp_path / "log").exists() and not (tmp_path / "checkpoint").exists()
    assert step.attention_unavailable("flash", torch.device("cpu")) == ""
