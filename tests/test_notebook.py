"""The notebook itself: committed clean, and executed headless (papermill, a real Jupyter kernel) on
generated CIFAR-10 files in torchvision's layout, then again with more epochs to check it resumes."""

import json
import time
from pathlib import Path

import torch

from conftest import write_fake_cifar10
from run_files import read_csv

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK = ROOT / "dyt_cifar10.ipynb"
REQUIRED_PARAMETERS = {
    "epochs", "batch_size", "dim", "depth", "heads", "norm", "seed", "device", "data_dir", "checkpoint_dir",
    "log_dir", "plot_dir", "train_subset", "test_subset", "compile", "overrides", "run_name", "lr", "download",
    "compare_seeds", "show_progress",
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
        show_progress=False,
    )
    first = _execute(tmp_path, "first", epochs=2, **common)
    assert "starting fresh" in _text(first) and "finished: 2 of 2 epochs trained" in _text(first)
    csv_path = tmp_path / "log" / "dyt_cifar10.csv"
    assert [r["epoch"] for r in read_csv(csv_path)] == ["1", "2"]
    log = (tmp_path / "log" / "dyt_cifar10.log").read_text()
    assert log.count("epoch    ") == 2 and "environment: python=" in log
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
    for twin in ("dyt_cifar10_norm-dyt_seed-0", "dyt_cifar10_norm-ln_seed-0"):  # the comparison's own runs
        assert [r["epoch"] for r in read_csv(tmp_path / "log" / f"{twin}.csv")] == ["1", "2", "3"]
    assert (tmp_path / "plots" / "dyt_cifar10_norms.png").read_bytes()[:4] == b"\x89PNG"
    assert "per group (mean and std over seeds)" in text

    third = _execute(tmp_path, "third", epochs=3, **common)  # finished: results again, no training
    assert "resuming after epoch 3 of 3" in _text(third) and len(read_csv(csv_path)) == 3


def test_stop_button_mid_epoch_then_rerun_resumes_cleanly_in_a_real_kernel(tmp_path):
    """The training cell interrupted in a live Jupyter kernel (what the stop button sends), then run
    again: the cut-off epoch is trained again from the last checkpoint, never continued in memory."""
    from jupyter_client.manager import start_new_kernel

    data = write_fake_cifar10(tmp_path / "data", per_batch=60, test=40)
    km, kc = start_new_kernel(kernel_name="python3", cwd=str(ROOT))
    setup = f"""
import sys, time
sys.path.insert(0, {str(ROOT)!r})
from config import Config
from training import Trainer, load_data
cfg = Config(epochs=3, dim=16, depth=1, heads=2, batch_size=10, device="cpu", data_dir={str(data)!r},
             checkpoint_dir={str(tmp_path / "ck")!r}, log_dir={str(tmp_path / "log")!r},
             plot_dir={str(tmp_path / "p")!r})
trainer = Trainer(cfg, load_data(cfg), show_progress=False)
real_step = trainer.train_step
def slow_step(x, t):
    time.sleep(0.1)
    return real_step(x, t)
trainer.train_step = slow_step
"""
    loop = "for epoch in trainer.remaining_epochs():\n    trainer.run_epoch(epoch)\nprint('steps', trainer.step)"
    try:
        assert kc.execute_interactive(setup, timeout=120)["content"]["status"] == "ok"
        msg_id = kc.execute(loop)
        time.sleep(4.5)  # 30 steps per epoch of 0.1 s: into epoch 2
        km.interrupt_kernel()
        reply = kc.get_shell_msg(timeout=60)
        assert reply["parent_header"]["msg_id"] == msg_id and reply["content"]["status"] == "error"
        assert reply["content"]["ename"] == "KeyboardInterrupt"
        assert kc.execute_interactive(loop, timeout=120)["content"]["status"] == "ok"
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)
    latest = torch.load(tmp_path / "ck" / "dyt_cifar10_latest.pth", weights_only=True)
    assert latest["epoch"] == 3 and latest["step"] == 3 * 30
    assert [r["epoch"] for r in read_csv(tmp_path / "log" / "dyt_cifar10.csv")] == ["1", "2", "3"]
    assert "restored after an interrupted epoch" in (tmp_path / "log" / "dyt_cifar10.log").read_text()
