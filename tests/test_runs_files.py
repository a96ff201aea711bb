"""A run's files (runs/files.py): their names, the CSV, set-aside names, background saves with the best
as a copy of the latest, what a checkpoint must hold, and the log's session header."""

import json

import pytest
import torch

from conftest import rows, tiny
from runs import checkpoints, history
from runs import files as run_files
from runs.checkpoints import CheckpointError, CheckpointWriter
from runs.files import RunFiles, RunPaths
from runs.lock import RunLockedError


def test_every_file_name_comes_from_run_paths(tmp_path):
    p = RunPaths.of(tiny(tmp_path, run_name="r1"))
    ck, log, plots = tmp_path / "checkpoint", tmp_path / "log", tmp_path / "plots"
    assert (p.latest, p.best, p.lock) == (ck / "r1_latest.pth", ck / "r1_best.pth", ck / "r1.lock")
    assert (p.csv, p.log, p.config) == (log / "r1.csv", log / "r1.log", log / "r1_config.json")
    assert (p.result, p.output, p.figure("training")) == (
        log / "r1_result.json",
        log / "r1.out",
        plots / "r1_training.png",
    )
    with pytest.raises(AttributeError):
        p.name = "other"  # one frozen value


def test_a_csv_from_an_older_version_gains_the_new_columns(tmp_path):
    path = tmp_path / "run.csv"
    history.append_csv(path, {"epoch": 1, "test_acc": 0.5, "epoch_seconds": 3.0})
    history.append_csv(path, {"epoch": 2, "test_acc": 0.6, "train_seconds": 2.0})
    table = rows(path)
    assert list(table[0]) == ["epoch", "test_acc", "epoch_seconds", "train_seconds"]
    assert table[0] == {"epoch": "1", "test_acc": "0.5", "epoch_seconds": "3.0", "train_seconds": ""}
    assert table[1] == {"epoch": "2", "test_acc": "0.6", "epoch_seconds": "", "train_seconds": "2.0"}
    history.append_csv(path, {"epoch": 3, "test_acc": 0.7, "train_seconds": 2.0})
    assert [r["epoch"] for r in rows(path)] == ["1", "2", "3"]


def test_repair_keeps_rows_up_to_the_epoch_and_drops_damaged_lines(tmp_path):
    path = tmp_path / "run.csv"
    for e in (1, 2, 3):
        history.append_csv(path, {"epoch": e, "test_acc": e / 10})
    with open(path, "ab") as f:
        f.write(b"4,0.4\n5\n" + b"\0" * 20 + b"\n")  # rows past epoch 2, a partial row, a NUL line
    assert history.repair_csv(path, 2, ["epoch", "test_acc"]) == (2, 2, False)
    assert rows(path) == [{"epoch": "1", "test_acc": "0.1"}, {"epoch": "2", "test_acc": "0.2"}]
    assert history.repair_csv(path, 2, ["epoch", "test_acc"]) == (0, 0, False)  # sound: left alone


def test_set_aside_never_replaces_an_earlier_set_aside_file(tmp_path):
    made = []
    for content in (b"first", b"second", b"third"):  # within one second: the same time stamp
        path = tmp_path / "run_best.pth"
        path.write_bytes(content)
        made.append(run_files.set_aside(path, "orphaned"))
        assert not path.exists()
    assert len(set(made)) == 3 and [m.read_bytes() for m in made] == [b"first", b"second", b"third"]
    assert made[1].name.endswith("-2.orphaned.pth") and made[2].name.endswith("-3.orphaned.pth")


def test_the_writer_saves_latest_then_copies_it_as_best_and_readers_wait(tmp_path):
    writer = CheckpointWriter()
    state = {"format": 1, "config": {}, "x": torch.arange(1000)}
    latest, best = tmp_path / "a_latest.pth", tmp_path / "a_best.pth"
    writer.submit(latest, state, (best,))
    assert torch.equal(checkpoints.load_checkpoint(best, resumable=False)["x"], state["x"])  # waits for the copy
    writer.wait()
    assert latest.read_bytes() == best.read_bytes()
    writer.submit(latest, {**state, "x": torch.zeros(3)})  # no copy: best keeps the earlier epoch
    writer.wait()
    assert latest.read_bytes() != best.read_bytes()


