"""Several runs: grid -> runs with readable names, child processes, the table, group statistics and
plot, one failure not stopping the rest, and a sweep killed part-way then run again."""

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import sweeps
from config import RECIPES, Config
from conftest import rows, write_fake_cifar10
from runs import history
from runs.files import RunPaths
from sweeps.__main__ import main as sweeps_main

ROOT = Path(__file__).resolve().parent.parent


def _base(tmp_path, data, **kw) -> Config:
    values = dict(
        epochs=2, dim=16, depth=1, heads=2, batch_size=50, eval_batch_size=50, device="cpu", data_dir=str(data),
        download=False, checkpoint_dir=str(tmp_path / "ck"), log_dir=str(tmp_path / "log"),
        plot_dir=str(tmp_path / "plots"), clean_train_images=50, verify_data=False,
    )  # fmt: skip
    values.update(kw)
    return Config(**values)


def test_grid_names_each_run_after_its_overrides():
    runs = sweeps.grid(Config(run_name="mine"), {"norm": ["dyt", "ln"], "seed": [0, 1]})
    assert [c.name for c, _ in runs] == [
        "mine_norm-dyt_seed-0",
        "mine_norm-dyt_seed-1",
        "mine_norm-ln_seed-0",
        "mine_norm-ln_seed-1",
    ]
    assert [(c.norm, c.seed) for c, _ in runs] == [("dyt", 0), ("dyt", 1), ("ln", 0), ("ln", 1)]
    assert runs[3][1] == {"norm": "ln", "seed": 1}


@pytest.mark.slow
def test_tiny_sweep_table_group_statistics_and_plot(tmp_path):
    data = write_fake_cifar10(tmp_path / "data", per_batch=20, test=40)
    runs = sweeps.grid(_base(tmp_path, data), {"norm": ["dyt", "ln"], "seed": [0, 1]})
    table = sweeps.run_sweep(runs, per_gpu=2, name="norms", progress="off")
    assert list(table["status"]) == ["finished"] * 4 and list(table["epochs"]) == [2] * 4
    for cfg, _ in runs:
        accs = [100 * float(r["test_acc"]) for r in rows(Path(cfg.log_dir) / f"{cfg.name}.csv")]
        row = table[table["run_name"] == cfg.name].iloc[0]
        assert row["final_acc"] == pytest.approx(accs[-1]) and math.isnan(row["last5_acc"])  # 2 epochs: no mean of 5
    groups = table.attrs["groups"].set_index("norm")
    assert "last5_acc_mean" not in groups and "last3_acc_mean" not in groups  # headers follow what was run
    for norm in ("dyt", "ln"):
        mine = table[table["norm"] == norm]["final_acc"]
        assert groups.loc[norm, "final_acc_mean"] == pytest.approx(mine.mean())
        assert groups.loc[norm, "final_acc_std"] == pytest.approx(mine.std())
        assert groups.loc[norm, "runs"] == 2
    final = table.set_index(["norm", "seed"])["final_acc"]
    pairs = table.attrs["pairs"]
    assert list(pairs["setting"]) == ["norm=ln"] and list(pairs["against"]) == ["norm=dyt"]
    diffs = [final["ln", s] - final["dyt", s] for s in (0, 1)]
    assert pairs.iloc[0]["pairs"] == 2 and pairs.iloc[0]["mean_diff"] == pytest.approx(sum(diffs) / 2)
    written = (tmp_path / "log" / "norms_paired.csv").read_text().splitlines()
    assert written[0].startswith("setting,against,score,differences,pairs,mean_diff,se,ci_low,ci_high")
    assert (tmp_path / "log" / "norms_runs.csv").exists() and (tmp_path / "log" / "norms_groups.csv").exists()
    assert (tmp_path / "plots" / "norms.png").read_bytes()[:4] == b"\x89PNG"
    # Run again: everything is finished, nothing is trained.
    before = {c.name: (Path(c.log_dir) / f"{c.name}.csv").read_bytes() for c, _ in runs}
    again = sweeps.run_sweep(runs, per_gpu=2, name="norms", progress="off")
    assert list(again["status"]) == ["finished"] * 4
    assert before == {c.name: (Path(c.log_dir) / f"{c.name}.csv").read_bytes() for c, _ in runs}


