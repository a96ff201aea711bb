"""Files replaced in one step: a crash mid-write leaves the previous file whole, never half of each."""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable


def temp_files(path: str | Path) -> list[Path]:
    """The temp files ``atomic_write`` leaves beside ``path`` when its process is killed mid-write."""
    path = Path(path)
    return sorted(path.parent.glob(f".{path.name}.*.tmp")) if path.parent.is_dir() else []


def atomic_write(path: str | Path, write: Callable[[str], None], size_hint: int = 0) -> None:
    """Call ``write(tmp_path)``, then move the temp file over ``path`` in one ``os.replace``.

    A crash or an exception during ``write`` leaves the previous ``path`` intact (the temp file is
    removed on error). A full disk raises ``OSError(ENOSPC)`` saying how much space the save needs
    (``size_hint`` bytes for the new file, written beside the old one before it is replaced)."""
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
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        free = shutil.disk_usage(path.parent).free
        if isinstance(e, (OSError, RuntimeError)) and (
            getattr(e, "errno", None) == errno.ENOSPC or (size_hint and free < size_hint)
        ):
            raise OSError(
                errno.ENOSPC,
                f"the disk holding {path.parent} is full ({free / 2**20:,.0f} MiB free) while saving {path.name}: "
                f"an atomic save needs about {size_hint / 2**20:,.0f} MiB free there (the new file is written "
                f"beside the old one, then replaces it). The files already there are intact. Free some space, "
                f"or point this folder's setting at another disk, then run again ({type(e).__name__}: {e})",
            ) from e
        raise


def atomic_copy(source: str | Path, path: str | Path) -> None:
    """Copy ``source`` to ``path`` atomically (a reader sees the old file or the whole new one)."""
    atomic_write(path, lambda tmp: shutil.copyfile(source, tmp), size_hint=Path(source).stat().st_size)
