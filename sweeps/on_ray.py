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

import socket
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
CONNECT_SECONDS = 10  # how long --address HOST:PORT may take to answer
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


def check_address(address: Optional[str]) -> None:
    """For ``HOST:PORT``, that something answers there within ``CONNECT_SECONDS`` (Ray itself would
    retry for minutes); ``RuntimeError`` in one line if not."""
    if address in (None, "auto") or address.startswith("ray://"):
        return
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"--address must be auto or HOST:PORT, got {address!r}")
    try:
        socket.create_connection((host, int(port)), timeout=CONNECT_SECONDS).close()
    except OSError as e:
        raise RuntimeError(
            f"no Ray cluster answers at {address} ({type(e).__name__}: {e}). Start one there (`ray start --head "
            f"--port {port}` on that machine), or leave out --address to start Ray on this machine."
        ) from None


def start_ray(address: Optional[str] = None, **kwargs) -> None:
    """Connect to the cluster at ``address`` (None: start Ray on this machine), shipping this project's
    code to its workers (``kwargs`` go to ``ray.init``, e.g. ``num_cpus``). ``RuntimeError`` in one
    line when no cluster is found there."""
    ray, _ = import_ray()
    check_address(address)
    try:
        ray.init(address=address, runtime_env={"working_dir": str(ROOT), "excludes": EXCLUDES}, **kwargs)
    except ConnectionError as e:
        raise RuntimeError(
            f"no running Ray cluster found for --address {address} ({str(e).splitlines()[0]}). Start one with "
            f"`ray start --head` (and `ray start --address HEAD:6379` on the other nodes), or leave out --address "
            f"to start Ray on this machine."
        ) from None


def check_arguments(max_epochs, grace_epochs, max_failures: int, max_concurrent: int, scheduler) -> None:
    """The Ray options' values, before anything starts (``ValueError`` naming the option)."""
    options = [("--max-epochs", max_epochs, 1), ("--grace-epochs", grace_epochs, 1)]
    options += [("--max-failures", max_failures, 0), ("--max-concurrent", max_concurrent, 0)]
    for option, value, low in options:
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < low):
            raise ValueError(f"{option} must be an integer >= {low}, got {value!r}")
    if scheduler not in (None, "asha"):
        raise ValueError(f"scheduler must be 'asha' or None, got {scheduler!r}")
    if grace_epochs is not None and max_epochs is not None and grace_epochs > max_epochs:
        raise ValueError(f"--grace-epochs ({grace_epochs}) must not exceed --max-epochs ({max_epochs})")


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


def recording_asha(max_t: int, grace_period: int):
    """Ray Tune's ASHA on the runs' test accuracy per epoch, remembering the names of the runs it stopped
    before their last epoch (``.stopped``): only those are "stopped early", never a run that an interrupt
    or a lost cluster ended."""
    from ray.tune.schedulers import ASHAScheduler

    class RecordingASHA(ASHAScheduler):
        def __init__(self):
            super().__init__(time_attr=history.EPOCH, metric=history.TEST_ACC, mode="max", max_t=max_t,
                             grace_period=grace_period, reduction_factor=2)  # fmt: skip
            self.stopped: set[str] = set()

        def on_trial_result(self, tune_controller, trial, result):
            decision = super().on_trial_result(tune_controller, trial, result)
            if decision == self.STOP and result.get(history.EPOCH, max_t) < max_t:
                self.stopped.add(trial.config["run"]["run_name"] or Config.from_dict(trial.config["run"]).name)
            return decision

    return RecordingASHA()


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
    sweep_runs.check_sweep_name(name)
    check_arguments(max_epochs, grace_epochs, max_failures, max_concurrent, scheduler)
    check_address(address)
    clashes = sweep_runs.trained_with_another_config(runs)
    if clashes:
        raise ValueError(sweep_runs.clash_message(clashes))
    runs = [(with_absolute_folders(c), o) for c, o in runs]
    sweep_runs.check_folders(runs)  # a read-only folder named in one line, before Ray starts
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
            max_t = max_epochs or longest
            asha = recording_asha(max_t, grace_epochs or max(1, max_t // 4))
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
        tuner.fit()
        for cfg in pending:  # only what the scheduler stopped: an interrupted sweep's runs stay unfinished
            done = sweep_runs.run_result(cfg)
            if asha is not None and cfg.name in asha.stopped and done["status"] == "unfinished":
                sweep_runs.write_result(cfg, {**done, "status": STOPPED})
    return sweep_runs.write_results(runs, name)
