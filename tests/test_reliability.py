"""Reliability: each test is one way a run used to break (interrupts, divergence, two writers, damaged
files, full disks, bad folders), and checks that it now either recovers exactly or stops clearly."""

import csv
import errno
import json
import os
import pickle
import shutil
import time

import pytest
import torch

from conftest import QUIET, assert_same_run, lock_held_by_another_process, rows, tiny, train_all
from data import CorruptDatasetError, ensure_cifar10, read_batch
from recipe import lr_at
from runs import files as run_files
from runs import lock as run_lock
from runs.checkpoints import CheckpointError
from runs.files import RunPaths
from runs.lock import RunLock, RunLockedError
from training import DivergenceError, Trainer


def _interrupt_at(trainer, monkeypatch, step, exc=KeyboardInterrupt):
    """Make ``trainer.train_step`` raise ``exc`` when the global step reaches ``step`` (once)."""
    real = trainer.train_step
    fired = []

    def step_or_raise(x, targets):
        if trainer.step == step and not fired:
            fired.append(True)
            raise exc()
        return real(x, targets)

    monkeypatch.setattr(trainer, "train_step", step_or_raise)


# Row 1: an interrupted epoch is never continued from memory.
def test_interrupted_epoch_is_restored_from_the_checkpoint_not_continued(cifar, tmp_path, monkeypatch, reference_runs):
    full = reference_runs.get("default")
    t = Trainer(tiny(tmp_path), cifar, **QUIET)
    _interrupt_at(t, monkeypatch, step=t.steps_per_epoch + 2)  # in the middle of epoch 2
    with pytest.raises(KeyboardInterrupt):
        train_all(t)
    assert t.step == t.steps_per_epoch + 2  # the half-trained state that must not be continued
    train_all(t)  # the training cell run again in the same kernel
    assert t.step == 3 * t.steps_per_epoch
    assert_same_run(full, t)
    state = torch.load(t.paths.latest, weights_only=True)
    assert state["step"] == state["epoch"] * t.steps_per_epoch
    assert "restored after an interrupted epoch" in t.paths.log.read_text()


def test_run_epoch_on_an_interrupted_trainer_restores_first(cifar, tmp_path, monkeypatch):
    t = Trainer(tiny(tmp_path, epochs=2), cifar, **QUIET)
    t.resume()
    t.run_epoch(1)
    _interrupt_at(t, monkeypatch, step=t.steps_per_epoch + 1, exc=RuntimeError)
    with pytest.raises(RuntimeError):
        t.run_epoch(2)
    t.run_epoch(2)  # restores epoch 1's checkpoint, then trains epoch 2 from its start
    assert t.step == 2 * t.steps_per_epoch and [r["epoch"] for r in rows(t.paths.csv)] == ["1", "2"]


# Row 2: a fresh start never overwrites an earlier run's best.
def test_advice_of_the_corrupt_latest_error_keeps_best(cifar, tmp_path):
    t = Trainer(tiny(tmp_path, epochs=1), cifar, **QUIET)
    train_all(t)
    best_bytes = t.paths.best.read_bytes()
    latest = t.paths.latest
    latest.write_bytes(latest.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="Move it away to start this run afresh") as info:
        Trainer(tiny(tmp_path, epochs=1), cifar, **QUIET).resume()
    assert "set aside" in str(info.value)
    latest.rename(tmp_path / "moved_away.pth")  # what the message says to do
    fresh = Trainer(tiny(tmp_path, epochs=1), cifar, **QUIET)
    assert fresh.resume() is None
    train_all(fresh)
    aside = list((tmp_path / "checkpoint").glob("dyt_cifar10_best.*.orphaned.pth"))
    assert len(aside) == 1 and aside[0].read_bytes() == best_bytes
    assert fresh.paths.best.exists() and fresh.paths.best.read_bytes() != best_bytes


# Row 3: divergence stops the run; a non-finite model is never saved or scored.
def test_nan_loss_stops_with_epoch_step_and_last_good_checkpoint(cifar, tmp_path):
    t = Trainer(tiny(tmp_path, epochs=3), cifar, **QUIET)
    t.resume()
    t.run_epoch(1)
    t.files.wait_for_saves()
    latest, best = t.paths.latest.read_bytes(), t.paths.best.read_bytes()
    with torch.no_grad():
        t.model.head.weight[0, 0] = float("nan")
    with pytest.raises(DivergenceError) as info:
        t.run_epoch(2)
    msg = str(info.value)
    assert "epoch 2" in msg and f"step {t.steps_per_epoch + 1}" in msg and str(t.paths.latest) in msg
    assert "(epoch 1)" in msg and "another run_name" in msg
    assert t.paths.latest.read_bytes() == latest and t.paths.best.read_bytes() == best
    assert [r["epoch"] for r in rows(t.paths.csv)] == ["1"]
    assert "DIVERGED" in t.paths.log.read_text()


