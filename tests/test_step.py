"""The training step's device-tensor inputs (lr, mixup lambda), compile modes with their fallback,
and compile time kept apart from epoch time. The CUDA-graph path itself needs a GPU
(bench/benchmark.py); what can be compared on a CPU is compared here."""

import pytest
import torch

import run_files
import training
from conftest import QUIET, rows, tiny, train_all, without_time
from training import Trainer


def test_device_tensor_lr_and_lambda_give_the_same_run_as_floats(cifar, tmp_path):
    cfg = dict(epochs=2, mixup_alpha=0.4, cutmix_alpha=1.0, warmup_epochs=1)
    tensors = Trainer(tiny(tmp_path / "a", **cfg), cifar, **QUIET)
    train_all(tensors)
    assert isinstance(tensors.optimizer.param_groups[0]["lr"], torch.Tensor)
    assert tensors.optimizer.param_groups[0]["lr"] is tensors.lr

    floats = Trainer(tiny(tmp_path / "b", **cfg), cifar, **QUIET)
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
    for epoch in (1, 2):
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
    assert row["lr"] == pytest.approx(training.lr_at(again.step - 1, again.total_steps, again.warmup_steps, 1e-3, 1e-5))


def test_a_failing_compile_falls_back_and_the_run_equals_an_eager_one(cifar, tmp_path, monkeypatch, capsys):
    eager = Trainer(tiny(tmp_path / "eager", epochs=2), cifar, **QUIET)
    train_all(eager)

    class Broken(torch.nn.Module):  # what torch.compile returns when Inductor fails at the first call
        def forward(self, *args, **kwargs):
            raise RuntimeError("inductor exploded\nlong traceback")

    def broken_compile(model, **kwargs):
        return Broken()

    monkeypatch.setattr(torch, "compile", broken_compile)
    t = Trainer(tiny(tmp_path / "compiled", epochs=2, compile=True), cifar, **QUIET)
    assert t.compile_modes == ["default"] and t.compile_mode == "default"
    train_all(t)
    out = capsys.readouterr().out
    assert (
        "torch.compile(mode='default') failed (RuntimeError: inductor exploded); continuing with the model run eagerly"
        in out
    )
    assert t.compile_mode is None and t.compiled_model is None
    a, b = eager.model.state_dict(), t.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert without_time(rows(eager.paths["csv"])) == without_time(rows(t.paths["csv"]))


def test_graphs_are_tried_first_only_when_compiling_on_cuda(cifar, tmp_path):
    assert Trainer(tiny(tmp_path, compile=False, cuda_graphs=True), cifar, **QUIET).compile_modes == []
    t = Trainer(tiny(tmp_path, compile=True, cuda_graphs=True), cifar, **QUIET)
    assert t.compile_modes == ["default"]  # a CPU: no CUDA graphs
    if torch.cuda.is_available():
        gpu = tiny(tmp_path, compile=True, device="cuda")
        assert Trainer(gpu, training.load_data(gpu), **QUIET).compile_modes == ["reduce-overhead", "default"]


def test_compile_time_is_kept_apart_from_epoch_time(cifar, tmp_path, monkeypatch):
    t = Trainer(tiny(tmp_path, epochs=2), cifar, **QUIET)
    t._use_compile_mode("default")  # as if compiling; the model itself runs eagerly below
    t.compiled_model = t.forward_model = t.model
    t.step_forward = training.StepForward(t.model, "cpu", None)
    real = t._step

    def slow_first_steps(x, targets):
        if t._unproven_steps:
            import time

            time.sleep(0.2)
        return real(x, targets)

    monkeypatch.setattr(t, "_step", slow_first_steps)
    train_all(t)
    first, second = rows(t.paths["csv"])
    assert float(first["compile_seconds"]) >= 3 * 0.2 and float(first["train_seconds"]) < 0.6
    assert float(second["compile_seconds"]) == 0.0
    assert t.compile_seconds >= 0.6


def test_a_csv_from_an_older_version_gains_the_new_columns(tmp_path):
    path = tmp_path / "run.csv"
    run_files.append_csv(path, {"epoch": 1, "test_acc": 0.5, "epoch_seconds": 3.0})
    run_files.append_csv(path, {"epoch": 2, "test_acc": 0.6, "train_seconds": 2.0})
    table = rows(path)
    assert list(table[0]) == ["epoch", "test_acc", "epoch_seconds", "train_seconds"]
    assert table[0] == {"epoch": "1", "test_acc": "0.5", "epoch_seconds": "3.0", "train_seconds": ""}
    assert table[1] == {"epoch": "2", "test_acc": "0.6", "epoch_seconds": "", "train_seconds": "2.0"}
    run_files.append_csv(path, {"epoch": 3, "test_acc": 0.7, "train_seconds": 2.0})
    assert [r["epoch"] for r in rows(path)] == ["1", "2", "3"]


