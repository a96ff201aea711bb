"""Why one norm trains better than another: probes of finished runs, from their latest checkpoints.

For each run it rebuilds the initial weights from the run's config and seed (``recipe.build_run``, as
the ``Trainer`` does) and compares them with the trained ones, on the first ``--images`` CIFAR-10 test images:

- ``drift_<layer>``: how far training moved each kind of weight, ``||W_end - W_init|| / ||W_init||``
  over all blocks together: how far the optimizer moved the layers around the norms, for their size;
- ``entropy_init_<b>`` / ``entropy_<b>``: block b's attention entropy as a fraction of uniform
  (``models.attention_entropy``), at init and at the end;
- ``rms_in_<slot>``, ``rms_out_<slot>``, ``squashed_<slot>``: what each norm sees and hands on at the
  end, and DyT's share of inputs in tanh's flat part (``models.norm_inputs``);
- from the run's CSV in ``--logs``: clean training accuracy at epochs 1, 2 and the last, test accuracy
  at the last, and their gap (fitting speed against generalisation).

Prints one row per arm (the mean over its seeds: run names that differ only in ``_seed-N``) and
writes every run's row to ``--out``.

``--replay N`` asks when instead: it trains each run again from its config and seed (in a temporary
folder; the run's files are not touched) for its first N epochs, probes the attention entropy and the
norms' output size after each epoch, and checks every replayed epoch's training loss against the run's
CSV bit for bit (one thread makes a CPU run deterministic), so the trajectory is the run's own.

    python bench/norm_probe.py DATA_DIR CHECKPOINT_DIR RUN [RUN ...] [--logs DIR] [--out CSV] [--replay N]
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
from pathlib import Path

import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from config import Config, with_overrides  # noqa: E402
from data import CifarTensors, load_cifar10, normalize  # noqa: E402
from models import attention_entropy, norm_inputs  # noqa: E402
from recipe import build_run  # noqa: E402
from runs.checkpoints import load_checkpoint  # noqa: E402
from training import Trainer  # noqa: E402

LAYERS = ("patch_embed", "attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")  # weights whose drift is reported


def arm_of(run: str) -> str:
    """The run's name without its seed: ``cpu_norm-ln_seed-3`` -> ``cpu_norm-ln``."""
    return re.sub(r"_seed-\d+$", "", run)


def drift(initial: dict, final: dict, layer: str) -> float:
    """``||W_end - W_init|| / ||W_init||`` over every weight matrix whose name contains ``layer``."""
    names = [n for n in initial if layer in n and n.endswith(".weight")]
    if not names:
        raise KeyError(f"no weight named like {layer!r} in the model")
    moved = sum((final[n].float() - initial[n].float()).pow(2).sum() for n in names)
    size = sum(initial[n].float().pow(2).sum() for n in names)
    return (moved / size).sqrt().item()


def fitting(history: pd.DataFrame) -> dict[str, float]:
    """Clean training accuracy early and at the end, test accuracy at the end, and their gap (points)."""
    last = history.iloc[-1]
    row = {f"clean_acc_{e}": 100 * history["train_clean_acc"].iloc[e - 1] for e in (1, 2) if len(history) >= e}
    row.update(clean_acc_last=100 * last["train_clean_acc"], test_acc_last=100 * last["test_acc"])
    row["gap"] = row["clean_acc_last"] - row["test_acc_last"]
    return row


def probe_run(checkpoint: Path, data: CifarTensors, images: int, history: pd.DataFrame | None = None) -> dict:
    """Every probe of one run (see the module's docstring), from its latest checkpoint, on the first
    ``images`` test images of ``data`` (its training images only rebuild a mimetic init)."""
    state = load_checkpoint(checkpoint, resumable=False)
    cfg = Config.from_dict(state["config"])
    model = build_run(cfg, data).model  # the run's initial weights, drawn from its seed
    images = normalize(data.x_test[:images])
    initial = {n: t.detach().clone() for n, t in model.state_dict().items()}
    row: dict = {"epoch": state["epoch"]}
    row.update({f"entropy_init_{b}": e for b, e in enumerate(attention_entropy(model, images))})
    model.load_state_dict(state["model"])
    row.update({f"drift_{layer}": drift(initial, state["model"], layer) for layer in LAYERS})
    row.update({f"entropy_{b}": e for b, e in enumerate(attention_entropy(model, images))})
    for slot, seen in norm_inputs(model, images).items():
        row.update({f"{what}_{slot}": value for what, value in seen.items()})
    if history is not None:
        row.update(fitting(history))
    return row


