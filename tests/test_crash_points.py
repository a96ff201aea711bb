"""A real process SIGKILLed at each point of an epoch's end (before, during and after the CSV row, the
latest checkpoint's write and its copy to the best checkpoint), then resumed: the status, the best file
and the CSV agree every time, and the run ends as an uninterrupted one does (issue: a kill while the
best checkpoint is copied lost it)."""

import json
import subprocess
import sys

import pytest
import torch

from conftest import QUIET, rows, tiny, train_all, without_time
from runs.checkpoints import best_summary
from training import Trainer

pytestmark = pytest.mark.slow  # a child process per crash point

# The child trains the run and kills itself (SIGKILL: no handler, no cleanup) at the nth time it
# reaches `point`. Writes are recognised by the file they go to, so nothing of the product is changed.
CHILD = r"""
import json, os, shutil, signal, sys
point, nth, cfg = sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3])
import torch
torch.set_num_threads(1)
from config import Config
from recipe import load_data
from runs import files
from training import Trainer

seen = {"n": 0}

def reached(here):
    if here == point:
        seen["n"] += 1
        if seen["n"] == nth:
            os.kill(os.getpid(), signal.SIGKILL)

def kind(path):
    name = str(path)
    return "latest" if name.endswith("_latest.pth") else "best" if name.endswith("_best.pth") else "other"

real_replace, real_save, real_copy, real_append = os.replace, torch.save, shutil.copyfile, files.append_csv

def replace(src, dst, *args, **kwargs):
    reached(f"before-{kind(dst)}-replace")  # the temp file is whole, not yet in place
    real_replace(src, dst, *args, **kwargs)
    reached(f"after-{kind(dst)}-replace")

def save(obj, f, *args, **kwargs):
    real_save(obj, f, *args, **kwargs)
    if point == "mid-latest-write" and seen["n"] + 1 == nth:  # leave half a temp file, then die
        os.truncate(f, os.path.getsize(f) // 2)
    reached("mid-latest-write")

def copy(src, dst, *args, **kwargs):
    real_copy(src, dst, *args, **kwargs)
    if point == "mid-best-copy" and seen["n"] + 1 == nth:
        os.truncate(dst, os.path.getsize(dst) // 2)
    reached("mid-best-copy")

def append(path, row):
    reached("before-csv")
    real_append(path, row)
    reached("after-csv")

os.replace, torch.save, shutil.copyfile, files.append_csv = replace, save, copy, append
trainer = Trainer(Config.from_dict(cfg), load_data(Config.from_dict(cfg)), progress="off")
for epoch in trainer.remaining_epochs():
    trainer.run_epoch(epoch)
trainer.close()
"""

POINTS = (
    "before-csv",
    "after-csv",
    "mid-latest-write",
    "before-latest-replace",
    "after-latest-replace",
    "mid-best-copy",
    "before-best-replace",
    "after-best-replace",
)


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the child: the same kernels, so the resumed run is bitwise the reference
    yield
    torch.set_num_threads(threads)


# Learns within a few epochs on the generated data: better at epochs 1, 2 and 3 (three best copies), not at 4.
RECIPE = dict(epochs=4, lr=5e-3, warmup_epochs=0, randaugment=False, mixup_alpha=0, drop_path=0, dropout=0,
              batch_size=8, dim=32)  # fmt: skip


def _config(folder, data_dir):
    return tiny(folder, data_dir=str(data_dir), download=False, **RECIPE)


@pytest.fixture
def reference(tmp_path, cifar, fake_cifar, one_thread):
    t = Trainer(_config(tmp_path / "reference", fake_cifar), cifar, **QUIET)
    train_all(t)
    t.close()
    accs = [float(r["test_acc"]) for r in rows(t.paths.csv)]
    better = [i + 1 for i, a in enumerate(accs) if a > max([0.0] + accs[:i])]
    assert better == [1, 2, 3] and t.best.epoch == 3, accs  # so a kill can land on each best copy, and after
    return t


def _run_killed(cfg, point: str, nth: int) -> int:
    done = subprocess.run(
        [sys.executable, "-c", f"import sys; sys.path[:0] = {sys.path!r}\n" + CHILD, point, str(nth),
         json.dumps(cfg.to_dict())],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == -9, f"{point} #{nth}: the child was not killed there ({done.returncode}): {done.stderr}"
    return done.returncode


@pytest.mark.parametrize("point", POINTS)
def test_a_kill_at_any_point_of_the_epoch_end_loses_no_best_checkpoint(point, tmp_path, cifar, fake_cifar, reference):
    ref = reference
    ref_best = torch.load(ref.paths.best, weights_only=True)
    for nth in (1, 3):  # the first epoch's, and the third (the best epoch: its latest is then copied to best)
        cfg = _config(tmp_path / f"{point}-{nth}", fake_cifar)
        _run_killed(cfg, point, nth)
        t = Trainer(cfg, cifar, **QUIET)
        train_all(t)  # resumes after the kill and finishes
        assert without_time(rows(t.paths.csv)) == without_time(rows(ref.paths.csv)), (point, nth)
        assert t.best == ref.best, (point, nth)  # the status names the reference's best epoch
        on_disk = t.files.read_best()
        assert best_summary(on_disk) == t.best and on_disk["epoch"] == t.best.epoch  # that epoch's file
        assert all(torch.equal(on_disk["model"][k], ref_best["model"][k]) for k in ref_best["model"])
        csv_best = max(rows(t.paths.csv), key=lambda r: float(r["test_acc"]))
        assert int(csv_best["epoch"]) == t.best.epoch and float(csv_best["test_acc"]) == t.best.acc
        model, info = t.best_model()
        assert info["epoch"] == t.best.epoch and f"at epoch {t.best.epoch}" in t.status()
        t.close()
