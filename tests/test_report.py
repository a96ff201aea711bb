"""A run's summary and advice, read from its CSV alone."""

import math

import pytest

from config import Config
from report import describe, next_steps, summarize_run
from runs import history


def _csv(tmp_path, accs, clean=None, ema=None):
    path = tmp_path / "run.csv"
    for i, acc in enumerate(accs):
        row = {"epoch": i + 1, "test_acc": acc, "train_seconds": 30.0, "eval_seconds": 6.0, "checkpoint_seconds": 0.0}
        if clean is not None:
            row["train_clean_acc"] = clean
        if ema is not None:
            row["ema_test_acc"] = ema[i]
        history.append_csv(path, row)
    return path


def test_summary_values(tmp_path):
    accs = [0.1, 0.3, 0.5, 0.6, 0.7, 0.65, 0.8]
    s = summarize_run(_csv(tmp_path, accs, clean=0.82))
    assert s["epochs"] == 7 and s["final_acc"] == pytest.approx(80) and s["best_epoch"] == 7
    assert s["last5_acc"] == pytest.approx(100 * sum(accs[-5:]) / 5)
    assert s["last3_acc"] == pytest.approx(100 * sum(accs[-3:]) / 3)
    assert s["minutes"] == pytest.approx(7 * 36 / 60) and s["train_clean_acc"] == pytest.approx(82)


def test_summary_scores_raw_and_ema_weights_apart(tmp_path):
    s = summarize_run(_csv(tmp_path, [0.5, 0.6, 0.4], ema=[0.55, 0.58, 0.57]))
    assert s["final_acc"] == pytest.approx(40) and s["last3_acc"] == pytest.approx(50)
    assert s["best_acc"] == pytest.approx(60) and s["best_epoch"] == 2
    assert s["ema_final_acc"] == pytest.approx(57) and s["ema_last3_acc"] == pytest.approx(170 / 3)
    assert s["ema_best_acc"] == pytest.approx(58) and s["ema_best_epoch"] == 2
    assert math.isnan(s["train_clean_acc"])
    assert math.isnan(s["last5_acc"]) and math.isnan(s["ema_last5_acc"])  # 3 epochs: no 5-epoch mean to claim
    (tmp_path / "raw").mkdir()
    assert "ema_last5_acc" not in summarize_run(_csv(tmp_path / "raw", [0.5]))


def test_advice_fits_the_run(tmp_path):
    early = summarize_run(_csv(tmp_path, [0.3] * 1, clean=0.31))
    tips = " ".join(next_steps(early, Config(epochs=1)))
    assert "After 1 epoch it is too early to say" in tips and "underfits" not in tips  # close early in any run
    (tmp_path / "u").mkdir()
    under = summarize_run(_csv(tmp_path / "u", [0.8] * 10, clean=0.81))
    tips = " ".join(next_steps(under, Config(epochs=200)))
    assert "stopped at epoch 10 of 200" in tips and "underfits" in tips and "randaug_prob 0.5" in tips
    bare = Config(epochs=10, randaugment=False, mixup_alpha=0.0, drop_path=0.0)
    tips = " ".join(next_steps(under, bare))
    assert "randaug" not in tips and "no augmentation or regularisation left" in tips and "stopped" not in tips
    over = summarize_run(_csv(tmp_path / "o", [0.7] * 60, clean=0.95)) if (tmp_path / "o").mkdir() is None else None
    assert "overfits" in " ".join(next_steps(over, Config(epochs=60)))
    assert next_steps({"epochs": 0}, Config()) == ["Nothing trained yet: run the training cell."]
    assert "anecdote" in next_steps(under, bare)[-1] and "anecdote" in next_steps(under, bare, compared_seeds=1)[-1]
    assert next_steps(under, bare, compared_seeds=2)[-1].startswith("The comparison paired 2 seeds; its interval")
    assert "read the interval" in next_steps(under, bare, compared_seeds=5)[-1]


def test_describe_counts_the_epochs_it_averages_and_scores_ema_apart(tmp_path):
    text = describe("run", summarize_run(_csv(tmp_path, [0.5, 0.6], clean=0.7, ema=[0.55, 0.58])))
    assert text.startswith("run: 2 epochs; test accuracy 60.00% at the end, best 60.00% (epoch 2)")
    assert "EMA weights: test accuracy 58.00% at the end, best 58.00%" in text and "averaged" not in text
    (tmp_path / "one").mkdir()
    one = describe("run", summarize_run(_csv(tmp_path / "one", [0.5])))
    assert "1 epoch;" in one and "averaged" not in one and "EMA" not in one
    (tmp_path / "six").mkdir()
    six = describe("run", summarize_run(_csv(tmp_path / "six", [0.1, 0.2, 0.3, 0.4, 0.5, 0.6])))
    assert "40.00% averaged over the last 5 epochs" in six
    (tmp_path / "four").mkdir()
    four = describe("run", summarize_run(_csv(tmp_path / "four", [0.1, 0.2, 0.3, 0.4])))
    assert "30.00% averaged over the last 3 epochs" in four


