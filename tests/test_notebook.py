"""The notebook itself: committed clean, and executed headless (papermill, a real Jupyter kernel) on
generated CIFAR-10 files in torchvision's layout, then again with more epochs to check it resumes."""

import ast
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import write_fake_cifar10
from runs.history import read_csv

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK = ROOT / "dyt_cifar10.ipynb"
REQUIRED_PARAMETERS = {
    "epochs", "batch_size", "dim", "depth", "heads", "norm", "seed", "device", "data_dir", "checkpoint_dir",
    "log_dir", "plot_dir", "train_subset", "test_subset", "compile", "overrides", "run_name", "lr", "download",
    "compare_seeds", "progress",
}  # fmt: skip


def _cells():
    return json.loads(NOTEBOOK.read_text())["cells"]


def test_committed_notebook_has_no_outputs():
    code = [c for c in _cells() if c["cell_type"] == "code"]
    assert code and all(not c["outputs"] and c["execution_count"] is None for c in code)


def test_parameters_cell_holds_plain_values():
    tagged = [c for c in _cells() if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(tagged) == 1
    namespace: dict = {}
    exec("".join(tagged[0]["source"]), namespace)
    values = {k: v for k, v in namespace.items() if not k.startswith("__")}
    assert REQUIRED_PARAMETERS <= set(values)
    assert all(v is None or isinstance(v, (bool, int, float, str, dict, list)) for v in values.values())


def test_notebook_has_no_ipython_magics_or_argv():
    source = "".join("".join(c["source"]) for c in _cells() if c["cell_type"] == "code")
    assert "sys.argv" not in source and "argparse" not in source
    assert not any(line.lstrip().startswith(("%", "!")) for line in source.splitlines())


def _execute(tmp_path: Path, name: str, **parameters):
    import papermill

    out = tmp_path / f"{name}.ipynb"
    papermill.execute_notebook(
        str(NOTEBOOK), str(out), parameters=parameters, kernel_name="python3", cwd=str(ROOT), progress_bar=False
    )
    return json.loads(out.read_text())


def _text(nb) -> str:
    parts = []
    for cell in nb["cells"]:
        for output in cell.get("outputs", []):
            parts.append("".join(output.get("text", "")))
            parts.append("".join(output.get("data", {}).get("text/plain", "")))
    return "\n".join(parts)


@pytest.mark.slow
def test_notebook_trains_then_resumes(tmp_path):
    data = write_fake_cifar10(tmp_path / "data", per_batch=60, test=40)
    common = dict(
        dim=32,
        depth=2,
        heads=2,
        batch_size=50,
        device="cpu",
        data_dir=str(data),
        checkpoint_dir=str(tmp_path / "checkpoint"),
        log_dir=str(tmp_path / "log"),
        plot_dir=str(tmp_path / "plots"),
        progress="lines",
        overrides={"verify_data": False},  # generated files, not the published ones
    )
    first = _execute(tmp_path, "first", epochs=2, **common)
    assert "starting fresh" in _text(first) and "finished: 2 of 2 epochs trained" in _text(first)
    csv_path = tmp_path / "log" / "dyt_cifar10.csv"
    assert [r["epoch"] for r in read_csv(csv_path)] == ["1", "2"]
    log = (tmp_path / "log" / "dyt_cifar10.log").read_text()
    assert len(re.findall(r"epoch \d/\d \| ", log)) == 2 and "environment: python=" in log
    latest = torch.load(tmp_path / "checkpoint" / "dyt_cifar10_latest.pth", weights_only=True)
    best = torch.load(tmp_path / "checkpoint" / "dyt_cifar10_best.pth", weights_only=True)
    assert latest["epoch"] == 2 and latest["config"]["dim"] == 32 and 1 <= best["epoch"] <= 2
    for name in ("dyt_cifar10_training.png", "dyt_cifar10_augmented.png", "dyt_cifar10_confusion.png"):
        assert (tmp_path / "plots" / name).read_bytes()[:4] == b"\x89PNG"
    rows_before = read_csv(csv_path)

    second = _execute(tmp_path, "second", epochs=3, compare_seeds=[0], **common)
    text = _text(second)
    assert "resuming after epoch 2 of 3" in text and "finished: 3 of 3 epochs trained" in text
    rows = read_csv(csv_path)
    assert [r["epoch"] for r in rows] == ["1", "2", "3"] and rows[:2] == rows_before  # continued, not redone
    assert "resumed from" in (tmp_path / "log" / "dyt_cifar10.log").read_text()
    # The comparison reuses the run above (DyT, seed 0) and trains only its LayerNorm twin.
    assert [r["epoch"] for r in read_csv(tmp_path / "log" / "dyt_cifar10_norm-ln_seed-0.csv")] == ["1", "2", "3"]
    assert not (tmp_path / "log" / "dyt_cifar10_norm-dyt_seed-0.csv").exists()
    assert (tmp_path / "plots" / "dyt_cifar10_norms.png").read_bytes()[:4] == b"\x89PNG"
    assert "per group (mean and std over seeds)" in text

    third = _execute(tmp_path, "third", epochs=3, **common)  # finished: results again, no training
    assert "finished: 3 of 3 epochs trained" in _text(third) and "To train longer, raise epochs" in _text(third)
    assert _text(third).count("finished: 3 of 3 epochs trained") == 1  # the status once, not twice
    assert "resuming" not in _text(third) and len(read_csv(csv_path)) == 3


def _slowing_trainer(tmp_path: Path, progress: str) -> str:
    """Kernel code: a tiny Trainer (30 steps an epoch) whose steps slow down in epoch 2, after touching
    ``in_epoch_2`` to tell the test it may interrupt."""
    data = write_fake_cifar10(tmp_path / "data", per_batch=60, test=40)
    return f"""
import sys, time
sys.path.insert(0, {str(ROOT)!r})
import utils
from config import Config
from recipe import load_data
from training import Trainer
cfg = Config(epochs=3, dim=16, depth=1, heads=2, batch_size=10, device="cpu", data_dir={str(data)!r}, verify_data=False,
             checkpoint_dir={str(tmp_path / "ck")!r}, log_dir={str(tmp_path / "log")!r},
             plot_dir={str(tmp_path / "p")!r})
trainer = Trainer(cfg, load_data(cfg), progress={progress!r})
real_step = trainer.train_step
def slow_step(x, t):
    if trainer.step == 35:  # into epoch 2 (30 steps an epoch): tell the test, then give it time to interrupt
        open({str(tmp_path / "in_epoch_2")!r}, "w").close()
    time.sleep(0.1 if trainer.step >= 35 else 0)
    return real_step(x, t)
trainer.train_step = slow_step
"""


def _stopped_in_epoch_2(km, kc, tmp_path: Path, setup: str, loop: str):
    """Run ``setup``, start ``loop`` and interrupt the kernel in epoch 2, as the stop button does;
    returns the loop's message id and the kernel's reply to it."""
    assert kc.execute_interactive(setup, timeout=120)["content"]["status"] == "ok"
    msg_id = kc.execute(loop)
    while not (tmp_path / "in_epoch_2").exists():
        time.sleep(0.05)
    km.interrupt_kernel()
    return msg_id, kc.get_shell_msg(timeout=60)


@pytest.mark.slow
def test_stop_button_mid_epoch_then_rerun_resumes_cleanly_in_a_real_kernel(tmp_path):
    """The training cell interrupted in a live Jupyter kernel (what the stop button sends), then run
    again: the cut-off epoch is trained again from the last checkpoint, never continued in memory."""
    from jupyter_client.manager import start_new_kernel

    setup = _slowing_trainer(tmp_path, "bars")  # progress bars as widgets, as in JupyterLab
    km, kc = start_new_kernel(kernel_name="python3", cwd=str(ROOT))
    loop = "for epoch in trainer.remaining_epochs():\n    trainer.run_epoch(epoch)\nprint('steps', trainer.step)"
    try:
        msg_id, reply = _stopped_in_epoch_2(km, kc, tmp_path, setup, loop)
        widgets = []  # the widget state changes the stopped execution sent (tqdm's bars)
        while True:
            msg = kc.get_iopub_msg(timeout=30)
            if msg["msg_type"] == "comm_msg":
                widgets.append(msg["content"]["data"].get("state", {}))
            if msg["msg_type"] == "status" and msg["content"]["execution_state"] == "idle":
                break
        # The stopped epoch's bar is marked and closed red (tqdm's "danger"), not left running.
        texts = [str(state.get("value", "")).replace("\u2007", " ") for state in widgets]  # tqdm's figure spaces
        assert any(t.startswith("epoch 2 (stopped):") for t in texts), texts
        assert any(state.get("bar_style") == "danger" for state in widgets)
        assert reply["parent_header"]["msg_id"] == msg_id and reply["content"]["status"] == "error"
        assert reply["content"]["ename"] == "TrainingInterrupted"
        shown = "\n".join(reply["content"]["traceback"])  # what Jupyter prints under the cell: a few lines
        assert len(shown.splitlines()) <= 3 and "Stopped in epoch 2 at step" in shown
        assert "the last checkpoint is" in shown and "(epoch 1)" in shown and "Run this cell again to resume" in shown
        assert re.search(r"at step ([5-9]|[1-2]\d) of 30;", shown)  # the step within the epoch, as the bar counts
        said = []

        def hook(msg):
            if msg["msg_type"] == "stream":
                said.append(msg["content"]["text"])

        assert kc.execute_interactive(loop, timeout=120, output_hook=hook)["content"]["status"] == "ok"
        assert "resuming after epoch 1 of 3 (the stopped epoch starts again)" in "".join(said)  # on the page
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)
    latest = torch.load(tmp_path / "ck" / "dyt_cifar10_latest.pth", weights_only=True)
    assert latest["epoch"] == 3 and latest["step"] == 3 * 30
    assert [r["epoch"] for r in read_csv(tmp_path / "log" / "dyt_cifar10.csv")] == ["1", "2", "3"]
    log = (tmp_path / "log" / "dyt_cifar10.log").read_text()
    assert "restored after an interrupted epoch" in log and "STOPPED: Stopped in epoch 2 at step" in log


