"""tensorboard=True: the CSV's numbers as TensorBoard scalars, the same values, no epoch twice after a
crash; and without the optional package, a clear error before anything trains."""

import sys

import pytest

from conftest import QUIET, rows, tiny, train_all
from runs.tensorboard_log import tag
from training import Trainer

event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")


def _scalars(folder) -> dict:
    acc = event_accumulator.EventAccumulator(str(folder), size_guidance={"scalars": 0})
    acc.Reload()
    return {t: [(e.step, e.value) for e in acc.Scalars(t)] for t in acc.Tags()["scalars"]}


def test_tensorboard_gets_the_csv_numbers_once_per_epoch_even_after_a_crash(cifar, tmp_path):
    t = Trainer(tiny(tmp_path, epochs=3, tensorboard=True, ema_decay=0.9), cifar, **QUIET)
    t.resume()
    t.run_epoch(1)
    t.run_epoch(2)
    t.files.wait_for_saves()
    epoch2 = t.paths.latest.read_bytes()
    t.run_epoch(3)
    t.close()
    t.paths.latest.write_bytes(epoch2)  # as after a crash before epoch 3's checkpoint: epoch 3 is trained again
    again = Trainer(tiny(tmp_path, epochs=3, tensorboard=True, ema_decay=0.9), cifar, **QUIET)
    train_all(again)
    again.close()
    scalars = _scalars(again.paths.tensorboard)
    table = rows(again.paths.csv)
    for column in table[0]:
        if column == "epoch":
            continue
        expected = [(int(r["epoch"]), pytest.approx(float(r[column]), rel=1e-6)) for r in table]
        assert scalars[tag(column)] == expected, column  # every epoch once, the CSV's value
    assert {"accuracy/test", "accuracy/test_ema", "loss/train", "lr"} <= set(scalars)
    assert any(k.startswith("alpha/") for k in scalars) and any(k.startswith("gain/") for k in scalars)


def test_tensorboard_without_the_package_says_what_to_install(tmp_path, monkeypatch, cifar):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    with pytest.raises(RuntimeError, match="pip install tensorboard, or set tensorboard=False"):
        Trainer(tiny(tmp_path, tensorboard=True), cifar, **QUIET)
    assert not (tmp_path / "log").exists()  # nothing written


@pytest.mark.parametrize("stop_at", ["after the row, before the checkpoint", "after the checkpoint"])
def test_a_stop_right_after_an_epochs_write_then_a_continue_in_the_same_process(cifar, tmp_path, monkeypatch, stop_at):
    from training import TrainingInterrupted

    t = Trainer(tiny(tmp_path, epochs=3, tensorboard=True), cifar, **QUIET)
    t.resume()
    t.run_epoch(1)
    if stop_at == "after the checkpoint":
        target, name = t.console, "epoch_line"  # the epoch's line is said after its files are written
    else:
        target, name = t.files.writer, "submit"  # the CSV and TensorBoard rows are written, the checkpoint not
    real = getattr(target, name)

    def stop_in_epoch_2(*args, **kwargs):
        if t.epoch == 2:
            monkeypatch.setattr(target, name, real)
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(target, name, stop_in_epoch_2)
    with pytest.raises(TrainingInterrupted) as stop:
        t.run_epoch(2)
    n = t.steps_per_epoch
    if stop_at == "after the checkpoint":
        assert stop.value.message.startswith(f"Stopped after epoch 2 was saved; nothing is lost (the last checkpoint "
                                             f"is {t.paths.latest} (epoch 2))")  # fmt: skip
    else:  # not "step 0 of N" for an epoch whose steps all trained
        said = f"Stopped in epoch 2 at step {n} of {n}; that epoch's progress is discarded and the last checkpoint"
        assert stop.value.message.startswith(f"{said} is {t.paths.latest} (epoch 1)")
    train_all(t)  # the same process goes on
    t.close()
    log = t.paths.log.read_text()
    resumed = "resuming after epoch 2 of 3\n" if stop_at == "after the checkpoint" else "resuming after epoch 1 of 3 ("
    assert resumed in log
    scalars = _scalars(t.paths.tensorboard)
    table = rows(t.paths.csv)
    assert [int(r["epoch"]) for r in table] == [1, 2, 3]
    for column in ("test_acc", "train_loss", "lr"):
        assert scalars[tag(column)] == [(int(r["epoch"]), pytest.approx(float(r[column]), rel=1e-6)) for r in table]