def test_each_series_keeps_its_colour_across_panels_and_comparison_ticks_are_whole_epochs(tmp_path):
    import figures

    csv_path = tmp_path / "run.csv"
    csv_path.write_text(
        "epoch,lr,train_loss,train_acc,train_clean_acc,test_loss,test_acc,ema_test_loss,ema_test_acc\n"
        "1,0.001,2.1,0.2,0.25,2.0,0.28,2.05,0.27\n2,0.0005,1.9,0.3,0.35,1.8,0.33,1.85,0.32\n"
    )
    for fig in (figures.plot_run(csv_path, tmp_path / "run.png"), figures.plot_progress(csv_path, tmp_path / "p.png")):
        colours = {}
        for a in fig.axes[:2]:
            for line in a.get_lines():
                series = line.get_label().split(" ")[0].rstrip(",")  # "train", "test"
                key = "ema" if "EMA" in line.get_label() else "clean" if "clean" in line.get_label() else series
                colours.setdefault(key, set()).add(line.get_color())
        assert all(len(c) == 1 for c in colours.values()) and {"train", "test", "ema", "clean"} <= set(colours)
        assert len({next(iter(c)) for c in colours.values()}) == len(colours)  # and distinct from each other
    fig = figures.plot_groups({"dyt": [csv_path], "ln": [csv_path]}, tmp_path / "groups.png")
    ticks = fig.axes[0].get_xticks()
    assert all(float(t).is_integer() for t in ticks)


def test_a_one_epoch_group_plot_shows_its_points_and_spread(tmp_path):
    import figures

    seeds = []
    for seed, acc in enumerate((0.30, 0.34)):
        (tmp_path / str(seed)).mkdir()
        seeds.append(_csv(tmp_path / str(seed), [acc]))
    fig = figures.plot_groups({"dyt": seeds, "ln": seeds[:1]}, tmp_path / "groups.png")
    lines = [line for line in fig.axes[0].get_lines() if not line.get_label().startswith("_")]
    assert [line.get_marker() for line in lines] == ["o", "o"]  # a line through one point draws nothing
    assert [list(line.get_ydata()) for line in lines] == [[pytest.approx(32)], [pytest.approx(30)]]
    (bars,) = fig.axes[0].collections  # dyt's spread over its two seeds, as a bar from 30 to 34
    (segment,) = bars.get_segments()
    assert [y for _, y in segment] == [pytest.approx(30), pytest.approx(34)]


def test_layer_styles_tell_depth_by_colour_and_slot_by_dash():
    from matplotlib.colors import to_rgb

    import figures

    layers = [f"blocks.{b}.norm{k}" for b in range(6) for k in (1, 2)] + ["norm"]
    styles = figures.layer_styles(layers)
    assert styles["blocks.2.norm1"]["color"] == styles["blocks.2.norm2"]["color"]  # one block, one colour
    assert (styles["blocks.2.norm1"]["linestyle"], styles["blocks.2.norm2"]["linestyle"]) == ("-", "--")
    colours = [to_rgb(styles[f"blocks.{b}.norm1"]["color"]) for b in range(6)]
    gaps = [sum(abs(x - y) for x, y in zip(a, b)) for a, b in zip(colours, colours[1:])]
    assert min(gaps) > 0.15  # neighbouring blocks are told apart
    assert styles["norm"] == {"color": "black", "linestyle": ":"}
    labels = [h.get_label() for h in figures.layer_legend(layers)]
    assert labels == [f"block {b}" for b in range(1, 7)] + [
        "norm",
        "norm1 (before attention)",
        "norm2 (before the MLP)",
    ]


def test_the_schedule_after_raising_epochs_shows_what_was_trained_and_what_is_left(tmp_path):
    import figures

    csv_path = tmp_path / "run.csv"
    for epoch, lr in ((1, 0.001), (2, 0.0005)):  # trained on a 2-epoch cosine
        history.append_csv(csv_path, {"epoch": epoch, "lr": lr, "test_acc": 0.5})
    new = lambda step: 0.001 * (1 - step / 40)  # noqa: E731 - the raised run's schedule, 10 steps an epoch
    fig = figures.plot_schedule(new, 40, 10, tmp_path / "s.png", trained_csv=csv_path)
    trained, left = fig.axes[0].get_lines()
    assert trained.get_label().startswith("trained") and list(trained.get_ydata()) == [0.001, 0.0005]
    assert left.get_label() == "to train" and left.get_xdata()[0] == 2.0 and left.get_xdata()[-1] == 3.9
    assert left.get_ydata()[0] == pytest.approx(new(20))  # the new schedule from the first untrained step
    fresh = figures.plot_schedule(new, 40, 10, trained_csv=tmp_path / "none.csv")  # nothing trained yet
    (line,) = fresh.axes[0].get_lines()
    assert line.get_xdata()[0] == 0.0 and fresh.axes[0].get_legend() is None
    done = figures.plot_schedule(new, 20, 10, trained_csv=csv_path)  # all trained: nothing left to draw
    assert [x.get_label() for x in done.axes[0].get_lines()] == ["trained (CSV, end of each epoch)"]


def test_alpha_per_slot_is_the_mean_over_each_groups_runs_and_layernorm_is_left_out(tmp_path):
    import figures

    def run(name, alphas):
        path = tmp_path / f"{name}.csv"
        for e, (a1, a2) in enumerate(alphas, 1):
            history.append_csv(path, {"epoch": e, "test_acc": 0.5, "alpha_blocks.0.norm1": a1, "alpha_norm": a2})
        return path

    ln = tmp_path / "ln.csv"
    history.append_csv(ln, {"epoch": 1, "test_acc": 0.5})
    curves = {"dyt": [run("s0", [(0.5, 0.4), (0.3, 0.2)]), run("s1", [(0.5, 0.6), (0.1, 0.4)])], "ln": [ln]}
    fig = figures.plot_alpha_slots(curves, tmp_path / "alpha.png")
    first, final = fig.axes[0], fig.axes[1]
    assert first.get_title() == "blocks.0.norm1" and final.get_title() == "norm"
    (line,) = first.get_lines()  # LayerNorm has no alpha: one line, DyT's
    assert line.get_label() == "dyt (2)" and list(line.get_ydata()) == pytest.approx([0.5, 0.2])
    assert list(final.get_lines()[0].get_ydata()) == pytest.approx([0.5, 0.3])
