"""Whole epochs of this checkout against another checkout of the project (an older commit), on the
same machine in the same invocation: is anything slower than before?

    git worktree add /tmp/baseline 5582e40        # the code as it was, beside this one
    python bench/against_baseline.py /tmp/baseline --data-dir ../cifar10-data --device cpu

Each side trains the same small configuration in its own process (its own imports, its own files),
the two sides alternating for ``--rounds`` rounds so that drift on a shared machine hits both. The
time of ``run_epoch`` (train, evaluation, checkpoint: what a user waits for) is taken by the same
code for both; the first epoch of each process (allocation, first calls) is left out. Prints the
median and quartiles per side and the ratio of medians.

A checkout is driven through the API both generations share: ``Trainer(cfg, data)``, ``resume()``,
``remaining_epochs()``, ``run_epoch(epoch)`` (``training``/``config`` modules, or the older ``engine``).
Fields only the newer code knows go in ``--current-overrides``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from benchmark import spread  # this folder is on the path of a script run from it

HERE = Path(__file__).resolve().parent.parent

# Runs inside a checkout: prints one "EPOCH <seconds>" line per epoch trained.
CHILD = r"""
import json, sys, time
sys.path.insert(0, ".")
try:
    import inspect
    from config import Config
    from training import Trainer
    try:
        from recipe import load_data
    except ImportError:  # before recipe.py
        from training import load_data
    if "progress" in inspect.signature(Trainer).parameters:
        quiet = dict(progress="off")
    else:  # before the Trainer took one progress word
        quiet = dict(show_progress=False, print_epochs=False)
except ImportError:  # before the layout change: one engine module
    from engine import Config, Trainer, load_data
    quiet = dict(quiet=True)
cfg = Config(**json.loads(sys.argv[1]))
trainer = Trainer(cfg, load_data(cfg), **quiet)
trainer.resume()
for epoch in trainer.remaining_epochs():
    start = time.perf_counter()
    trainer.run_epoch(epoch)
    print("EPOCH", time.perf_counter() - start, flush=True)
if hasattr(trainer, "close"):
    trainer.close()
elif getattr(trainer, "writer", None) is not None:
    trainer.writer.wait()
"""

# The README's CPU settings on a slice of CIFAR-10: seconds per epoch on a 2-core machine.
SMALL = dict(
    dim=128, depth=4, heads=4, patch_size=8, batch_size=128, lr=0.003, randaugment=False, mixup_alpha=0.0,
    drop_path=0.0, train_subset=5000, test_subset=2000, download=False,
)  # fmt: skip


def run_side(checkout: Path, config: dict, epochs: int, out: Path) -> list[float]:
    cfg = {**config, "epochs": epochs, "checkpoint_dir": str(out / "ck"), "log_dir": str(out / "log"),
           "plot_dir": str(out / "plots")}  # fmt: skip
    for d in ("ck", "log", "plots"):
        (out / d).mkdir(parents=True, exist_ok=True)
    done = subprocess.run([sys.executable, "-c", CHILD, json.dumps(cfg)], cwd=checkout, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{checkout}: the run failed:\n{done.stdout}\n{done.stderr}")
    return [float(line.split()[1]) for line in done.stdout.splitlines() if line.startswith("EPOCH ")][1:]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("baseline", type=Path, help="another checkout of the project (e.g. a git worktree)")
    ap.add_argument("--data-dir", required=True)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--epochs", type=int, default=4, help="epochs per process (the first is left out)")
    ap.add_argument("--rounds", type=int, default=3, help="processes per side, alternating")
    ap.add_argument("--overrides", default="{}", help="JSON: config fields for both sides")
    ap.add_argument("--current-overrides", default="{}", help="JSON: fields only this checkout's config has")
    ap.add_argument("--json", type=Path, help="also write the figures here")
    args = ap.parse_args(argv)
    config = {**SMALL, "data_dir": str(Path(args.data_dir).resolve()), "device": args.device,
              **json.loads(args.overrides)}  # fmt: skip
    current = {**config, **json.loads(args.current_overrides)}
    sides = {"baseline": (args.baseline.resolve(), config), "current": (HERE, current)}
    commits = {
        name: subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=path, capture_output=True, text=True
        ).stdout.strip()
        for name, (path, _) in sides.items()
    }
    print(
        f"# {datetime.date.today()}, torch {torch.__version__}, device {args.device} ({torch.get_num_threads()} "
        f"CPU threads), baseline {commits['baseline']}, current {commits['current']}"
    )
    times: dict[str, list[float]] = {name: [] for name in sides}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for name, (path, cfg) in sides.items():
                times[name] += run_side(path, cfg, args.epochs, Path(tmp) / f"{name}{r}")
                print(f"round {r + 1} {name}: " + " ".join(f"{t:.2f}" for t in times[name][-(args.epochs - 1) :]))
    result = {name: spread(t) for name, t in times.items()}
    result["ratio_current_over_baseline"] = result["current"]["median"] / result["baseline"]["median"]
    result["commits"] = commits
    for name in sides:
        s = result[name]
        print(f"{name} ({commits[name]}): {s['median']:.2f} s per epoch [{s['p25']:.2f}-{s['p75']:.2f}], n={s['n']}")
    print(f"current / baseline: {result['ratio_current_over_baseline']:.3f}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
