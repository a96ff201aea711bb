"""The CPU: its thread count (set, or chosen by timing the first steps, kept on resume, handed to a sweep's
children), the evaluation rows per pass, and the CPU warning only when something trains."""

import subprocess

import pytest
import torch

import sweeps.local
from config import Config
from step import configure_process


def test_cpu_threads_sets_torch_threads_on_a_cpu_only():
    before = torch.get_num_threads()
    try:
        configure_process(torch.device("cpu"), None, cpu_threads=1)
        assert torch.get_num_threads() == 1
        configure_process(torch.device("cpu"), None, cpu_threads=0)  # 0: left as it is
        assert torch.get_num_threads() == 1
        configure_process(torch.device("meta"), None, cpu_threads=3)  # not a CPU run: left as it is
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_a_sweep_child_on_the_cpu_gets_the_runs_thread_count(monkeypatch, tmp_path):
    seen = []

    class Recorder:
        def __init__(self, args, stdout, stderr, env):
            seen.append(env["OMP_NUM_THREADS"])

    monkeypatch.setattr(subprocess, "Popen", Recorder)
    cfg = Config(log_dir=str(tmp_path), run_name="r")
    sweeps.local._launch(cfg, None, per_process_threads=2)
    sweeps.local._launch(Config(log_dir=str(tmp_path), run_name="r", cpu_threads=1), None, per_process_threads=2)
    assert seen == ["2", "1"]


class Clock:
    """``time.perf_counter`` for ``step``: each step takes the seconds its thread count is given."""

    def __init__(self, seconds_at: dict):
        self.now, self.seconds_at = 0.0, seconds_at

    def __call__(self):
        return self.now

    def step(self, threads: int, extra: float = 0.0) -> None:
        self.now += self.seconds_at[threads] + extra


def _threads(monkeypatch, start: int) -> list[int]:
    """A fake torch thread setting starting at ``start``; returns the list of counts set."""
    state = {"n": start}
    set_to: list[int] = []
    monkeypatch.setattr(torch, "get_num_threads", lambda: state["n"])
    monkeypatch.setattr(torch, "set_num_threads", lambda n: (set_to.append(n), state.update(n=n)))
    return set_to


def _trial(pace, clock, compile_at=None) -> tuple[int, tuple]:
    """Steps until the trial decides: (steps taken, its result)."""
    pace.epoch_start()
    compiling = 0.0
    for i in range(1, 40):
        extra = 100.0 if i == compile_at else 0.0  # a step that compiled: its compile seconds are not its time
        compiling += extra
        clock.step(torch.get_num_threads(), extra)
        result = pace.step_end(compiling)
        if result is not None:
            return i, result
    raise AssertionError("the trial never ended")


def test_the_fastest_thread_count_is_kept_and_compile_time_is_left_out(monkeypatch):
    import step

    set_to = _threads(monkeypatch, 4)
    clock = Clock({4: 1.5, 2: 1.0, 1: 2.0})
    monkeypatch.setattr(step.time, "perf_counter", clock)
    pace = step.CpuPace(choose=True)
    assert pace.candidates == [1, 2, 4] and pace.chosen == 0
    steps, result = _trial(pace, clock, compile_at=2)
    assert steps == 12 and result[0] == 1.0  # 3 counts x (1 untimed + 3 timed)
    assert pace.chosen == 2 and set_to == [1, 2, 4, 2] and torch.get_num_threads() == 2
    assert result[1].startswith(
        "CPU threads: 2, the fastest a step of 1 thread 2.00s, 2 threads 1.00s, 4 threads 1.50s"
    )
    assert "cpu_threads=N" in result[1]
    clock.step(2)
    assert pace.step_end(0.0) is None  # said once


def test_a_losing_count_is_dropped_after_one_step(monkeypatch):
    import step

    set_to = _threads(monkeypatch, 4)
    clock = Clock({1: 0.5, 2: 4.6, 4: 12.0})  # a loaded machine: more threads, much slower steps
    monkeypatch.setattr(step.time, "perf_counter", clock)
    pace = step.CpuPace(choose=True)
    steps, result = _trial(pace, clock)
    assert steps == 6 and result[0] == 0.5  # 4 steps at one thread, then one at each losing count
    assert pace.chosen == 1 and set_to == [1, 2, 4, 1]
    assert result[1].startswith("CPU threads: 1, the fastest a step of 1 thread 0.50s, 2 threads >4.60s (dropped "
                                "after one step), 4 threads >12.00s (dropped after one step)")  # fmt: skip
    spent = 4 * 0.5 + 4.6 + 12.0
    assert clock.now == spent  # before: 4 steps at each count, 4 x (0.5 + 4.6 + 12.0)