def test_a_really_compiled_run_counts_its_compile_time_once(cifar, tmp_path):
    # torch.compile with Inductor on the CPU (a C++ compiler is needed): the compiled path end to end.
    t = Trainer(tiny(tmp_path, epochs=2, compile=True, ema_decay=0.9), cifar, **QUIET)
    train_all(t)
    assert t.compile_mode == "default" and t.compiled_model is not None and t.augment.compiled is not None
    first, second = rows(t.paths["csv"])
    assert float(first["compile_seconds"]) > 0 and float(second["compile_seconds"]) == 0.0
    assert float(first["compile_seconds"]) == pytest.approx(t.compile_seconds)
    assert all(torch.isfinite(p).all() for p in t.model.parameters())


@pytest.mark.parametrize("amp", [None, torch.bfloat16])
def test_step_forward_equals_model_loss_and_metric_apart(amp):
    torch.manual_seed(0)
    model = training.build_model(training.Config(dim=32, depth=1, heads=2, drop_path=0.0))
    x = torch.randn(8, 3, 32, 32)
    targets = torch.softmax(torch.randn(8, 10), -1)
    loss, correct = training.StepForward(model, "cpu", amp)(x, targets)
    loss.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    with torch.autocast("cpu", dtype=amp, enabled=amp is not None):
        logits = model(x)
    apart = training.soft_cross_entropy(logits, targets)
    apart.backward()
    assert torch.equal(loss, apart) and loss.dtype == torch.float32
    assert correct.item() == (logits.argmax(-1) == targets.argmax(-1)).sum().item()
    assert all(torch.equal(g, p.grad) for g, p in zip(grads, model.parameters()))


def test_compiled_step_forward_matches_eager():
    # Inductor on the CPU: the loss and the metric inside the compiled region give the eager values.
    torch.manual_seed(0)
    model = training.build_model(training.Config(dim=32, depth=1, heads=2, drop_path=0.0)).eval()
    x = torch.randn(8, 3, 32, 32)
    targets = torch.softmax(4 * torch.randn(8, 10), -1)
    eager = training.StepForward(model, "cpu", None)
    compiled = torch.compile(eager, dynamic=False)
    (loss, correct), (ref_loss, ref_correct) = compiled(x, targets), eager(x, targets)
    assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-5) and correct.item() == ref_correct.item()


def test_a_failing_compiled_evaluation_goes_on_eagerly_and_training_stays_compiled(cifar, tmp_path, capsys):
    eager = Trainer(tiny(tmp_path / "eager", epochs=2, ema_decay=0.9), cifar, **QUIET)
    train_all(eager)

    class BrokenEval(torch.nn.Module):  # a compiled eval graph that fails at its first call
        def forward(self, *args, **kwargs):
            raise RuntimeError("cudagraph capture failed\ntraceback")

    t = Trainer(tiny(tmp_path / "compiled", epochs=2, ema_decay=0.9), cifar, **QUIET)
    t._use_compile_mode("default")  # as if compiling: the step runs eagerly, evaluation hits the broken graph
    t.step_forward = training.StepForward(t.model, "cpu", None)
    t.forward_model, t.compiled_ema = BrokenEval(), BrokenEval()
    train_all(t)
    out = capsys.readouterr().out
    assert out.count("note: the compiled evaluation failed (RuntimeError: cudagraph capture failed)") == 1
    assert t.compile_mode == "default" and t.forward_model is t.model and t.compiled_ema is None
    assert without_time(rows(eager.paths["csv"])) == without_time(rows(t.paths["csv"]))


def test_an_evaluation_error_after_the_first_is_raised(cifar, tmp_path):
    t = Trainer(tiny(tmp_path, epochs=2), cifar, **QUIET)
    t._use_compile_mode("default")  # as if compiling; everything runs eagerly, the first evaluation works
    t.compiled_model = t.forward_model = t.model
    t.step_forward = training.StepForward(t.model, "cpu", None)
    t.resume()
    t.run_epoch(1)

    class Broken(torch.nn.Module):
        def forward(self, *args, **kwargs):
            raise RuntimeError("out of memory")

    t.forward_model = Broken()
    with pytest.raises(RuntimeError, match="out of memory"):
        t.run_epoch(2)