def test_a_huge_learning_rate_diverges_instead_of_saving_nan_weights(cifar, tmp_path):
    t = Trainer(tiny(tmp_path, epochs=2, lr=1e30, min_lr=0.0, grad_clip=0.0, warmup_epochs=0), cifar, **QUIET)
    with pytest.raises(DivergenceError, match="epoch 1"):
        train_all(t)
    assert not t.paths.latest.exists() and not t.paths.best.exists()


# Row 4: one writer per run.
def test_second_process_on_the_same_run_is_refused_until_the_holder_dies(cifar, tmp_path):
    cfg = tiny(tmp_path, epochs=1)
    lock_path = tmp_path / "checkpoint" / "dyt_cifar10.lock"
    with lock_held_by_another_process(lock_path) as holder:
        with pytest.raises(RunLockedError, match=f"process {holder.pid}") as info:
            Trainer(cfg, cifar, **QUIET).resume()
        assert str(lock_path) in str(info.value) and "another run_name" in str(info.value)
        assert not (tmp_path / "log" / "dyt_cifar10.csv").exists()
    t = Trainer(cfg, cifar, **QUIET)  # the holder was SIGKILLed: its stale lock is taken over
    train_all(t)
    assert [r["epoch"] for r in rows(t.paths.csv)] == ["1"]


def test_a_newer_trainer_takes_over_and_the_old_one_writes_nothing(cifar, tmp_path):
    old = Trainer(tiny(tmp_path, epochs=2), cifar, **QUIET)
    old.resume()
    new = Trainer(tiny(tmp_path, epochs=2), cifar, **QUIET)  # the notebook's model cell re-run
    new.resume()
    with pytest.raises(RunLockedError, match="no longer holds"):
        old.run_epoch(1)
    train_all(new)
    assert [r["epoch"] for r in rows(new.paths.csv)] == ["1", "2"]


def test_lock_from_another_host_is_stale_only_after_its_heartbeat_expires(tmp_path, monkeypatch):
    path = tmp_path / "run.lock"
    path.write_text(json.dumps({"pid": 1, "host": "elsewhere", "token": "x", "heartbeat": time.time()}))
    with pytest.raises(RunLockedError, match="elsewhere"):
        RunLock(path).acquire()
    monkeypatch.setattr(run_lock, "STALE_SECONDS", 0)  # old by our clock: watched, and it does not beat
    monkeypatch.setattr(run_lock, "WATCH_SECONDS", 0.2)
    RunLock(path).acquire()


# Row 5: amp changes within a run.
def test_resuming_a_bf16_run_with_fp16_works(cifar, tmp_path):
    train_all(Trainer(tiny(tmp_path, epochs=1, amp="bf16"), cifar, **QUIET))
    t = Trainer(tiny(tmp_path, epochs=2, amp="fp16"), cifar, **QUIET)
    assert t.resume() == 1 and t.scaler.is_enabled()
    train_all(t)
    assert [r["epoch"] for r in rows(t.paths.csv)] == ["1", "2"]


# Row 6: nothing in a data file can run code.
class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_data_file_cannot_run_code(fake_cifar, tmp_path):
    marker = tmp_path / "pwned"
    batch = fake_cifar / "cifar-10-batches-py" / "data_batch_1"
    with open(batch, "wb") as f:
        pickle.dump({"data": _Evil(marker), "labels": [0]}, f, protocol=2)
    with pytest.raises(CorruptDatasetError, match="refusing to load posix.system|refusing to load os.system"):
        read_batch(batch)
    assert not marker.exists()


# Row 7: integrity is checked on load.
def test_flipped_bytes_in_latest_are_detected(cifar, tmp_path):
    t = Trainer(tiny(tmp_path, epochs=1), cifar, **QUIET)
    train_all(t)
    data = bytearray(t.paths.latest.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 64] = bytes(b ^ 0xFF for b in data[middle : middle + 64])
    t.paths.latest.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="CRC") as info:
        Trainer(tiny(tmp_path, epochs=2), cifar, **QUIET).resume()
    assert str(t.paths.latest) in str(info.value)


