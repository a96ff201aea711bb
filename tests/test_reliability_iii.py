"""Reliability III: one test per row of the adversarial round (R1 ... R14); R4 is the crash-point test
(test_crash_points.py), R8 the heartbeat stopped in test_reliability's D4."""

import json
import socket
import threading
import time

import pytest

from conftest import QUIET, rows, tiny, train_all
from runs import lock as run_lock
from runs.lock import RunLock, RunLockedError
from training import Trainer


class ShiftedClock:
    """The lock module's view of time with the wall clock moved by ``offset`` seconds (a clock set back
    or forward); the monotonic clock is untouched, as on a real machine."""

    def __init__(self, offset: float):
        self.offset = offset

    def time(self):
        return time.time() + self.offset

    def __getattr__(self, name):
        return getattr(time, name)


def _wait_for(condition, what: str, tries: int = 2000):
    for _ in range(tries):  # a bound on polls, not a timing
        if condition():
            return
        time.sleep(0.01)
    raise AssertionError(f"never happened: {what}")


def test_r2_a_clock_set_back_an_hour_does_not_kill_the_live_holder(cifar, tmp_path, monkeypatch):
    t = Trainer(tiny(tmp_path, epochs=2), cifar, **QUIET)
    t.resume()
    t.run_epoch(1)
    monkeypatch.setattr(run_lock, "time", ShiftedClock(-3600))  # the holder's own heartbeat is now 1 h ahead
    t.run_epoch(2)  # its own token is recognised whatever the heartbeat says
    assert [r["epoch"] for r in rows(t.paths.csv)] == ["1", "2"]


def _foreign_lock(path, heartbeat: float) -> dict:
    holder = {"pid": 4242, "host": "another-host", "token": "theirs", "heartbeat": heartbeat}
    path.write_text(json.dumps(holder))
    return holder


@pytest.mark.parametrize("offset", [-7200, 7200])  # their clock behind ours, or ahead of it
def test_r2_another_hosts_lock_is_judged_by_whether_it_beats_not_by_clocks(tmp_path, monkeypatch, offset):
    monkeypatch.setattr(run_lock, "WATCH_SECONDS", 0.5)
    path = tmp_path / "run.lock"
    holder = _foreign_lock(path, time.time() + offset)
    stop = threading.Event()

    def beat():  # a live holder on a host whose clock disagrees with ours
        while not stop.wait(0.05):
            holder["heartbeat"] += 60
            path.write_text(json.dumps(holder))

    beating = threading.Thread(target=beat)
    beating.start()
    try:
        with pytest.raises(RunLockedError, match="another-host"):
            RunLock(path).acquire()
    finally:
        stop.set()
        beating.join()
    lock = RunLock(path)  # the same holder, silent now: it stopped beating, so it is taken over
    lock.acquire()
    assert json.loads(path.read_text())["token"] == lock.token
    lock.release()


def test_r2_a_fresh_heartbeat_from_another_host_is_refused_at_once(tmp_path, monkeypatch):
    monkeypatch.setattr(run_lock, "WATCH_SECONDS", 3600.0)  # it must not be watched at all
    path = tmp_path / "run.lock"
    _foreign_lock(path, time.time() - 5)
    with pytest.raises(RunLockedError, match="another-host"):
        RunLock(path).acquire()


def test_r3_the_heartbeat_puts_back_a_deleted_file_and_survives_a_failed_write(tmp_path, monkeypatch):
    monkeypatch.setattr(run_lock, "HEARTBEAT_SECONDS", 0.02)
    real_write = run_lock.atomic_write
    failures = {"left": 1}

    def flaky(path, write, **kw):
        if failures["left"]:
            failures["left"] -= 1
            raise OSError(5, "Input/output error (a network drive hiccup)")
        real_write(path, write, **kw)

    monkeypatch.setattr(run_lock, "atomic_write", flaky)
    path = tmp_path / "run.lock"
    lock = RunLock(path)
    lock.acquire()
    first = json.loads(path.read_text())["heartbeat"]
    _wait_for(lambda: failures["left"] == 0 and json.loads(path.read_text())["heartbeat"] != first, "a beat after")
    path.unlink()  # deleted by hand while the run trains
    _wait_for(path.exists, "the heartbeat puts the file back")
    assert json.loads(path.read_text())["token"] == lock.token
    assert "was deleted while this run trained" in lock.check()
    _wait_for(lambda: json.loads(path.read_text())["heartbeat"] != first, "beats go on")
    assert lock._thread.is_alive()
    lock.release()