def replay(
    checkpoint: Path, data: CifarTensors, images: int, epochs: int, folder: Path, history: pd.DataFrame | None = None
) -> list[dict]:
    """The run trained again from its config and seed, with its files in ``folder``, for its first
    ``epochs`` epochs (its schedule unchanged): after each, the clean training and test accuracy, each
    block's attention entropy and each norm's output RMS. With ``history`` (the run's CSV) each epoch's
    training loss must equal the original's exactly."""
    cfg = Config.from_dict(load_checkpoint(checkpoint, resumable=False)["config"])
    files = {f"{k}_dir": str(folder / k) for k in ("checkpoint", "log", "plot")}
    trainer = Trainer(with_overrides(cfg, files), data, progress="off")
    trainer.resume()  # a fresh folder: starts at epoch 1
    images = normalize(data.x_test[:images])
    rows = []
    try:
        for epoch in range(1, epochs + 1):
            stats = trainer.run_epoch(epoch)
            if history is not None and float(stats["train_loss"]) != history["train_loss"].iloc[epoch - 1]:
                raise RuntimeError(
                    f"{cfg.name}: the replay's epoch {epoch} has training loss {stats['train_loss']!r}, the run's CSV "
                    f"{history['train_loss'].iloc[epoch - 1]!r}: not the same run (another torch, thread count or code)"
                )
            row = {"epoch": epoch, "clean_acc": 100 * stats["train_clean_acc"], "test_acc": 100 * stats["test_acc"]}
            row.update({f"entropy_{b}": e for b, e in enumerate(attention_entropy(trainer.model, images))})
            row.update({f"rms_out_{k}": v["rms_out"] for k, v in norm_inputs(trainer.model, images).items()})
            rows.append(row)
    finally:
        trainer.close()
    return rows


def probe(
    checkpoint_dir: Path, runs: list[str], data: CifarTensors, images: int, log_dir: Path | None = None
) -> pd.DataFrame:
    """One row per run, indexed by run name, with its ``arm``."""
    rows = {}
    for run in runs:
        csv = log_dir / f"{run}.csv" if log_dir is not None else None
        row = probe_run(_checkpoint(checkpoint_dir, run), data, images, pd.read_csv(csv) if csv else None)
        rows[run] = {"arm": arm_of(run), **row}
    return pd.DataFrame.from_dict(rows, orient="index")


def _checkpoint(checkpoint_dir: Path, run: str) -> Path:
    path = checkpoint_dir / f"{run}_latest.pth"
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: is {run!r} a run whose checkpoints are in {checkpoint_dir}?")
    return path


def by_arm(table: pd.DataFrame) -> pd.DataFrame:
    """The mean of every probe over each arm's seeds, with the number of seeds."""
    means = table.drop(columns=["epoch"]).groupby("arm", sort=False).mean()
    return means.assign(seeds=table.groupby("arm", sort=False).size())


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("data_dir")
    ap.add_argument("checkpoint_dir", type=Path)
    ap.add_argument("runs", nargs="+")
    ap.add_argument("--logs", type=Path, help="the runs' log folder (their CSVs), for the fitting columns")
    ap.add_argument("--images", type=int, default=1000, help="test images the probes run on")
    ap.add_argument("--out", type=Path, help="write every run's row here (CSV)")
    ap.add_argument("--replay", type=int, default=0, help="train each run's first N epochs again, probing each")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    data = load_cifar10(args.data_dir, download=False)
    show = pd.option_context("display.width", 250, "display.max_columns", 100, "display.float_format", "{:.3f}".format)
    if args.replay:
        rows = []
        for run in args.runs:
            csv = args.logs / f"{run}.csv" if args.logs else None
            history = pd.read_csv(csv) if csv else None
            with tempfile.TemporaryDirectory() as folder:
                found = replay(
                    _checkpoint(args.checkpoint_dir, run), data, args.images, args.replay, Path(folder), history
                )
            rows += [{"run_name": run, "arm": arm_of(run), **r} for r in found]
        table = pd.DataFrame(rows)
        if args.out:
            table.to_csv(args.out, index=False, float_format="%.6g")
        with show:
            print(table.drop(columns="run_name").groupby(["arm", "epoch"], sort=False).mean().T.to_string())
        return
    table = probe(args.checkpoint_dir, args.runs, data, args.images, args.logs)
    if args.out:
        table.to_csv(args.out, index_label="run_name", float_format="%.6g")
    with show:
        print(by_arm(table).T.to_string())


if __name__ == "__main__":
    main()