# Row 8: temp files of a killed save are cleaned when the run starts.
def test_stale_temp_files_of_this_run_are_removed(cifar, tmp_path):
    ck = tmp_path / "checkpoint"
    ck.mkdir()
    ours = ck / ".dyt_cifar10_latest.pth.abc123.tmp"
    theirs = ck / ".other_run_latest.pth.abc123.tmp"
    ours.write_bytes(b"half")
    theirs.write_bytes(b"half")
    t = Trainer(tiny(tmp_path, epochs=1), cifar, **QUIET)
    t.resume()
    assert not ours.exists() and theirs.exists()
    assert "removed 1 temp file" in t.paths.log.read_text()


# Row 9: a full disk is named as such.
def test_full_disk_says_which_folder_and_how_much_space(cifar, tmp_path, monkeypatch):
    t = Trainer(tiny(tmp_path, epochs=2), cifar, **QUIET)
    t.resume()
    t.run_epoch(1)
    t.files.wait_for_saves()
    latest = t.paths.latest.read_bytes()

    def full_disk(obj, f):
        raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 810880 vs 810768")

    monkeypatch.setattr(torch, "save", full_disk)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**9, 10**9 - 1000, 1000))
    with pytest.raises(OSError) as info:
        t.run_epoch(2)
    msg = str(info.value)
    assert info.value.errno == errno.ENOSPC and "full" in msg and str(tmp_path / "checkpoint") in msg
    assert "needs about" in msg and "MiB free" in msg
    assert t.paths.latest.read_bytes() == latest and not run_files.temp_files(t.paths.latest)


# Row 10: best copied over latest. The best file is a copy of the latest of its epoch, so it resumes
# from there; a weights-only best file of an earlier version gets a clear message.
def test_best_copied_over_latest_resumes_from_its_epoch(cifar, tmp_path):
    t = Trainer(tiny(tmp_path, epochs=2), cifar, **QUIET)
    t.resume()
    t.run_epoch(1)
    t.files.wait_for_saves()
    assert t.paths.best.read_bytes() == t.paths.latest.read_bytes()
    t.run_epoch(2)
    t.close()
    best = torch.load(t.paths.best, weights_only=True)
    shutil.copy(t.paths.best, t.paths.latest)
    again = Trainer(tiny(tmp_path, epochs=2), cifar, **QUIET)
    assert again.resume() == best["epoch"] and again.best.acc == best["best_acc"]


def test_a_weights_only_best_of_an_earlier_version_copied_over_latest_gets_a_clear_message(cifar, tmp_path):
    t = Trainer(tiny(tmp_path, epochs=1), cifar, **QUIET)
    train_all(t)
    t.close()
    old_best = {"format": 1, "config": t.cfg.to_dict(), "model": t.model.state_dict(), "weights": "raw", "epoch": 1,
                "test_acc": 0.5}  # fmt: skip
    torch.save(old_best, t.paths.latest)
    with pytest.raises(CheckpointError, match="best-model checkpoint of an earlier version") as info:
        Trainer(tiny(tmp_path, epochs=2), cifar, **QUIET).resume()
    assert "cannot resume" in str(info.value) and "another run_name" in str(info.value)


# Row 11: a CSV line of NUL bytes.
def test_nul_line_in_the_csv_is_dropped_and_logged(cifar, tmp_path):
    t = Trainer(tiny(tmp_path, epochs=2), cifar, **QUIET)
    t.resume()
    t.run_epoch(1)
    t.files.wait_for_saves()
    with open(t.paths.csv, "ab") as f:
        f.write(b"\0" * 300 + b"\n")
    again = Trainer(tiny(tmp_path, epochs=2), cifar, **QUIET)
    assert again.resume() == 1
    train_all(again)
    assert [r["epoch"] for r in rows(again.paths.csv)] == ["1", "2"]
    assert "dropped 1 damaged CSV line" in again.paths.log.read_text()
    assert b"\0" not in again.paths.csv.read_bytes()
    assert list(csv.reader(open(again.paths.csv)))[0][0] == "epoch"


# Row 13: data_dir pointing at a file.
def test_data_dir_that_is_a_file_says_so(tmp_path):
    f = tmp_path / "cifar.zip"
    f.write_bytes(b"x")
    with pytest.raises(NotADirectoryError, match="is a file, not a folder"):
        ensure_cifar10(f, download=True)


