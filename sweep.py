"""Several runs side by side: a list and/or a grid of config overrides becomes runs, each in its own process.

The unit of work is ``train_run(config)``: it trains one config to completion (resuming it if it
has files already) and returns its summary. ``run_sweep`` calls it in child processes, ``per_gpu``
at a time on every visible GPU (or ``per_gpu`` at a time on the CPU), and writes a table. Running
the same sweep again continues every unfinished run and skips the finished ones. A cluster
scheduler calls the same function unchanged (see the README: Ray Tune, submitit).

    python sweep.py --grid '{"norm": ["dyt", "ln"], "seed": [0, 1, 2]}' --per-gpu 2 --name norms
    python sweep.py --runs '[{}, {"randaug_prob": 0.5}, {"randaug_magnitude": 5}]' --per-gpu 3 --name recipes
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import torch

import report
from atomic_files import atomic_write
from config import Config, config_differences, with_overrides
from data import ensure_cifar10
from run_files import RunPaths

POLL_SECONDS = 0.5
DONE = ("finished", "stopped early")  # statuses a sweep run again does not train further
FOLDER_FIELDS = ("data_dir", "checkpoint_dir", "log_dir", "plot_dir")


def run_name_for(base: str, overrides: dict) -> str:
    """``dyt_cifar10`` + ``{"norm": "ln", "seed": 1}`` -> ``dyt_cifar10_norm-ln_seed-1``."""
    parts = [f"{k}-{v}" for k, v in overrides.items()]
    return "_".join([base] + parts).replace("/", "-").replace(" ", "")


def grid(base: Config, axes: dict[str, list]) -> list[tuple[Config, dict]]:
    """Every combination of ``axes`` (field -> values) applied to ``base``: (config, overrides) pairs,
    each config with a run name derived from its overrides."""
    return expand(base, [{}], axes)


def expand(base: Config, listed: list[dict], axes: Optional[dict[str, list]] = None) -> list[tuple[Config, dict]]:
    """Each override set of ``listed`` crossed with every combination of ``axes``: (config, overrides)
    pairs in that order, each config named after its overrides. ``[{}]`` with axes is a plain grid;
    a list without axes is one run per entry (``{}`` is the base config itself).

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
            cfg = with_overrides(base, {**overrides, "run_name": run_name_for(base.name, overrides)})
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


def compare_norms(cfg: Config, seeds: list[int]) -> list[tuple[Config, dict]]:
    """DyT and LayerNorm with ``cfg``'s recipe over ``seeds``. The run of ``cfg``'s own norm and seed
    is ``cfg`` itself (its files, its name), so a run the notebook trained already is not trained again."""
    runs = grid(cfg, {"norm": ["dyt", "ln"], "seed": list(seeds)})
    return [(cfg, o) if (o["norm"], o["seed"]) == (cfg.norm, cfg.seed) else (c, o) for c, o in runs]


def train_run(config: Config | dict, progress: str = "off", on_epoch: Optional[Callable[[dict], None]] = None) -> dict:
    """Train one config to completion (resuming its files if any) and return its summary;
    ``on_epoch`` is called with each epoch's CSV row (Ray Tune's reporting).

    Errors are reported, not raised: ``status`` is ``"finished"``, ``"diverged"`` or ``"failed"``,
    with ``error`` saying why. The summary is also written to ``<log_dir>/<run>_result.json``."""
    from recipe import load_data
    from training import DivergenceError, Trainer

    cfg = config if isinstance(config, Config) else Config.from_dict(config)
    start = time.time()
    result = {"run_name": cfg.name, "status": "failed", "error": ""}
    trainer = None
    try:
        trainer = Trainer(cfg, load_data(cfg), progress=progress)
        for epoch in trainer.remaining_epochs():
            row = trainer.run_epoch(epoch)
            if on_epoch is not None:
                on_epoch(row)
        result["status"] = "finished"
    except DivergenceError as e:
        result.update(status="diverged", error=str(e))
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


def _done(cfg: Config) -> bool:
    return run_result(cfg)["status"] in DONE


