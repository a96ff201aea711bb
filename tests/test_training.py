"""Training: config fields reaching the objects, schedule, weight-decay groups, exact resume, checkpoints, logs."""

import math
import re

import pytest
import torch

import figures
import recipe
from config import Config
from conftest import QUIET, assert_same_run, rows, tiny, train_all, without_time
from data import DatasetNotFoundError, load_cifar10
from models import DynamicTanh, ViT
from recipe import lr_at
from runs import checkpoints, history
from runs.checkpoints import CheckpointError, ConfigMismatchError
from training import Trainer


def test_config_fields_reach_the_objects(cifar, tmp_path):
    cfg = tiny(
        tmp_path,
        run_name="probe",
        norm="dyt",
        alpha_init=0.3,
        dim=24,
        depth=3,
        heads=3,
        patch_size=8,
        mlp_ratio=2.0,
        drop_path=0.3,
        dropout=0.05,
        lr=2e-3,
        weight_decay=0.1,
        batch_size=16,
        eval_batch_size=7,
        crop_padding=2,
        hflip=False,
        randaug_ops=3,
        randaug_magnitude=4.0,
        randaug_magnitude_std=0.0,
        mixup_alpha=0.4,
        cutmix_alpha=1.0,
        label_smoothing=0.2,
        amp="bf16",
        warmup_epochs=0.5,
        epochs=20,
        ema_decay=0.99,
        clean_train_images=30,
        pool="gap",
        randaug_prob=0.5,
        patch_embed_init="pytorch",
    )
    t = Trainer(cfg, cifar, **QUIET)
    m = t.model
    assert m.patch_embed.kernel_size == (8, 8) and m.patch_embed.out_channels == 24 and len(m.blocks) == 3
    assert m.blocks[0].attn.heads == 3 and m.blocks[0].mlp.fc1.out_features == 48
    assert m.blocks[2].drop_path1.p == pytest.approx(0.3) and m.pos_drop.p == 0.05
    assert isinstance(m.norm, DynamicTanh) and m.norm.alpha.item() == pytest.approx(0.3)
    assert t.optimizer.param_groups[0]["lr"] == 2e-3 and t.optimizer.param_groups[0]["weight_decay"] == 0.1
    assert (
        t.train_loader.batch_size == 16 and t.evaluator.test_loader.batch_size == 7 and t.steps_per_epoch == 200 // 16
    )
    assert t.warmup_steps == round(0.5 * 12) and t.total_steps == 20 * 12
    assert t.augment.padding == 2 and t.augment.flip is False
    ra = t.augment.randaugment
    assert (ra.num_ops, ra.magnitude, ra.magnitude_std, ra.prob) == (3, 4.0, 0.0, 0.5)
    assert m.patch_embed_init == "pytorch" and m.patch_embed.bias.abs().sum() > 0
    assert (
        t.ema.decay == 0.99 and len(t.evaluator.clean_train_loader.x) == 30 and m.pool == "gap" and m.cls_token is None
    )
    assert (t.mixup.mixup_alpha, t.mixup.cutmix_alpha, t.mixup.label_smoothing) == (0.4, 1.0, 0.2)
    assert t.amp_dtype == torch.bfloat16 and t.compile_mode is None  # compile: auto is off on CPU
    assert t.paths.latest.name == "probe_latest.pth" and t.paths.figure("training").parent == tmp_path / "plots"
    assert Trainer(tiny(tmp_path, randaugment=False), cifar, **QUIET).augment.randaugment is None


# --- schedule and optimizer -------------------------------------------------------------------


def test_lr_schedule_values():
    args = dict(total_steps=110, warmup_steps=10, peak=1e-3, floor=1e-5)
    assert lr_at(0, **args) == pytest.approx(1e-4)
    assert lr_at(9, **args) == pytest.approx(1e-3)
    assert lr_at(10, **args) == pytest.approx(1e-3)
    assert lr_at(60, **args) == pytest.approx(1e-5 + (1e-3 - 1e-5) * 0.5)
    assert lr_at(110, **args) == pytest.approx(1e-5)
    assert lr_at(35, **args) == pytest.approx(1e-5 + (1e-3 - 1e-5) * 0.5 * (1 + math.cos(math.pi / 4)))
    assert lr_at(4, total_steps=5, warmup_steps=10, peak=1.0, floor=0.0) == pytest.approx(0.5)  # run < warmup
    assert lr_at(5, total_steps=100, warmup_steps=0, peak=1.0, floor=0.0) == pytest.approx(
        0.5 * (1 + math.cos(math.pi * 0.05))
    )