def test_a_checkpoint_missing_what_a_resume_reads_names_the_file_and_the_keys(cifar, tmp_path):
    from conftest import QUIET, train_all
    from training import Trainer

    t = Trainer(tiny(tmp_path, epochs=1), cifar, **QUIET)
    train_all(t)
    t.close()
    state = torch.load(t.paths.latest, weights_only=True)
    del state["best_acc"], state["rng"]["loader"]
    torch.save(state, t.paths.latest)
    with pytest.raises(CheckpointError) as info:
        Trainer(tiny(tmp_path, epochs=2), cifar, **QUIET).resume()
    message = str(info.value)
    assert str(t.paths.latest) in message and "lacks best_acc, rng.loader" in message and "Move it away" in message


def test_the_log_keeps_lines_said_before_the_session_and_writes_the_header_once(tmp_path):
    files = RunFiles(tiny(tmp_path))
    files.log("said before the lock was taken")
    assert not files.paths.log.exists()
    files.open()
    files.start_session("fresh start", ["environment: x"])
    files.start_session("restored", ["environment: x"])
    lines = [line.split(" ", 2)[2] for line in files.paths.log.read_text().splitlines()]
    assert lines == ["=== session: fresh start", "environment: x", "said before the lock was taken", "=== restored"]
    assert json.loads(files.paths.config.read_text())["epochs"] == 3
    files.close()
    assert not files.paths.lock.exists()


def test_record_refuses_once_another_trainer_holds_the_run(tmp_path):
    files = RunFiles(tiny(tmp_path))
    files.open()
    newer = RunFiles(tiny(tmp_path))
    newer.open()  # the same process built a newer trainer: it takes the run over
    with pytest.raises(RunLockedError, match="no longer holds"):
        files.record({"epoch": 1}, {"format": 1}, best=False)
    assert not files.paths.csv.exists() and not files.paths.latest.exists()
    newer.close()


def _files_with(tmp_path, latest: dict, best: dict | None) -> RunFiles:
    files = RunFiles(tiny(tmp_path))
    files.test_images = 100
    checkpoints.save_checkpoint(files.paths.latest, latest)
    if best is not None:
        checkpoints.save_checkpoint(files.paths.best, best)
    return files


def _checkpoint(cfg, epoch: int, best_acc: float, best_epoch: int) -> dict:
    return {"format": checkpoints.CHECKPOINT_FORMAT, "config": cfg.to_dict(), "model": {"w": torch.full((2,), epoch)},
            "optimizer": {}, "scaler": {}, "epoch": epoch, "step": epoch, "best_acc": best_acc,
            "best_epoch": best_epoch, "best_source": "raw", "rng": {}}  # fmt: skip


def test_restore_best_copies_a_cut_off_best_from_latest(tmp_path):
    cfg = tiny(tmp_path)
    latest = _checkpoint(cfg, 4, 0.5, 4)  # latest is the best epoch; its copy never happened
    files = _files_with(tmp_path, latest, _checkpoint(cfg, 2, 0.3, 2))
    note = files.restore_best(latest)
    assert files.best == (0.5, 4, "raw") and "made" in note and "cut off" in note
    assert torch.load(files.paths.best, weights_only=True)["epoch"] == 4  # the best file now holds epoch 4


def test_restore_best_keeps_the_best_file_when_the_recorded_epoch_is_nowhere(tmp_path):
    cfg = tiny(tmp_path / "a")
    latest = _checkpoint(cfg, 5, 0.5, 4)  # records epoch 4 as best, but the best file holds epoch 2
    files = _files_with(tmp_path / "a", latest, _checkpoint(cfg, 2, 0.3, 2))
    note = files.restore_best(latest)
    assert files.best == (0.3, 2, "raw") and "epoch 4 is missing, so epoch 2 (30.00%) stays the best" in note
    cfg = tiny(tmp_path / "b")
    files = _files_with(tmp_path / "b", _checkpoint(cfg, 5, 0.5, 4), None)  # and no best file at all
    assert "none is kept" in files.restore_best(_checkpoint(cfg, 5, 0.5, 4)) and files.best == (0.0, 0, "raw")
    assert files.consider(6, [(0.01, "raw")]) and files.best.epoch == 6  # the next scoring epoch is the best


def test_accuracies_are_compared_in_whole_images(tmp_path):
    files = RunFiles(tiny(tmp_path))
    files.test_images = 100
    files.best = checkpoints.BestRecord(0.07, 1, "raw")
    assert not files.consider(2, [(0.07000000029802322, "raw")])  # float32 of 7/100 against 0.07: a tie
    assert files.consider(2, [(0.08, "ema"), (0.07, "raw")]) and files.best == (0.08, 2, "ema")
