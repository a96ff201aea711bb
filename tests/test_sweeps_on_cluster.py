"""A Ray sweep on a simulated cluster whose nodes share no disk: a head and two worker nodes on this machine
(``ray.cluster_utils.Cluster``), each trial working in a scratch folder of its own node, the runs' files in
a local S3 server (moto). A worker node is removed while it trains a run: the run is retried on the other
node from the storage and ends bit for bit where an uninterrupted run ends."""

import json
import threading
import time

import pytest

ray = pytest.importorskip("ray", reason="Ray is an optional extra: pip install -r requirements-cluster.txt")
pytest.importorskip("moto.server", reason="the storage tests need moto: pip install -r requirements-dev.txt")
pytestmark = pytest.mark.slow  # starts a 3-node Ray

import torch  # noqa: E402
from pyarrow.fs import FileSelector  # noqa: E402

import sweeps  # noqa: E402
from config import Config  # noqa: E402
from conftest import S3Server, rows, without_time, write_fake_cifar10  # noqa: E402
from runs.files import RunPaths  # noqa: E402
from sweeps import on_ray  # noqa: E402
from sweeps.storage import StorageSpec  # noqa: E402

FAST_FAILURE_DETECTION = {"health_check_initial_delay_ms": 0, "health_check_period_ms": 1000,
                          "health_check_timeout_ms": 1000, "health_check_failure_threshold": 5}  # fmt: skip


@pytest.fixture(scope="module")
def cluster(s3_server):
    """A head (no CPUs: it trains nothing) and two worker nodes of one CPU each, joined by this process.
    Tried twice; skipped, saying why, only when Ray cannot start on this machine."""
    from ray.cluster_utils import Cluster

    ray.shutdown()  # another module's local Ray
    for attempt in (1, 2):
        nodes = None
        try:
            head = dict(num_cpus=0, include_dashboard=False, _system_config=FAST_FAILURE_DETECTION)
            nodes = Cluster(initialize_head=True, head_node_args=head)
            workers = [nodes.add_node(num_cpus=1) for _ in range(2)]
            nodes.wait_for_nodes()
            on_ray.start_ray(nodes.address, log_to_driver=False)
            break
        except Exception as e:  # Ray's own start-up error on a machine too busy to start it in time
            ray.shutdown()
            if nodes is not None:
                nodes.shutdown()
            if attempt == 2:
                pytest.skip(f"a 3-node Ray could not start on this machine, twice: {type(e).__name__}: {e}")
            time.sleep(5)
    nodes.workers = workers
    yield nodes
    ray.shutdown()
    nodes.shutdown()


def _base(root, data, **kw):
    return sweeps.grid(
        on_ray.with_absolute_folders(
            Config(
                epochs=8, dim=16, depth=1, heads=2, batch_size=10, eval_batch_size=50, device="cpu", data_dir=str(data),
                download=False, checkpoint_dir=str(root / "ck"), log_dir=str(root / "log"),
                plot_dir=str(root / "plots"), clean_train_images=50, verify_data=False, compile_cache=False, **kw,
            )
        ),
        {"seed": [0, 1]},
    )  # fmt: skip


def _stored_rows(fs, key):
    try:
        with fs.open_input_stream(key) as f:
            return f.read().decode().strip().splitlines()[1:]
    except FileNotFoundError:
        return []


def test_a_node_lost_mid_run_is_retried_on_another_node_from_the_storage(tmp_path, cluster, s3_server):
    data = write_fake_cifar10(tmp_path / "data", per_batch=120, test=50)
    runs = _base(tmp_path / "driver", data)
    spec = StorageSpec(f"s3://{S3Server.BUCKET}/{tmp_path.name}", endpoint=s3_server.endpoint,
                       heartbeat_seconds=0.5, scratch=str(tmp_path / "scratch"))  # fmt: skip
    fs, root = s3_server.filesystem(), f"{S3Server.BUCKET}/{tmp_path.name}"
    lost = runs[0][0].name
    removed = []

    def remove_the_node_that_trains_the_first_run():
        for _ in range(6000):  # a bound on polls, not a timing
            trained = _stored_rows(fs, f"{root}/log/{lost}.csv")
            try:
                with fs.open_input_stream(f"{root}/checkpoint/{lost}.lease") as f:
                    node = json.loads(f.read())["node"]
            except (FileNotFoundError, ValueError, KeyError):
                node = None
            if trained and node:
                worker = next(w for w in cluster.workers if w.node_id == node)
                cluster.remove_node(worker, allow_graceful=False)  # the machine is gone, mid-epoch
                removed.append((node, len(_stored_rows(fs, f"{root}/log/{lost}.csv"))))
                return
            time.sleep(0.05)

    watcher = threading.Thread(target=remove_the_node_that_trains_the_first_run)
    watcher.start()
    table = on_ray.run_ray_sweep(runs, "lost", max_failures=3, progress="off", storage=spec)
    watcher.join()
    assert removed and 1 <= removed[0][1] < 8, removed  # removed part-way, with epochs stored
    status = dict(zip(table["run_name"], zip(table["status"], table["epochs"], table["nodes"])))
    assert status[lost][:2] == ("finished", 8) and len(status[lost][2].split(", ")) == 2  # retried elsewhere
    assert status[runs[1][0].name][:2] == ("finished", 8) and "," not in status[runs[1][0].name][2]
    assert removed[0][0].startswith(status[lost][2].split(", ")[0])
    with fs.open_input_stream(f"{root}/log/{lost}_nodes.json") as f:
        placed = json.loads(f.read())
    assert [p["node"] for p in placed][0] == removed[0][0] and f"lease of node {removed[0][0][:12]}" in placed[1][
        "note"
    ]

    reference = _base(tmp_path / "alone", data)
    sweeps.run_sweep(reference, per_gpu=2, name="alone", progress="off")  # uninterrupted, 1 thread each
    for (cfg, _), (ref, _) in zip(runs, reference):
        stored = _stored_rows(fs, f"{root}/log/{cfg.name}.csv")
        assert [line.split(",")[0] for line in stored] == [str(e) for e in range(1, 9)]  # every epoch once
        copy = rows(RunPaths.of(cfg).log_dir / "stored" / f"{cfg.name}.csv")  # the table's copy of it
        assert without_time(copy) == without_time(rows(RunPaths.of(ref).csv))
        local = tmp_path / f"{cfg.name}_latest.pth"
        fs_copy = fs.open_input_stream(f"{root}/checkpoint/{cfg.name}_latest.pth").read()
        local.write_bytes(fs_copy)
        got, want = (torch.load(p, weights_only=True) for p in (local, RunPaths.of(ref).latest))
        for part in ("model", "ema"):
            assert got[part].keys() == want[part].keys()
            assert all(torch.equal(got[part][k], want[part][k]) for k in want[part]), part
    scratch = {p.name for p in (tmp_path / "scratch").iterdir()}
    assert len(scratch) == 2 and removed[0][0][:12] in scratch  # each node its own scratch folder
    assert fs.get_file_info(f"{root}/lost_runs.csv").size > 0  # the table is in the storage too
    written = [p for p in tmp_path.rglob("*") if p.is_file() and p.suffix in (".json", ".log", ".csv", ".txt")]
    stored = [i.path for i in fs.get_file_info(FileSelector(root, recursive=True)) if i.is_file]
    texts = [p.read_bytes() for p in written] + [fs.open_input_stream(k).read() for k in stored]
    assert not any(S3Server.SECRET_KEY.encode() in t or S3Server.ACCESS_KEY.encode() in t for t in texts)
