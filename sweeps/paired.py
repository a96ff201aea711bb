"""Paired differences between a sweep's settings: the same seeds in two settings, compared seed by seed.

Two settings trained on the same seeds share the seed's initial weights and batch order, so the spread of
their per-seed differences is smaller than the spread of either setting alone: a difference too small to
see in two means can be clear in the pairs. For each setting against a reference (the sweep's first), and
for each score: the per-seed differences, their mean, standard error and 95% interval (Student's t).
"""

from __future__ import annotations

import math

METRICS = ("final_acc", "last3_acc", "last5_acc")  # scores compared, where the runs have them (report.py)
LEVEL = 0.95


def t_quantile(p: float, df: int) -> float:
    """The ``p`` quantile (0.5 < p < 1) of Student's t with ``df`` degrees of freedom. With x = sqrt(df)
    tan(u), the t density becomes c cos(u)^(df-1) on [0, pi/2), smooth enough for Simpson's rule; the
    quantile is found by bisection on u."""
    if not 0.5 < p < 1 or df < 1:
        raise ValueError(f"need 0.5 < p < 1 and df >= 1, got p={p}, df={df}")
    c = math.exp(math.lgamma((df + 1) / 2) - math.lgamma(df / 2)) / math.sqrt(math.pi)

    def mass(u: float, n: int = 400) -> float:  # P(0 < T < sqrt(df) tan u)
        h = u / n
        f = [math.cos(h * i) ** (df - 1) for i in range(n + 1)]
        return c * h / 3 * (f[0] + f[-1] + 4 * sum(f[1:-1:2]) + 2 * sum(f[2:-1:2]))

    low, high = 0.0, math.pi / 2
    for _ in range(60):
        mid = (low + high) / 2
        low, high = (mid, high) if 0.5 + mass(mid) < p else (low, mid)
    return math.sqrt(df) * math.tan((low + high) / 2)


def paired(differences: list[float]) -> dict:
    """Mean, standard error and 95% interval of per-seed ``differences`` (NaN where fewer than two)."""
    n = len(differences)
    mean = sum(differences) / n if n else math.nan
    if n < 2:
        return {"pairs": n, "mean_diff": mean, "se": math.nan, "ci_low": math.nan, "ci_high": math.nan}
    se = math.sqrt(sum((d - mean) ** 2 for d in differences) / (n - 1) / n)
    half = t_quantile(0.5 + LEVEL / 2, n - 1) * se
    return {"pairs": n, "mean_diff": mean, "se": se, "ci_low": mean - half, "ci_high": mean + half}


def setting(value) -> str:
    """A swept setting as a person wrote it: ``3e-3`` -> ``0.003``, ``2e-5`` -> ``2e-05``, ``5.0`` -> ``5``."""
    return f"{value:g}" if isinstance(value, float) else str(value)


def label(row, fields: list[str]) -> str:
    """A setting's name from its swept fields (the seed left out): ``norm=ln, lr=0.001``."""
    named = [f"{k}={setting(row[k])}" for k in fields if k != "seed"]
    return ", ".join(named) or "base config"


def paired_table(table, fields: list[str], reference: str | None = None):
    """Each setting of ``table`` (a sweep's per-run table, finished runs used) against ``reference`` (a
    ``label``; default: the first run's setting), per score of ``METRICS`` that the runs have, on the
    seeds both finished: setting minus reference, in points. One row per (setting, score); a setting is
    named by the fields it changes from the reference."""
    import pandas as pd

    columns = ["setting", "against", "score", "differences", "pairs", "mean_diff", "se", "ci_low", "ci_high"]
    if "seed" not in fields or table.empty:
        return pd.DataFrame(columns=columns)
    labels = [label(row, fields) for _, row in table.iterrows()]
    done = table.assign(setting=labels)[table["status"] == "finished"]
    reference = reference or labels[0]
    base = done[done["setting"] == reference].set_index("seed")
    first = table.iloc[labels.index(reference)]
    rows = []
    for name in dict.fromkeys(labels):
        if name == reference:
            continue
        row = table.iloc[labels.index(name)]
        changed = [f for f in fields if f != "seed" and row[f] != first[f]]  # what this setting changes
        shown_name = label(row, changed)
        mine = done[done["setting"] == name].set_index("seed")
        seeds = [s for s in mine.index if s in base.index]
        if not seeds:
            continue
        for score in METRICS:
            if score not in done or any(math.isnan(v) for v in mine.loc[seeds, score].tolist()):
                continue
            diffs = [float(mine.loc[s, score] - base.loc[s, score]) for s in seeds]
            shown = " ".join(f"{d:+.2f}" for d in diffs)
            rows.append({"setting": shown_name, "against": reference, "score": score, "differences": shown,
                         **paired(diffs)})  # fmt: skip
    return pd.DataFrame(rows, columns=columns)