@pytest.mark.slow
def test_one_failing_run_does_not_stop_the_others(tmp_path):
    data = write_fake_cifar10(tmp_path / "data", per_batch=20, test=40)
    base = _base(tmp_path, data, epochs=1, lr=1e30, min_lr=0.0, grad_clip=0.0, warmup_epochs=0)
    runs = sweeps.grid(base, {"norm": ["dyt"], "lr": [1e30, 1e-3]})
    table = sweeps.run_sweep(runs, per_gpu=2, name="mixed", progress="off")
    status = dict(zip(table["run_name"], table["status"]))
    assert status[runs[0][0].name] == "diverged" and status[runs[1][0].name] == "finished"
    assert "diverged" in table[table["status"] == "diverged"].iloc[0]["error"]


@pytest.mark.slow
def test_killed_sweep_resumes_every_run_once(tmp_path):
    data = write_fake_cifar10(tmp_path / "data", per_batch=60, test=40)
    overrides = json.dumps(_base(tmp_path, data, epochs=4, batch_size=10).to_dict())
    command = [sys.executable, "-m", "sweeps", "--grid", '{"norm": ["dyt", "ln"], "seed": [0]}',
               "--overrides", overrides, "--per-gpu", "2", "--name", "killed"]  # fmt: skip
    proc = subprocess.Popen(command, cwd=ROOT, start_new_session=True, stdout=subprocess.DEVNULL)
    log = tmp_path / "log" / "dyt_cifar10_norm-dyt_seed-0.csv"
    deadline = time.time() + 120
    while time.time() < deadline and not (log.exists() and len(rows(log)) >= 1):
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)  # the sweep and its children, mid-run
    proc.wait()
    assert log.exists() and len(rows(log)) < 4
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    for norm in ("dyt", "ln"):
        table = rows(tmp_path / "log" / f"dyt_cifar10_norm-{norm}_seed-0.csv")
        assert [r["epoch"] for r in table] == ["1", "2", "3", "4"]  # every epoch once, none twice
    assert "killed: 2 runs" in done.stdout and "per group" in done.stdout
    header = next(line for line in done.stdout.splitlines() if "run_name" in line).split()
    assert header[:4] == ["run_name", "norm", "seed", "status"]  # the swept fields are in the printed table


def test_listed_runs_cross_the_grid_and_clashes_are_refused():
    runs = sweeps.expand(Config(run_name="r"), [{}, {"pool": "gap", "lr": 0.002}], {"seed": [0, 1]})
    assert [c.name for c, _ in runs] == [
        "r_seed-0",
        "r_seed-1",
        "r_pool-gap_lr-0.002_seed-0",
        "r_pool-gap_lr-0.002_seed-1",
    ]
    assert [(c.pool, c.lr, c.seed) for c, _ in runs] == [
        ("cls", Config().lr, 0), ("cls", Config().lr, 1), ("gap", 0.002, 0), ("gap", 0.002, 1)
    ]  # fmt: skip
    assert [c.name for c, _ in sweeps.expand(Config(run_name="r"), [{}, {"norm": "ln"}])] == ["r", "r_norm-ln"]
    with pytest.raises(ValueError, match="share the name 'r'"):
        sweeps.expand(Config(run_name="r"), [{}, {}])
    with pytest.raises(ValueError, match="seed is set both"):
        sweeps.expand(Config(), [{"seed": 1}], {"seed": [0]})
    with pytest.raises(ValueError, match="did you mean 'seed'"):
        sweeps.expand(Config(), [{"sed": 1}])
    for bad in ([], {"pool": "gap"}, [1]):
        with pytest.raises(ValueError, match="non-empty list of JSON objects"):
            sweeps.expand(Config(), bad)
    with pytest.raises(ValueError, match="non-empty list of values"):
        sweeps.expand(Config(), [{}], {"seed": []})