def test_r3_a_heartbeat_that_cannot_be_written_stops_the_holder_at_its_next_write(tmp_path, monkeypatch):
    monkeypatch.setattr(run_lock, "HEARTBEAT_SECONDS", 0.02)
    monkeypatch.setattr(run_lock, "STALE_SECONDS", 0.2)

    def broken(*_, **__):
        raise OSError(28, "No space left on device")

    lock = RunLock(tmp_path / "run.lock")
    lock.acquire()
    monkeypatch.setattr(run_lock, "atomic_write", broken)
    _wait_for(lambda: lock.beat.error is not None and time.monotonic() - lock.beat.last_ok > 0.1, "failing beats")
    with pytest.raises(RunLockedError, match="could not refresh its lock") as info:
        lock.check()
    assert "No space left on device" in str(info.value) and "run again to resume" in str(info.value)
    assert not lock.held


def test_r3_a_trainer_whose_lock_was_taken_over_writes_nothing(cifar, tmp_path, monkeypatch):
    t = Trainer(tiny(tmp_path, epochs=2), cifar, **QUIET)
    t.resume()
    t.files.lock.stop_heartbeat()
    _foreign_lock(t.paths.lock, time.time())
    with pytest.raises(RunLockedError, match="no longer holds"):
        t.run_epoch(1)
    assert not t.paths.csv.exists()
    assert socket.gethostname() != "another-host"
    again = Trainer(tiny(tmp_path / "b", epochs=1), cifar, **QUIET)
    train_all(again)


class FakeClock:
    """``time`` as the trainer sees it, where a compile attempt takes ``compile_seconds`` of clock."""

    def __init__(self):
        self.now = 1000.0

    def perf_counter(self):
        self.now += 0.001
        return self.now

    def __getattr__(self, name):
        return getattr(time, name)


def test_r12_a_failed_compiled_augmentation_counts_as_compile_time_not_training_time(cifar, tmp_path, monkeypatch):
    import training

    clock = FakeClock()
    monkeypatch.setattr(training, "time", clock)
    monkeypatch.setattr(training, "synced_time", lambda device: clock.perf_counter())
    t = Trainer(tiny(tmp_path, epochs=1), cifar, progress="lines")
    t.resume()

    def failing_compile(x, **params):
        clock.now += 100.0  # the attempt (Inductor) takes a while, then fails
        raise RuntimeError("inductor exploded\nlong traceback")

    t.augment.compiled = failing_compile  # as a failing torch.compile of the transform would
    with pytest.warns(UserWarning, match="compiled augmentation failed"):
        t.run_epoch(1)
    row = rows(t.paths.csv)[0]
    assert float(row["compile_seconds"]) >= 100 and float(row["train_seconds"]) < 100  # kept apart
    assert float(row["images_per_second"]) > len(cifar.x_train) / 100  # not slowed by the attempt
    log = t.paths.log.read_text()
    assert "the compiled augmentation failed (RuntimeError: inductor exploded)" in log and "compile time" in log


def test_r13_a_checkpoint_of_the_first_version_without_a_device_type_resumes(cifar, tmp_path):
    import torch

    t = Trainer(tiny(tmp_path, epochs=2), cifar, **QUIET)
    t.resume()
    t.run_epoch(1)
    t.close()
    state = torch.load(t.paths.latest, weights_only=True)
    del state["rng"]["device_type"], state["rng"]["cuda"]  # what the first notebook version wrote
    torch.save(state, t.paths.latest)
    again = Trainer(tiny(tmp_path, epochs=2), cifar, progress="lines")
    assert again.resume() == 1
    train_all(again)
    assert [r["epoch"] for r in rows(again.paths.csv)] == ["1", "2"]
    assert "of an earlier version (no device), resumed on cpu: the loader's random stream is re-seeded" in (
        again.paths.log.read_text()
    )


# --- R6, R7: the kernel cache -----------------------------------------------------------------------


