"""A run's history: one CSV row per epoch, appended, with a header; repaired after a crash."""

from __future__ import annotations

import csv
import io
from pathlib import Path

from runs.atomic import atomic_write

# The CSV's columns, named once: every writer and reader of a run's history spells them from here.
EPOCH = "epoch"
LR = "lr"  # the learning rate at the end of the epoch
TRAIN_LOSS, TRAIN_ACC = "train_loss", "train_acc"  # on the augmented (and mixed) training batches
TRAIN_CLEAN_ACC = "train_clean_acc"  # unaugmented training images (clean_train_images of them)
TEST_LOSS, TEST_ACC = "test_loss", "test_acc"
EMA = "ema_"  # prefix of the EMA weights' test scores: ema_test_loss, ema_test_acc
EMA_TEST_LOSS, EMA_TEST_ACC = EMA + TEST_LOSS, EMA + TEST_ACC
TIME_COLUMNS = ("train_seconds", "eval_seconds", "checkpoint_seconds", "compile_seconds", "images_per_second")
ALPHA, GAIN = "alpha_", "gain_"  # prefixes of the per-layer columns: DyT's alpha, each norm's gain


def columns(clean: bool, ema: bool, alpha_layers: list[str], gain_layers: list[str]) -> list[str]:
    """A run's CSV columns, in order: with ``clean`` training accuracy, with ``ema`` scores, and one
    alpha and one gain column per named layer."""
    names = [EPOCH, LR, TRAIN_LOSS, TRAIN_ACC] + ([TRAIN_CLEAN_ACC] if clean else []) + [TEST_LOSS, TEST_ACC]
    names += [EMA_TEST_LOSS, EMA_TEST_ACC] if ema else []
    return names + list(TIME_COLUMNS) + [ALPHA + n for n in alpha_layers] + [GAIN + n for n in gain_layers]


def row(columns: list[str], epoch: int, stats: dict, alphas: dict, gains: dict) -> dict:
    """One epoch's row in ``columns``' order: ``stats`` (the epoch's scores and seconds), and each
    layer's alpha and gain."""
    values = {**stats, EPOCH: epoch, **{ALPHA + n: v for n, v in alphas.items()}}
    values.update({GAIN + n: v for n, v in gains.items()})
    return {c: values[c] for c in columns}


def read_csv(path: str | Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def append_csv(path: str | Path, row: dict) -> None:
    """Append one row, writing the header first when the file is new or empty. A row with columns
    the file lacks (a run continued by a newer version) first rewrites the file with the union of
    both (atomically; older rows get empty cells), so no column is shifted or lost."""
    path = Path(path)
    header = []
    if path.exists() and path.stat().st_size:
        with open(path, newline="") as f:
            header = next(csv.reader(f), [])
    if header and not set(row) <= set(header):
        fields = header + [k for k in row if k not in header]
        old = read_csv(path)

        def rewrite(tmp: str) -> None:
            with open(tmp, "w", newline="") as out:
                w = csv.DictWriter(out, fieldnames=fields, restval="")
                w.writeheader()
                w.writerows(old + [row])

        atomic_write(path, rewrite)
        return
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=header or list(row), restval="")
        if not header:
            writer.writeheader()
        writer.writerow(row)


def _header_is_sound(fields: list[str]) -> bool:
    return bool(fields) and fields[0] == EPOCH and all(f and f.isprintable() for f in fields)


def repair_csv(path: str | Path, last_epoch: int, columns: list[str]) -> tuple[int, int, bool]:
    """Keep the rows of epochs 1..``last_epoch`` (atomically). Returns (rows past it dropped, damaged
    lines dropped, header rebuilt): a line of NUL bytes or a partial row, as a power cut can leave, is
    damaged; a damaged header is rebuilt as ``columns`` (the trainer's own), keeping the rows that fit."""
    path = Path(path)
    if not path.exists():
        return 0, 0, False
    lines = path.read_bytes().decode("utf-8", errors="replace").splitlines()
    if not lines:
        return 0, 0, False
    fields = next(csv.reader([lines[0]]), []) if "\0" not in lines[0] else []
    rebuilt = not _header_is_sound(fields)
    body = lines[1:]
    if rebuilt:
        fields = list(columns)
        body = lines  # the first line may be a row whose header line was lost
    keep, past, damaged = [], 0, 0
    for line in body:
        values = next(csv.reader([line]), []) if "\0" not in line else []
        if len(values) != len(fields) or not values[0].isdigit():
            damaged += bool(line.strip()) and not (rebuilt and line is lines[0])
            continue
        if int(values[0]) > last_epoch:
            past += 1
        else:
            keep.append(values)
    if (past, damaged, rebuilt) == (0, 0, False):
        return 0, 0, False

    def write(tmp: str) -> None:
        buf = io.StringIO()
        w = csv.writer(buf)
        w.writerow(fields)
        w.writerows(keep)
        Path(tmp).write_text(buf.getvalue())

    atomic_write(path, write)
    return past, damaged, rebuilt
