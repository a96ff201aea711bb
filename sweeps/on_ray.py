"""Sweeps on a Ray cluster: the runs of ``python -m sweeps`` as Ray Tune trials, one GPU each (or one CPU on a
CPU-only cluster), with early stopping by ASHA. Ray is an optional extra (``requirements-cluster.txt``);
nothing else in the project imports it.

Each trial calls ``sweeps.runs.train_run`` on its config, so the project's own files stay the truth: every
run writes its checkpoint, CSV and log where its config says (one machine, or a filesystem all nodes share).
With ``--storage`` (nodes that share no disk) a trial trains in its node's scratch folder from and to the
storage instead (``train_stored_run``; sweeps/storage.py, sweeps/lease.py), and the table is built from
the storage. A trial that Ray retries after a lost node resumes from its last epoch; a sweep run again
after the cluster restarts trains only the unfinished runs. Each epoch's test accuracy is reported to Tune,
so a scheduler can stop weak runs; such a run is marked ``stopped early`` in the table.

    python -m sweeps --backend ray --grid '{"norm": ["dyt", "ln"], "seed": [0, 1, 2]}' --name norms
    python -m sweeps --backend ray --address auto --runs '[{}, {"lr": 2e-5}]' --scheduler asha --max-epochs 200
    python -m sweeps --backend ray --address auto --storage s3://my-bucket/norms --grid '{"seed": [0, 1, 2]}'
"""

from __future__ import annotations

import json
import socket
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Optional

from config import OUTPUT_FOLDERS, Config
from data import ensure_cifar10
from runs import history
from runs.files import RunPaths
from runs.lock import RunLockedError
from sweeps import runs as sweep_runs
from sweeps.lease import StorageLease
from sweeps.storage import RunMirror, Storage, StorageError, StorageSpec, check_endpoint, check_uri

ROOT = Path(__file__).resolve().parent.parent  # the project, shipped to the workers
REQUIREMENTS = "requirements-cluster.txt"
STOPPED = "stopped early"
# Not shipped to the cluster's workers with the code: environments, data, outputs, caches.
EXCLUDES = [".venv/", ".git/", "data/", "checkpoint/", "log/", "plots/", ".cifar/", "*.pth", "__pycache__/"]
CONNECT_SECONDS = 10  # how long --address HOST:PORT may take to answer
SCRATCH = "dyt_cifar10_scratch"  # a node's working folder for the runs of a sweep with a storage, in its temp folder
STORED = "stored"  # <log_dir>/stored/: this machine's copies of the runs' CSVs, logs and results, from the storage
NODES = "_nodes.json"  # log/<run>_nodes.json in the storage: each node the run was placed on, in order
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


def storage_spec(uri: Optional[str], endpoint: Optional[str] = None) -> Optional[StorageSpec]:
    """``--storage`` and ``--storage-endpoint`` as the trials read them (None without a storage);
    ``ValueError`` for a URI or endpoint that cannot be used or carries credentials."""
    if uri is None:
        return None
    return StorageSpec(check_uri(uri), check_endpoint(endpoint))


def with_absolute_folders(cfg: Config) -> Config:
    """``cfg`` with its data and output folders made absolute: a Ray worker runs in a folder of its own."""
    folders = {k: str(Path(getattr(cfg, k)).expanduser().resolve()) for k in sweep_runs.FOLDER_FIELDS}
    return replace(cfg, **folders)


def trial(config: dict) -> None:
    """One Ray Tune trial: train the run to completion, reporting each epoch's scores; with a storage,
    in this node's scratch folder, from and to the storage."""
    import ray
    from ray import tune

    def report(row: dict) -> None:
        tune.report({history.EPOCH: row[history.EPOCH], **{k: row[k] for k in METRICS if k in row}})

    if config.get("storage"):
        spec = StorageSpec.from_dict(config["storage"])
        train_stored_run(config["run"], spec, ray.get_runtime_context().get_node_id(), on_epoch=report)
    else:
        sweep_runs.train_run(config["run"], on_epoch=report)


def in_scratch(cfg: Config, spec: StorageSpec, node: str) -> Config:
    """``cfg`` with its output folders in node ``node``'s scratch folder (its data folder is the node's own)."""
    root = Path(spec.scratch or Path(tempfile.gettempdir()) / SCRATCH) / node[:12]
    return replace(cfg, **{k: str(root / v) for k, v in OUTPUT_FOLDERS.items()})