def test_every_parameter_has_a_type_and_a_help_line_for_papermill():
    import papermill

    inspected = papermill.inspect_notebook(str(NOTEBOOK))
    assert inspected and all(p["inferred_type_name"] not in ("None", "") and p["help"] for p in inspected.values()), [
        n for n, p in inspected.items() if p["inferred_type_name"] in ("None", "") or not p["help"]
    ]


def test_every_parameter_parses():
    import papermill

    inspected = papermill.inspect_notebook(str(NOTEBOOK))
    tagged = next(c for c in _cells() if "parameters" in c.get("metadata", {}).get("tags", []))
    namespace: dict = {}
    exec("".join(tagged["source"]), namespace)
    names = {k for k in namespace if not k.startswith("__")}
    assert set(inspected) == names  # a comment with " = " in it used to hide a parameter from papermill
    assert all(ast.literal_eval(p["default"]) == namespace[n] for n, p in inspected.items())


@pytest.mark.parametrize("norm", ["dyt", "ln"])
def test_the_one_line_cpu_setting_is_the_documented_one_in_files_of_its_own(tmp_path, norm):
    from config import CPU_SETTING, Config, config_from_parameters, with_overrides
    from recipe import training_macs

    tagged = next(c for c in _cells() if "parameters" in c.get("metadata", {}).get("tags", []))
    lines = "".join(tagged["source"]).splitlines()
    (setting,) = [line[2:] for line in lines if line.startswith("# dim, depth, heads")]
    namespace: dict = {}
    exec("\n".join(lines) + f"\nnorm = {norm!r}\n" + setting, namespace)  # the line uncommented, after the cell
    names = ["recipe", "epochs", "batch_size", "dim", "depth", "heads", "patch_size", "norm", "seed", "lr", "run_name"]
    cfg = config_from_parameters({n: namespace[n] for n in names}, namespace["overrides"], tmp_path)
    assert cfg.name == f"{norm}_cpu" != Config(norm=norm).name  # not the default recipe's run and files
    assert cfg == with_overrides(Config(), {**CPU_SETTING, **{k: getattr(cfg, k) for k in ("norm", "run_name")},
                                            **{k: str(tmp_path / f) for k, f in (("checkpoint_dir", "checkpoint"),
                                            ("log_dir", "log"), ("plot_dir", "plots"))}})  # fmt: skip
    assert training_macs(cfg) == training_macs(with_overrides(Config(), CPU_SETTING))


