"""A run's per-epoch numbers as TensorBoard scalars too (``tensorboard=True``): the same values as the
CSV row, in ``<log_dir>/tb/<run>``, grouped as TensorBoard shows them (loss/, accuracy/, alpha/<layer>,
gain/<layer>, seconds/). TensorBoard is optional: the package is needed only when this is on."""

from __future__ import annotations

from pathlib import Path

from runs import history as h

TAGS = {
    h.TRAIN_LOSS: "loss/train",
    h.TEST_LOSS: "loss/test",
    h.EMA_TEST_LOSS: "loss/test_ema",
    h.TRAIN_ACC: "accuracy/train",
    h.TRAIN_CLEAN_ACC: "accuracy/train_clean",
    h.TEST_ACC: "accuracy/test",
    h.EMA_TEST_ACC: "accuracy/test_ema",
    h.LR: "lr",
}


def tag(column: str) -> str:
    """Where a CSV column shows in TensorBoard."""
    for prefix, group in ((h.ALPHA, "alpha/"), (h.GAIN, "gain/")):
        if column.startswith(prefix):
            return group + column[len(prefix) :]
    return TAGS.get(column, f"seconds/{column}" if column.endswith("_seconds") else column)


def require_tensorboard() -> None:
    """``RuntimeError`` saying what to install when the optional package is missing."""
    try:
        from torch.utils.tensorboard import SummaryWriter  # noqa: F401
    except ImportError as e:
        raise RuntimeError(
            f"tensorboard=True needs the tensorboard package, an optional extra ({type(e).__name__}: {e}): "
            f"pip install tensorboard, or set tensorboard=False (the CSV and plots have the same numbers)"
        ) from None


class TensorBoardLog:
    """Writes each recorded epoch's row. Opened at the first row of a session with ``purge_step`` at that
    epoch, so epochs written before a crash and trained again are not shown twice."""

    def __init__(self, folder: Path):
        require_tensorboard()
        self.folder = folder
        self.writer = None

    def write(self, row: dict) -> None:
        from torch.utils.tensorboard import SummaryWriter

        epoch = int(row[h.EPOCH])
        if self.writer is None:
            self.writer = SummaryWriter(str(self.folder), purge_step=epoch)
        for column, value in row.items():
            if column != h.EPOCH and value not in ("", None):
                self.writer.add_scalar(tag(column), float(value), epoch)
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
