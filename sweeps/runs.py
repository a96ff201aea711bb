"""The runs of a sweep, whatever trains them: names from overrides, one run trained to completion
(``train_run``, the unit of work), where each run stands (``run_result``, from its own files), and the
table, group statistics and plot. The local backend (local.py) and the Ray backend (on_ray.py) both
build on it.
"""

from __future__ import annotations

import itertools
import json
import time
from pathlib import Path
from typing import Callable, Optional

import report
from config import RUN_NAME, Config, config_differences, with_overrides
from runs.atomic import atomic_write
from runs.files import RunPaths, check_writable
from runs.lock import RunLock, RunLockedError
from sweeps.paired import label, paired_table, setting

DONE = ("finished", "stopped early")  # statuses a sweep run again does not train further
ELSEWHERE = "running elsewhere"  # another process holds the run's lock: this sweep says so and writes nothing
FOLDER_FIELDS = ("data_dir", "checkpoint_dir", "log_dir", "plot_dir")


def run_name_for(base: str, overrides: dict) -> str:
    """``dyt_cifar10`` + ``{"norm": "ln", "seed": 1}`` -> ``dyt_cifar10_norm-ln_seed-1``."""
    parts = [f"{k}-{v}" for k, v in overrides.items()]
    return "_".join([base] + parts).replace("/", "-").replace(" ", "")


def grid(base: Config, axes: dict[str, list]) -> list[tuple[Config, dict]]:
    """Every combination of ``axes`` (field -> values) applied to ``base``: (config, overrides) pairs,
    each config with a run name derived from its overrides."""
    return expand(base, [{}], axes)


def expand(
    base: Config, listed: list[dict], axes: Optional[dict[str, list]] = None, shared: Optional[dict] = None
) -> list[tuple[Config, dict]]:
    """Each override set of ``listed`` crossed with every combination of ``axes``: (config, overrides)
    pairs in that order, each config named after its overrides. ``[{}]`` with axes is a plain grid;
    a list without axes is one run per entry (``{}`` is the base config itself). A run that names a
    ``recipe`` gets that preset's values, with what ``base`` set on its own preset and the fields of
    ``shared`` (the sweep's ``--overrides``) on top (``config.with_overrides``).

    Raises ``ValueError`` for a malformed list or grid, a field in both, or two runs with one name."""
    if not isinstance(listed, list) or not listed or not all(isinstance(o, dict) for o in listed):
        raise ValueError(f"the runs must be a non-empty list of JSON objects (field -> value), got {listed!r}")
    axes = axes or {}
    if not isinstance(axes, dict) or not all(isinstance(v, list) and v for v in axes.values()):
        raise ValueError(f"the grid must be a JSON object of field -> non-empty list of values, got {axes!r}")
    both = sorted({k for o in listed for k in o} & set(axes))
    if both:
        raise ValueError(f"{', '.join(both)} is set both in the runs and in the grid; set each field in one of them")
    names = list(axes)
    runs = []
    for fixed in listed:
        for values in itertools.product(*(axes[n] for n in names)):
            overrides = {**fixed, **dict(zip(names, values))}
            cfg = with_overrides(base, {**overrides, "run_name": run_name_for(base.name, overrides)}, shared)
            runs.append((cfg, overrides))
    seen: dict[str, dict] = {}
    for cfg, overrides in runs:
        if cfg.name in seen:
            raise ValueError(
                f"two runs would share the name {cfg.name!r} (and its files): {seen[cfg.name]} and {overrides}; "
                f"make their overrides differ"
            )
        seen[cfg.name] = overrides
    return runs


def check_sweep_name(name: str) -> str:
    """``name`` if it can name a sweep's files (``log/<name>_runs.csv``, ...), else ``ValueError``."""
    if not isinstance(name, str) or not RUN_NAME.fullmatch(name):
        raise ValueError(
            f"the sweep name must be 1-100 letters, digits and ._=+- (no spaces or path separators), starting with "
            f"a letter or digit, got {name!r}; to write elsewhere, set log_dir and plot_dir in --overrides"
        )
    return name


