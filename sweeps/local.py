"""Several runs side by side, from the command line or the notebook: a list and/or a grid of config
overrides becomes runs (sweep_runs.py), each trained in its own process.

``run_sweep`` calls ``train_run`` in child processes, ``per_gpu`` at a time on every visible GPU (or
``per_gpu`` at a time on the CPU), and writes the table. Running the same sweep again continues every
unfinished run and skips the finished ones. ``--backend ray`` trains the same runs as Ray Tune trials
on a cluster instead (ray_sweep.py, an optional extra).

    python sweep.py --grid '{"norm": ["dyt", "ln"], "seed": [0, 1, 2]}' --per-gpu 2 --name norms
    python sweep.py --runs '[{}, {"randaug_prob": 0.5}, {"randaug_magnitude": 5}]' --per-gpu 3 --name recipes
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

import torch

from config import Config, with_overrides
from data import ensure_cifar10
from run_files import RunPaths
from sweep_runs import (  # noqa: F401  (the notebook and users call these through sweep)
    DONE,
    clash_message,
    compare_norms,
    expand,
    grid,
    run_result,
    show,
    train_run,
    trained_with_another_config,
    write_results,
)

POLL_SECONDS = 0.5


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
