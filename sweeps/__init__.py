"""Sweeps: several runs of one recipe side by side (a grid of overrides, a list of them, or both), each
run with its own files, so each resumes on its own and a sweep run again trains only what is unfinished.

    runs.py      a sweep's runs whatever trains them: names, one run trained, where each stands, the table
    local.py     the local backend: child processes, ``per_gpu`` at a time on every GPU (or on the CPU)
    on_ray.py    the same runs as Ray Tune trials on a cluster, with ASHA (optional: requirements-cluster.txt)
    __main__.py  the command line: ``python -m sweeps --grid ... --runs ...``

The notebook and Python callers use the names below: ``sweeps.compare_norms(cfg, seeds)``,
``sweeps.run_sweep(runs)``, ``sweeps.show(table)``.
"""

from sweeps.local import run_sweep
from sweeps.runs import compare_norms, expand, grid, run_result, show, train_run, write_results

__all__ = ["compare_norms", "expand", "grid", "run_result", "run_sweep", "show", "train_run", "write_results"]
