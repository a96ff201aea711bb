"""Several runs side by side from the command line: a list and/or a grid of config overrides becomes
runs (sweeps/runs.py), each trained in its own process on this machine (sweeps/local.py) or as a Ray Tune
trial on a cluster (``--backend ray``, sweeps/on_ray.py, an optional extra). Running the same sweep again
continues every unfinished run and skips the finished ones.

    python -m sweeps --grid '{"norm": ["dyt", "ln"], "seed": [0, 1, 2]}' --per-gpu 2 --name norms
    python -m sweeps --runs '[{}, {"randaug_prob": 0.5}, {"randaug_magnitude": 5}]' --per-gpu 3 --name recipes
    python -m sweeps --backend ray --address auto --storage s3://my-bucket/norms --grid '{"seed": [0, 1, 2]}'
"""

from __future__ import annotations

import argparse
import json
import sys

from config import parse_overrides, recipe_config
from sweeps.local import SweepInterrupted, run_sweep
from sweeps.runs import check_sweep_name, expand, show, train_run, write_results


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(
        prog="python -m sweeps", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--grid", help='JSON object: field -> list of values, e.g. \'{"norm": ["dyt", "ln"], "seed": [0, 1]}\''
    )
    ap.add_argument(
        "--runs",
        help='JSON list of override objects, one run each (crossed with --grid), e.g. \'[{}, {"pool": "gap"}]\'',
    )
    ap.add_argument("--recipe", default="default", help="the preset every run starts from (config.RECIPES)")
    ap.add_argument(
        "--overrides", default="{}", help="JSON object of Config fields shared by every run (win over --recipe)"
    )
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
    cluster.add_argument(
        "--storage", help="where the runs' files live for nodes that share no disk: a folder (NFS), s3:// or gs:// URI"
    )
    cluster.add_argument(
        "--storage-endpoint", help="an S3-compatible server that is not AWS, e.g. http://10.0.0.5:9000 (MinIO)"
    )
    ap.add_argument("--one", help=argparse.SUPPRESS)  # a child process: one config as JSON
    args = ap.parse_args(argv)
    ray_options = ("address", "scheduler", "max_epochs", "grace_epochs", "storage", "storage_endpoint")
    ray_only = [f"--{n.replace('_', '-')}" for n in ray_options
                if getattr(args, n) is not None]  # fmt: skip
    if args.backend != "ray" and ray_only:
        ap.error(f"{', '.join(ray_only)} only mean something with --backend ray")
    if args.one:
        result = train_run(json.loads(args.one))
        print(json.dumps(result))
        sys.exit(0 if result["status"] == "finished" else 1)
    if not args.grid and not args.runs:
        ap.error("give --grid, --runs or both")
    storage = None
    try:
        check_sweep_name(args.name)
        if args.per_gpu < 1:
            raise ValueError(f"--per-gpu must be an integer >= 1, got {args.per_gpu}")
        if args.backend == "ray":
            from sweeps import on_ray

            on_ray.check_arguments(args.max_epochs, args.grace_epochs, args.max_failures, args.max_concurrent, None)
            if args.storage_endpoint and not args.storage:
                raise ValueError("--storage-endpoint names the server of --storage: give --storage too")
            storage = on_ray.storage_spec(args.storage, args.storage_endpoint)
    except ValueError as e:
        ap.error(str(e))
    try:
        listed = json.loads(args.runs) if args.runs else [{}]
        axes = json.loads(args.grid) if args.grid else {}
        runs = expand(recipe_config(args.recipe, args.overrides), listed, axes, parse_overrides(args.overrides))
    except ValueError as e:  # bad JSON, an unknown field, a bad value, clashing names
        ap.error(str(e))
    try:
        if args.table_only and storage is not None:
            from sweeps import on_ray

            table = on_ray.stored_table(runs, args.name, storage)
        elif args.table_only:
            table = write_results(runs, args.name)
        elif args.backend == "ray":
            from sweeps import on_ray

            table = on_ray.run_ray_sweep(
                runs, args.name, args.address, args.scheduler, args.max_epochs, args.grace_epochs,
                args.max_failures, args.max_concurrent, storage=storage,
            )  # fmt: skip
        else:
            table = run_sweep(runs, args.per_gpu, args.name)
    except (ValueError, RuntimeError, PermissionError) as e:  # another config's files; Ray missing; a folder
        ap.exit(2, f"{ap.prog}: error: {e}\n")
    except SweepInterrupted as stop:  # Ctrl-C: what stopped and how to go on, not a traceback
        ap.exit(130, stop.message + "\n")
    show(table)


if __name__ == "__main__":
    main()
