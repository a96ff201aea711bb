"""What the live curves cost the training loop: the time ``LiveCurves.update`` holds the calling thread
with the drawing done there (as before) and in its own thread (now), and the time of a fixed piece of
training work alone and while a figure is drawn beside it, alternating, in one process.

    python bench/live_curves.py [--rounds 7] [--epochs 50]
"""

from __future__ import annotations

import argparse
import datetime
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmark import spread  # noqa: E402

import figures  # noqa: E402
from config import Config  # noqa: E402
from recipe import build_model  # noqa: E402
from runs import history  # noqa: E402
from runs.console import LiveCurves  # noqa: E402


class Handle:
    def update(self, image):
        pass


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--epochs", type=int, default=50, help="rows of the CSV the figure draws")
    ap.add_argument("--steps", type=int, default=8, help="training steps of the CPU settings' model per piece")
    args = ap.parse_args(argv)
    tmp = Path(tempfile.mkdtemp())
    csv_path = tmp / "run.csv"
    for e in range(1, args.epochs + 1):
        row = {"epoch": e, "lr": 1e-3, "train_loss": 2 / e, "train_acc": 0.5, "train_clean_acc": 0.6,
               "test_loss": 1.5 / e, "test_acc": 0.5, "train_seconds": 30.0}  # fmt: skip
        history.append_csv(csv_path, row)
    live = LiveCurves(
        lambda c, p: figures.plot_progress(c, p, "live"), tmp / "live.png", lambda i, display_id: Handle()
    )
    model = build_model(Config(dim=128, depth=4, heads=4, patch_size=8))
    opt = torch.optim.AdamW(model.parameters(), 1e-3)
    x, y = torch.randn(128, 3, 32, 32), torch.randint(0, 10, (128,))

    def work() -> float:
        start = time.perf_counter()
        for _ in range(args.steps):
            loss = torch.nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        return time.perf_counter() - start

    work()
    held_before, held_after, alone, beside = [], [], [], []
    for _ in range(args.rounds):
        start = time.perf_counter()
        live.update(csv_path, final=True)  # drawn in the calling thread, as every update was before
        held_before.append(time.perf_counter() - start)
        alone.append(work())
        live.last = -float("inf")
        start = time.perf_counter()
        live.update(csv_path)  # drawn in its own thread
        held_after.append(time.perf_counter() - start)
        beside.append(work())  # the training that goes on meanwhile
        live.wait()
    print(f"# {datetime.date.today()}, torch {torch.__version__}, CPU ({torch.get_num_threads()} threads), "
          f"{args.epochs}-epoch figure, {args.rounds} rounds")  # fmt: skip
    rows = [("update() holds the training thread, drawing there (before)", held_before),
            ("update() holds the training thread, drawing in its own thread (now)", held_after),
            (f"{args.steps} training steps alone", alone),
            (f"{args.steps} training steps while a figure is drawn beside them", beside)]  # fmt: skip
    print("| | median s | quartiles |\n|---|---|---|")
    for name, values in rows:
        s = spread(values)
        print(f"| {name} | {s['median']:.3f} | {s['p25']:.3f}-{s['p75']:.3f} |")
    cost_before = spread(held_before)["median"]
    cost_after = spread(held_after)["median"] + spread(beside)["median"] - spread(alone)["median"]
    print(f"training time lost per redraw: before {cost_before:.3f} s, now {cost_after:.3f} s "
          f"(held + slowdown of the steps beside it); ratio {cost_after / cost_before:.3f}")  # fmt: skip


if __name__ == "__main__":
    main()
