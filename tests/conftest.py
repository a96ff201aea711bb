"""Shared fixtures: small CIFAR-10 in the exact on-disk layout torchvision uses."""

import contextlib
import csv
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from config import Config
from data import BATCH_FOLDER, TEST_FILES, TRAIN_FILES

# One torch thread in the test process: its tensors are tiny, and beside another busy process on a 2-core
# machine torch's default of two threads made the quick loop take over 13 minutes (stopped there) against
# 57 s with one (2026-12-06). Tests that need another count set it themselves.
torch.set_num_threads(1)


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


@pytest.fixture(scope="session")
def reference_runs(tmp_path_factory):
    """Uninterrupted reference runs, each trained once per test session, on the same generated data
    as the ``cifar`` fixture (the generator is seeded)."""
    from data import load_cifar10

    root = tmp_path_factory.mktemp("reference")
    return ReferenceRuns(root, load_cifar10(write_fake_cifar10(root / "data"), download=False, verify=False))


@pytest.fixture
def cifar(fake_cifar):
    """The generated CIFAR-10 loaded onto the CPU by the real loading code."""
    from data import load_cifar10

    return load_cifar10(fake_cifar, download=False, verify=False)


QUIET = dict(progress="off")  # Trainer keyword arguments: nothing on screen


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
        verify_data=False,  # generated CIFAR-format files, not the published ones
        compile_cache=False,  # compiled kernels in the machine's cache, not a fresh folder per test
        checkpoint_dir=str(tmp_path / "checkpoint"),
        log_dir=str(tmp_path / "log"),
        plot_dir=str(tmp_path / "plots"),
    )
    base.update(overrides)
    return Config(**base)


@contextlib.contextmanager
def lock_held_by_another_process(lock_path: Path, seconds: int = 120):
    """A child process that holds the run lock at ``lock_path`` (as another notebook or sweep would),
    killed on leaving the block."""
    holder = subprocess.Popen(
        [sys.executable, "-c", f"import sys, time; sys.path[:0] = {sys.path!r}; from runs.lock import RunLock; "
         f"lock = RunLock({str(lock_path)!r}); lock.acquire(); print('held', flush=True); time.sleep({seconds})"],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "held"
        yield holder
    finally:
        holder.kill()
        holder.wait()
        holder.stdout.close()


def rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def without_time(table):
    return [{k: v for k, v in r.items() if k not in TIME_COLUMNS} for r in table]


class ReferenceRuns:
    """Named tiny configs and, for each, one uninterrupted run trained on first use. Tests compare
    their own (interrupted, resumed, compiled...) runs of the same config with it; none may train it
    further or write into its folder."""

    CONFIGS = {
        "default": {},
        "mixup": dict(epochs=2, mixup_alpha=0.4, cutmix_alpha=1.0, warmup_epochs=1),
        "levers": dict(ema_decay=0.8, pool="gap", attn_init="mimetic", randaug_prob=0.5, alpha_lr_scale=0.1),
    }
    MIXUP = CONFIGS["mixup"]
    LEVERS = CONFIGS["levers"]

    def __init__(self, root: Path, data):
        self.root, self.data, self._runs = root, data, {}

    def get(self, name: str):
        from training import Trainer

        if name not in self._runs:
            trainer = Trainer(tiny(self.root / name, **self.CONFIGS[name]), self.data, **QUIET)
            train_all(trainer)
            trainer.close()
            self._runs[name] = trainer
        return self._runs[name]

    assert_same_run = staticmethod(lambda a, b: assert_same_run(a, b))


def assert_same_run(a, b) -> None:
    """Two trainers ended in the same state: steps, every weight (and EMA weight) bit for bit, and
    the same CSV apart from timings."""
    assert (a.epoch, a.step) == (b.epoch, b.step)
    pairs = [(a.model, b.model)] + ([(a.ema.module, b.ema.module)] if a.ema is not None else [])
    for x, y in pairs:
        sx, sy = x.state_dict(), y.state_dict()
        assert sx.keys() == sy.keys() and all(torch.equal(sx[k], sy[k]) for k in sx)
    assert without_time(rows(a.paths.csv)) == without_time(rows(b.paths.csv))


class S3Server:
    """A local S3-compatible server (moto's server mode on 127.0.0.1) with one bucket, and the test
    credentials set in this process's environment, as a cluster's nodes would have them."""

    ACCESS_KEY, SECRET_KEY = "dyt-test-access-key", "dyt-test-secret-9f2c"
    BUCKET = "dyt-runs"

    def __init__(self):
        from moto.server import ThreadedMotoServer

        self.port = 0
        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self.server.start()
        self.port = self.server.get_host_and_port()[1]
        self.endpoint = f"http://127.0.0.1:{self.port}"

    def filesystem(self):
        import pyarrow.fs as pafs

        return pafs.S3FileSystem(endpoint_override=f"127.0.0.1:{self.port}", scheme="http", region="us-east-1")

    def stop(self) -> None:
        """The server goes away (its objects are kept in this process): the storage is unreachable."""
        self.server.stop()

    def start(self) -> None:
        """The server answers again, on the same port, with the same objects."""
        from moto.server import ThreadedMotoServer

        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self.server.start()


@pytest.fixture(scope="session")
def s3_server():
    """``S3Server`` for the session (skipped, saying why, where moto or pyarrow is not installed)."""
    import logging
    import os

    pytest.importorskip("moto.server", reason="the storage tests need moto: pip install -r requirements-dev.txt")
    pytest.importorskip("pyarrow.fs", reason="the storage tests need pyarrow (installed with Ray)")
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no line per request
    names = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")
    before = {n: os.environ.get(n) for n in names}
    os.environ.update(AWS_ACCESS_KEY_ID=S3Server.ACCESS_KEY, AWS_SECRET_ACCESS_KEY=S3Server.SECRET_KEY,
                      AWS_DEFAULT_REGION="us-east-1")  # fmt: skip
    server = S3Server()
    import pyarrow.fs as pafs

    pafs.S3FileSystem(
        endpoint_override=f"127.0.0.1:{server.port}", scheme="http", allow_bucket_creation=True
    ).create_dir(S3Server.BUCKET)
    yield server
    server.stop()
    for n, v in before.items():
        if v is None:
            os.environ.pop(n, None)
        else:
            os.environ[n] = v
