"""Small helpers: progress bar, durations, device and environment report, where outputs go, showing figures."""

from __future__ import annotations

import ast
import os
import platform
import sys
from pathlib import Path

import torch
from tqdm.auto import tqdm


def progress_bar(total: int, desc: str = "", leave: bool = True, unit: str = "it", **kwargs) -> tqdm:
    """A tqdm bar that renders as a widget in Jupyter and as text in a terminal or log."""
    return tqdm(total=total, desc=desc, leave=leave, unit=unit, dynamic_ncols=True, **kwargs)


def duration(seconds: float) -> str:
    """``3725`` -> ``"1h 02m"``, ``185`` -> ``"3m 05s"``, ``7.2`` -> ``"7s"``."""
    seconds = max(0, round(seconds))
    if seconds >= 3600:
        return f"{seconds // 3600}h {seconds % 3600 // 60:02d}m"
    if seconds >= 60:
        return f"{seconds // 60}m {seconds % 60:02d}s"
    return f"{seconds}s"


def plural(n: int, word: str) -> str:
    """``plural(1, "epoch")`` -> ``"1 epoch"``, ``plural(3, "epoch")`` -> ``"3 epochs"``."""
    return f"{n} {word}" + ("" if n == 1 else "s")


HEADLESS_RUNNERS = ("papermill", "nbconvert", "nbclient")  # programs that run a notebook's kernel without a person


def headless_kernel() -> bool:
    """Whether this Jupyter kernel was started by a program that runs notebooks unattended
    (papermill, ``jupyter nbconvert --execute``), read from its parent's command line where the
    system shows it (Linux); elsewhere False."""
    parent = os.environ.get("JPY_PARENT_PID") or str(os.getppid())
    try:
        command = Path(f"/proc/{parent}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return False
    return any(name in command for name in HEADLESS_RUNNERS)


def live_jupyter() -> bool:
    """A Jupyter kernel with a person watching: widgets and figures that update in place render."""
    try:
        from IPython import get_ipython

        shell = get_ipython()
    except ImportError:
        shell = None
    return shell is not None and type(shell).__name__ == "ZMQInteractiveShell" and not headless_kernel()


def progress_renders() -> bool:
    """Whether progress bars show up: a terminal, or a Jupyter kernel someone watches (widgets). Not a
    pipe, a log file or papermill, where they only clutter the output (``resolve_progress`` then
    chooses one line per epoch)."""
    return live_jupyter() or sys.stdout.isatty()


def resolve_progress(progress: str) -> str:
    """The notebook's ``progress`` parameter as a Trainer's mode: ``"auto"`` is ``"bars"`` where they
    render (a Jupyter kernel, a terminal), else ``"lines"`` (papermill, a log file)."""
    modes = ("auto", "bars", "lines", "off")
    if progress not in modes:
        raise ValueError(f"progress must be one of {modes}, got {progress!r}")
    if progress != "auto":
        return progress
    return "bars" if progress_renders() else "lines"


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


def prepare_output_root(mount_google_drive: bool = True) -> Path:
    """Where checkpoints, logs and plots go by default, mounting Google Drive on Colab when
    ``mount_google_drive`` (a disconnect then keeps them); /kaggle/working on Kaggle; else this folder."""
    service = notebook_service()
    if service == "colab":
        drive = Path("/content/drive")
        if mount_google_drive and not (drive / "MyDrive").is_dir():
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


def first_line(error: BaseException) -> str:
    """``Type: first line of the message`` (the type alone when the message is empty), printable."""
    lines = [line for line in str(error).splitlines() if line.strip()]
    if not lines:
        return f"{type(error).__name__} (no message; the log above it may say more)"
    text = lines[0].encode("utf-8", "backslashreplace").decode("utf-8")  # bytes of a damaged file, printable
    return f"{type(error).__name__}: {text[:300]}"


def ipython():
    """The running IPython shell (a notebook kernel), or None in plain Python."""
    try:
        return get_ipython()  # noqa: F821 (IPython's builtin)
    except NameError:
        return None


PAPERMILL_PATHS = {"PAPERMILL_INPUT_PATH", "PAPERMILL_OUTPUT_PATH"}  # papermill --inject-paths: its own names


def assigned_names(source: str) -> set[str]:
    """The names a cell's top-level statements assign (plainly or with a type annotation)."""
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return set()
    names = set()
    for node in tree.body:
        targets = (
            node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(node, ast.AnnAssign) else []
        )
        names.update(t.id for t in targets if isinstance(t, ast.Name))
    return names


def injected_parameters(parameters_cell: set[str]) -> set[str]:
    """The names papermill injected into this kernel: its "# Parameters" cell, which it puts right after the
    notebook's parameters cell (the last entry of IPython's input history that assigns every name of
    ``parameters_cell``), less papermill's own path names (``--inject-paths``). A cell of the user's that
    starts with "# Parameters" elsewhere is not it. Empty outside IPython or without injected parameters."""
    shell = ipython()
    history = list(shell.user_ns.get("In", [])) if shell is not None else []
    for i in range(len(history) - 2, -1, -1):
        if not history[i].lstrip().startswith("# Parameters") and set(parameters_cell) <= assigned_names(history[i]):
            following = history[i + 1]
            return (
                assigned_names(following) - PAPERMILL_PATHS if following.lstrip().startswith("# Parameters") else set()
            )
    return set()
