"""What a run shows (runs/console.py): one line per epoch, the evaluation bar, the CPU estimates, the live
curves redrawn in place, and the stop button's short message."""

from pathlib import Path

import pytest
import torch

import utils
from conftest import tiny, train_all
from runs import console
from runs.console import LINE_WIDTH, Console, LiveCurves
from training import Trainer, TrainingInterrupted

ROOT = Path(__file__).resolve().parent.parent


class Bar:
    """A recording stand-in for ``utils.progress_bar`` (tqdm's ``n``, ``total``, ``desc``, ``disable``)."""

    made: list = []

    def __init__(self, total, desc="", **kwargs):
        self.total, self.desc, self.n, self.disable = total, desc, 0, False
        Bar.made.append(self)

    def update(self, n=1):
        self.n += n

    def set_postfix(self, **kwargs):
        pass

    def set_description(self, desc, refresh=True):
        self.desc = desc

    def close(self):
        self.disable = True


def test_lines_mode_prints_each_epoch_and_the_cpu_estimates_with_evaluation(cifar, tmp_path, capsys):
    t = Trainer(tiny(tmp_path, epochs=2), cifar, progress="lines")
    train_all(t)
    out = capsys.readouterr().out
    assert out.count("epoch 1/2 |") == 1 and out.count("epoch 2/2 |") == 1
    assert "CPU estimate: about" in out and "(evaluation not included)" in out
    estimate = next(line for line in out.splitlines() if line.startswith("CPU estimate after the first epoch"))
    assert "evaluation" in estimate and "for the 1 epoch left" in estimate  # one epoch, not "1 epochs"
    assert "WARNING: training on the CPU" in t.paths.log.read_text()  # said before the log opened


def test_off_mode_shows_nothing_and_logs_everything(cifar, tmp_path, capsys):
    t = Trainer(tiny(tmp_path, epochs=1), cifar, progress="off")
    train_all(t)
    assert capsys.readouterr().out == ""
    log = t.paths.log.read_text()
    assert "epoch 1/1 |" in log and "CPU estimate" in log


def test_bars_mode_shows_an_evaluation_bar_over_every_forward_pass(cifar, tmp_path, monkeypatch):
    Bar.made = []
    monkeypatch.setattr(utils, "progress_bar", Bar)
    t = Trainer(tiny(tmp_path, epochs=1, ema_decay=0.9, clean_train_images=64, eval_batch_size=20), cifar)
    train_all(t)
    evaluating = [b for b in Bar.made if b.desc == "evaluating"]
    # 50 test images in 3 passes, for the trained and the EMA weights, and 64 clean training images in 4.
    assert len(evaluating) == 1 and evaluating[0].total == evaluating[0].n == 3 + 3 + 4 and evaluating[0].disable


def test_live_curves_draw_once_then_update_in_place_at_most_every_few_seconds(tmp_path, monkeypatch):
    clock = {"now": 1000.0}
    monkeypatch.setattr(console.time, "monotonic", lambda: clock["now"])
    drawn, shown = [], []

    class Handle:
        def update(self, image):
            shown.append(("update", image.filename))

    def display(image, display_id):
        assert display_id is True
        shown.append(("display", image.filename))
        return Handle()

    png = tmp_path / "live.png"
    png.write_bytes(b"\x89PNG\r\n\x1a\n")

    live = LiveCurves(lambda csv, path: drawn.append(csv), png, display)
    for seconds, final in ((0, False), (3, False), (console.LIVE_EVERY_SECONDS, False), (1, False), (1, True)):
        clock["now"] += seconds
        live.update("run.csv", final=final)
        live.wait()
    assert len(drawn) == 3  # the first epoch, one 10 s later, and the last; not the ones in between
    # The place on the page (the earlier figure on disk) once, then each drawing updates it.
    assert [kind for kind, _ in shown] == ["display", "update", "update", "update"]
    assert {f for _, f in shown} == {str(png)}


def test_a_trainer_draws_live_curves_only_where_someone_watches(cifar, tmp_path, monkeypatch):
    monkeypatch.setattr(utils, "live_jupyter", lambda: False)
    assert Trainer(tiny(tmp_path / "a"), cifar).console.live is None
    monkeypatch.setattr(utils, "live_jupyter", lambda: True)
    assert Trainer(tiny(tmp_path / "b"), cifar, progress="lines").console.live is None
    assert isinstance(Trainer(tiny(tmp_path / "c"), cifar).console.live, LiveCurves)


