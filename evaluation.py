"""Scoring a model: test loss and accuracy, accuracy on unaugmented training images, the confusion
matrix. Every forward pass has the same number of rows (the last batch is zero-padded), so a compiled
model sees one shape; all scores of one evaluation come back in one host sync."""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from data import CLASSES, CifarTensors, DeviceLoader
from runs import history

CPU_BATCH, GPU_BATCH = 250, 1000  # eval_batch_size=0; on a 2-core CPU 250 scored 1.46x faster than 1000


def rows_per_pass(asked: int, device: torch.device) -> int:
    """Rows per evaluation forward pass: ``asked`` (a config's ``eval_batch_size``), or by device when 0."""
    return asked or (CPU_BATCH if device.type == "cpu" else GPU_BATCH)


class Evaluator:
    """Scores models on ``data``'s test set and on its first ``clean_train_images`` training images.

    Args:
        data: CIFAR-10 on the device.
        batch_size: rows per forward pass (0: by device, ``rows_per_pass``).
        clean_train_images: training images scored without augmentation (0: none).
        amp_dtype: autocast dtype, or None for float32.
    """

    def __init__(self, data: CifarTensors, batch_size: int, clean_train_images: int, amp_dtype: Optional[torch.dtype]):
        self.device = data.x_test.device
        self.batch_size = batch_size = rows_per_pass(batch_size, self.device)
        self.amp_dtype = amp_dtype
        self.test_loader = DeviceLoader(data.x_test, data.y_test, batch_size, train=False)
        n_clean = min(clean_train_images, len(data.x_train))
        self.clean_train_loader = (
            DeviceLoader(data.x_train[:n_clean], data.y_train[:n_clean], batch_size, train=False) if n_clean else None
        )

    def batches(self, with_ema: bool) -> int:
        """Forward passes of one ``scores`` call."""
        clean = len(self.clean_train_loader) if self.clean_train_loader is not None else 0
        return len(self.test_loader) * (2 if with_ema else 1) + clean

    @torch.no_grad()
    def predict(
        self, model: nn.Module, loader: Optional[DeviceLoader] = None, on_batch: Optional[Callable[[], None]] = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Logits (float32) and labels of ``loader`` (default: the test set) under ``model`` in eval mode,
        and the summed cross-entropy; ``on_batch`` is called after each forward pass."""
        model.eval()
        outs, labels = [], []
        loader = loader or self.test_loader
        bs = min(self.batch_size, len(loader.x))  # one shape per loader, never padded past its images
        for x, y in loader:
            n = len(x)
            if n < bs:
                x = torch.cat([x, x.new_zeros((bs - n,) + x.shape[1:])])
            with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
                outs.append(model(x)[:n].float().clone())  # a CUDA graph's output is overwritten by its next replay
            labels.append(y)
            if on_batch is not None:
                on_batch()
        logits, labels = torch.cat(outs), torch.cat(labels)
        return logits, labels, F.cross_entropy(logits, labels, reduction="sum")

    def scores(
        self, model: nn.Module, ema: Optional[nn.Module] = None, on_batch: Optional[Callable[[], None]] = None
    ) -> dict[str, float]:
        """``test_loss``, ``test_acc`` (and ``ema_``-prefixed for ``ema``), and ``train_clean_acc`` of
        ``model`` when clean training images are scored; ``on_batch`` after each forward pass."""
        scored = {}
        for prefix, net in (("", model), (history.EMA, ema)):
            if net is not None:
                logits, labels, loss_sum = self.predict(net, on_batch=on_batch)
                scored[prefix + history.TEST_LOSS] = loss_sum / len(labels)
                scored[prefix + history.TEST_ACC] = (logits.argmax(-1) == labels).float().mean()
        if self.clean_train_loader is not None:
            logits, labels, _ = self.predict(model, self.clean_train_loader, on_batch)
            scored[history.TRAIN_CLEAN_ACC] = (logits.argmax(-1) == labels).float().mean()
        values = torch.stack(list(scored.values())).tolist()  # one host sync
        return dict(zip(scored, values))

    def confusion_matrix(self, model: nn.Module) -> torch.Tensor:
        """(10, 10) counts of ``model`` on the test set, true class per row."""
        logits, labels, _ = self.predict(model)
        k = len(CLASSES)
        return torch.bincount(labels * k + logits.argmax(-1), minlength=k * k).reshape(k, k).cpu()
