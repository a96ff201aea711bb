"""A sweep's runs in a storage (sweeps/storage.py, sweeps/lease.py), without Ray: a folder and a local S3
server (moto). Whole-file writes, the lease between trials, a run continued on another node from the
storage bit for bit, and the storage away for a while (waited for) or for good (a stop that loses nothing)."""

import json
import socket
import threading

import pytest
import torch

pytest.importorskip("pyarrow.fs", reason="the storage needs pyarrow (installed with Ray: requirements-cluster.txt)")

from conftest import S3Server, rows, tiny, without_time, write_fake_cifar10  # noqa: E402
from runs.lock import RunLockedError  # noqa: E402
from sweeps import on_ray, storage  # noqa: E402
from sweeps.__main__ import main  # noqa: E402
from sweeps.lease import StorageLease  # noqa: E402
from sweeps.storage import RunMirror, Storage, StorageError, StorageSpec, check_endpoint, check_uri  # noqa: E402


@pytest.fixture(params=["folder", "s3"])
def spec(request, tmp_path):
    """A storage of each kind, empty, with short heartbeats (the lease tests watch 2.5 of them)."""
    if request.param == "folder":
        return StorageSpec(str(tmp_path / "storage"), heartbeat_seconds=0.2, scratch=str(tmp_path / "scratch"))
    server = request.getfixturevalue("s3_server")
    return StorageSpec(f"s3://{S3Server.BUCKET}/{tmp_path.name}", endpoint=server.endpoint, heartbeat_seconds=0.2,
                       scratch=str(tmp_path / "scratch"))  # fmt: skip


def _names(store: Storage, folder: str) -> list[str]:
    import pyarrow.fs as pafs

    found = store.fs.get_file_info(pafs.FileSelector(store.key(folder), allow_not_found=True))
    return sorted(i.base_name for i in found)