def test_one_thread_or_a_set_count_is_timed_for_the_estimate_only(monkeypatch):
    import step

    set_to = _threads(monkeypatch, 1)
    clock = Clock({1: 0.7})
    monkeypatch.setattr(step.time, "perf_counter", clock)
    for pace in (step.CpuPace(choose=True), step.CpuPace(choose=False)):
        results = []
        for _ in range(4):
            clock.step(1)
            results.append(pace.step_end(0.0))
        assert results[:3] == [None] * 3 and results[3] == (pytest.approx(0.7), "") and pace.chosen == 1
    assert set_to == [1, 1]
    _threads(monkeypatch, 2)
    assert step.CpuPace(choose=False).candidates == [2]  # cpu_threads set: no trial


def test_a_trainer_keeps_its_chosen_count_in_the_checkpoint_and_resumes_with_it(cifar, tmp_path):
    from conftest import tiny, train_all
    from training import Trainer

    torch.set_num_threads(2)
    try:
        cfg = tiny(tmp_path, epochs=1, batch_size=16)  # 12 steps: the trial's 8 fit in the epoch
        first = Trainer(cfg, cifar, progress="off")
        train_all(first)
        chosen = first.pace.chosen
        assert chosen in (1, 2) and torch.get_num_threads() == chosen
        assert torch.load(first.paths.latest, weights_only=False)["cpu_threads"] == chosen
        log = first.paths.log.read_text()
        assert f"note: CPU threads: {chosen}, the fastest a step of 1 thread" in log
        first.close()
        torch.set_num_threads(2)
        again = Trainer(tiny(tmp_path, epochs=2, batch_size=16), cifar, progress="off")
        again.resume()
        assert again.pace.candidates == [chosen] and torch.get_num_threads() == chosen
    finally:
        torch.set_num_threads(1)


def test_the_cpu_warning_waits_until_something_trains(cifar, tmp_path):
    from conftest import tiny, train_all
    from training import Trainer

    cfg = tiny(tmp_path, epochs=1)
    t = Trainer(cfg, cifar, progress="off")
    train_all(t)
    t.close()
    done = Trainer(cfg, cifar, progress="off")
    assert list(done.remaining_epochs()) == []
    sessions = t.paths.log.read_text().split("fresh start")[1].split("resumed from")
    assert "WARNING: training on the CPU" in sessions[0] and "WARNING" not in sessions[1]


def test_a_sweep_hands_the_chosen_count_to_cpu_children_one_at_a_time(monkeypatch, fake_cifar, tmp_path):
    from sweeps.runs import grid

    launched = []

    class Done:
        returncode = 0

        def poll(self):
            return 0

    def launch(cfg, gpu, threads):
        launched.append((cfg.cpu_threads, threads))
        return Done()

    monkeypatch.setattr(sweeps.local, "_launch", launch)
    monkeypatch.setattr(sweeps.local, "POLL_SECONDS", 0.0)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    base = Config(data_dir=str(fake_cifar), download=False, log_dir=str(tmp_path / "log"), device="cpu",
                  checkpoint_dir=str(tmp_path / "ck"), plot_dir=str(tmp_path / "plots"))  # fmt: skip
    runs = grid(base, {"seed": [0, 1]})
    sweeps.local.run_sweep(runs, per_gpu=1, progress="off", cpu_threads=1)
    assert [t for t, _ in launched] == [1, 1]  # one at a time: the notebook's choice
    launched.clear()
    sweeps.local.run_sweep(runs, per_gpu=2, progress="off", cpu_threads=1)
    assert [t for t, _ in launched] == [0, 0]  # two at a time share the cores: each gets its share
    launched.clear()
    sweeps.local.run_sweep(grid(base, {"seed": [0], "cpu_threads": [2]}), per_gpu=1, progress="off", cpu_threads=1)
    assert [t for t, _ in launched] == [2]  # a run's own setting wins


def test_evaluation_rows_per_pass_follow_the_device_unless_set(cifar):
    from evaluation import Evaluator, rows_per_pass

    assert rows_per_pass(0, torch.device("cpu")) == 250 and rows_per_pass(0, torch.device("cuda")) == 1000
    assert rows_per_pass(64, torch.device("cpu")) == 64
    assert Evaluator(cifar, 0, 0, None).batch_size == 250 and Evaluator(cifar, 20, 0, None).batch_size == 20
    assert len(Evaluator(cifar, 20, 0, None).test_loader) == 3  # 50 test images