def check_folders(runs: list[tuple[Config, dict]]) -> None:
    """Every run's output folder is writable (``PermissionError`` naming the first that is not), checked
    before anything trains or starts."""
    for folder in dict.fromkeys(getattr(c, k) for c, _ in runs for k in ("checkpoint_dir", "log_dir", "plot_dir")):
        check_writable(folder)


def compare_norms(cfg: Config, seeds: list[int]) -> list[tuple[Config, dict]]:
    """DyT and LayerNorm with ``cfg``'s recipe over ``seeds``. The run of ``cfg``'s own norm and seed
    is ``cfg`` itself (its files, its name), so a run the notebook trained already is not trained again."""
    runs = grid(cfg, {"norm": ["dyt", "ln"], "seed": list(seeds)})
    return [(cfg, o) if (o["norm"], o["seed"]) == (cfg.norm, cfg.seed) else (c, o) for c, o in runs]


def train_run(
    config: Config | dict,
    progress: str = "off",
    on_epoch: Optional[Callable[[dict], None]] = None,
    after_save: Optional[Callable[[int], None]] = None,
) -> dict:
    """Train one config to completion (resuming its files if any) and return its summary;
    ``on_epoch`` is called with each epoch's CSV row (Ray Tune's reporting), ``after_save`` with the epoch
    once its checkpoint is on disk, in the checkpoint writer's thread (the push to a cluster's storage).

    Errors are reported, not raised: ``status`` is ``"finished"``, ``"diverged"`` or ``"failed"``,
    with ``error`` saying why. The summary is also written to ``<log_dir>/<run>_result.json``."""
    from recipe import load_data
    from training import DivergenceError, Trainer

    cfg = config if isinstance(config, Config) else Config.from_dict(config)
    start = time.time()
    result = {"run_name": cfg.name, "status": "failed", "error": ""}
    trainer = None
    holder = RunLock(RunPaths.of(cfg).lock).held_elsewhere()
    if holder is not None:  # another sweep or notebook trains it: its files are not this sweep's to write
        return {**result, "status": ELSEWHERE, "error": f"process {holder['pid']} on {holder['host']} trains it"}
    try:
        trainer = Trainer(cfg, load_data(cfg), progress=progress)
        trainer.files.after_save = after_save
        for epoch in trainer.remaining_epochs():
            row = trainer.run_epoch(epoch)
            if on_epoch is not None:
                on_epoch(row)
        result["status"] = "finished"
    except DivergenceError as e:
        result.update(status="diverged", error=str(e))
    except RunLockedError as e:  # taken by another process between the look above and the lock
        return {**result, "status": ELSEWHERE, "error": str(e)}
    except Exception as e:  # one run's failure is its own; the sweep goes on
        result["error"] = f"{type(e).__name__}: {e}"
    finally:
        if trainer is not None and trainer.files.opened:
            trainer.close()
    paths = RunPaths.of(cfg)
    if paths.csv.exists():
        result.update(report.summarize_run(paths.csv))
    result.update(planned_epochs=cfg.epochs, wall_minutes=(time.time() - start) / 60)
    write_result(cfg, result)
    return result


def write_result(cfg: Config, result: dict) -> None:
    """``<log_dir>/<run>_result.json``: how a run ended, as ``run_result`` reads it."""
    text = json.dumps(result, indent=2) + "\n"
    atomic_write(RunPaths.of(cfg).result, lambda tmp: Path(tmp).write_text(text))


def clash_message(clashes: list[str]) -> str:
    return (
        f"{len(clashes)} run(s) of this sweep already have files from another config, so their results would "
        f"not be this config's: {'; '.join(clashes)}. Give this sweep's runs names of their own (a "
        f'"run_name" in the shared overrides, which prefixes every run), or other output folders.'
    )