def test_config_from_parameters_takes_fields_then_overrides(tmp_path):
    from config import config_from_parameters

    params = {"epochs": 7, "lr": 0.001, "checkpoint_dir": "", "log_dir": "/x/log"}
    cfg = config_from_parameters(params, '{"lr": 0.002, "run_name": "sweep1"}', tmp_path)
    assert (cfg.epochs, cfg.lr, cfg.name) == (7, 0.002, "sweep1")
    assert cfg.checkpoint_dir == str(tmp_path / "checkpoint") and cfg.log_dir == "/x/log"
    with pytest.raises(ValueError, match="'mount_drive'"):  # the dict holds Config fields only
        config_from_parameters({**params, "mount_drive": True})


def test_compare_seeds_parse_like_overrides_before_training():
    from config import parse_seeds

    assert parse_seeds("[0, 1, 2]") == parse_seeds([0, 1, 2]) == [0, 1, 2] and parse_seeds("") == []
    for bad in ("[", "[0, 0]", '["a"]', "[-1]", 3):
        with pytest.raises(ValueError, match="compare_seeds"):
            parse_seeds(bad)


def test_every_parameter_reaches_the_config_or_the_notebook():
    # Each name in the parameters cell is passed to the config (a Config field) or read by a later cell.
    import dataclasses

    from config import Config

    tagged = next(c for c in _cells() if "parameters" in c.get("metadata", {}).get("tags", []))
    namespace: dict = {}
    exec("".join(tagged["source"]), namespace)
    names = {k for k in namespace if not k.startswith("__")}
    later = [ast.parse("".join(c["source"])) for c in _cells() if c["cell_type"] == "code" and c is not tagged]
    read = {n.id for tree in later for n in ast.walk(tree) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)}
    passed = {
        k.arg
        for tree in later
        for call in ast.walk(tree)
        if isinstance(call, ast.Call) and getattr(call.func, "id", "") == "dict"
        for k in call.keywords
        if isinstance(k.value, ast.Name) and k.value.id == k.arg
    }
    fields = {f.name for f in dataclasses.fields(Config)}
    assert names & fields <= passed, sorted((names & fields) - passed)
    assert names <= read, sorted(names - read)


