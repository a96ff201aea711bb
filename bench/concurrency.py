"""What running k trainings at once on one GPU gives: aggregate training throughput of k concurrent
runs (each its own process, through python -m sweeps as users run them) against one run alone, same machine,
same invocation.

    python bench/concurrency.py --data-dir ~/data --k 2 --epochs 6
    python bench/concurrency.py --data-dir DIR --epochs 2 --overrides '{"dim": 32, "train_subset": 2000}'  # CPU dry run

Each run's steady epochs (all but the first, which compiles) give its images per second from the
CSV's ``train_seconds``; the runs of a k-run sweep train over the same period, so their rates add up.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from config import Config, with_overrides  # noqa: E402
from runs.history import read_csv  # noqa: E402
from sweeps import grid, run_sweep  # noqa: E402


def steady_rate(csv_path: Path, images_per_epoch: int) -> float:
    """Images per second of a run's epochs after the first (median)."""
    rows = read_csv(csv_path)[1:]
    if not rows:
        raise SystemExit(f"{csv_path}: fewer than 2 epochs; raise --epochs")
    return images_per_epoch / statistics.median(float(r["train_seconds"]) for r in rows)


def measure(base: Config, k: int, name: str) -> float:
    runs = grid(with_overrides(base, {"run_name": name}), {"seed": list(range(k))})
    table = run_sweep(runs, per_gpu=k, name=name, progress="off")
    failed = table[table["status"] != "finished"]
    if len(failed):
        raise SystemExit(f"runs failed: {failed[['run_name', 'status', 'error']].to_string()}")
    images = (50_000 if not base.train_subset else base.train_subset) // base.batch_size * base.batch_size
    return sum(steady_rate(Path(c.log_dir) / f"{c.name}.csv", images) for c, _ in runs)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", required=True)
    ap.add_argument("--k", type=int, default=2, help="concurrent runs to compare with one")
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--overrides", default="{}", help="JSON object of Config fields for every run")
    ap.add_argument("--json", type=Path, help="also write the figures here")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        base = with_overrides(
            Config(),
            {
                "data_dir": args.data_dir,
                "download": False,
                "epochs": args.epochs,
                "checkpoint_dir": f"{tmp}/ck",
                "log_dir": f"{tmp}/log",
                "plot_dir": f"{tmp}/plots",
                **json.loads(args.overrides),
            },
        )
        one = measure(base, 1, "alone")
        many = measure(base, args.k, f"k{args.k}")
    result = {"k": args.k, "one_run_images_per_s": one, f"{args.k}_runs_images_per_s": many, "ratio": many / one}
    print(f"1 run: {one:,.0f} img/s | {args.k} runs at once: {many:,.0f} img/s in all | ratio {many / one:.2f}x")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
