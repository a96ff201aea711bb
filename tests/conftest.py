"""Shared fixtures: small CIFAR-10 in the exact on-disk layout torchvision uses."""

import csv
import pickle
from pathlib import Path

import numpy as np
import pytest

from config import Config
from data import BATCH_FOLDER, TEST_FILES, TRAIN_FILES


def write_fake_cifar10(root: Path, per_batch: int = 40, test: int = 50, seed: int = 0) -> Path:
    """Write ``root/cifar-10-batches-py/`` with five train batches of ``per_batch`` images and a test
    batch, as pickled dicts with the real files' keys. Images carry a class-dependent colour so
    that a model can learn something from them."""
    rng = np.random.default_rng(seed)
    folder = root / BATCH_FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    for name, n in [(f, per_batch) for f in TRAIN_FILES] + [(f, test) for f in TEST_FILES]:
        labels = rng.integers(0, 10, n)
        base = np.stack([labels * 25, 255 - labels * 25, (labels * 70) % 256], axis=1)[:, :, None]  # (n, 3, 1)
        noise = rng.integers(-40, 40, (n, 3, 1024))
        data = np.clip(base + noise, 0, 255).astype(np.uint8).reshape(n, 3072)
        entry = {
            "batch_label": f"fake {name}",
            "labels": labels.tolist(),
            "data": data,
            "filenames": [f"img_{i}.png" for i in range(n)],
        }
        with open(folder / name, "wb") as f:
            pickle.dump(entry, f, protocol=2)
    return root


@pytest.fixture
def fake_cifar(tmp_path):
    return write_fake_cifar10(tmp_path / "data")


@pytest.fixture
def cifar(fake_cifar):
    """The generated CIFAR-10 loaded onto the CPU by the real loading code."""
    from data import load_cifar10

    return load_cifar10(fake_cifar, download=False)


QUIET = dict(show_progress=False, print_epochs=False)  # Trainer keyword arguments: nothing on screen


def train_all(trainer) -> None:
    """Train every remaining epoch, as the notebook's training cell does."""
    for epoch in trainer.remaining_epochs():
        trainer.run_epoch(epoch)


TIME_COLUMNS = {"train_seconds", "eval_seconds", "checkpoint_seconds", "compile_seconds", "images_per_second"}


def tiny(tmp_path, **overrides) -> Config:
    base = dict(
        epochs=3,
        batch_size=32,
        eval_batch_size=40,
        dim=16,
        depth=2,
        heads=2,
        warmup_epochs=1,
        drop_path=0.2,
        dropout=0.1,
        device="cpu",
        checkpoint_dir=str(tmp_path / "checkpoint"),
        log_dir=str(tmp_path / "log"),
        plot_dir=str(tmp_path / "plots"),
    )
    base.update(overrides)
    return Config(**base)


def rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def without_time(table):
    return [{k: v for k, v in r.items() if k not in TIME_COLUMNS} for r in table]