@pytest.mark.slow
def test_the_readme_command_prints_epoch_lines_on_the_terminal_and_overrides_reach_the_files(tmp_path):
    # As the README runs it: the papermill command line with --log-output and progress left at "auto".
    data = write_fake_cifar10(tmp_path / "data", per_batch=20, test=20)
    out = tmp_path / "log" / "out.ipynb"
    out.parent.mkdir()
    params = dict(
        dim=16, depth=1, heads=2, batch_size=50, epochs=2, device="cpu", data_dir=str(data),
        checkpoint_dir=str(tmp_path / "ck"), log_dir=str(tmp_path / "log"), plot_dir=str(tmp_path / "plots"),
    )  # fmt: skip
    overrides = {"run_name": "big", "randaug_magnitude": 5, "ema_decay": 0.9, "verify_data": False}
    command = [sys.executable, "-m", "papermill", str(NOTEBOOK), str(out), "--log-output", "--cwd", str(ROOT)]
    command += [a for k, v in params.items() for a in ("-p", k, str(v))] + ["-p", "overrides", json.dumps(overrides)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    terminal = done.stdout + done.stderr
    assert done.returncode == 0, terminal[-3000:]
    assert "epoch 1/2 |" in terminal and "epoch 2/2 |" in terminal  # each epoch's line reaches the terminal
    assert "it/s]" not in terminal and "step/s]" not in terminal  # no progress bars in a headless run
    assert "WARNING: training on the CPU (2 threads)" in terminal or "WARNING: training on the CPU" in terminal
    assert "CPU estimate after the first epoch" in terminal
    saved = json.loads((tmp_path / "log" / "big_config.json").read_text())
    assert saved["randaug_magnitude"] == 5 and saved["ema_decay"] == 0.9 and saved["dim"] == 16
    assert (tmp_path / "ck" / "big_latest.pth").exists() and (tmp_path / "plots" / "big_training.png").exists()
    log = (tmp_path / "log" / "big.log").read_text()
    assert "WARNING: training on the CPU" in log  # said before the log opened, written to it all the same


@pytest.mark.slow
def test_an_unknown_override_stops_with_the_closest_field(tmp_path):
    import papermill

    data = write_fake_cifar10(tmp_path / "data", per_batch=20, test=20)
    with pytest.raises(papermill.PapermillExecutionError, match="did you mean 'randaug_magnitude'"):
        _execute(tmp_path, "unknown", data_dir=str(data), overrides='{"randaug_magnitud": 5}', log_dir=str(tmp_path))


def _bootstrap_source() -> str:
    code = [c for c in _cells() if c["cell_type"] == "code"]
    return "".join(code[0]["source"])


def test_first_cell_on_a_blank_runtime_says_how_to_get_the_code(tmp_path, monkeypatch):
    blank = tmp_path / "blank"
    blank.mkdir()
    monkeypatch.chdir(blank)
    try:
        exec(_bootstrap_source(), {})
    except RuntimeError as e:
        message = str(e)
    else:
        raise AssertionError("the first cell must stop when the modules are missing")
    assert "git clone" in message and "%cd dyt_cifar10" in message and "%pip install -r requirements.txt" in message


def _fake_project(folder: Path) -> Path:
    for name in ("config.py", "training.py", "data.py", "randomaug.py", "models/dyt.py"):
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text("")
    return folder


def test_first_cell_uses_the_clone_its_instructions_make_and_says_so(tmp_path, monkeypatch, capsys):
    clone = _fake_project(tmp_path / "work" / "dyt_cifar10")
    monkeypatch.chdir(tmp_path / "work")  # a restarted kernel: back in the folder the clone was made in
    monkeypatch.setattr("sys.path", list(__import__("sys").path))
    exec(_bootstrap_source(), {})
    assert Path.cwd() == clone and "using the clone made by this cell's instructions" in capsys.readouterr().out


def test_first_cell_adopts_no_other_clone(tmp_path, monkeypatch):
    _fake_project(tmp_path / "some_other_checkout")  # a sibling folder the user did not point at
    (tmp_path / "blank").mkdir()
    monkeypatch.chdir(tmp_path / "blank")
    with pytest.raises(RuntimeError, match="git clone"):
        exec(_bootstrap_source(), {})
    assert Path.cwd() == tmp_path / "blank"


@pytest.mark.slow
def test_a_misspelled_papermill_parameter_stops_with_the_closest_one(tmp_path):
    import papermill

    data = write_fake_cifar10(tmp_path / "data", per_batch=20, test=20)
    with pytest.raises(papermill.PapermillExecutionError, match="unknown notebook parameter.*did you mean 'epochs'"):
        _execute(tmp_path, "misspelled", data_dir=str(data), epoch=1, log_dir=str(tmp_path))
    assert not list(tmp_path.glob("**/*.pth"))  # nothing trained on the default 200 epochs


def test_the_notebook_knows_every_parameter_of_its_parameters_cell():
    from config import check_parameter_names

    tagged = next(c for c in _cells() if "parameters" in c.get("metadata", {}).get("tags", []))
    namespace: dict = {}
    exec("".join(tagged["source"]), namespace)
    names = {k for k in namespace if not k.startswith("__")}
    config_cell = next(c for c in _cells() if "check_parameter_names(" in "".join(c["source"]))
    scope: dict = {}
    tree = ast.parse("".join(config_cell["source"]))
    for node in tree.body:  # the dict of Config parameters and the notebook's own ones, as the cell builds them
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", "") in ("parameters", "NOTEBOOK_PARAMETERS"):
            value = node.value
            scope[node.targets[0].id] = (
                [k.arg for k in value.keywords] if isinstance(value, ast.Call) else ast.literal_eval(value)
            )
    known = [*scope["parameters"], *scope["NOTEBOOK_PARAMETERS"]]
    assert set(known) == names
    check_parameter_names(names, known)
    with pytest.raises(ValueError, match=r"'epoch' \(did you mean 'epochs'\?\)"):
        check_parameter_names({"epoch"}, known)


@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["cvt-7/4", "vit-lite-7/4"])
def test_a_preset_by_name_from_papermill(tmp_path, recipe):
    data = write_fake_cifar10(tmp_path / "data", per_batch=20, test=20)
    nb = _execute(
        tmp_path, "preset", data_dir=str(data), recipe=recipe, epochs=2, dim=32, heads=2, depth=1,
        batch_size=50, train_subset=100, device="cpu", log_dir=str(tmp_path / "log"),
        checkpoint_dir=str(tmp_path / "ck"), plot_dir=str(tmp_path / "plots"), run_name="cvt",
        overrides='{"verify_data": false, "download": false, "clean_train_images": 0}',
    )  # fmt: skip
    saved = json.loads((tmp_path / "log" / "cvt_config.json").read_text())
    pool = "seq" if recipe == "cvt-7/4" else "cls"
    assert saved["recipe"] == recipe and saved["pool"] == pool and saved["dim"] == 32 and saved["epochs"] == 2
    assert f"recipe {recipe!r}" in _text(nb) and (tmp_path / "ck" / "cvt_latest.pth").exists()


