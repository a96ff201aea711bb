"""Sweeps on a Ray cluster: the runs of ``python -m sweeps`` as Ray Tune trials, one GPU each (or one CPU on a
CPU-only cluster), with early stopping by ASHA. Ray is an optional extra (``requirements-cluster.txt``);
nothing else in the project imports it.

Each trial calls ``sweeps.runs.train_run`` on its config, so the project's own files stay the truth: every
run writes its checkpoint, CSV and log where its config says (a shared filesystem on a cluster). A trial
that Ray retries after a lost node resumes from its last epoch; a sweep run again after the cluster
restarts trains only the unfinished runs. Each epoch's test accuracy is reported to Tune, so a scheduler
can stop weak runs; such a run is marked ``stopped early`` in the table.

    python -m sweeps --backend ray --grid '{"norm": ["dyt", "ln"], "seed": [0, 1, 2]}' --name norms
    python -m sweeps --backend ray --address auto --runs '[{}, {"lr": 2e-5}]' --scheduler asha --max-epochs 200
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Optional

from config import Config
from data import ensure_cifar10
from runs import history
from sweeps import runs as sweep_runs

ROOT = Path(__file__).resolve().parent.parent  # the project, shipped to the workers
REQUIREMENTS = "requirements-cluster.txt"
STOPPED = "stopped early"
# Not shipped to the cluster's workers with the code: environments, data, outputs, caches.
EXCLUDES = [".venv/", ".git/", "data/", "checkpoint/", "log/", "plots/", ".cifar/", "*.pth", "__pycache__/"]
METRICS = (history.TEST_ACC, history.TEST_LOSS, history.TRAIN_LOSS, history.EMA_TEST_ACC)


def import_ray():
    """Ray and Ray Tune, or a ``RuntimeError`` that says how to install them."""
    try:
        import ray
        from ray import tune
    except ImportError as e:
        raise RuntimeError(
            f"--backend ray needs Ray, an optional extra of this project: pip install -r {REQUIREMENTS} "
            f"({type(e).__name__}: {e}). The local backend (the default) needs nothing more."
        ) from None
    return ray, tune


def start_ray(address: Optional[str] = None, **kwargs) -> None:
    """Connect to the cluster at ``address`` (None: start Ray on this machine), shipping this project's
    code to its workers (``kwargs`` go to ``ray.init``, e.g. ``num_cpus``)."""
    ray, _ = import_ray()
    ray.init(address=address, runtime_env={"working_dir": str(ROOT), "excludes": EXCLUDES}, **kwargs)


def with_absolute_folders(cfg: Config) -> Config:
    """``cfg`` with its data and output folders made absolute: a Ray worker runs in a folder of its own."""
    folders = {k: str(Path(getattr(cfg, k)).expanduser().resolve()) for k in sweep_runs.FOLDER_FIELDS}
    return replace(cfg, **folders)


def trial(config: dict) -> None:
    """One Ray Tune trial: train the run to completion, reporting each epoch's scores."""
    from ray import tune

    def report(row: dict) -> None:
        tune.report({history.EPOCH: row[history.EPOCH], **{k: row[k] for k in METRICS if k in row}})

    sweep_runs.train_run(config["run"], on_epoch=report)


def run_ray_sweep(
    runs: list[tuple[Config, dict]],
    name: str = "sweep",
    address: Optional[str] = None,
    scheduler: Optional[str] = None,
    max_epochs: Optional[int] = None,
    grace_epochs: Optional[int] = None,
    max_failures: int = 2,
    max_concurrent: int = 0,
    progress: str = "lines",
):
    """Train ``runs`` (``sweeps.expand``) as Ray Tune trials and return the same table as ``sweeps.run_sweep``.

    Args:
        address: a running cluster (``"auto"``, ``"HOST:PORT"``); None starts Ray on this machine.
        scheduler: ``"asha"`` stops runs whose test accuracy trails at ``grace_epochs``, twice that, ...
        max_epochs: ASHA's last rung (default: the longest run's epochs).
        grace_epochs: epochs every run trains before ASHA may stop it (default: a quarter of max_epochs).
        max_failures: times a trial is retried after its worker or node died.
        max_concurrent: trials at once (0: as many as the cluster's resources allow).
    """
    ray, tune = import_ray()
    clashes = sweep_runs.trained_with_another_config(runs)
    if clashes:
        raise ValueError(sweep_runs.clash_message(clashes))
    runs = [(with_absolute_folders(c), o) for c, o in runs]
    pending = [c for c, _ in runs if sweep_runs.run_result(c)["status"] not in sweep_runs.DONE]
    say = print if progress != "off" else (lambda *_: None)
    say(f"{name}: {len(runs)} runs, {len(runs) - len(pending)} done already, {len(pending)} to train on Ray")
    if pending:
        for data_dir, download in {(c.data_dir, c.download) for c in pending}:
            ensure_cifar10(data_dir, download)  # downloaded once, not by every trial
        if not ray.is_initialized():
            start_ray(address, log_to_driver=progress != "off")
        resources = {"cpu": 1, "gpu": 1} if ray.cluster_resources().get("GPU", 0) >= 1 else {"cpu": 1}
        longest = max(c.epochs for c in pending)
        asha = None
        if scheduler == "asha":
            from ray.tune.schedulers import ASHAScheduler

            max_t = max_epochs or longest
            asha = ASHAScheduler(
                time_attr=history.EPOCH,
                metric=history.TEST_ACC,
                mode="max",
                max_t=max_t,
                grace_period=grace_epochs or max(1, max_t // 4),
                reduction_factor=2,
            )
        elif scheduler is not None:
            raise ValueError(f"scheduler must be 'asha' or None, got {scheduler!r}")
        tuner = tune.Tuner(
            tune.with_resources(trial, resources),
            param_space={"run": tune.grid_search([c.to_dict() for c in pending])},
            tune_config=tune.TuneConfig(scheduler=asha, max_concurrent_trials=max_concurrent or None),
            run_config=tune.RunConfig(
                name=name,
                storage_path=str(Path(pending[0].log_dir) / "ray"),
                failure_config=tune.FailureConfig(max_failures=max_failures),
                verbose=1 if progress != "off" else 0,
            ),
        )
        grid = tuner.fit()
        for result in grid:
            cfg = Config.from_dict(result.config["run"])
            done = sweep_runs.run_result(cfg)
            if result.error is None and done["status"] == "unfinished":  # the scheduler ended it
                sweep_runs.write_result(cfg, {**done, "status": STOPPED})
    return sweep_runs.write_results(runs, name)
