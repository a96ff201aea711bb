"""Small helpers: progress bar, seeding, device and environment report, atomic file writes."""

from __future__ import annotations

import os
import platform
import random
import tempfile
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from tqdm.auto import tqdm


def progress_bar(total: int, desc: str = "", leave: bool = True, unit: str = "it", **kwargs) -> tqdm:
    """A tqdm bar that renders as a widget in Jupyter and as text in a terminal or log."""
    return tqdm(total=total, desc=desc, leave=leave, unit=unit, dynamic_ncols=True, **kwargs)


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (CPU and every CUDA device)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def resolve_device(device: str = "auto") -> torch.device:
    """``"auto"`` -> CUDA if available, else Apple MPS, else CPU; anything else is passed through."""
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={device!r} but CUDA is not available here; use 'auto' or 'cpu'")
    return dev


def environment_report(device: torch.device) -> dict[str, str]:
    """What a result depends on: versions, the device and its memory, where we run."""
    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "device": str(device),
        "host": platform.node(),
        "notebook_service": notebook_service() or "none",
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info["gpu"] = props.name
        info["gpu_memory_gib"] = f"{props.total_memory / 2**30:.1f}"
        info["cuda"] = str(torch.version.cuda)
        info["bf16"] = str(torch.cuda.is_bf16_supported())
    else:
        info["cpu_threads"] = str(torch.get_num_threads())
    return info


def notebook_service() -> str | None:
    """``"colab"``, ``"kaggle"`` or ``None``: the managed services that disconnect and lose local files."""
    if "COLAB_RELEASE_TAG" in os.environ or "COLAB_GPU" in os.environ:
        return "colab"
    if "KAGGLE_KERNEL_RUN_TYPE" in os.environ or "KAGGLE_URL_BASE" in os.environ:
        return "kaggle"
    return None


def output_root(mount_drive: bool = True) -> Path:
    """Where checkpoints, logs and plots go by default: Google Drive on Colab (mounted here if
    ``mount_drive``), so a disconnect keeps them; /kaggle/working on Kaggle; else this folder."""
    service = notebook_service()
    if service == "colab":
        drive = Path("/content/drive")
        if mount_drive and not (drive / "MyDrive").is_dir():
            try:
                from google.colab import drive as colab_drive  # only exists on Colab

                colab_drive.mount(str(drive))
            except (ImportError, RuntimeError, ValueError) as e:
                print(f"Google Drive not mounted ({e}); outputs stay on the VM and vanish with it.")
        if (drive / "MyDrive").is_dir():
            return drive / "MyDrive" / "dyt_cifar10"
    if service == "kaggle":
        return Path("/kaggle/working")
    return Path(".")


def show(path: str | Path) -> None:
    """Show an image file inline in Jupyter; elsewhere say where it is."""
    try:
        from IPython import get_ipython
        from IPython.display import Image, display
    except ImportError:
        get_ipython = None
    if get_ipython is not None and get_ipython() is not None:
        display(Image(filename=str(path)))
    else:
        print(f"[figure] {path}")


def atomic_write(path: str | Path, write: Callable[[str], None]) -> None:
    """Call ``write(tmp_path)``, then move the temp file over ``path`` in one ``os.replace``.

    A crash or an exception during ``write`` leaves the previous ``path`` intact (the temp file is
    removed on error)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
