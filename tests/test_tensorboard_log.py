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