def test_papermill_and_nbconvert_kernels_are_headless(monkeypatch, tmp_path):
    monkeypatch.setenv("JPY_PARENT_PID", "12345")
    commands = {"/proc/12345/cmdline": b"python\0-m\0papermill\0in.ipynb\0out.ipynb\0"}
    real_read = utils.Path.read_bytes
    monkeypatch.setattr(utils.Path, "read_bytes", lambda p: commands.get(str(p)) or real_read(p))
    assert utils.headless_kernel()
    commands["/proc/12345/cmdline"] = b"/usr/bin/python3\0/usr/local/bin/jupyter-lab\0"
    assert not utils.headless_kernel()


def test_the_stop_message_is_a_few_lines_and_still_a_keyboard_interrupt(cifar, tmp_path, monkeypatch, capsys):
    Bar.made = []
    monkeypatch.setattr(utils, "progress_bar", Bar)
    t = Trainer(tiny(tmp_path, epochs=2), cifar, progress="bars")
    t.resume()
    t.run_epoch(1)
    real = t.train_step

    def stop(x, targets):
        if t.step == t.steps_per_epoch + 2:
            raise KeyboardInterrupt
        return real(x, targets)

    monkeypatch.setattr(t, "train_step", stop)
    with pytest.raises(KeyboardInterrupt) as info:
        t.run_epoch(2)
    assert isinstance(info.value, TrainingInterrupted)
    (shown,) = info.value._render_traceback_()
    assert shown.startswith(f"TrainingInterrupted: Stopped in epoch 2 at step 2 of {t.steps_per_epoch};")  # the bar's
    assert f"STOPPED: Stopped in epoch 2 at step 2 of {t.steps_per_epoch}" in t.paths.log.read_text()
    assert f"the last checkpoint is {t.paths.latest} (epoch 1)" in shown and "Run this cell again" in shown
    stopped = Bar.made[-1]  # the epoch's bar: marked and closed where it stopped, not left running
    assert stopped.desc == "epoch 2 (stopped)" and stopped.disable and stopped.n == 2 < stopped.total
    assert all(b.disable for b in Bar.made)
    monkeypatch.undo()
    capsys.readouterr()
    train_all(t)  # the cell run again: the page says where it goes on
    assert "resuming after epoch 1 of 2 (the stopped epoch starts again)" in capsys.readouterr().out
    assert t.epoch == 2 and torch.isfinite(next(t.model.parameters())).all()


def test_console_words(capsys):
    lines = []
    c = Console("lines", lines.append)
    c.cpu_estimate(0.5, 10, 1)
    assert lines == ["CPU estimate: about 5s per epoch of training, 5s for the 1 epoch left (evaluation not included)."]
    assert utils.plural(1, "thread") == "1 thread" and utils.plural(2, "warmup step") == "2 warmup steps"


def test_the_cpu_warning_names_the_threads_and_a_real_pointer_once(monkeypatch):
    from runs.console import Console

    lines = []
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    console = Console("off", lines.append)
    console.hardware_warnings(torch.device("cpu"), None, False, 1039.4)  # the default model's size: hours or more
    console.hardware_warnings(torch.device("cpu"), None, False, 1039.4)  # a second epoch, a second session's start
    assert len(lines) == 2 and "(2 threads)" in lines[0] and lines[1].startswith("This run is 1,039x the notebook's")
    assert "docs/running.md, 'On a CPU'" in lines[1] and "**On a CPU.**" in (ROOT / "docs" / "running.md").read_text()
    assert all(len(line) <= LINE_WIDTH for line in lines)  # no line wraps in a notebook
    lines.clear()
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    Console("off", lines.append).hardware_warnings(torch.device("cpu"), None, False, 1.0)  # the CPU setting itself
    assert len(lines) == 1 and "(1 thread)" in lines[0]  # no pointer to the setting in use
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    Console("off", lines.append).hardware_warnings(torch.device("cuda"), torch.bfloat16, False)
    assert lines[1:] == ["autocast: bfloat16 on NVIDIA H100 (compute capability 9.0)"]  # no CPU warning on a GPU


def test_on_a_gpu_the_autocast_dtype_is_said_once(monkeypatch):
    from runs.console import Console

    lines = []
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla T4")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    Console("off", lines.append).hardware_warnings(torch.device("cuda"), torch.float16, False)
    assert lines == ["autocast: fp16 with a GradScaler on Tesla T4 (compute capability 7.5)"]