def _slots(per_gpu: int) -> list[Optional[int]]:
    """One entry per concurrent run: a GPU index, or None for the CPU."""
    gpus = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    return [g for g in gpus for _ in range(per_gpu)] if gpus else [None] * per_gpu


def _launch(cfg: Config, gpu: Optional[int], per_process_threads: int) -> subprocess.Popen:
    env = dict(os.environ)
    if gpu is not None:
        env["CUDA_VISIBLE_DEVICES"] = str(gpu)
        cfg = with_overrides(cfg, {"device": "auto"})  # the one visible GPU
    else:
        env["OMP_NUM_THREADS"] = str(per_process_threads)
    Path(cfg.log_dir).mkdir(parents=True, exist_ok=True)
    with open(RunPaths.of(cfg).output, "a") as out:  # the child keeps its own copy of the file
        # Same working directory as this process, so relative folders in the config mean the same there.
        return subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "--one", json.dumps(cfg.to_dict())],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
        )


def run_sweep(runs: list[tuple[Config, dict]], per_gpu: int = 1, name: str = "sweep", progress: str = "lines"):
    """Train ``runs`` (from ``grid``) in child processes, ``per_gpu`` at a time per GPU; returns
    the table (``results``) as a pandas DataFrame and writes it with the group statistics.
    ``progress``: ``"lines"`` (a line per started and ended run) or ``"off"``.

    Raises ``ValueError`` before training anything if a run's files were written by another config."""
    if per_gpu < 1:
        raise ValueError(f"per_gpu must be >= 1, got {per_gpu}")
    clashes = trained_with_another_config(runs)
    if clashes:
        raise ValueError(clash_message(clashes))
    say = print if progress != "off" else (lambda *_: None)
    for data_dir, download in {(c.data_dir, c.download) for c, _ in runs}:
        ensure_cifar10(data_dir, download)  # downloaded once, not by every child
    pending = [(c, o) for c, o in runs if not _done(c)]
    say(f"{name}: {len(runs)} runs, {len(runs) - len(pending)} finished already, {len(pending)} to train")
    slots = _slots(per_gpu)
    threads = max(1, (os.cpu_count() or 1) // len(slots))
    running: dict[int, tuple[subprocess.Popen, Config]] = {}
    try:
        while pending or running:
            for slot in [s for s in range(len(slots)) if s not in running]:
                if not pending:
                    break
                cfg, _ = pending.pop(0)
                running[slot] = (_launch(cfg, slots[slot], threads), cfg)
                where = f"GPU {slots[slot]}" if slots[slot] is not None else "CPU"
                say(f"  started {cfg.name} on {where}")
            time.sleep(POLL_SECONDS)
            for slot, (proc, cfg) in list(running.items()):
                if proc.poll() is not None:
                    del running[slot]
                    say(f"  {cfg.name}: exit code {proc.returncode}")
    except BaseException:  # an interrupt stops the children too; their runs resume next time
        for proc, _ in running.values():
            proc.send_signal(signal.SIGINT)
        try:
            for proc, _ in running.values():
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()
        except KeyboardInterrupt:  # interrupted again while waiting: stop the children now
            for proc, _ in running.values():
                proc.kill()
        raise
    return write_results(runs, name)


def write_results(runs: list[tuple[Config, dict]], name: str):
    """The per-run table and the per-group statistics (mean and std over seeds) as CSVs, and the
    overlay plot; returns the per-run table."""
    import pandas as pd

    import figures

    fields = list(dict.fromkeys(k for _, overrides in runs for k in overrides))  # every swept field, in order
    files = {cfg.name: RunPaths.of(cfg) for cfg, _ in runs}
    rows = []
    for cfg, _ in runs:
        rows.append({**{k: getattr(cfg, k) for k in fields}, **run_result(cfg)})
    table = pd.DataFrame(rows)
    log_dir, plot_dir = Path(runs[0][0].log_dir), Path(runs[0][0].plot_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    table.to_csv(log_dir / f"{name}_runs.csv", index=False)
    groups = group_stats(table, [k for k in fields if k != "seed"])
    groups.to_csv(log_dir / f"{name}_groups.csv", index=False)
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
    table.attrs.update(groups=groups, plot=plot_dir / f"{name}.png", name=name, fields=fields)
    return table


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
    scores = [c for c in ("last5_acc", "ema_last5_acc", "final_acc", "best_acc", "minutes") if c in done]
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

    scores = ("final_acc", "best_acc", "last5_acc", "ema_last5_acc", "minutes")
    columns = [c for c in ("run_name", *table.attrs.get("fields", []), "status", "epochs", *scores) if c in table]
    print(table[columns].to_string(index=False, float_format="{:.2f}".format))
    groups = table.attrs["groups"]
    print("\nper group (mean and std over seeds):")
    print(groups.to_string(index=False, float_format="{:.2f}".format) if len(groups) else "(no finished run yet)")
    for _, row in table[table["status"].isin(["failed", "diverged"])].iterrows():
        print(f"\n{row['run_name']} {row['status']}: {row.get('error', '')}")
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


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--grid", help='JSON object: field -> list of values, e.g. \'{"norm": ["dyt", "ln"], "seed": [0, 1]}\''
    )
    ap.add_argument(
        "--runs",
        help='JSON list of override objects, one run each (crossed with --grid), e.g. \'[{}, {"pool": "gap"}]\'',
    )
    ap.add_argument("--overrides", default="{}", help="JSON object of Config fields shared by every run")
    ap.add_argument("--per-gpu", type=int, default=1, help="runs at a time on each GPU (or on the CPU)")
    ap.add_argument("--name", default="sweep", help="names the table, group statistics and plot")
    ap.add_argument(
        "--table-only", action="store_true", help="write and show the table of the runs so far; train nothing"
    )
    cluster = ap.add_argument_group("on a Ray cluster (pip install -r requirements-cluster.txt)")
    cluster.add_argument("--backend", choices=("local", "ray"), default="local", help="where the runs train")
    cluster.add_argument("--address", help="a running Ray cluster: auto or HOST:PORT (default: start Ray here)")
    cluster.add_argument("--scheduler", choices=("asha",), help="stop runs whose test accuracy trails (ASHA)")
    cluster.add_argument("--max-epochs", type=int, help="ASHA's last rung (default: the runs' epochs)")
    cluster.add_argument("--grace-epochs", type=int, help="epochs before ASHA may stop a run (default: max/4)")
    cluster.add_argument("--max-failures", type=int, default=2, help="retries of a run whose worker or node died")
    cluster.add_argument("--max-concurrent", type=int, default=0, help="runs at once (default: as resources allow)")
    ap.add_argument("--one", help=argparse.SUPPRESS)  # a child process: one config as JSON
    args = ap.parse_args(argv)
    ray_only = [f"--{n.replace('_', '-')}" for n in ("address", "scheduler", "max_epochs", "grace_epochs")
                if getattr(args, n) is not None]  # fmt: skip
    if args.backend != "ray" and ray_only:
        ap.error(f"{', '.join(ray_only)} only mean something with --backend ray")
    if args.one:
        result = train_run(json.loads(args.one))
        print(json.dumps(result))
        sys.exit(0 if result["status"] == "finished" else 1)
    if not args.grid and not args.runs:
        ap.error("give --grid, --runs or both")
    try:
        listed = json.loads(args.runs) if args.runs else [{}]
        axes = json.loads(args.grid) if args.grid else {}
        runs = expand(with_overrides(Config(), args.overrides), listed, axes)
    except ValueError as e:  # bad JSON, an unknown field, a bad value, clashing names
        ap.error(str(e))
    try:
        if args.table_only:
            table = write_results(runs, args.name)
        elif args.backend == "ray":
            import ray_sweep

            table = ray_sweep.run_ray_sweep(
                runs, args.name, args.address, args.scheduler, args.max_epochs, args.grace_epochs,
                args.max_failures, args.max_concurrent,
            )  # fmt: skip
        else:
            table = run_sweep(runs, args.per_gpu, args.name)
    except (ValueError, RuntimeError) as e:  # runs whose files belong to another config; Ray missing
        ap.exit(2, f"{ap.prog}: error: {e}\n")
    show(table)


if __name__ == "__main__":
    main()