@pytest.mark.slow
def test_listed_runs_table_fills_fields_from_the_config_and_reports_unfinished_runs(tmp_path):
    data = write_fake_cifar10(tmp_path / "data", per_batch=20, test=40)
    runs = sweeps.expand(_base(tmp_path, data, epochs=2), [{}, {"pool": "gap"}, {"pool": "gap", "ema_decay": 0.9}])
    table = sweeps.run_sweep(runs, per_gpu=3, name="recipes", progress="off")
    assert list(table["status"]) == ["finished"] * 3
    assert list(table["pool"]) == ["cls", "gap", "gap"]  # the base config's value where a run left it alone
    assert list(table["ema_decay"]) == [Config().ema_decay, Config().ema_decay, 0.9]
    assert len(table.attrs["groups"]) == 3 and list(table.attrs["groups"]["runs"]) == [1, 1, 1]
    # A run killed after its first epoch: reported from its CSV, kept out of the groups.
    paths = RunPaths.of(runs[1][0])
    paths.result.unlink()
    history.repair_csv(paths.csv, 1, [])
    again = sweeps.write_results(runs, "recipes")
    row = again[again["run_name"] == runs[1][0].name].iloc[0]
    assert row["status"] == "unfinished" and row["epochs"] == 1
    accs = [100 * float(r["test_acc"]) for r in rows(paths.csv)]
    assert len(accs) == 1 and row["final_acc"] == pytest.approx(accs[-1])
    assert list(again.attrs["groups"]["runs"]) == [1, 1]
    written = (tmp_path / "log" / "recipes_runs.csv").read_text()
    assert "unfinished" in written and written.count("finished") == 3
    # The same sweep asked again with another shared setting: those files are not this config's results.
    other = sweeps.expand(_base(tmp_path, data, epochs=2, lr=2e-3), [{}, {"pool": "gap"}])
    before = paths.csv.read_bytes()
    with pytest.raises(ValueError, match=r"2 run\(s\) of this sweep already have files from another config") as info:
        sweeps.run_sweep(other, per_gpu=3, name="recipes", progress="off")
    assert "lr 0.001 there, 0.002 now" in str(info.value) and runs[1][0].name in str(info.value)
    assert paths.csv.read_bytes() == before  # nothing trained


