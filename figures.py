"""All figures: training curves from a run's CSV, run overlays, image grids, confusion matrices.

Only this module imports matplotlib (through ``Figure``, not pyplot: no global state, works headless)
and pandas; every plot reads files or tensors, so it can be redrawn without training.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Callable, Optional

import torch

from data import CIFAR10_MEAN, CIFAR10_STD, CLASSES
from runs import history as h


def _figure(rows: int, cols: int, size: tuple[float, float]):
    from matplotlib.figure import Figure  # no pyplot: works headless, no global state

    fig = Figure(figsize=size, layout="constrained")
    return fig, fig.subplots(rows, cols, squeeze=False)


def _save(fig, path: str | Path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


# One colour per series in every panel and figure: train, clean train, test, EMA test.
SERIES_COLORS = {"train": "C0", "clean": "C2", "test": "C1", "ema": "C3"}
C = SERIES_COLORS
FEW_EPOCHS = 3  # a group's curve this short is drawn as points, its spread as bars


def plot_run(csv_path: str | Path, out_path: str | Path, title: str = "", mixup: bool = True):
    """Loss, accuracy and learning rate; DyT's alpha and each norm's gain per layer (one legend for
    both, beside them), from the CSV alone. ``mixup``: whether the run mixed its training images (the
    labels say so). Returns the figure."""
    import pandas as pd
    from matplotlib.ticker import MaxNLocator

    df = pd.read_csv(csv_path)
    fig, ax = _figure(2, 3, (15, 7.5))
    mixed = ", mixup" if mixup else ""
    a = ax[0, 0]
    a.plot(df[h.EPOCH], df[h.TRAIN_LOSS], color=C["train"], label=f"train (augmented{mixed}, label smoothing)")
    a.plot(df[h.EPOCH], df[h.TEST_LOSS], color=C["test"], label="test")
    if h.EMA_TEST_LOSS in df:
        a.plot(df[h.EPOCH], df[h.EMA_TEST_LOSS], color=C["ema"], label="test (EMA weights)")
    a.set(title="loss")
    a.legend()
    a = ax[0, 1]
    dominant = ", vs the dominant label" if mixup else ""
    a.plot(df[h.EPOCH], 100 * df[h.TRAIN_ACC], color=C["train"], label=f"train (augmented{dominant})")
    if h.TRAIN_CLEAN_ACC in df:  # above test: overfitting; near or below it: underfitting
        a.plot(df[h.EPOCH], 100 * df[h.TRAIN_CLEAN_ACC], color=C["clean"], label="train (clean images)")
    best = f"best {100 * df[h.TEST_ACC].max():.2f}%"
    a.plot(df[h.EPOCH], 100 * df[h.TEST_ACC], color=C["test"], label=f"test ({best})")
    if h.EMA_TEST_ACC in df:
        ema_best = f"best {100 * df[h.EMA_TEST_ACC].max():.2f}%"
        a.plot(df[h.EPOCH], 100 * df[h.EMA_TEST_ACC], color=C["ema"], label=f"test, EMA weights ({ema_best})")
    a.set(title="accuracy (%)")
    a.legend()
    a.grid(alpha=0.3)
    ax[0, 2].plot(df[h.EPOCH], df[h.LR])
    ax[0, 2].set(title="learning rate (end of epoch)")
    layers = [c[len(h.GAIN) :] for c in df.columns if c.startswith(h.GAIN)]
    styles = layer_styles(layers)
    for col, (prefix, what) in enumerate(((h.ALPHA, "DyT alpha"), (h.GAIN, "norm gain: mean |weight| x alpha"))):
        a = ax[1, col]
        shown = [n for n in layers if prefix + n in df]
        for n in shown:
            a.plot(df[h.EPOCH], df[prefix + n], label=n, linewidth=1.6, **styles[n])
        a.set(title=f"{what} per layer" if shown else "no DyT layers (LayerNorm run)")
    ax[1, 2].axis("off")
    if layers:
        ax[1, 2].legend(handles=layer_legend(layers), loc="center left", fontsize=11, title="layer", title_fontsize=11)
    for a in ax.flat:
        a.xaxis.set_major_locator(MaxNLocator(integer=True))
        a.set(xlabel="epoch")
    fig.suptitle(title or Path(csv_path).stem)
    _save(fig, out_path)
    return fig


BLOCK_NORM = re.compile(r"blocks\.(\d+)\.norm([12])")  # a block's norms: norm1 before attention, norm2 the MLP's
SLOT_STYLES = {"1": "-", "2": "--"}


def layer_styles(layers: list[str]) -> dict[str, dict]:
    """A line style per norm layer: the colour says the depth (a block's two norms share it, from dark
    purple at the first block to yellow at the last), the dash says the slot (solid: before attention,
    dashed: before the MLP); any other norm (the final one) is black."""
    from matplotlib import colormaps

    blocks = sorted({int(m.group(1)) for n in layers if (m := BLOCK_NORM.fullmatch(n))})
    ramp = colormaps["plasma"]
    styles = {}
    for n in layers:
        m = BLOCK_NORM.fullmatch(n)
        if m:
            depth = blocks.index(int(m.group(1))) / max(len(blocks) - 1, 1)
            styles[n] = {"color": ramp(0.88 * depth), "linestyle": SLOT_STYLES[m.group(2)]}
        else:
            styles[n] = {"color": "black", "linestyle": ":"}
    return styles


def layer_legend(layers: list[str]) -> list:
    """Legend entries for ``layer_styles``: one per block (its colour), the two slots (their dashes) and
    each other norm: a dozen layers read as a few entries."""
    from matplotlib.lines import Line2D

    styles = layer_styles(layers)
    handles, seen = [], set()
    for n in layers:
        m = BLOCK_NORM.fullmatch(n)
        label = f"block {int(m.group(1)) + 1}" if m else n
        if label not in seen:
            seen.add(label)
            handles.append(Line2D([], [], color=styles[n]["color"], linestyle="-" if m else ":", label=label))
    if any(BLOCK_NORM.fullmatch(n) for n in layers):
        handles.append(Line2D([], [], color="grey", linestyle="-", label="norm1 (before attention)"))
        handles.append(Line2D([], [], color="grey", linestyle="--", label="norm2 (before the MLP)"))
    return handles


def plot_progress(csv_path: str | Path, out_path: str | Path, title: str = ""):
    """Loss and accuracy per epoch so far, small: the figure redrawn while a run trains."""
    import pandas as pd
    from matplotlib.ticker import MaxNLocator

    df = pd.read_csv(csv_path)
    fig, ax = _figure(1, 2, (10, 3.4))
    dot = {"marker": "o"} if len(df) == 1 else {}  # one epoch: points, not invisible one-point lines
    ax[0, 0].plot(df[h.EPOCH], df[h.TRAIN_LOSS], color=C["train"], label="train", **dot)
    ax[0, 0].plot(df[h.EPOCH], df[h.TEST_LOSS], color=C["test"], label="test", **dot)
    ax[0, 0].set(title="loss")
    if h.TRAIN_CLEAN_ACC in df:
        ax[0, 1].plot(df[h.EPOCH], 100 * df[h.TRAIN_CLEAN_ACC], color=C["clean"], label="train (clean images)", **dot)
    ax[0, 1].plot(
        df[h.EPOCH],
        100 * df[h.TEST_ACC],
        color=C["test"],
        label=f"test (last {100 * df[h.TEST_ACC].iloc[-1]:.2f}%)",
        **dot,
    )
    if h.EMA_TEST_ACC in df:
        ax[0, 1].plot(df[h.EPOCH], 100 * df[h.EMA_TEST_ACC], color=C["ema"], label="test, EMA weights", **dot)
    ax[0, 1].set(title="accuracy (%)")
    for a in ax.flat:
        a.legend()
        a.grid(alpha=0.3)
        a.set(xlabel="epoch")
        a.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.suptitle(title or Path(csv_path).stem)
    _save(fig, out_path)
    return fig


def plot_images(images: torch.Tensor, labels: torch.Tensor, out_path: Optional[str | Path] = None, cols: int = 8):
    """A grid of images (B, 3, H, W), uint8 or normalised float, titled with class names."""
    x = images.detach().float().cpu()
    if images.dtype != torch.uint8:
        x = (x * torch.tensor(CIFAR10_STD).view(1, 3, 1, 1) + torch.tensor(CIFAR10_MEAN).view(1, 3, 1, 1)) * 255
    x = x.clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    rows = -(-len(x) // cols)
    fig, ax = _figure(rows, cols, (1.4 * cols, 1.55 * rows))
    for i, a in enumerate(ax.flat):
        a.axis("off")
        if i < len(x):
            a.imshow(x[i])
            a.set_title(CLASSES[int(labels[i])], fontsize=8)
    if out_path is not None:
        _save(fig, out_path)
    return fig


def plot_confusion(matrix: torch.Tensor, out_path: Optional[str | Path] = None, title: str = ""):
    """Row-normalised confusion matrix (true class per row) with per-class accuracy on the diagonal."""
    m = matrix.double()
    norm = (m / m.sum(1, keepdim=True).clamp(min=1)).numpy()
    fig, ax = _figure(1, 1, (7, 6))
    a = ax[0, 0]
    im = a.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    a.set_xticks(range(len(CLASSES)), CLASSES, rotation=45, ha="right")
    a.set_yticks(range(len(CLASSES)), CLASSES)
    a.set(xlabel="predicted", ylabel="true", title=title or "confusion matrix (row-normalised)")
    for i in range(len(CLASSES)):
        for j in range(len(CLASSES)):
            a.text(
                j,
                i,
                f"{norm[i, j]:.2f}",
                ha="center",
                va="center",
                fontsize=7,
                color="white" if norm[i, j] > 0.5 else "black",
            )
    fig.colorbar(im, ax=a)
    if out_path is not None:
        _save(fig, out_path)
    return fig


SCHEDULE_POINTS = 2000  # steps at which the schedule is drawn (a long run has millions)


def plot_schedule(
    lr_at_step: Callable[[int], float],
    total_steps: int,
    steps_per_epoch: int,
    out_path: Optional[str | Path] = None,
    title: str = "",
    trained_csv: Optional[str | Path] = None,
):
    """The learning rate over the whole run (``lr_at_step`` at up to ``SCHEDULE_POINTS`` steps, the
    first and last included), with the x axis in epochs. With ``trained_csv`` (the run's CSV, when it has
    rows), the epochs already trained are drawn from it as they were trained (the learning rate at each
    epoch's end; after ``epochs`` was raised that is the old schedule) and the schedule only from there
    on, as what is left to train."""
    import pandas as pd

    done = pd.read_csv(trained_csv) if trained_csv is not None and Path(trained_csv).exists() else None
    done = done[[h.EPOCH, h.LR]].dropna() if done is not None and len(done) else None
    first = min(int(done[h.EPOCH].max()) * steps_per_epoch, total_steps - 1) if done is not None else 0
    count = min(total_steps - first, SCHEDULE_POINTS)
    steps = sorted({first + round(i * (total_steps - 1 - first) / max(count - 1, 1)) for i in range(count)})
    fig, ax = _figure(1, 1, (6, 2.6))
    a = ax[0, 0]
    if done is not None:
        a.plot(done[h.EPOCH], done[h.LR], color="grey", marker=".", label="trained (CSV, end of each epoch)")
    if done is None or first < total_steps - 1:
        label = "to train" if done is not None else None
        a.plot([s / steps_per_epoch for s in steps], [lr_at_step(s) for s in steps], color=C["train"], label=label)
    if done is not None:
        a.legend(fontsize=8)
    a.set(title=title or "learning rate", xlabel="epoch", ylabel="lr")
    a.grid(alpha=0.3)
    if out_path is not None:
        _save(fig, out_path)
    return fig


def plot_alpha_slots(curves: dict[str, list[str | Path]], out_path: str | Path, title: str = ""):
    """DyT's alpha per slot (one panel per norm layer) over epochs: for each group of runs (label ->
    CSVs, e.g. one per seed), the mean over its runs as a line. Groups without alpha (LayerNorm) are left
    out. Returns the figure."""
    import pandas as pd
    from matplotlib.ticker import MaxNLocator

    frames = {label: [pd.read_csv(p) for p in paths] for label, paths in curves.items()}
    frames = {k: v for k, v in frames.items() if any(c.startswith(h.ALPHA) for c in v[0].columns)}
    slots = (
        [c[len(h.ALPHA) :] for c in next(iter(frames.values()))[0].columns if c.startswith(h.ALPHA)] if frames else []
    )
    cols = 3
    fig, ax = _figure(max(1, -(-len(slots) // cols)), cols, (13, 3.0 * max(1, -(-len(slots) // cols))))
    for i, slot in enumerate(slots):
        a = ax.flat[i]
        for j, (label, runs) in enumerate(frames.items()):
            epochs = min(len(r) for r in runs)
            mean = sum(r[h.ALPHA + slot].to_numpy()[:epochs] for r in runs) / len(runs)
            a.plot(runs[0][h.EPOCH][:epochs], mean, color=f"C{j}", label=f"{label} ({len(runs)})")
        a.set(title=slot, xlabel="epoch", ylabel="alpha")
        a.grid(alpha=0.3)
        a.xaxis.set_major_locator(MaxNLocator(integer=True))
    for a in ax.flat[len(slots) :]:
        a.axis("off")
    if slots:
        ax.flat[0].legend(fontsize=8, title="mean of (runs)")
    fig.suptitle(title or "DyT alpha per slot")
    _save(fig, out_path)
    return fig


def plot_groups(curves: dict[str, list[str | Path]], out_path: str | Path, title: str = ""):
    """Test accuracy per epoch of groups of runs (label -> CSVs, e.g. one per seed): the mean as a
    line and the band from the lowest to the highest run. Runs of different lengths are cut to the
    shortest of their group."""
    import pandas as pd
    from matplotlib.ticker import MaxNLocator

    fig, ax = _figure(1, 1, (8, 4.8))
    a = ax[0, 0]
    for label, paths in curves.items():
        frames = [pd.read_csv(p).set_index(h.EPOCH)[h.TEST_ACC] for p in paths]
        table = pd.concat(frames, axis=1, join="inner") * 100
        mean = table.mean(axis=1)
        few = len(table) <= FEW_EPOCHS  # a line through 1-3 points is hard to see, or not drawn at all
        a.plot(
            table.index,
            mean,
            marker="o" if few else None,
            label=f"{label} (n={len(frames)}, last {mean.iloc[-1]:.2f}%)",
        )
        if len(frames) > 1 and few:
            low, high = table.min(axis=1), table.max(axis=1)
            a.errorbar(table.index, mean, yerr=[mean - low, high - mean], fmt="none", capsize=4, alpha=0.5)
        elif len(frames) > 1:
            a.fill_between(table.index, table.min(axis=1), table.max(axis=1), alpha=0.25)
    a.set(title=title or "test accuracy (%)", xlabel="epoch", ylabel="test accuracy (%)")
    a.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs, not 1.2 ... 1.8
    a.legend()
    a.grid(alpha=0.3)
    _save(fig, out_path)
    return fig