def test_a_uri_or_endpoint_that_carries_credentials_or_cannot_work_is_refused(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert check_uri("runs") == str(tmp_path / "runs") and check_uri("s3://b/p/") == "s3://b/p"
    for uri, says in [("s3://AKIA:hunter2@b/p", "in its address"), ("s3://b/p?secret_key=hunter2", "secret_key"),
                      ("ftp://b/p", "ftp://"), ("s3:///p", "names no bucket"), ("", "must be a folder")]:  # fmt: skip
        with pytest.raises(ValueError, match=says) as e:
            check_uri(uri)
        assert "hunter2" not in str(e.value)
    assert check_endpoint("http://10.0.0.5:9000/") == "http://10.0.0.5:9000"
    for endpoint in ("10.0.0.5:9000", "ftp://h", "http://user:pw@h:9000"):
        with pytest.raises(ValueError, match="--storage-endpoint must be"):
            check_endpoint(endpoint)
    for argv, says in [(["--storage", "s3://b/p"], "only mean something with --backend ray"),
                       (["--backend", "ray", "--storage-endpoint", "http://h:1"], "give --storage too")]:  # fmt: skip
        with pytest.raises(SystemExit):
            main(["--grid", '{"seed": [0]}', *argv])
        assert says in capsys.readouterr().err


def test_every_file_appears_whole_and_a_killed_upload_leaves_nothing_visible(spec):
    store = Storage(spec)
    store.check()
    key = store.key("log", "a_config.json")
    store.put_bytes(b"old", key, "writing")

    def cut_off(out):
        out.write(b"half of the new")
        raise ConnectionResetError("the node went away mid-upload")

    with pytest.raises(ConnectionResetError):
        store._put(cut_off, key)
    assert store.read_bytes(key, "reading") == b"old" and _names(store, "tmp") == []
    for name in ("a_config.json.x1.y1.tmp", "a.b_config.json.x2.y2.tmp"):  # killed uploads of runs a and a.b
        store.put_bytes(b"partial", store.key("tmp", name), "writing")
    assert store.clean_up(["a.csv", "a_config.json"]) == 1 and _names(store, "tmp") == ["a.b_config.json.x2.y2.tmp"]
    assert store.read_bytes(store.key("log", "missing.csv"), "reading") is None


def test_a_lease_that_beats_is_never_taken_and_a_silent_one_is_taken_over(spec):
    store = Storage(spec)
    first = StorageLease(store, "run", "node-a")
    assert first.acquire() == ""
    with pytest.raises(RunLockedError, match="being trained on node node-a"):
        StorageLease(store, "run", "node-b").acquire()  # watched 2.5 heartbeats: it beat meanwhile
    first._stop.set()  # node a is lost: its heartbeat stops, its lease stays
    first._thread.join()
    second = StorageLease(store, "run", "node-b")
    assert "took over the lease of node node-a" in second.acquire()
    with pytest.raises(RunLockedError, match="taken over by node node-b"):
        first.check()  # node a comes back: it writes nothing more
    first.release()
    assert json.loads(store.read_bytes(second.key, "reading"))["node"] == "node-b"  # not deleted by node a
    second.release()
    assert store.read_bytes(second.key, "reading") is None


def _reference(reference_runs):
    trainer = reference_runs.get("default")
    ema = trainer.ema.module.state_dict() if trainer.ema is not None else {}
    return trainer.model.state_dict(), ema, without_time(rows(trainer.paths.csv))


def _assert_stored_equals_reference(store: Storage, cfg, reference_runs, tmp_path) -> None:
    model, ema, csv = _reference(reference_runs)
    got = tmp_path / "stored_latest.pth"
    got.write_bytes(store.read_bytes(store.key("checkpoint", f"{cfg.name}_latest.pth"), "reading"))
    state = torch.load(got, weights_only=True)
    assert state["model"].keys() == model.keys() and all(torch.equal(state["model"][k], model[k]) for k in model)
    assert state["ema"].keys() == ema.keys() and all(torch.equal(state["ema"][k], ema[k]) for k in ema)
    stored_csv = tmp_path / "stored.csv"
    stored_csv.write_bytes(store.read_bytes(store.key("log", f"{cfg.name}.csv"), "reading"))
    assert without_time(rows(stored_csv)) == csv  # every epoch once, the same numbers


def _run(tmp_path):
    return tiny(tmp_path / "driver", data_dir=str(write_fake_cifar10(tmp_path / "data")), download=False)


def test_a_run_stopped_on_one_node_continues_on_another_from_the_storage(spec, tmp_path, reference_runs):
    cfg = _run(tmp_path)

    def node_lost_after_epoch_2(row):
        if int(row["epoch"]) == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        on_ray.train_stored_run(cfg.to_dict(), spec, "node-a", on_epoch=node_lost_after_epoch_2)
    result = on_ray.train_stored_run(cfg.to_dict(), spec, "node-b")
    assert result["status"] == "finished" and result["epochs"] == 3
    store = Storage(spec)
    _assert_stored_equals_reference(store, cfg, reference_runs, tmp_path)
    assert not list((tmp_path / "scratch" / "node-b" / "checkpoint").glob("*.pth"))  # scratch emptied at the end
    table = on_ray.stored_table([(cfg, {})], "stored", spec)  # what --table-only shows, from the storage
    assert list(table["status"]) == ["finished"] and list(table["nodes"]) == ["node-a, node-b"]
    assert store.read_bytes(store.key("stored_runs.csv"), "reading").startswith(b"seed,run_name,status")


def _after_epoch_1_is_stored(store, cfg, then):
    def hook(row):
        if int(row["epoch"]) == 1:
            for _ in range(6000):  # a bound on polls: epoch 1's push (the best copy comes last) is done
                if store.read_bytes(store.key("checkpoint", f"{cfg.name}_best.pth"), "polling") is not None:
                    break
                threading.Event().wait(0.02)
            then()

    return hook


def test_a_storage_away_for_a_while_is_waited_for(s3_server, tmp_path, reference_runs):
    cfg = _run(tmp_path)
    spec = StorageSpec(f"s3://{S3Server.BUCKET}/{tmp_path.name}", endpoint=s3_server.endpoint, retry_seconds=60,
                       heartbeat_seconds=0.2, scratch=str(tmp_path / "scratch"))  # fmt: skip
    store = Storage(spec)
    back = threading.Timer(2.0, s3_server.start)

    def away():
        s3_server.stop()
        back.start()

    try:
        result = on_ray.train_stored_run(
            cfg.to_dict(), spec, "node-a", on_epoch=_after_epoch_1_is_stored(store, cfg, away)
        )
    finally:
        back.join()
    assert result["status"] == "finished"
    _assert_stored_equals_reference(store, cfg, reference_runs, tmp_path)


def test_a_storage_away_past_the_bound_stops_the_run_naming_its_last_stored_epoch(s3_server, tmp_path, reference_runs):
    cfg = _run(tmp_path)
    spec = StorageSpec(f"s3://{S3Server.BUCKET}/{tmp_path.name}", endpoint=s3_server.endpoint, retry_seconds=1,
                       heartbeat_seconds=0.2, scratch=str(tmp_path / "scratch"))  # fmt: skip
    store = Storage(spec)
    try:
        with pytest.raises(StorageError) as stop:
            on_ray.train_stored_run(
                cfg.to_dict(), spec, "node-a", on_epoch=_after_epoch_1_is_stored(store, cfg, s3_server.stop)
            )
    finally:
        s3_server.start()
    said = str(stop.value)
    assert f"run {cfg.name} stopped" in said and "kept failing for 1 s" in said
    assert "holds it up to epoch 1: nothing there is lost" in said and "\n" not in said
    result = on_ray.train_stored_run(cfg.to_dict(), spec, "node-b")  # the lease of node a, silent, is taken over
    assert result["status"] == "finished"
    _assert_stored_equals_reference(store, cfg, reference_runs, tmp_path)
    placed = json.loads(store.read_bytes(store.key("log", f"{cfg.name}_nodes.json"), "reading"))
    assert [p["node"] for p in placed] == ["node-a", "node-b"] and "took over the lease" in placed[1]["note"]


def test_a_storage_unreachable_at_start_is_one_line_and_nothing_trains(tmp_path, monkeypatch, capsys):
    ray = pytest.importorskip("ray", reason="the Ray backend is an optional extra")
    monkeypatch.setattr(storage, "START_SECONDS", 1.0)
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    started = ray.is_initialized()
    folders = {k: str(tmp_path / k) for k in ("checkpoint_dir", "log_dir", "plot_dir", "data_dir")}
    overrides = json.dumps({**folders, "download": False})
    with pytest.raises(SystemExit) as code:
        main(["--backend", "ray", "--storage", "s3://dyt-runs/x", "--storage-endpoint", f"http://127.0.0.1:{port}",
              "--grid", '{"seed": [0]}', "--overrides", overrides])  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert code.value.code == 2 and len(err.splitlines()) == 1
    assert "kept failing for 1 s while writing a test file" in err and "nothing was trained" in err
    assert ray.is_initialized() == started and not any(tmp_path.iterdir())  # no folder made, nothing written


def test_a_mirror_pushes_only_what_changed_in_the_order_a_resume_needs(spec, tmp_path):
    from runs.files import RunPaths

    paths = RunPaths("r", tmp_path / "ck", tmp_path / "log", tmp_path / "plots")
    for p in (paths.csv, paths.log, paths.config, paths.latest, paths.best):
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(p.name)
    mirror, order = RunMirror(Storage(spec), paths), []
    real = mirror.storage.put_file
    mirror.storage.put_file = lambda path, key, what: (order.append(path.name), real(path, key, what))
    mirror.push(1)
    assert order == ["r.csv", "r.log", "r_config.json", "r_latest.pth", "r_best.pth"] and mirror.stored_epoch == 1
    order.clear()
    paths.csv.write_text("r.csv, 2 rows")
    paths.latest.write_text("epoch 2")
    mirror.push(2)
    assert order == ["r.csv", "r_latest.pth"] and mirror.stored_epoch == 2


def test_the_trials_of_one_node_fetch_the_data_one_at_a_time(tmp_path, monkeypatch):
    inside, overlaps, calls = [], [], []

    def fetch(root, download):
        overlaps.append(len(inside))
        inside.append(root)
        threading.Event().wait(0.2)  # a download under way
        calls.append((root, download))
        inside.pop()

    monkeypatch.setattr(on_ray, "ensure_cifar10", fetch)
    cfg = tiny(tmp_path, data_dir=str(tmp_path / "data"))
    trials = [threading.Thread(target=on_ray.data_once_per_node, args=(cfg, tmp_path / "node" / "data.lock"))
              for _ in range(3)]  # fmt: skip
    for t in trials:
        t.start()
    for t in trials:
        t.join()
    assert overlaps == [0, 0, 0] and calls == [(str(tmp_path / "data"), True)] * 3


def test_a_failed_trial_is_reported_by_the_last_line_of_its_error():
    line = "sweeps.storage.StorageError: run a stopped: the storage s3://b/p did not answer"

    class Results:
        errors = [RuntimeError(f"Failure # 1\nTraceback (most recent call last):\n  File ...\n{line}\n\n")]

    assert on_ray.trial_errors(Results()) == [line]


def test_the_checkpoint_checks_hold_on_files_from_the_storage(s3_server, tmp_path):
    ray = pytest.importorskip("ray", reason="the Ray backend is an optional extra")
    cfg = _run(tmp_path)
    spec = StorageSpec(f"s3://{S3Server.BUCKET}/{tmp_path.name}", endpoint=s3_server.endpoint, heartbeat_seconds=0.2,
                       scratch=str(tmp_path / "scratch"))  # fmt: skip
    store = Storage(spec)
    assert on_ray.train_stored_run({**cfg.to_dict(), "epochs": 1}, spec, "node-a")["status"] == "finished"
    started = ray.is_initialized()
    other = tiny(tmp_path / "driver", data_dir=cfg.data_dir, download=False, lr=1e-4)  # same name, other config
    with pytest.raises(ValueError, match=r"already have files from another config.*lr"):
        on_ray.run_ray_sweep([(other, {})], "clash", progress="off", storage=spec)
    assert ray.is_initialized() == started  # refused before Ray started
    key = store.key("checkpoint", f"{cfg.name}_latest.pth")
    damaged = bytearray(store.read_bytes(key, "reading"))
    damaged[len(damaged) // 2] ^= 0xFF
    store.put_bytes(bytes(damaged), key, "damaging")
    result = on_ray.train_stored_run(cfg.to_dict(), spec, "node-b")  # 3 epochs now: a resume of the damaged file
    assert result["status"] == "failed" and "CheckpointError" in result["error"]
    assert store.read_bytes(key, "reading") == bytes(damaged)  # left as it was, for the user to look at


def test_a_trial_waits_for_a_holder_that_finishes_within_its_wait(spec):
    store = Storage(spec)
    first = StorageLease(store, "run", "node-a")
    first.acquire()
    finishing = threading.Timer(1.0, first.release)  # still beating for 1 s, then released
    finishing.start()
    second = StorageLease(store, "run", "node-b")
    assert second.acquire(wait=30) == ""  # waited, then took the released lease: nothing taken over
    finishing.join()
    assert json.loads(store.read_bytes(second.key, "reading"))["node"] == "node-b"
    second.release()


def test_an_endpoint_from_the_environment_reaches_the_server(s3_server, tmp_path, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", s3_server.endpoint)  # what each node's own environment may say
    store = Storage(StorageSpec(f"s3://{S3Server.BUCKET}/{tmp_path.name}"))
    store.check()
    store.put_bytes(b"x", store.key("log", "r.csv"), "writing")
    assert s3_server.filesystem().open_input_stream(f"{S3Server.BUCKET}/{tmp_path.name}/log/r.csv").read() == b"x"