@pytest.mark.slow
def test_command_line_table_only_and_bad_input(tmp_path, capsys):
    data = write_fake_cifar10(tmp_path / "data", per_batch=20, test=40)
    overrides = json.dumps(_base(tmp_path, data, epochs=1).to_dict())
    base = [sys.executable, "-m", "sweeps", "--overrides", overrides, "--name", "cli"]
    listed = ["--runs", '[{}, {"norm": "ln"}]']
    shown = subprocess.run(base + listed + ["--table-only"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert shown.returncode == 0, shown.stderr
    assert "2 run(s) not finished" in shown.stdout and not (tmp_path / "ck").exists()  # nothing trained
    assert (tmp_path / "log" / "cli_runs.csv").read_text().count("not run") == 2
    for args, message in (
        (["--runs", "[{}, {}]"], "share the name"),
        (["--runs", "{not json"], "Expecting property name"),
        (["--runs", '[{"nrom": "ln"}]'], "did you mean 'norm'"),
        ([], "give --grid, --runs or both"),
    ):  # the same entry point, in this process (the command line above proved it starts)
        with pytest.raises(SystemExit) as exit_code:
            sweeps_main(["--overrides", overrides, "--name", "cli"] + args)
        assert exit_code.value.code == 2 and message in capsys.readouterr().err, (args, message)


def test_the_ray_backend_without_ray_says_what_to_install_and_its_flags_need_it(tmp_path, monkeypatch, capsys):
    from sweeps import on_ray

    monkeypatch.setitem(sys.modules, "ray", None)  # as on a machine without the optional extra
    with pytest.raises(RuntimeError, match="pip install -r requirements-cluster.txt") as info:
        on_ray.import_ray()
    assert "The local backend (the default) needs nothing more" in str(info.value)
    data = write_fake_cifar10(tmp_path / "data", per_batch=20, test=40)
    overrides = json.dumps(_base(tmp_path, data, epochs=1).to_dict())
    with pytest.raises(SystemExit) as exit_code:
        sweeps_main(["--overrides", overrides, "--runs", "[{}]", "--backend", "ray"])
    assert exit_code.value.code == 2 and "requirements-cluster.txt" in capsys.readouterr().err
    assert not (tmp_path / "ck").exists()  # nothing trained
    with pytest.raises(SystemExit):
        sweeps_main(["--overrides", overrides, "--runs", "[{}]", "--scheduler", "asha"])
    assert "--scheduler only mean something with --backend ray" in capsys.readouterr().err


@pytest.mark.parametrize(
    "args, says",
    [
        (["--name", "no/such/dir"], "the sweep name must be"),
        (["--name", ""], "the sweep name must be"),
        (["--per-gpu", "0"], "--per-gpu must be an integer >= 1"),
        (["--backend", "ray", "--max-epochs", "0"], "--max-epochs must be an integer >= 1"),
        (["--backend", "ray", "--grace-epochs", "-2"], "--grace-epochs must be an integer >= 1"),
        (["--backend", "ray", "--max-concurrent", "-1"], "--max-concurrent must be an integer >= 0"),
        (["--backend", "ray", "--max-failures", "-5"], "--max-failures must be an integer >= 0"),
        (["--backend", "ray", "--max-epochs", "4", "--grace-epochs", "5"], "must not exceed --max-epochs"),
    ],
)
def test_r10_bad_sweep_options_are_refused_before_anything_starts(tmp_path, capsys, args, says):
    data = write_fake_cifar10(tmp_path / "data", per_batch=20, test=40)
    overrides = json.dumps(_base(tmp_path, data, epochs=1).to_dict())
    with pytest.raises(SystemExit) as exit_code:
        sweeps_main(["--overrides", overrides, "--runs", "[{}]"] + args)
    assert exit_code.value.code == 2 and says in capsys.readouterr().err
    assert not (tmp_path / "ck").exists() and not (tmp_path / "log").exists()  # nothing trained or written
    with pytest.raises(ValueError, match="the sweep name must be"):
        sweeps.run_sweep(sweeps.expand(_base(tmp_path, data), [{}]), name="a/b", progress="off")


def test_r9_address_auto_without_a_cluster_says_so_in_one_line(tmp_path, monkeypatch, capsys):
    ray = pytest.importorskip("ray", reason="Ray is an optional extra")

    def no_cluster(*_, **__):
        raise ConnectionError("Could not find any running Ray instance. Please specify the one to connect to.")

    monkeypatch.setattr(ray, "init", no_cluster)  # what ray.init("auto") raises with no cluster running
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    data = write_fake_cifar10(tmp_path / "data", per_batch=20, test=40)
    overrides = json.dumps(_base(tmp_path, data, epochs=1).to_dict())
    with pytest.raises(SystemExit) as exit_code:
        sweeps_main(["--overrides", overrides, "--runs", "[{}]", "--backend", "ray", "--address", "auto"])
    err = capsys.readouterr().err
    assert exit_code.value.code == 2 and "no running Ray cluster found for --address auto" in err
    assert "ray start --head" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_r6_the_printed_table_shows_swept_settings_as_written(tmp_path, capsys):
    import pandas as pd

    table = pd.DataFrame(
        {"run_name": ["a", "b"], "lr": [0.003, 2e-05], "status": ["finished", "finished"], "epochs": [1, 1],
         "final_acc": [55.123, 10.0]}
    )  # fmt: skip
    groups = pd.DataFrame({"lr": [0.003, 2e-05], "final_acc_mean": [55.123, 10.0], "runs": [1, 1]})
    table.attrs.update(fields=["lr"], groups=groups, plot=tmp_path / "none.png")
    sweeps.show(table)
    out = capsys.readouterr().out
    assert "0.003" in out and "2e-05" in out and " 0.00 " not in out  # lr by magnitude, not 0.00 twice
    assert "55.12" in out  # scores keep two decimals


@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["cvt-7/4", "vit-lite-7/4"])
def test_a_sweep_starts_from_a_preset_by_name(tmp_path, recipe):
    data = write_fake_cifar10(tmp_path / "data", per_batch=20, test=40)
    small = {k: v for k, v in _base(tmp_path, data, epochs=2).to_dict().items() if k not in RECIPES["cvt-7/4"]}
    del small["recipe"]  # the preset is named by --recipe
    small.update(dim=32, heads=2, depth=1, batch_size=50, epochs=2)
    sweeps_main(["--recipe", recipe, "--overrides", json.dumps(small), "--grid", '{"norm": ["dyt", "ln"]}',
                 "--name", "preset"])  # fmt: skip
    for norm in ("dyt", "ln"):
        saved = json.loads((tmp_path / "log" / f"dyt_cifar10_norm-{norm}_config.json").read_text())
        assert saved["recipe"] == recipe and saved["pool"] == RECIPES[recipe]["pool"] and saved["norm"] == norm
        assert saved["block_style"] == "cct" and saved["epochs"] == 2
    assert list(pd_read(tmp_path / "log" / "preset_runs.csv")["status"]) == ["finished", "finished"]


def pd_read(path):
    import pandas as pd

    return pd.read_csv(path)


class FakeChild:
    """A child process that never ends by itself; records the signal it is sent."""

    returncode = None

    def __init__(self):
        self.signals = []

    def poll(self):
        return self.returncode

    def send_signal(self, sig):
        self.signals.append(sig)
        self.returncode = -sig

    def wait(self, timeout=None):
        return self.returncode

    def kill(self):
        self.returncode = -9


def test_a_sweep_shows_each_childs_epochs_and_a_stop_says_what_stopped(tmp_path, monkeypatch, capsys):
    data = write_fake_cifar10(tmp_path / "data", per_batch=20, test=40)
    runs = sweeps.grid(_base(tmp_path, data, epochs=4), {"seed": [0, 1]})
    children = []

    def launch(cfg, gpu, threads):
        children.append(FakeChild())
        return children[-1]

    polls = {"n": 0}

    def poll_sleep(seconds):  # between polls the first child finishes an epoch, then the user stops
        polls["n"] += 1
        if polls["n"] <= 2:
            row = {"epoch": polls["n"], "test_acc": 0.25 * polls["n"], "train_seconds": 50.0, "eval_seconds": 9.0,
                   "checkpoint_seconds": 1.0}  # fmt: skip
            history.append_csv(RunPaths.of(runs[0][0]).csv, row)
        else:
            raise KeyboardInterrupt

    monkeypatch.setattr(sweeps.local, "_launch", launch)
    monkeypatch.setattr(sweeps.local.time, "sleep", poll_sleep)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(KeyboardInterrupt) as info:
        sweeps.run_sweep(runs, per_gpu=1, name="watched")
    out = capsys.readouterr().out
    name = runs[0][0].name
    assert f"    {name}: epoch 1/4, test 25.00%, ~3m 00s left" in out
    assert f"    {name}: epoch 2/4, test 50.00%, ~2m 00s left" in out
    assert children[0].signals == [signal.SIGINT] and len(children) == 1  # one at a time: the second never started
    (shown,) = info.value._render_traceback_()
    assert isinstance(info.value, sweeps.local.SweepInterrupted) and len(shown.splitlines()) == 3
    assert f"  {name}: 2 of 4 epochs saved" in shown and "Run this cell (or the same command) again" in shown


def _finished(cfg, accs):
    """Run ``cfg``'s CSV as if it had trained, with these test accuracies."""
    RunPaths.of(cfg).csv.parent.mkdir(parents=True, exist_ok=True)
    for epoch, acc in enumerate(accs, 1):
        history.append_csv(RunPaths.of(cfg).csv, {"epoch": epoch, "test_acc": acc, "train_seconds": 1.0})


def test_a_sweep_of_one_seed_per_setting_pairs_on_it_and_says_why_there_is_no_interval(tmp_path, capsys):
    base = _base(tmp_path, tmp_path, epochs=1, seed=3)
    runs = sweeps.grid(base, {"norm": ["dyt", "ln"]})
    for (cfg, _), acc in zip(runs, (0.50, 0.47)):
        _finished(cfg, [acc])
    table = sweeps.write_results(runs, "two")
    assert list(table["seed"]) == [3, 3]  # not swept: the runs share the base config's seed, and pair on it
    pairs = table.attrs["pairs"]
    final = pairs[pairs["score"] == "final_acc"].iloc[0]
    assert final["setting"] == "norm=ln" and final["pairs"] == 1 and final["mean_diff"] == pytest.approx(-3)
    sweeps.show(table)
    out = capsys.readouterr().out
    assert "paired by seed: setting minus norm=dyt" in out and "one seed in common: a difference without an" in out
    # seeds that never meet: no difference, and the reason
    runs = sweeps.expand(base, [{"seed": 0}, {"norm": "ln", "seed": 1}])
    for (cfg, _), acc in zip(runs, (0.50, 0.47)):
        _finished(cfg, [acc])
    table = sweeps.write_results(runs, "apart")
    assert table.attrs["pairs"].empty
    sweeps.show(table)
    assert "no paired difference: no seed finished in both the first setting and another" in capsys.readouterr().out
    # a sweep of one setting has nothing to pair: nothing said
    runs = sweeps.grid(Config.from_dict({**base.to_dict(), "run_name": "single"}), {"seed": [0, 1]})
    for (cfg, _), acc in zip(runs, (0.50, 0.47)):
        _finished(cfg, [acc])
    sweeps.show(sweeps.write_results(runs, "one"))
    out = capsys.readouterr().out
    assert "paired" not in out and "one seed in common" not in out