def test_live_curves_appear_again_in_a_cell_run_again(tmp_path, monkeypatch):
    clock = {"now": 1000.0}
    monkeypatch.setattr(console.time, "monotonic", lambda: clock["now"])
    shown, cell = [], {"count": 7}

    class Handle:
        def __init__(self, n):
            self.n = n

        def update(self, image):
            shown.append(("update", self.n))

    def display(image, display_id):
        shown.append(("display", cell["count"]))
        return Handle(cell["count"])

    png = tmp_path / "live.png"
    png.write_bytes(b"\x89PNG\r\n\x1a\n")
    live = LiveCurves(lambda csv, path: None, png, display, cell=lambda: cell["count"])
    live.update("run.csv", final=True)
    live.update("run.csv", final=True)  # the same cell: the figure is updated in place
    cell["count"] = 9  # "Run this cell again" after a stop: the old output was cleared
    live.update("run.csv", final=True)
    live.update("run.csv", final=True)
    assert shown == [("display", 7), ("update", 7), ("update", 7), ("display", 9), ("update", 9), ("update", 9)]


def test_live_curves_are_drawn_off_the_training_thread_and_the_last_before_returning(tmp_path):
    import threading

    started, release, drawn, updates = threading.Event(), threading.Event(), [], []

    def slow_draw(csv, path):  # a drawing that takes as long as the test wants
        started.set()
        release.wait(timeout=30)
        path.write_bytes(b"\x89PNG\r\n\x1a\n")
        drawn.append((csv, threading.current_thread().name))

    class Handle:
        def update(self, image):
            updates.append(image)

    shown = []
    live = LiveCurves(slow_draw, tmp_path / "live.png", lambda image, display_id: shown.append(image) or Handle())
    live.update("epoch1.csv")  # returns while the figure is still being drawn
    assert started.wait(timeout=30) and drawn == [] and "curves after this epoch" in shown[0].data
    live.last = -float("inf")
    live.update("epoch2.csv")  # asked while epoch 1's figure is drawn: waits, replacing nothing older
    release.set()
    live.wait()
    assert drawn == [("epoch1.csv", "live curves"), ("epoch2.csv", "live curves")] and len(updates) == 2
    live.update("final.csv", final=True)  # the last one: drawn here, before returning
    assert drawn[-1] == ("final.csv", threading.current_thread().name) and len(updates) == 3
    assert live.error is None


def test_the_live_figure_after_one_epoch_shows_points(tmp_path):
    import figures

    csv_path = tmp_path / "run.csv"
    csv_path.write_text("epoch,lr,train_loss,train_acc,test_loss,test_acc\n1,0.001,2.1,0.2,2.0,0.28\n")
    fig = figures.plot_progress(csv_path, tmp_path / "live.png", "one epoch")
    lines = [line for a in fig.axes for line in a.get_lines()]
    assert lines and all(line.get_marker() == "o" for line in lines)  # visible, not one-point lines
    assert (tmp_path / "live.png").exists()


def test_epoch_lines_fit_a_notebook_and_split_where_they_would_not():
    lines = []
    c = Console("off", lines.append)
    c.epoch_seconds = [33.4]
    cpu = {"lr": 3e-3, "train_loss": 2.0818, "train_acc": 0.232, "train_clean_acc": 0.292, "test_loss": 1.9413,
           "test_acc": 0.2836, "train_seconds": 30.1, "eval_seconds": 3.2, "checkpoint_seconds": 0.1,
           "compile_seconds": 0.0}  # fmt: skip
    c.epoch_line(1, 10, cpu, 0.2836, 1)
    assert lines == [
        "epoch  1/10 | train loss 2.082 clean 29.2% | test loss 1.941 acc 28.36% (best) | 33s, ~5m 01s left"
    ]
    lines.clear()
    c.epoch_seconds = [64.0] * 5
    gpu = {**cpu, "ema_test_acc": 0.8650, "compile_seconds": 103.0}
    c.epoch_line(120, 200, gpu, 0.8650, 119)
    assert len(lines) == 3 and all(len(line) <= 110 for line in lines)
    assert lines[0] == (
        "epoch 120/200 | train loss 2.082 clean 29.2% | test loss 1.941 acc 28.36% ema 86.50% (best 86.50% @ 119)"
    )
    assert lines[1] == "      33s, ~1h 25m left"
    assert lines[2] == "      (and 103s compiling, not counted in the epoch's time)"
    lines.clear()
    c.epoch_line(2, 10, {k: v for k, v in cpu.items() if k != "train_clean_acc"}, 0.3, 1)
    assert lines[0].startswith("epoch  2/10 | train loss 2.082 acc 23.2% | ")  # no clean accuracy: the batches'
    assert "(best 30.00% @ 1) | 33s" in lines[0] and len(lines) == 1