@pytest.mark.slow
def test_live_curves_appear_in_the_cell_run_again_after_a_stop_in_a_real_kernel(tmp_path):
    """Notebook III item 1 in a live kernel: the training cell stopped, then run again, gets a figure of
    its own (a new display), rather than updating the cleared output of the stopped execution."""
    from jupyter_client.manager import start_new_kernel

    setup = _slowing_trainer(tmp_path, "bars") + "assert utils.live_jupyter()  # someone could watch: curves on\n"
    km, kc = start_new_kernel(kernel_name="python3", cwd=str(ROOT))
    loop = "for epoch in trainer.remaining_epochs():\n    trainer.run_epoch(epoch)\ntrainer.console.live.wait()"
    figures: dict[str, list] = {}  # execution's msg_id -> (message type, display id)

    def record(msg):
        display_id = msg["content"].get("transient", {}).get("display_id") if "content" in msg else None
        if msg["msg_type"] in ("display_data", "update_display_data") and display_id:  # not the bars' output
            figures.setdefault(msg["parent_header"]["msg_id"], []).append((msg["msg_type"], display_id))

    try:
        first, reply = _stopped_in_epoch_2(km, kc, tmp_path, setup, loop)
        assert reply["content"]["ename"] == "TrainingInterrupted"
        while True:  # what the stopped execution showed
            msg = kc.get_iopub_msg(timeout=30)
            record(msg)
            if msg["msg_type"] == "status" and msg["content"]["execution_state"] == "idle":
                break
        again = kc.execute_interactive(loop, timeout=120, output_hook=record)
        assert again["content"]["status"] == "ok"
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)
    stopped, rerun = figures[first], figures[again["parent_header"]["msg_id"]]
    assert stopped[0][0] == "display_data"  # epoch 1's figure, its place made in the training thread
    new = [display_id for kind, display_id in rerun if kind == "display_data"]
    assert len(new) == 1 and new[0] != stopped[0][1]  # a figure of its own in the cell run again
    assert rerun[-1] == ("update_display_data", new[0])  # the last epoch's curves are drawn into it