def test_weight_decay_only_on_matrices():
    model = ViT(dim=16, depth=2, heads=2)
    decay, no_decay = recipe.param_groups(model, 0.05)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    assert decayed == {n for n, p in model.named_parameters() if p.ndim >= 2} - {"pos_embed", "cls_token"}
    assert "blocks.0.norm1.alpha" not in decayed and "head.bias" not in decayed and "patch_embed.weight" in decayed
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


# --- resume -----------------------------------------------------------------------------------


def test_interrupted_and_resumed_run_equals_uninterrupted(cifar, tmp_path, reference_runs):
    first = Trainer(tiny(tmp_path), cifar, **QUIET)
    first.resume()
    for epoch in list(first.remaining_epochs())[:2]:
        first.run_epoch(epoch)
    del first  # "the kernel died"
    second = Trainer(tiny(tmp_path), cifar, **QUIET)
    assert second.resume() == 2
    assert list(second.remaining_epochs()) == [3]
    train_all(second)
    full = reference_runs.get("default")
    assert_same_run(full, second)
    assert second.step == 3 * full.steps_per_epoch
    ra, rb = rows(full.paths.csv), rows(second.paths.csv)
    assert [r["epoch"] for r in rb] == ["1", "2", "3"]
    assert without_time(ra) == without_time(rb)
    log = second.paths.log.read_text()
    assert "resumed from" in log and "at epoch 2/3" in log and log.count("=== session") == 2


def test_checkpoint_holds_everything_and_loads_weights_only(cifar, tmp_path):
    t = Trainer(tiny(tmp_path, epochs=1), cifar, **QUIET)
    train_all(t)
    state = torch.load(t.paths.latest, weights_only=True)
    assert {"model", "optimizer", "scaler", "epoch", "step", "best_acc", "best_epoch", "config", "rng"} <= set(state)
    assert set(state["rng"]) == {"device_type", "torch", "cuda", "loader", "mixup"}
    assert state["epoch"] == 1 and state["config"] == t.cfg.to_dict()
    best = torch.load(t.paths.best, weights_only=True)
    assert best["best_epoch"] == 1 and best["best_acc"] == t.best.acc and best["best_source"] == "raw"
    assert not any(k.startswith("_orig_mod") for k in state["model"])


def test_rerun_after_finishing_trains_nothing(cifar, tmp_path):
    t = Trainer(tiny(tmp_path, epochs=1), cifar, **QUIET)
    train_all(t)
    again = Trainer(tiny(tmp_path, epochs=1), cifar, **QUIET)
    assert (
        again.resume() == 1 and again.status().startswith("finished: 1 of 1") and list(again.remaining_epochs()) == []
    )
    assert len(rows(again.paths.csv)) == 1


def test_raising_epochs_continues_the_same_run(cifar, tmp_path):
    t = Trainer(tiny(tmp_path, epochs=2), cifar, **QUIET)
    train_all(t)
    longer = Trainer(tiny(tmp_path, epochs=3), cifar, **QUIET)
    assert longer.resume() == 2
    train_all(longer)
    assert [r["epoch"] for r in rows(longer.paths.csv)] == ["1", "2", "3"]
    assert longer.total_steps == 3 * longer.steps_per_epoch


@pytest.mark.parametrize("change", [dict(dim=32), dict(lr=5e-4), dict(norm="ln", run_name="dyt_cifar10")])
def test_checkpoint_of_another_config_is_refused(cifar, tmp_path, change):
    train_all(Trainer(tiny(tmp_path, epochs=1), cifar, **QUIET))
    other = Trainer(tiny(tmp_path, epochs=1, **change), cifar, **QUIET)
    with pytest.raises(ConfigMismatchError) as info:
        other.resume()
    for field in change:
        if field != "run_name":
            assert field in str(info.value)


def test_ln_run_never_touches_dyt_files(cifar, tmp_path):
    dyt = Trainer(tiny(tmp_path, epochs=1), cifar, **QUIET)
    train_all(dyt)
    before = dyt.paths.latest.read_bytes()
    ln = Trainer(tiny(tmp_path, epochs=1, norm="ln"), cifar, **QUIET)
    assert ln.resume() is None
    train_all(ln)
    assert ln.paths.latest.name == "ln_cifar10_latest.pth" and dyt.paths.latest.read_bytes() == before


