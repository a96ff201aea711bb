"""Sweeps on Ray (on_ray.py), on a local Ray instance started once for this module: the same files as
the local backend, a trial killed mid-run retried from its last epoch, ASHA stopping a clearly worse run.
Ray is an optional extra (requirements-cluster.txt); CI installs it, so these run there."""

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

ray = pytest.importorskip("ray", reason="Ray is an optional extra: pip install -r requirements-cluster.txt")
pytestmark = pytest.mark.slow  # starts a local Ray

import sweeps  # noqa: E402
from config import Config  # noqa: E402
from conftest import lock_held_by_another_process, rows, write_fake_cifar10  # noqa: E402
from runs.files import RunPaths  # noqa: E402
from sweeps import on_ray  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    """One local Ray for the module. On a loaded machine Ray's start-up can miss its own deadlines: it is
    tried again once, and if it still cannot start the module is skipped saying why (a Ray that started
    and then fails a test is a failure like any other)."""
    for attempt in (1, 2):
        try:
            on_ray.start_ray(num_cpus=2, include_dashboard=False, log_to_driver=False)
            break
        except Exception as e:  # Ray's own start-up error on a machine too busy to start it in time
            ray.shutdown()
            if attempt == 2:
                pytest.skip(f"a local Ray could not start on this machine, twice: {type(e).__name__}: {e}")
            time.sleep(5)
    yield
    ray.shutdown()


def _base(root, data, **kw) -> Config:
    values = dict(
        epochs=2, dim=16, depth=1, heads=2, batch_size=50, eval_batch_size=50, device="cpu", data_dir=str(data),
        download=False, checkpoint_dir=str(root / "ck"), log_dir=str(root / "log"), plot_dir=str(root / "plots"),
        clean_train_images=50, verify_data=False, compile_cache=False,
    )  # fmt: skip
    values.update(kw)
    return Config(**values)


def test_a_ray_sweep_writes_what_the_local_backend_writes(tmp_path):
    data = write_fake_cifar10(tmp_path / "data", per_batch=20, test=40)
    tables = {}
    for backend in ("local", "ray"):
        runs = sweeps.grid(_base(tmp_path / backend, data), {"norm": ["dyt", "ln"]})
        if backend == "local":
            tables[backend] = sweeps.run_sweep(runs, per_gpu=2, name="norms", progress="off")  # 1 thread each
        else:
            tables[backend] = on_ray.run_ray_sweep(runs, "norms", progress="off")  # 1 CPU each
        for cfg, _ in runs:
            tables[(backend, cfg.name)] = [
                (r["epoch"], r["test_acc"], r["train_loss"]) for r in rows(RunPaths.of(cfg).csv)
            ]
    for name in ("dyt_cifar10_norm-dyt", "dyt_cifar10_norm-ln"):
        assert len(tables[("ray", name)]) == 2 and tables[("ray", name)] == tables[("local", name)]
    assert list(tables["ray"]["status"]) == ["finished", "finished"]
    assert (tmp_path / "ray" / "log" / "norms_groups.csv").exists() and (
        tmp_path / "ray" / "plots" / "norms.png"
    ).exists()
    again = on_ray.run_ray_sweep(runs, "norms", progress="off")  # finished runs are not trained again
    assert [(r["epoch"], r["test_acc"], r["train_loss"]) for r in rows(RunPaths.of(runs[0][0]).csv)] == tables[
        ("ray", runs[0][0].name)
    ] and list(again["status"]) == ["finished", "finished"]


def test_a_trial_killed_mid_run_is_retried_and_resumes(tmp_path):
    data = write_fake_cifar10(tmp_path / "data", per_batch=60, test=40)
    runs = sweeps.grid(_base(tmp_path, data, epochs=4, batch_size=10), {"seed": [0]})
    paths = RunPaths.of(on_ray.with_absolute_folders(runs[0][0]))
    killed = []

    def kill_the_worker_after_its_first_epoch():
        for _ in range(6000):  # a bound, not a timing
            if paths.csv.exists() and len(rows(paths.csv)) >= 1 and paths.lock.exists():
                try:
                    pid = int(__import__("json").loads(paths.lock.read_text())["pid"])
                except (ValueError, KeyError):
                    continue
                killed.append(len(rows(paths.csv)))
                os.kill(pid, signal.SIGKILL)  # the worker dies mid-run, as on a lost node
                return
            time.sleep(0.05)

    watcher = threading.Thread(target=kill_the_worker_after_its_first_epoch)
    watcher.start()
    table = on_ray.run_ray_sweep(runs, "killed", max_failures=2, progress="off")
    watcher.join()
    assert killed and killed[0] < 4  # it died part-way
    assert [r["epoch"] for r in rows(paths.csv)] == ["1", "2", "3", "4"]  # every epoch once
    assert list(table["status"]) == ["finished"]