@pytest.mark.slow
def test_the_comparison_shows_each_childs_epochs_and_a_stop_says_what_stopped_in_a_real_kernel(tmp_path):
    """Notebook III item 2 in a live kernel: the comparison's children report their epochs on the page as
    they finish them, and the stop button ends the section in a few lines naming what stopped."""
    from jupyter_client.manager import start_new_kernel

    data = write_fake_cifar10(tmp_path / "data", per_batch=60, test=40)
    setup = f"""
import sys
sys.path.insert(0, {str(ROOT)!r})
import sweeps
from config import Config
cfg = Config(epochs=30, dim=16, depth=1, heads=2, batch_size=10, device="cpu", data_dir={str(data)!r},
             verify_data=False, checkpoint_dir={str(tmp_path / "ck")!r}, log_dir={str(tmp_path / "log")!r},
             plot_dir={str(tmp_path / "p")!r}, cpu_threads=1)
runs = sweeps.compare_norms(cfg, [0])
"""
    compare = "results = sweeps.run_sweep(runs, per_gpu=1, name='norms')"
    first_csv = tmp_path / "log" / "dyt_cifar10.csv"
    km, kc = start_new_kernel(kernel_name="python3", cwd=str(ROOT))
    said = []
    try:
        assert kc.execute_interactive(setup, timeout=120)["content"]["status"] == "ok"
        msg_id = kc.execute(compare)
        for _ in range(6000):  # a bound on polls, not a timing: until the first run has finished 2 epochs
            if first_csv.exists() and len(read_csv(first_csv)) >= 2:
                break
            time.sleep(0.05)
        time.sleep(1.0)  # the sweep polls twice a second: its line for epoch 2 reaches the page
        km.interrupt_kernel()
        reply = kc.get_shell_msg(timeout=120)
        while True:
            msg = kc.get_iopub_msg(timeout=30)
            if msg["msg_type"] == "stream" and msg["parent_header"].get("msg_id") == msg_id:
                said.append(msg["content"]["text"])
            if msg["msg_type"] == "status" and msg["content"]["execution_state"] == "idle":
                break
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)
    page = "".join(said)
    assert "started dyt_cifar10 on CPU" in page and "    dyt_cifar10: epoch 1/30, test " in page
    assert reply["content"]["ename"] == "SweepInterrupted"
    shown = "\n".join(reply["content"]["traceback"])
    assert len(shown.splitlines()) <= 4 and re.search(r"  dyt_cifar10: \d+ of 30 epochs saved", shown)
    assert "Run this cell (or the same command) again to continue" in shown


