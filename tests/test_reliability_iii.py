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