# Row 15: an unwritable output folder is found before any training.
def test_unwritable_checkpoint_folder_is_refused_before_training(cifar, tmp_path):
    blocker = tmp_path / "not_a_folder"
    blocker.write_text("x")
    t = Trainer(tiny(tmp_path, checkpoint_dir=str(blocker / "ck")), cifar, **QUIET)
    with pytest.raises(PermissionError, match="cannot write in .*not_a_folder"):
        train_all(t)
    assert t.step == 0 and not (tmp_path / "log" / "dyt_cifar10.csv").exists()


# Row 16: lowering epochs is defined and said.
def test_lowering_epochs_is_said_on_screen_and_in_status(cifar, tmp_path, capsys):
    train_all(Trainer(tiny(tmp_path, epochs=3), cifar, **QUIET))
    lower = Trainer(tiny(tmp_path, epochs=2), cifar, progress="lines")
    assert lower.resume() == 3 and list(lower.remaining_epochs()) == []
    out = capsys.readouterr().out
    assert "epochs changed from 3 to 2" in out and "nothing left to train" in out
    assert lower.status().startswith("finished: 3 epochs trained, more than epochs = 2")


def test_lowering_epochs_mid_run_redraws_the_cosine(cifar, tmp_path, capsys):
    t = Trainer(tiny(tmp_path, epochs=4), cifar, **QUIET)
    t.resume()
    t.run_epoch(1)
    shorter = Trainer(tiny(tmp_path, epochs=2), cifar, progress="lines")
    assert list(shorter.remaining_epochs()) == [2]
    assert "re-drawn for 2 epochs" in capsys.readouterr().out
    row = shorter.run_epoch(2)
    spe, cfg = shorter.steps_per_epoch, shorter.cfg
    assert shorter.total_steps == 2 * spe  # the cosine now ends with epoch 2
    assert row["lr"] == pytest.approx(lr_at(2 * spe - 1, 2 * spe, shorter.warmup_steps, cfg.lr, cfg.min_lr))


# --- Reliability II: one test per defect row (D1-D13) ---------------------------------------------


def test_d1_an_interrupt_during_the_restore_restores_again_next_time(cifar, tmp_path, monkeypatch, reference_runs):
    t = Trainer(tiny(tmp_path), cifar, **QUIET)
    _interrupt_at(t, monkeypatch, step=t.steps_per_epoch + 2)
    with pytest.raises(KeyboardInterrupt):
        train_all(t)
    real_read = t.files.read_latest
    calls = []

    def stop_pressed_again():  # the stop button hit while the checkpoint is read
        calls.append(1)
        if len(calls) == 1:
            raise KeyboardInterrupt
        return real_read()

    monkeypatch.setattr(t.files, "read_latest", stop_pressed_again)
    with pytest.raises(KeyboardInterrupt):
        train_all(t)
    train_all(t)  # the cell run a third time: restores from the checkpoint, never from epoch 1
    assert [r["epoch"] for r in rows(t.paths.csv)] == ["1", "2", "3"]
    assert_same_run(reference_runs.get("default"), t)


def test_d3_an_older_latest_put_back_by_hand_keeps_the_better_best(cifar, tmp_path):
    t = Trainer(tiny(tmp_path), cifar, **QUIET)
    t.resume()
    t.run_epoch(1)
    t.files.wait_for_saves()
    epoch1 = t.paths.latest.read_bytes()
    t.run_epoch(2)
    t.close()
    state = torch.load(t.paths.best, weights_only=True)  # a better best on disk than epoch 1 remembers
    state.update(best_acc=0.99, best_epoch=2)
    torch.save(state, t.paths.best)
    best = t.paths.best.read_bytes()
    t.paths.latest.write_bytes(epoch1)  # what the corrupt-checkpoint message suggests: a good older latest
    again = Trainer(tiny(tmp_path), cifar, progress="lines")
    assert again.resume() == 1 and (again.best.acc, again.best.epoch) == (0.99, 2)
    train_all(again)
    assert t.paths.best.read_bytes() == best  # no epoch beat 99%: the best file was never replaced
    assert "it stays the best" in t.paths.log.read_text()