def train_stored_run(run: dict, spec: StorageSpec, node: str, on_epoch=None) -> dict:
    """Train run ``run`` (a config dict) on Ray node ``node`` from and to the storage: take its lease, pull
    its files into scratch, train with a push after every epoch, push the result, release the lease.
    ``StorageError`` (naming the run and the last epoch stored) when the storage stays unreachable, so Ray
    retries the trial; a live trainer elsewhere gives status ``running elsewhere``."""
    storage = Storage(spec)
    cfg = in_scratch(Config.from_dict(run), spec, node)
    mirror = RunMirror(storage, RunPaths.of(cfg))
    lease = StorageLease(storage, cfg.name, node)

    def push(epoch: int) -> None:  # in the checkpoint writer's thread; an error stops the run at its next epoch
        try:
            lease.check()
        except StorageError as e:
            raise mirror.stopped(e) from None
        mirror.push(epoch)

    try:
        try:
            note = lease.acquire(wait=spec.retry_seconds)  # a retried trial's old worker may still be ending
        except RunLockedError as e:
            return {"run_name": cfg.name, "status": sweep_runs.ELSEWHERE, "error": str(e)}
        storage.clean_up([p.name for p in (*mirror.epoch_files, mirror.paths.result)])
        record_placement(storage, cfg.name, node, note)
        mirror.pull()
        data_once_per_node(cfg, Path(cfg.checkpoint_dir).parent / "data.lock")
        result = sweep_runs.train_run(cfg, on_epoch=on_epoch, after_save=push)
        if mirror.error is not None:
            raise mirror.error
        if result["status"] != sweep_runs.ELSEWHERE:
            mirror.push_result()
            mirror.remove_scratch()
        return result
    except StorageError as e:
        raise mirror.stopped(e) from None
    finally:
        lease.release()


def record_placement(storage: Storage, run: str, node: str, note: str) -> None:
    """Add node ``node`` to ``log/<run>_nodes.json`` in the storage: where the run trained, in order."""
    key = storage.key("log", f"{run}{NODES}")
    placed = storage.read_json(key, "reading where the run trained") or []
    now = time.strftime("%Y-%m-%d %H:%M:%S")
    placed = [*placed, {"node": node, "host": socket.gethostname(), "since": now, **({"note": note} if note else {})}]
    storage.put_bytes(json.dumps(placed, indent=1).encode(), key, "recording where the run trains")


def data_once_per_node(cfg: Config, lock: Path) -> None:
    """CIFAR-10 in ``cfg.data_dir`` on this node (downloaded there if allowed and missing), one trial of
    the node at a time (``lock``: a file in the node's scratch folder), so two trials never download
    into one folder at once."""
    import fcntl

    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)  # released when the file closes, or when the process dies
        ensure_cifar10(cfg.data_dir, cfg.download)


def pull_tables(storage: Storage, runs: list[tuple[Config, dict]]) -> tuple[list[tuple[Config, dict]], dict]:
    """Copies of the runs' CSVs, logs, configs and results from the storage in ``<log_dir>/stored/`` on this
    machine, as configs whose folders are that copy (what the table reads), and each run's nodes."""
    copies, nodes = [], {}
    for cfg, overrides in runs:
        folder = Path(cfg.log_dir) / STORED
        copy = replace(cfg, log_dir=str(folder), checkpoint_dir=str(folder / "checkpoint"))
        paths = RunPaths.of(copy)
        RunMirror(storage, paths).pull([paths.csv, paths.log, paths.config, paths.result])
        placed = storage.read_json(storage.key("log", f"{cfg.name}{NODES}"), f"reading where {cfg.name} trained")
        ids = list(dict.fromkeys(str(p.get("node", "?"))[:8] for p in placed or [] if isinstance(p, dict)))
        nodes[cfg.name] = {"nodes": ", ".join(ids)}
        copies.append((copy, overrides))
    return copies, nodes


def stored_table(runs: list[tuple[Config, dict]], name: str, storage: StorageSpec):
    """The table of ``runs`` from the storage, training nothing (``--table-only``)."""
    store = Storage(storage)
    store.check()
    table_runs, nodes = pull_tables(store, [(with_absolute_folders(c), o) for c, o in runs])
    table = sweep_runs.write_results(table_runs, name, nodes)
    push_tables(store, Path(table_runs[0][0].log_dir), name)
    return table


def push_tables(storage: Storage, folder: Path, name: str) -> None:
    """The sweep's table files, beside the runs in the storage."""
    for what in ("runs", "groups", "paired"):
        path = folder / f"{name}_{what}.csv"
        if path.exists():
            storage.put_file(path, storage.key(path.name), f"storing {path.name}")