def test_papermills_own_path_parameters_and_a_users_parameters_cell_are_not_misspellings(monkeypatch, tmp_path):
    from types import SimpleNamespace

    import papermill

    import utils

    out = tmp_path / "prepared.ipynb"  # what `papermill -p epochs 3 -p epoch 1 --inject-paths` runs, not run
    parameters = {"epochs": 3, "epoch": 1, "PAPERMILL_INPUT_PATH": str(NOTEBOOK), "PAPERMILL_OUTPUT_PATH": str(out)}
    papermill.execute_notebook(str(NOTEBOOK), str(out), parameters=parameters, prepare_only=True, progress_bar=False)
    cells = json.loads(out.read_text())["cells"]
    tagged = {"parameters", "injected-parameters"}
    parameters_cell, injected_cell = ("".join(c["source"]) for c in cells if tagged & set(c["metadata"]["tags"]))
    known = utils.assigned_names(parameters_cell)
    assert {"epochs", "recipe", "compare_seeds", "compile"} <= known
    history = {"In": ["", "import os", parameters_cell, injected_cell, "# Parameters of my own\nepoch_count = 5"]}
    monkeypatch.setattr(utils, "ipython", lambda: SimpleNamespace(user_ns=history))
    assert utils.injected_parameters(known) == {"epochs", "epoch"}  # the misspelling is caught, the paths are not
    history["In"] = ["", parameters_cell, "x = 1", "# Parameters\nmy_setting = 1"]  # no papermill: a user's own cell
    assert utils.injected_parameters(known) == set()
    history["In"] = ["", parameters_cell, "# Parameters\nepochs = 3", "# Parameters\nmine = 2"]
    assert utils.injected_parameters(known) == {"epochs"}  # papermill's cell, not the later user cell