def test_d4_a_slow_epoch_keeps_its_lock_fresh_and_a_lost_lock_writes_nothing(cifar, tmp_path, monkeypatch):
    monkeypatch.setattr(run_lock, "HEARTBEAT_SECONDS", 0.05)
    monkeypatch.setattr(run_lock, "STALE_SECONDS", 0.5)
    t = Trainer(tiny(tmp_path), cifar, **QUIET)
    t.resume()
    beats = set()
    for _ in range(3000):  # the timer rewrites the heartbeat while no epoch ends (a bound, not a timing)
        beats.add(json.loads(t.paths.lock.read_text())["heartbeat"])
        if len(beats) >= 4:
            break
        time.sleep(0.01)
    assert len(beats) >= 4
    monkeypatch.setattr(run_lock.socket, "gethostname", lambda: "another-host")
    with pytest.raises(RunLockedError, match="is being trained by process"):
        RunLock(t.paths.lock).acquire()  # another host sees a fresh heartbeat: refused
    monkeypatch.undo()
    real = t.train_epoch

    def taken_over_mid_epoch():
        stats = real()
        t.paths.lock.write_text(json.dumps({"pid": 1, "host": "elsewhere", "token": "x", "heartbeat": time.time()}))
        return stats

    t.train_epoch = taken_over_mid_epoch
    t.files.lock.stop_heartbeat()  # a beat under way could overwrite the fake takeover below
    with pytest.raises(RunLockedError, match="no longer holds"):
        t.run_epoch(1)
    assert not t.paths.csv.exists() and not t.paths.latest.exists()  # checked before each write


def test_d5_a_damaged_csv_header_is_rebuilt_and_the_rows_kept(cifar, tmp_path):
    import figures
    import report

    t = Trainer(tiny(tmp_path), cifar, **QUIET)
    t.resume()
    t.run_epoch(1)
    t.run_epoch(2)
    t.close()
    lines = t.paths.csv.read_bytes().split(b"\n")
    t.paths.csv.write_bytes(b"\0" * len(lines[0]) + b"\n" + b"\n".join(lines[1:]))  # a power cut in the header
    again = Trainer(tiny(tmp_path), cifar, **QUIET)
    assert again.resume() == 2
    table = rows(t.paths.csv)
    assert list(table[0]) == again.csv_columns() and [r["epoch"] for r in table] == ["1", "2"]
    assert "rebuilt the CSV's damaged header" in t.paths.log.read_text()
    train_all(again)
    assert report.summarize_run(t.paths.csv)["epochs"] == 3  # the results cells work again
    figures.plot_run(t.paths.csv, tmp_path / "run.png")


@pytest.mark.parametrize(
    "content, says",
    [
        ("not json", "it is not JSON"),
        ("[1, 2]", "it is not a JSON object"),
        ('{"pid": "abc", "host": "h", "token": "t", "heartbeat": 1}', "its pid 'abc' is not a process id"),
        ('{"pid": 1180591620717411303424, "host": "h", "token": "t", "heartbeat": 1}', "is not a process id"),
        ('{"pid": 0, "host": "h", "token": "t", "heartbeat": 1}', "its pid 0 is not a process id"),
        ('{"host": "h", "token": "t", "heartbeat": 1}', "its pid None is not a process id"),
        ('{"pid": 5, "host": "h", "token": "t", "heartbeat": "soon"}', "its heartbeat 'soon' is not a time"),
    ],
)
def test_d6_a_lock_file_with_odd_content_gets_a_clear_message(tmp_path, content, says):
    path = tmp_path / "run.lock"
    path.write_text(content)
    with pytest.raises(run_lock.DamagedLockError) as info:
        RunLock(path).acquire()
    message = str(info.value)
    assert says in message and str(path) in message and f"delete {path}" in message
    assert path.read_text() == content  # nothing taken over or removed


def test_d6_an_empty_lock_left_by_a_dead_writer_is_taken_over(tmp_path):
    path = tmp_path / "run.lock"
    path.write_text("")
    old = time.time() - 60
    os.utime(path, (old, old))
    lock = RunLock(path)
    lock.acquire()
    assert json.loads(path.read_text())["token"] == lock.token
    lock.release()


def test_d7_set_asides_in_one_second_keep_every_file(cifar, tmp_path):
    csv_path = RunPaths.of(tiny(tmp_path)).csv
    csv_path.parent.mkdir(parents=True)
    for n in range(3):  # three fresh starts within a second, each finding an earlier CSV and no checkpoint
        csv_path.write_text(f"epoch\n{n}\n")
        t = Trainer(tiny(tmp_path), cifar, **QUIET)
        assert t.resume() is None
        t.close()
    aside = sorted(csv_path.parent.glob("dyt_cifar10.*.orphaned.csv"))
    assert sorted(p.read_text() for p in aside) == [f"epoch\n{n}\n" for n in range(3)]