def test_corrupt_checkpoint_is_reported_and_best_kept(cifar, tmp_path):
    t = Trainer(tiny(tmp_path, epochs=1), cifar, **QUIET)
    train_all(t)
    best = t.paths.best.read_bytes()
    latest = t.paths.latest
    latest.write_bytes(latest.read_bytes()[: latest.stat().st_size // 2])
    again = Trainer(tiny(tmp_path, epochs=2), cifar, **QUIET)
    with pytest.raises(CheckpointError) as info:
        again.resume()
    assert str(latest) in str(info.value) and "best checkpoint" in str(info.value)
    assert t.paths.best.read_bytes() == best and latest.exists()


def test_foreign_file_is_not_a_checkpoint(tmp_path):
    path = tmp_path / "x.pth"
    torch.save({"weights": torch.zeros(2)}, path)
    with pytest.raises(CheckpointError, match="not a checkpoint"):
        checkpoints.load_checkpoint(path)


def test_save_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "run_latest.pth"
    checkpoints.save_checkpoint(path, {"format": 1, "config": {}, "v": torch.ones(3)})
    good = path.read_bytes()

    def crash(obj, f):
        with open(f, "wb") as out:
            out.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError, match="disk full"):
        checkpoints.save_checkpoint(path, {"format": 1, "config": {}, "v": torch.zeros(3)})
    assert path.read_bytes() == good
    assert [p.name for p in tmp_path.iterdir()] == ["run_latest.pth"]  # no temp file left behind


def test_resume_drops_csv_rows_past_the_checkpoint(cifar, tmp_path):
    t = Trainer(tiny(tmp_path, epochs=2), cifar, **QUIET)
    for epoch in list(t.remaining_epochs())[:1]:
        t.run_epoch(epoch)
    # Epoch 2 was trained and logged, then the kernel died before its checkpoint was written.
    extra = dict(rows(t.paths.csv)[0], epoch="2")
    history.append_csv(t.paths.csv, extra)
    again = Trainer(tiny(tmp_path, epochs=2), cifar, **QUIET)
    assert again.resume() == 1
    assert [r["epoch"] for r in rows(again.paths.csv)] == ["1"]
    train_all(again)
    assert [r["epoch"] for r in rows(again.paths.csv)] == ["1", "2"]
    assert "dropped 1 CSV rows" in again.paths.log.read_text()


def test_run_epoch_refuses_to_repeat_an_epoch(cifar, tmp_path):
    t = Trainer(tiny(tmp_path, epochs=2), cifar, **QUIET)
    with pytest.raises(RuntimeError, match="resume"):
        t.run_epoch(1)  # a trainer that has not looked for its checkpoint must not overwrite it
    t.resume()
    t.run_epoch(1)
    with pytest.raises(ValueError, match="not the next"):
        t.run_epoch(1)


def test_remaining_epochs_resumes_a_trainer_built_anew(cifar, tmp_path):
    first = Trainer(tiny(tmp_path, epochs=2), cifar, **QUIET)
    first.resume()
    first.run_epoch(1)
    rebuilt = Trainer(tiny(tmp_path, epochs=2), cifar, **QUIET)  # the model cell re-run
    assert list(rebuilt.remaining_epochs()) == [2] and rebuilt.step == rebuilt.steps_per_epoch
    assert rebuilt.resume() == 1  # idempotent


# --- logs and plots ---------------------------------------------------------------------------


def test_csv_log_and_config_files(cifar, tmp_path):
    t = Trainer(tiny(tmp_path, epochs=2), cifar, **QUIET)
    t.resume()
    train_all(t)
    table = rows(t.paths.csv)
    assert list(table[0])[:13] == [
        "epoch", "lr", "train_loss", "train_acc", "train_clean_acc", "test_loss", "test_acc",
        "train_seconds", "eval_seconds", "checkpoint_seconds", "compile_seconds", "images_per_second",
        "alpha_blocks.0.norm1",
    ]  # fmt: skip
    assert all(float(r["compile_seconds"]) == 0.0 for r in table)  # nothing compiled on the CPU by default
    assert [c for c in table[0] if c.startswith("alpha_")] == [
        "alpha_blocks.0.norm1",
        "alpha_blocks.0.norm2",
        "alpha_blocks.1.norm1",
        "alpha_blocks.1.norm2",
        "alpha_norm",
    ]
    assert 0 <= float(table[1]["test_acc"]) <= 1 and float(table[1]["lr"]) < float(table[0]["lr"])
    assert float(table[1]["alpha_norm"]) == pytest.approx(t.model.norm.alpha.item())
    log = t.paths.log.read_text()
    assert "environment: python=" in log and "torch=" in log and len(re.findall(r"epoch \d/\d \| ", log)) == 2
    assert Config.from_dict(__import__("json").loads(t.paths.config.read_text())) == t.cfg


def test_plots_are_drawn_from_the_csv_alone(tmp_path):
    csv_path = tmp_path / "run.csv"
    for e in range(1, 4):
        history.append_csv(
            csv_path,
            {
                "epoch": e,
                "lr": 1e-3 / e,
                "train_loss": 2 / e,
                "train_acc": 0.1 * e,
                "test_loss": 2.1 / e,
                "test_acc": 0.12 * e,
                "epoch_seconds": 1.0,
                "images_per_second": 100.0,
                "alpha_blocks.0.norm1": 0.5 + 0.01 * e,
                "alpha_norm": 0.5 - 0.01 * e,
                "gain_blocks.0.norm1": 0.4 + 0.01 * e,
                "gain_norm": 0.4 - 0.01 * e,
            },
        )
    fig = figures.plot_run(csv_path, tmp_path / "p" / "run.png", mixup=False)
    png = (tmp_path / "p" / "run.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000
    loss, acc, lr, alpha, gain, legend = fig.axes
    assert "best 36.00%" in [t.get_text() for t in acc.get_legend().get_texts()][1]
    assert not any("mixup" in t.get_text() for a in (loss, acc) for t in a.get_legend().get_texts())
    assert [line.get_label() for line in gain.get_lines()] == ["blocks.0.norm1", "norm"]
    assert list(gain.get_lines()[1].get_ydata()) == pytest.approx([0.39, 0.38, 0.37])
    texts = [t.get_text() for t in legend.get_legend().get_texts()]  # beside the panels, not over them
    assert texts == ["block 1", "norm", "norm1 (before attention)", "norm2 (before the MLP)"]
    assert legend.get_legend().get_texts()[0].get_fontsize() >= 10  # readable inline
    assert all(float(t).is_integer() for t in loss.get_xticks())  # 3 epochs: no tick at 1.5


def test_confusion_matrix_counts_every_test_image(cifar, tmp_path):
    t = Trainer(tiny(tmp_path, epochs=1, eval_batch_size=15), cifar, **QUIET)
    cm = t.evaluator.confusion_matrix(t.model)
    assert cm.shape == (10, 10) and cm.sum() == 50
    assert torch.equal(cm.sum(1), torch.bincount(cifar.y_test, minlength=10))


def test_best_model_is_a_separate_copy_with_best_weights(cifar, tmp_path):
    t = Trainer(tiny(tmp_path, epochs=2), cifar, **QUIET)
    train_all(t)
    model, info = t.best_model()
    assert model is not t.model and info["epoch"] == t.best.epoch and info["test_acc"] == t.best.acc
    saved = torch.load(t.paths.best, weights_only=True)
    assert saved["best_epoch"] == t.best.epoch and saved["best_source"] == info["source"] == "raw"
    assert all(torch.equal(v, saved["model"][k]) for k, v in model.state_dict().items())
    acc = t.evaluator.confusion_matrix(model).diag().sum().item() / 50
    assert acc == pytest.approx(t.best.acc)


def test_best_model_between_epochs_sees_the_epoch_just_trained_and_leaves_training_as_it_was(cifar, tmp_path):
    alone = Trainer(tiny(tmp_path / "alone", epochs=2), cifar, **QUIET)
    train_all(alone)
    t = Trainer(tiny(tmp_path / "asked", epochs=2), cifar, **QUIET)
    t.resume()
    t.run_epoch(1)
    model, info = t.best_model()  # right away: "no best checkpoint yet" before, while its copy was being written
    assert info["epoch"] == 1 and all(torch.equal(v, t.model.state_dict()[k]) for k, v in model.state_dict().items())
    t.run_epoch(2)
    t.close()
    assert_same_run(alone, t)  # asking did not move the random numbers drop path and dropout draw from


def test_load_data_reads_its_config_fields(fake_cifar, tmp_path):
    d = recipe.load_data(tiny(tmp_path, data_dir=str(fake_cifar), download=False, train_subset=64, test_subset=8))
    assert len(d.x_train) == 64 and len(d.x_test) == 8 and d.x_train.device.type == "cpu"
    with pytest.raises(DatasetNotFoundError, match="download=off"):
        recipe.load_data(tiny(tmp_path, data_dir=str(tmp_path / "empty"), download=False))


def test_seed_sets_init_and_batch_order(cifar, tmp_path):
    a = Trainer(tiny(tmp_path / "a", seed=1), cifar, **QUIET)
    b = Trainer(tiny(tmp_path / "b", seed=1), cifar, **QUIET)
    c = Trainer(tiny(tmp_path / "c", seed=2), cifar, **QUIET)
    assert torch.equal(a.model.head.weight, b.model.head.weight)
    assert not torch.equal(a.model.head.weight, c.model.head.weight)
    order = [torch.cat([y for _, y in t.train_loader]) for t in (a, b, c)]
    assert torch.equal(order[0], order[1]) and not torch.equal(order[0], order[2])


@pytest.mark.parametrize("grad_clip", [0.0, 0.25])
def test_grad_clip_is_applied_only_when_set(cifar, tmp_path, monkeypatch, grad_clip):
    calls = []
    real = torch.nn.utils.clip_grad_norm_

    def spy(params, max_norm, **kwargs):
        calls.append(max_norm)
        return real(params, max_norm, **kwargs)

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", spy)
    t = Trainer(tiny(tmp_path, grad_clip=grad_clip, epochs=1), cifar, **QUIET)
    t.train_epoch()
    assert calls == ([grad_clip] * t.steps_per_epoch if grad_clip else [])


def test_learning_rate_follows_config(cifar, tmp_path):
    t = Trainer(tiny(tmp_path, epochs=2, lr=2e-3, min_lr=5e-4, warmup_epochs=0.5), cifar, **QUIET)
    t.resume()
    lrs = [t.run_epoch(e)["lr"] for e in (1, 2)]
    expected = [lr_at(e * t.steps_per_epoch - 1, t.total_steps, t.warmup_steps, 2e-3, 5e-4) for e in (1, 2)]
    assert lrs == pytest.approx(expected) and 5e-4 < lrs[1] < 6e-4  # one step before the floor


def test_fresh_start_sets_an_orphaned_csv_aside(cifar, tmp_path):
    t = Trainer(tiny(tmp_path, epochs=1), cifar, **QUIET)
    train_all(t)
    t.paths.latest.unlink()  # the checkpoint is gone; its log stays
    again = Trainer(tiny(tmp_path, epochs=1), cifar, **QUIET)
    assert again.resume() is None
    aside = list((tmp_path / "log").glob("dyt_cifar10.*.orphaned.csv"))
    assert len(aside) == 1 and [r["epoch"] for r in rows(aside[0])] == ["1"]
    assert not again.paths.csv.exists()
    train_all(again)
    assert [r["epoch"] for r in rows(again.paths.csv)] == ["1"]


def test_checkpoint_from_another_device_type_resumes_with_reseeded_loader(cifar, tmp_path):
    t = Trainer(tiny(tmp_path, epochs=2), cifar, **QUIET)
    t.resume()
    t.run_epoch(1)
    t.files.wait_for_saves()  # the checkpoint is written in the background
    state = torch.load(t.paths.latest, weights_only=True)
    state["rng"]["device_type"] = "cuda"  # as written on a GPU: a CUDA generator state is 16 bytes
    state["rng"]["loader"]["generator"] = torch.zeros(16, dtype=torch.uint8)
    state["rng"]["cuda"] = [torch.zeros(16, dtype=torch.uint8)]
    torch.save(state, t.paths.latest)
    again = Trainer(tiny(tmp_path, epochs=2), cifar, **QUIET)
    assert again.resume() == 1
    assert "re-seeded" in again.paths.log.read_text()
    train_all(again)
    assert [r["epoch"] for r in rows(again.paths.csv)] == ["1", "2"]


def test_a_short_run_on_2000_images_learns_well_above_chance(tmp_path):
    from conftest import write_fake_cifar10

    data = load_cifar10(write_fake_cifar10(tmp_path / "data", per_batch=400, test=500), download=False, verify=False)
    cfg = tiny(tmp_path, epochs=3, dim=32, batch_size=64, lr=3e-3, drop_path=0.1, dropout=0.0, warmup_epochs=10)
    t = Trainer(cfg, data, **QUIET)
    assert t.warmup_steps == round(0.1 * 3 * t.steps_per_epoch)  # capped: a 10-epoch warmup would never end
    train_all(t)
    assert t.best.acc > 0.5  # chance is 0.1