def test_asha_stops_a_clearly_worse_run_and_the_table_says_so(tmp_path):
    data = write_fake_cifar10(tmp_path / "data", per_batch=60, test=50)
    base = _base(tmp_path, data, epochs=4, batch_size=10, warmup_epochs=0, clean_train_images=0)
    runs = sweeps.expand(base, [{"lr": 3e-3}, {"lr": 1e-7, "min_lr": 0.0}])  # the good run first
    table = on_ray.run_ray_sweep(
        runs, "asha", scheduler="asha", max_epochs=4, grace_epochs=1, max_concurrent=1, progress="off"
    )
    status = dict(zip(table["run_name"], zip(table["status"], table["epochs"])))
    assert status[runs[0][0].name] == ("finished", 4)
    assert status[runs[1][0].name][0] == "stopped early" and status[runs[1][0].name][1] < 4
    assert list(table.attrs["groups"]["runs"]) == [1]  # only the finished run is in the statistics


def test_r1_ctrl_c_on_the_driver_leaves_runs_unfinished_and_a_rerun_continues_them(tmp_path):
    data = write_fake_cifar10(tmp_path / "data", per_batch=60, test=40)
    base = _base(tmp_path, data, epochs=40, batch_size=10)
    runs = [(on_ray.with_absolute_folders(c), o) for c, o in sweeps.grid(base, {"seed": [0, 1]})]
    address = ray.get_runtime_context().gcs_address  # the driver joins this module's local Ray
    shared = json.dumps(runs[0][0].to_dict() | {"run_name": "", "seed": 0})
    command = [sys.executable, "-m", "sweeps", "--backend", "ray", "--address", address, "--grid", '{"seed": [0, 1]}',
               "--overrides", shared, "--name", "ctrlc"]  # fmt: skip
    driver = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    csvs = [RunPaths.of(c).csv for c, _ in runs]
    try:
        for _ in range(6000):  # a bound on polls, not a timing: both runs are training
            if all(p.exists() and len(rows(p)) >= 1 for p in csvs) or driver.poll() is not None:
                break
            time.sleep(0.05)
        driver.send_signal(signal.SIGINT)  # Ctrl-C on the driver, no scheduler
        driver.communicate(timeout=180)
    finally:
        if driver.poll() is None:
            driver.kill()
    trained = [len(rows(p)) for p in csvs]
    assert all(0 < n < 40 for n in trained), trained  # interrupted part-way
    for cfg, _ in runs:
        assert sweeps.run_result(cfg)["status"] in ("unfinished", "running elsewhere")
        result = RunPaths.of(cfg).result
        assert not result.exists() or "stopped early" not in result.read_text()
    for _ in range(6000):  # the trials' workers end after the driver: their locks go stale
        if all(sweeps.run_result(c)["status"] == "unfinished" for c, _ in runs):
            break
        time.sleep(0.05)
    table = on_ray.run_ray_sweep(runs, "ctrlc", progress="off")  # the command run again continues them
    assert list(table["status"]) == ["finished", "finished"]
    for p in csvs:
        assert [r["epoch"] for r in rows(p)] == [str(e) for e in range(1, 41)]  # every epoch once


def test_r5_a_run_locked_by_another_process_is_running_elsewhere_and_nothing_is_written(tmp_path):
    data = write_fake_cifar10(tmp_path / "data", per_batch=20, test=40)
    runs = sweeps.grid(_base(tmp_path, data), {"seed": [0, 1]})
    runs = [(on_ray.with_absolute_folders(c), o) for c, o in runs]
    busy = RunPaths.of(runs[1][0])
    with lock_held_by_another_process(busy.lock):  # another sweep trains seed 1
        table = on_ray.run_ray_sweep(runs, "twice", progress="off")
    status = dict(zip(table["run_name"], table["status"]))
    assert status[runs[0][0].name] == "finished" and status[busy.name] == "running elsewhere"
    assert not busy.result.exists() and not busy.csv.exists()  # nothing written about it here


def test_r9_an_address_where_no_cluster_answers_fails_fast_in_one_line(tmp_path, capsys):
    with pytest.raises(RuntimeError, match=r"no Ray cluster answers at 127.0.0.1:1 .*leave out --address"):
        on_ray.check_address("127.0.0.1:1")
    with pytest.raises(ValueError, match="HOST:PORT"):
        on_ray.check_address("nowhere")


def test_r11_a_log_folder_that_cannot_be_written_is_named_before_ray_starts(tmp_path):
    data = write_fake_cifar10(tmp_path / "data", per_batch=20, test=40)
    (tmp_path / "taken").write_text("a file where the log folder's parent should be")  # unwritable, even as root
    runs = sweeps.grid(_base(tmp_path, data, log_dir=str(tmp_path / "taken" / "log")), {"seed": [0]})
    with pytest.raises(PermissionError, match=f"cannot write in {tmp_path / 'taken' / 'log'}"):
        on_ray.run_ray_sweep(runs, "readonly", progress="off")
    assert not list(tmp_path.glob("ck/*.pth")) and not (tmp_path / "taken" / "ray").exists()  # nothing started
