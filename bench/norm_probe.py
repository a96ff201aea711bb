"""Why one norm trains better than another: probes of finished runs, from their latest checkpoints.

For each run it rebuilds the initial weights from the run's config and seed (``recipe.build_run``, as
the ``Trainer`` does) and compares them with the trained ones, on the first ``--images`` CIFAR-10 test images:

- ``drift_<layer>``: how far training moved each kind of weight, ``||W_end - W_init|| / ||W_init||``
  summed over the blocks: a measured "effective learning rate" of the layers around the norms;
- ``entropy_init_<b>`` / ``entropy_<b>``: block b's attention entropy as a fraction of uniform
  (``models.attention_entropy``), at init and at the end;
- ``rms_in_<slot>``, ``rms_out_<slot>``, ``squashed_<slot>``: what each norm sees and hands on at the
  end, and DyT's share of inputs in tanh's flat part (``models.norm_inputs``);
- from the run's CSV in ``--logs``: clean training accuracy at epochs 1, 2 and the last, test accuracy
  at the last, and their gap (fitting speed against generalisation).

Prints one row per arm (the mean over its seeds: run names that differ only in ``_seed-N``) and
writes every run's row to ``--out``.

    python bench/norm_probe.py DATA_DIR CHECKPOINT_DIR RUN [RUN ...] [--logs DIR] [--out CSV]
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from config import Config  # noqa: E402
from data import CifarTensors, load_cifar10, normalize  # noqa: E402
from models import attention_entropy, norm_inputs  # noqa: E402
from recipe import build_run  # noqa: E402
from runs.checkpoints import load_checkpoint  # noqa: E402

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


def probe(
    checkpoint_dir: Path, runs: list[str], data: CifarTensors, images: int, log_dir: Path | None = None
) -> pd.DataFrame:
    """One row per run, indexed by run name, with its ``arm``."""
    rows = {}
    for run in runs:
        path = checkpoint_dir / f"{run}_latest.pth"
        if not path.exists():
            raise FileNotFoundError(
                f"{path} is missing: is {run!r} a run trained with checkpoints in {checkpoint_dir}?"
            )
        csv = log_dir / f"{run}.csv" if log_dir is not None else None
        rows[run] = {"arm": arm_of(run), **probe_run(path, data, images, pd.read_csv(csv) if csv else None)}
    return pd.DataFrame.from_dict(rows, orient="index")


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
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    table = probe(args.checkpoint_dir, args.runs, load_cifar10(args.data_dir, download=False), args.images, args.logs)
    if args.out:
        table.to_csv(args.out, index_label="run_name", float_format="%.6g")
    with pd.option_context("display.width", 250, "display.max_columns", 100, "display.float_format", "{:.3f}".format):
        print(by_arm(table).T.to_string())


if __name__ == "__main__":
    main()