def test_r7_a_compile_failure_with_a_cache_repairs_it_once_and_retries_the_same_mode(tmp_path, monkeypatch):
    import torch

    import recipe
    from config import Config
    from step import CompileCache, CompiledStep

    cache_dir = tmp_path / "compile_cache"
    (cache_dir / "fxgraph").mkdir(parents=True)
    (cache_dir / "fxgraph" / "entry").write_bytes(b"\xff\xfe damaged")
    cache = CompileCache(cache_dir)
    calls = {"n": 0}

    def compile_failing_once(module, **kw):
        calls["n"] += 1
        if calls["n"] <= 2:  # the first compile (step and eval models) reads the damaged cache

            class Damaged(torch.nn.Module):
                def forward(self, *a, **k):
                    raise RuntimeError("")  # Inductor's empty message on a damaged file

            return Damaged()
        return module  # afresh: it works (run as the module itself)

    monkeypatch.setattr(torch, "compile", compile_failing_once)
    torch.manual_seed(0)
    model = recipe.build_model(Config(dim=16, depth=1, heads=2, drop_path=0.0))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    step = CompiledStep(
        model, optimizer, torch.amp.GradScaler("cpu", enabled=False), 1.0, None, ["default"], None, cache
    )
    out = step(torch.randn(4, 3, 32, 32), torch.softmax(torch.randn(4, 10), -1))
    assert step.mode == "default"  # the same mode again, not a fall back to eager
    assert "with the kernel cache" in out.note and "may be damaged" in out.note and "no message" in out.note
    asides = list(tmp_path.glob("compile_cache.*.damaged"))
    assert len(asides) == 1 and (asides[0] / "fxgraph" / "entry").exists() and not cache_dir.exists()
    assert cache.repair(RuntimeError("again")) == ""  # once per process: a second failure falls back


def test_r7_a_process_that_died_while_compiling_gets_its_cache_moved_aside(tmp_path):
    import subprocess
    import sys

    from step import CompileCache

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    cache_dir = tmp_path / "compile_cache"
    cache_dir.mkdir()
    (cache_dir / f".compiling-{socket.gethostname()}-{dead.pid}").touch()  # it crashed mid-compile
    (cache_dir / "kernel.so").write_bytes(b"half a kernel")
    cache = CompileCache(cache_dir)
    note = cache.check_for_crashes()  # what configure_process asks of a run's cache before any compile
    assert "stopped while compiling" in note and "moved to" in note
    assert not (cache_dir / "kernel.so").exists() and len(list(tmp_path.glob("compile_cache.*.damaged"))) == 1
    live = CompileCache(tmp_path / "other")
    live.begin()
    marker = next((tmp_path / "other").glob(".compiling-*"))
    assert CompileCache(tmp_path / "other").check_for_crashes() == ""  # a live compiler's marker: left alone
    live.end()
    assert not marker.exists()


CACHE_CHILD = """
import sys
sys.path[:0] = {path!r}
import json
from config import Config
from recipe import load_data
from training import Trainer
cfg = Config.from_dict(json.loads(sys.argv[1]))
t = Trainer(cfg, load_data(cfg), progress="lines")
for epoch in t.remaining_epochs():
    t.run_epoch(epoch)
print("MODE", t.compile_mode)
"""


@pytest.mark.slow  # two cold compiles in child processes
def test_r6_r7_a_checkpoint_dir_with_a_space_compiles_and_a_crashed_compile_is_repaired(tmp_path, fake_cifar):
    import hashlib
    import subprocess
    import sys
    import tempfile
    from pathlib import Path

    root = tmp_path / "my runs"  # a space: the C++ compiler's command line breaks on it
    from step import compile_variant

    variant = compile_variant("auto", ["default"])  # each variant's kernels in a folder of its own
    key = hashlib.sha1(bytes((root / "checkpoint" / "compile_cache" / variant).resolve())).hexdigest()
    cache = Path(tempfile.gettempdir()) / "dyt_cifar10_compile_cache" / key  # where it goes instead
    child = CACHE_CHILD.format(path=sys.path)
    outputs = []
    for name in ("first", "second"):
        cfg = tiny(root, run_name=name, epochs=1, compile=True, compile_cache=True, data_dir=str(fake_cifar),
                   download=False, clean_train_images=0)  # fmt: skip
        done = subprocess.run([sys.executable, "-c", child, json.dumps(cfg.to_dict())], capture_output=True,
                              text=True, timeout=900)  # fmt: skip
        assert done.returncode == 0, done.stderr[-2000:]
        outputs.append(done.stdout)
        if name == "first":
            assert "MODE default" in done.stdout and "cannot take a path with spaces" in done.stdout  # R6
            assert not list(cache.glob(".compiling-*"))  # its compiles finished: no marker left
            dead = subprocess.Popen([sys.executable, "-c", "pass"])
            dead.wait()
            (cache / f".compiling-{socket.gethostname()}-{dead.pid}").touch()  # then a process died compiling
    assert "MODE default" in outputs[1] and "stopped while compiling" in outputs[1]  # R7: moved aside, compiled
    assert len(list(cache.parent.glob(f"{cache.name}.*.damaged"))) == 1
    for folder in cache.parent.glob(f"{cache.name}*"):  # the system's temp folder is not the test's
        __import__("shutil").rmtree(folder)
