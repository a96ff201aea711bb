"""bench/norm_probe.py: each probe of a finished run against the run itself (its real initial weights,
its trained model, its CSV), and the per-arm means."""

import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

from conftest import QUIET, tiny, train_all
from data import normalize
from models import attention_entropy
from training import Trainer

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
import norm_probe  # noqa: E402


def _train(tmp_path, cifar, name, **kw):
    trainer = Trainer(tiny(tmp_path, run_name=name, epochs=2, **kw), cifar, **QUIET)
    initial = {n: t.detach().clone() for n, t in trainer.model.state_dict().items()}
    train_all(trainer)
    return trainer, initial


def test_probes_match_the_run_they_describe(cifar, tmp_path):
    runs = {
        "p_seed-0": _train(tmp_path, cifar, "p_seed-0", seed=0),
        "p_seed-1": _train(tmp_path, cifar, "p_seed-1", seed=1),
        "p_norm-ln_seed-0": _train(tmp_path, cifar, "p_norm-ln_seed-0", seed=0, norm="ln"),
    }
    table = norm_probe.probe(tmp_path / "checkpoint", list(runs), cifar, images=30, log_dir=tmp_path / "log")
    images = normalize(cifar.x_test[:30])
    for name, (trainer, initial) in runs.items():
        row, final = table.loc[name], trainer.model.state_dict()
        qkv = [n for n in initial if n.endswith("attn.qkv.weight")]
        moved = sum((final[n] - initial[n]).pow(2).sum() for n in qkv) / sum(initial[n].pow(2).sum() for n in qkv)
        assert row["drift_attn.qkv"] == pytest.approx(moved.sqrt().item(), rel=1e-6)  # the real initial weights
        assert [row[f"entropy_{b}"] for b in range(2)] == pytest.approx(attention_entropy(trainer.model, images))
        history = pd.read_csv(trainer.paths.csv)
        assert row["clean_acc_last"] == pytest.approx(100 * history["train_clean_acc"].iloc[-1])
        assert row["gap"] == pytest.approx(row["clean_acc_last"] - 100 * history["test_acc"].iloc[-1])
        assert row["epoch"] == 2 and row["drift_patch_embed"] > 0
    assert table.loc["p_seed-0", "arm"] == "p" and table.loc["p_norm-ln_seed-0", "arm"] == "p_norm-ln"
    assert pd.isna(table.loc["p_norm-ln_seed-0", "squashed_blocks.0.norm1"])
    assert 0 <= table.loc["p_seed-0", "squashed_blocks.0.norm1"] <= 1
    trained = runs["p_seed-0"][0].model
    with torch.no_grad():
        embedded = trained.embed(images)
        out = trained.blocks[0].norm1(embedded).pow(2).mean().sqrt().item()
    assert table.loc["p_seed-0", "rms_in_blocks.0.norm1"] == pytest.approx(
        embedded.pow(2).mean().sqrt().item(), rel=1e-5
    )
    assert table.loc["p_seed-0", "rms_out_blocks.0.norm1"] == pytest.approx(out, rel=1e-5)
    arms = norm_probe.by_arm(table)
    assert list(arms.index) == ["p", "p_norm-ln"] and list(arms["seeds"]) == [2, 1]
    assert arms.loc["p", "drift_mlp.fc1"] == pytest.approx(table.loc[["p_seed-0", "p_seed-1"], "drift_mlp.fc1"].mean())
    assert not torch.equal(runs["p_seed-0"][1]["patch_embed.weight"], runs["p_seed-1"][1]["patch_embed.weight"])


def test_a_missing_run_is_named(cifar, tmp_path):
    with pytest.raises(FileNotFoundError, match="nope_latest.pth is missing"):
        norm_probe.probe(tmp_path, ["nope"], cifar, images=10)
    with pytest.raises(KeyError, match="no weight named like 'fc9'"):
        norm_probe.drift({"a.weight": torch.ones(2)}, {"a.weight": torch.ones(2)}, "fc9")


def test_a_replay_is_the_run_again_probed_epoch_by_epoch(cifar, tmp_path):
    trainer, _ = _train(tmp_path, cifar, "r_seed-0", seed=0, cpu_threads=1)
    history = pd.read_csv(trainer.paths.csv)
    rows = norm_probe.replay(trainer.paths.latest, cifar, 30, 2, tmp_path / "replay", history)
    assert [r["epoch"] for r in rows] == [1, 2]
    assert [r["clean_acc"] for r in rows] == pytest.approx(list(100 * history["train_clean_acc"]), rel=1e-6)
    final = norm_probe.probe_run(trainer.paths.latest, cifar, 30)
    assert [rows[-1][f"entropy_{b}"] for b in range(2)] == [final[f"entropy_{b}"] for b in range(2)]
    assert rows[-1]["rms_out_norm"] == final["rms_out_norm"]  # the replay ends where the run ended, bit for bit
    assert (tmp_path / "replay" / "log" / "r_seed-0.csv").exists() and len(history) == 2  # the run's files untouched
    history.loc[1, "train_loss"] += 1e-7
    with pytest.raises(RuntimeError, match="epoch 2 has training loss .* not the same run"):
        norm_probe.replay(trainer.paths.latest, cifar, 30, 2, tmp_path / "again", history)
