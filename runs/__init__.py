"""A run's plumbing: what a training run writes, how it keeps one writer, and what it shows.

- ``files.py``: where a run's files are (``RunPaths``) and how they change each epoch (``RunFiles``),
  the best checkpoint's record included
- ``checkpoints.py``: what a checkpoint holds; written in the background, read back checked
- ``history.py``: the per-epoch CSV (its column names are defined there) appended and repaired
- ``lock.py``: one writer per run, a lock file kept fresh by a timer
- ``atomic.py``: files replaced in one step (a crash leaves the old file whole)
- ``console.py``: what a run shows: lines, progress bars, time estimates, live curves
"""