def trained_with_another_config(runs: list[tuple[Config, dict]]) -> list[str]:
    """For each run whose files were written by another config (same name, other settings: a sweep
    run again with other ``--overrides``), what differs. Such a run's results are not this config's."""
    clashes = []
    for cfg, _ in runs:
        try:
            saved = json.loads(RunPaths.of(cfg).config.read_text())
        except (OSError, ValueError):
            continue
        diff = config_differences(saved, cfg)
        if diff:
            fields = ", ".join(f"{k} {a!r} there, {b!r} now" for k, (a, b) in diff.items())
            clashes.append(f"{cfg.name} ({fields})")
    return clashes


def write_results(runs: list[tuple[Config, dict]], name: str, extra: Optional[dict[str, dict]] = None):
    """The per-run table and the per-group statistics (mean and std over seeds) as CSVs, and the
    overlay plot; returns the per-run table. ``extra``: more columns of a run, by its name."""
    import pandas as pd

    import figures

    fields = list(dict.fromkeys(k for _, overrides in runs for k in overrides))  # every swept field, in order
    fields += [] if "seed" in fields else ["seed"]  # runs not swept over seeds share one: they pair on it
    files = {cfg.name: RunPaths.of(cfg) for cfg, _ in runs}
    rows = []
    for cfg, _ in runs:
        rows.append({**{k: getattr(cfg, k) for k in fields}, **run_result(cfg), **(extra or {}).get(cfg.name, {})})
    table = pd.DataFrame(rows)
    log_dir, plot_dir = Path(runs[0][0].log_dir), Path(runs[0][0].plot_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    table.to_csv(log_dir / f"{name}_runs.csv", index=False)
    groups = group_stats(table, [k for k in fields if k != "seed"])
    groups.to_csv(log_dir / f"{name}_groups.csv", index=False)
    pairs = paired_table(table, fields)
    if len(pairs):
        pairs.to_csv(log_dir / f"{name}_paired.csv", index=False)
    curves: dict[str, list[Path]] = {}
    for (cfg, overrides), row in zip(runs, rows):
        csv_path = files[cfg.name].csv
        if csv_path.exists() and row.get("epochs"):
            label = ", ".join(f"{k}={v}" for k, v in overrides.items() if k != "seed") or "base config"
            curves.setdefault(label, []).append(csv_path)
    if curves:
        figures.plot_groups(
            curves, plot_dir / f"{name}.png", title=f"{name}: mean test accuracy, band: min to max over seeds"
        )
    table.attrs.update(groups=groups, pairs=pairs, plot=plot_dir / f"{name}.png", name=name, fields=fields)
    return table


def paired_caveats(table, pairs, fields: list[str]) -> list[str]:
    """Why the paired differences have no interval, or are missing, when the sweep has settings to compare."""
    done = table[table["status"] == "finished"]
    settings = {label(row, fields) for _, row in done.iterrows()}
    if len(settings) < 2:
        return []
    if pairs is None or not len(pairs):
        return ["no paired difference: no seed finished in both the first setting and another (each setting's runs "
                "must share seeds with the first's)"]  # fmt: skip
    if (pairs["pairs"] < 2).any():
        more = "train 2 or more seeds of each setting (e.g. --grid '{\"seed\": [0, 1, 2]}')"
        return [f"one seed in common: a difference without an interval, which cannot tell a real effect from "
                f"seed-to-seed noise; {more}"]  # fmt: skip
    return []


def run_result(cfg: Config) -> dict:
    """Where run ``cfg`` stands, from its CSV and what ``train_run`` said of it: ``"finished"`` (all
    epochs), ``"diverged"``/``"failed"`` (with ``error``), ``"unfinished"`` (a sweep stopped part-way)
    ``"stopped early"`` (by a Ray Tune scheduler) or ``"not run"``; with the CSV's summary."""
    paths = RunPaths.of(cfg)
    summary = report.summarize_run(paths.csv) if paths.csv.exists() else {"epochs": 0}
    try:
        said = json.loads(paths.result.read_text())
    except (OSError, ValueError):
        said = {}
    row = {"run_name": cfg.name, "status": "not run", "error": "", **summary, "planned_epochs": cfg.epochs}
    holder = RunLock(paths.lock).held_elsewhere() if summary["epochs"] < cfg.epochs else None
    if holder is not None:
        return {**row, "status": ELSEWHERE, "error": f"process {holder['pid']} on {holder['host']} trains it"}
    if said.get("status") in ("diverged", "failed", "stopped early") and said.get("epochs", 0) == summary["epochs"]:
        row.update(status=said["status"], error=said.get("error", ""))
    elif summary["epochs"] >= cfg.epochs:
        row["status"] = "finished"
    elif summary["epochs"]:
        row["status"] = "unfinished"
    if "wall_minutes" in said:
        row["wall_minutes"] = said["wall_minutes"]
    return row


def group_stats(table, by: list[str]):
    """Mean, std and count of the scores of finished runs per group (``by``: the swept fields other
    than the seed)."""
    import pandas as pd

    done = table[table["status"] == "finished"] if "status" in table else table.iloc[0:0]
    scores = ("final_acc", "last3_acc", "last5_acc", "ema_final_acc", "ema_last5_acc", "best_acc", "minutes")
    scores = [c for c in scores if c in done and done[c].notna().any()]  # a score no run has: no column
    if done.empty or not scores:
        return pd.DataFrame(columns=by + ["runs"])
    grouped = done.groupby(by, dropna=False) if by else done.assign(group="all").groupby("group")
    stats = grouped[scores].agg(["mean", "std"])
    stats.columns = [f"{score}_{stat}" for score, stat in stats.columns]
    stats["runs"] = grouped.size()
    return stats.reset_index()


def show(table) -> None:
    """The table, the group statistics and the plot, in a notebook or a terminal."""
    import utils

    scores = ("final_acc", "best_acc", "last3_acc", "last5_acc", "ema_last5_acc", "minutes")
    fields = table.attrs.get("fields", [])
    columns = ("run_name", *fields, "status", "epochs", *scores, "nodes")
    columns = [c for c in columns if c in table and table[c].notna().any()]
    swept = {f: setting for f in fields if f in table}  # a setting as it was given: 0.003 and 2e-05, not 0.00 twice
    print(table[columns].to_string(index=False, float_format="{:.2f}".format, formatters=swept))
    groups = table.attrs["groups"]
    print("\nper group (mean and std over seeds):")
    shown = groups.to_string(
        index=False, float_format="{:.2f}".format, formatters={f: setting for f in fields if f in groups}
    )
    print(shown if len(groups) else "(no finished run yet)")
    pairs = table.attrs.get("pairs")
    if pairs is not None and len(pairs):
        print(f"\npaired by seed: setting minus {pairs['against'].iloc[0]}, in points (95% interval, Student's t):")
        print(pairs.drop(columns="against").to_string(index=False, float_format="{:+.2f}".format))
    print(*(f"\n{line}" for line in paired_caveats(table, pairs, fields)), sep="")
    for _, row in table[table["status"].isin(["failed", "diverged"])].iterrows():
        print(f"\n{row['run_name']} {row['status']}: {row.get('error', '')}")
    elsewhere = table[table["status"] == ELSEWHERE]
    if len(elsewhere):
        print(
            f"\nrunning elsewhere (another process holds them; nothing written here): "
            f"{', '.join(elsewhere['run_name'])}"
        )
    if "nodes" in table:
        moved = table[table["nodes"].fillna("").str.contains(",")]
        if len(moved):
            print(
                f"\nretried on another node (a node was lost or the run failed there): {', '.join(moved['run_name'])}"
            )
    for line in table.attrs.get("errors", []):
        print(f"\na trial ended with an error: {line}")
    stopped = table[table["status"] == "stopped early"]
    if len(stopped):
        print(f"\nstopped early by the scheduler (not in the group statistics): {', '.join(stopped['run_name'])}")
    unfinished = table[table["status"].isin(["unfinished", "not run"])]
    if len(unfinished):
        print(
            f"\n{len(unfinished)} run(s) not finished (not in the group statistics); running the sweep again "
            f"continues them: {', '.join(unfinished['run_name'])}"
        )
    if Path(table.attrs["plot"]).exists():
        utils.show(table.attrs["plot"])
