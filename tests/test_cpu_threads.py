"""The CPU's thread count: set by ``cpu_threads``, and passed on to a sweep's child processes."""

import subprocess

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