def test_d8_compare_seeds_as_a_string_is_parsed_and_checked_before_training():
    from config import parse_seeds

    assert parse_seeds("[0, 1]") == [0, 1]
    with pytest.raises(ValueError, match="compare_seeds is not a JSON list"):
        parse_seeds("[0, 1")


def test_d9_values_config_cannot_run_are_refused_or_computed_lazily(tmp_path):
    import figures
    from config import Config
    from recipe import warmup_steps

    with pytest.raises(ValueError, match="eval_batch_size must be an integer >= 0 and <= 10000"):
        Config(eval_batch_size=10**9)
    with pytest.raises(ValueError, match="batch_size must be an integer >= 1 and <= 50000"):
        Config(batch_size=10**9)
    assert warmup_steps(Config(warmup_epochs=1e308, epochs=10), 100) == 100  # capped, no OverflowError
    calls = []

    def lr(step):
        calls.append(step)
        return 1.0

    figures.plot_schedule(lr, 10**6 * 195, 195, tmp_path / "s.png")  # epochs = 10**6: no list of every step
    assert len(calls) == figures.SCHEDULE_POINTS and calls[0] == 0 and calls[-1] == 10**6 * 195 - 1


def test_d10_a_lock_file_deleted_by_hand_is_taken_again_and_said(cifar, tmp_path):
    t = Trainer(tiny(tmp_path), cifar, progress="lines")
    t.resume()
    t.run_epoch(1)
    t.paths.lock.unlink()
    t.run_epoch(2)
    t.run_epoch(3)
    assert [r["epoch"] for r in rows(t.paths.csv)] == ["1", "2", "3"]
    assert t.paths.log.read_text().count("was deleted while this run trained; it is taken again") == 1
    assert json.loads(t.paths.lock.read_text())["token"] == t.files.lock.token


def test_d11_compile_time_is_not_in_the_cpu_estimate_and_cuda_graphs_on_a_cpu_is_said(
    cifar, tmp_path, monkeypatch, capsys
):
    import step

    clock = {"now": 0.0}

    def fake_perf_counter():
        return clock["now"]

    real_step = step.CompiledStep._step

    def step_taking_time(self, x, targets):  # each proof step "compiles" for 100 s, others take 1 s
        clock["now"] += 100.0 if self._unproven_steps else 1.0
        return real_step(self, x, targets)

    monkeypatch.setattr(torch, "compile", lambda module, **kw: module)
    monkeypatch.setattr(step.CompiledStep, "_step", step_taking_time)
    monkeypatch.setattr(step.time, "perf_counter", fake_perf_counter)
    t = Trainer(tiny(tmp_path, epochs=1, compile=True, cuda_graphs=True, batch_size=10), cifar, progress="lines")
    train_all(t)
    out = capsys.readouterr().out
    assert "cuda_graphs=True has no effect here" in out and "is compiled without them on cpu" in out
    # 3 proof steps of 100 s are compile time; the estimate sees the steps' 0 s of training time.
    assert "CPU estimate: about 0s per epoch" in out and t.compile_clock.seconds >= 300


def test_d12_a_checkpoint_missing_keys_names_the_file(cifar, tmp_path):
    t = Trainer(tiny(tmp_path, epochs=1), cifar, **QUIET)
    train_all(t)
    t.close()
    state = torch.load(t.paths.latest, weights_only=True)
    for key in ("model", "epoch"):
        del state[key]
    torch.save(state, t.paths.latest)
    with pytest.raises(CheckpointError, match="lacks model, epoch") as info:
        Trainer(tiny(tmp_path, epochs=2), cifar, **QUIET).resume()
    assert str(t.paths.latest) in str(info.value)


def test_d13_an_extracted_batch_file_that_differs_from_the_published_one_is_refused(fake_cifar):
    from data import load_cifar10, published_md5s

    folder = fake_cifar / "cifar-10-batches-py"
    with pytest.raises(CorruptDatasetError, match="data_batch_1 is not the published CIFAR-10 file") as info:
        load_cifar10(fake_cifar, download=False)
    assert published_md5s()["data_batch_1"] in str(info.value) and "verify_data=False" in str(info.value)
    assert f"delete the folder {folder}" in str(info.value)
    assert len(load_cifar10(fake_cifar, download=False, verify=False).x_test) == 50  # a data set of one's own