def trial_errors(results) -> list[str]:
    """The last line of each failed trial's error (Ray wraps it in its traceback)."""
    lines = []
    for error in results.errors:
        text = [line for line in str(error).splitlines() if line.strip()]
        lines.append(text[-1].strip() if text else type(error).__name__)
    return lines


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
    storage: Optional[StorageSpec] = None,
):
    """Train ``runs`` (``sweeps.expand``) as Ray Tune trials and return the same table as ``sweeps.run_sweep``.

    Args:
        address: a running cluster (``"auto"``, ``"HOST:PORT"``); None starts Ray on this machine.
        scheduler: ``"asha"`` stops runs whose test accuracy trails at ``grace_epochs``, twice that, ...
        max_epochs: ASHA's last rung (default: the longest run's epochs).
        grace_epochs: epochs every run trains before ASHA may stop it (default: a quarter of max_epochs).
        max_failures: times a trial is retried after its worker or node died (or the storage stayed away).
        max_concurrent: trials at once (0: as many as the cluster's resources allow).
        storage: where the runs' files live for nodes that share no disk (sweeps/storage.py). The runs are
            trained in each node's scratch folder; the table is built from copies in ``<log_dir>/stored/``
            and also put in the storage.
    """
    ray, tune = import_ray()
    sweep_runs.check_sweep_name(name)
    check_arguments(max_epochs, grace_epochs, max_failures, max_concurrent, scheduler)
    check_address(address)
    runs = [(with_absolute_folders(c), o) for c, o in runs]
    table_runs, store, nodes = runs, None, None
    if storage is not None:
        store = Storage(storage)
        store.check()  # unreachable: one line, before anything starts
        table_runs, nodes = pull_tables(store, runs)
    clashes = sweep_runs.trained_with_another_config(table_runs)
    if clashes:
        raise ValueError(sweep_runs.clash_message(clashes))
    sweep_runs.check_folders(table_runs)  # a read-only folder named in one line, before Ray starts
    pending = [
        (c, t) for (c, _), (t, _) in zip(runs, table_runs) if sweep_runs.run_result(t)["status"] not in sweep_runs.DONE
    ]
    say = print if progress != "off" else (lambda *_: None)
    where = f" (files in {storage.uri})" if storage else ""
    say(f"{name}: {len(runs)} runs, {len(runs) - len(pending)} done already, {len(pending)} to train on Ray{where}")
    errors = []
    if pending:
        if storage is None:  # one machine's disk: the data downloaded once, not by every trial
            for data_dir, download in {(c.data_dir, c.download) for c, _ in pending}:
                ensure_cifar10(data_dir, download)
        if not ray.is_initialized():
            start_ray(address, log_to_driver=progress != "off")
        resources = {"cpu": 1, "gpu": 1} if ray.cluster_resources().get("GPU", 0) >= 1 else {"cpu": 1}
        longest = max(c.epochs for c, _ in pending)
        asha = None
        if scheduler == "asha":
            max_t = max_epochs or longest
            asha = recording_asha(max_t, grace_epochs or max(1, max_t // 4))
        shared = {"storage": storage.to_dict()} if storage else {}
        tuner = tune.Tuner(
            tune.with_resources(trial, resources),
            param_space={"run": tune.grid_search([c.to_dict() for c, _ in pending]), **shared},
            tune_config=tune.TuneConfig(scheduler=asha, max_concurrent_trials=max_concurrent or None),
            run_config=tune.RunConfig(
                name=name,
                storage_path=store.key("ray") if store else str(Path(runs[0][0].log_dir) / "ray"),
                storage_filesystem=store.fs if store else None,  # Tune's own state beside the runs: Ray's advice
                failure_config=tune.FailureConfig(max_failures=max_failures),
                verbose=1 if progress != "off" else 0,
            ),
        )
        errors = trial_errors(tuner.fit())
        if store is not None:
            table_runs, nodes = pull_tables(store, runs)
        for cfg, copy in pending:
            done = sweep_runs.run_result(copy)  # only what the scheduler stopped: an interrupted run stays unfinished
            if asha is not None and cfg.name in asha.stopped and done["status"] == "unfinished":
                sweep_runs.write_result(copy, {**done, "status": STOPPED})
                if store is not None:
                    RunMirror(store, RunPaths.of(copy)).push_result()
    table = sweep_runs.write_results(table_runs, name, nodes)
    if store is not None:
        push_tables(store, Path(table_runs[0][0].log_dir), name)
    table.attrs["errors"] = errors
    return table
