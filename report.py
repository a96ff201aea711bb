"""What a finished run (or a set of runs) says: summaries read from the CSV logs alone."""

from __future__ import annotations

import math
from pathlib import Path

from runs import history as h
from runs.history import read_csv

LAST_EPOCHS = 5  # a run is scored by the mean test accuracy of its last epochs (less noisy than the best)
WINDOWS = (3, LAST_EPOCHS)  # the summary's last3_acc and last5_acc: NaN for a run with fewer epochs
FIT_EPOCHS = 5  # before this many epochs, training and test accuracy say nothing of under- or overfitting


def last_key(window: int, prefix: str = "") -> str:
    """The summary's key of the mean test accuracy over the last ``window`` epochs."""
    return f"{prefix}last{window}_acc"


def summarize_run(csv_path: str | Path) -> dict:
    """Epochs logged, final / best / mean-of-last-3 and -5 test accuracy (%; a window longer than the run
    is NaN, so a column never claims epochs that were not run) of the trained weights and, for a run
    with EMA, the same of the EMA weights in ``ema_``-prefixed keys (each scored on its own: taking
    the better of the two per epoch would flatter EMA runs), clean training accuracy, training minutes."""
    rows = read_csv(csv_path)
    if not rows:
        return {"epochs": 0}
    seconds = sum(float(r.get(k) or 0) for r in rows for k in h.TIME_COLUMNS[:3])
    summary = {"epochs": int(rows[-1][h.EPOCH])}
    for prefix in ("", h.EMA) if rows[-1].get(h.EMA_TEST_ACC) else ("",):
        accs = [100 * float(r[prefix + h.TEST_ACC] or "nan") for r in rows]
        best = max(range(len(rows)), key=lambda i: -math.inf if math.isnan(accs[i]) else accs[i])
        summary.update(
            {
                f"{prefix}final_acc": accs[-1],
                f"{prefix}best_acc": accs[best],
                f"{prefix}best_epoch": int(rows[best][h.EPOCH]),
                **{last_key(n, prefix): sum(accs[-n:]) / n if len(accs) >= n else math.nan for n in WINDOWS},
            }
        )
    summary["minutes"] = seconds / 60
    clean = rows[-1].get(h.TRAIN_CLEAN_ACC)
    summary["train_clean_acc"] = 100 * float(clean) if clean else math.nan
    return summary


def describe(name: str, summary: dict) -> str:
    """A run's result in words (``summary`` from ``summarize_run``): the trained weights and, apart,
    the EMA weights."""
    window = max((n for n in WINDOWS if n <= summary["epochs"]), default=None)

    def scores(prefix: str) -> str:
        final, best, epoch = (summary[prefix + k] for k in ("final_acc", "best_acc", "best_epoch"))
        mean = f", {summary[last_key(window, prefix)]:.2f}% averaged over the last {window} epochs" if window else ""
        return f"test accuracy {final:.2f}% at the end{mean}, best {best:.2f}% (epoch {epoch})"

    epochs = f"{summary['epochs']} epoch" + ("" if summary["epochs"] == 1 else "s")
    text = f"{name}: {epochs}; {scores('')}"
    if "ema_final_acc" in summary:
        text += f"; EMA weights: {scores('ema_')}"
    if not math.isnan(summary["train_clean_acc"]):
        text += f"; clean training accuracy {summary['train_clean_acc']:.1f}%"
    return text + f"; {summary['minutes']:.1f} minutes of training and evaluation."


def next_steps(summary: dict, cfg, compared_seeds: int = 0) -> list[str]:
    """Plain advice from a run's summary and its config (``config.Config``): what to try next;
    ``compared_seeds``: how many seeds the notebook's norm comparison ran (0: none)."""
    if not summary.get("epochs"):
        return ["Nothing trained yet: run the training cell."]
    tips = []
    if summary["epochs"] < cfg.epochs:
        tips.append(f"The run stopped at epoch {summary['epochs']} of {cfg.epochs}: run all cells again to resume it.")
    if summary["epochs"] < 50:
        tips.append(
            "A short run: accuracy keeps rising for 100-200 epochs; judge a recipe on a longer run (raise epochs and "
            "re-run to continue this one)."
        )
    gap = summary["train_clean_acc"] - summary["final_acc"]
    if summary["epochs"] < FIT_EPOCHS:
        tips.append(
            f"After {summary['epochs']} epoch{'s' * (summary['epochs'] > 1)} it is too early to say whether the model "
            f"under- or overfits (training and test accuracy are close early in any run)."
        )
    elif math.isnan(gap):
        tips.append("Set clean_train_images > 0 to see whether the model under- or overfits.")
    elif gap < 3:
        weaker = []
        if cfg.randaugment and cfg.randaug_ops and cfg.randaug_prob > 0.5:
            weaker.append("randaug_prob 0.5")
        if cfg.randaugment and cfg.randaug_ops and cfg.randaug_magnitude > 5:
            weaker.append("randaug_magnitude 5")
        if cfg.mixup_alpha > 0 or cfg.cutmix_alpha > 0:
            weaker.append("mixup_alpha 0")
        if cfg.drop_path > 0:
            weaker.append("drop_path 0")
        tips.append(
            f"Clean training accuracy ({summary['train_clean_acc']:.1f}%) is close to test accuracy: the model "
            f"underfits. "
            + (
                f"Less regularisation should help ({', '.join(weaker)}), in a new run (another run_name)."
                if weaker
                else "It has no augmentation or regularisation left to remove: train longer or use a larger model."
            )
        )
    elif gap > 10:
        tips.append(
            f"Clean training accuracy ({summary['train_clean_acc']:.1f}%) is far above test accuracy: the model "
            f"overfits. More regularisation (stronger RandAugment, cutmix_alpha 1.0, drop_path 0.2) should help."
        )
    if compared_seeds < 2:
        tips.append("One seed is an anecdote: compare norms over several seeds (section 8).")
    elif compared_seeds < 5:
        tips.append(
            f"The comparison paired {compared_seeds} seeds; its interval narrows with more (about 5 seeds show a "
            f"1-point difference at 0.5 points of run-to-run spread): add seeds to compare_seeds and run it again."
        )
    else:
        tips.append(
            f"The comparison paired {compared_seeds} seeds: read the interval of the difference, not the means alone."
        )
    return tips
