"""A sweep's runs in a storage that every node of a cluster reaches (``--storage``): a local or NFS folder,
or an object store (``s3://bucket/prefix``, ``gs://bucket/prefix``) through pyarrow's filesystems, as Ray
itself does. Node-local folders are only scratch: a trial pulls its run's files from the storage before it
trains and pushes them after every epoch, so the run resumes on whichever node Ray places it.

Under the storage's prefix, with the names of runs/files.py:

    checkpoint/<run>_latest.pth   checkpoint/<run>_best.pth   checkpoint/<run>.lease (sweeps/lease.py)
    log/<run>.csv   log/<run>.log   log/<run>_config.json   log/<run>_result.json   log/<run>_nodes.json
    tmp/<file>.<id>.tmp           uploads under way (a killed upload's leftovers are removed by the run's next trial)
    <sweep>_runs.csv, <sweep>_groups.csv, <sweep>_paired.csv: the table, from the command that built it

Every file appears whole or not at all: it is uploaded under ``tmp/`` and then moved to its name (a rename
in a folder; a server-side copy on an object store, which publishes an object only once it is complete).
An epoch is pushed in the order a resume needs (CSV, log, config, latest, then best), so at whatever instant
a node is lost, the stored files are a state the resume code already repairs: a CSV row past the latest
checkpoint is dropped, a best copy cut off is made again from the latest.

Each call to the storage is retried for ``retry_seconds`` (backing off to 5 s between tries), then fails
with ``StorageError`` naming what it was doing. Credentials never pass through here: each node's pyarrow
reads them from its own environment (``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``, an instance profile,
``GOOGLE_APPLICATION_CREDENTIALS``, ...), and a URI that carries any is refused.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional
from urllib.parse import parse_qs, urlsplit

from runs.atomic import atomic_write
from runs.files import RunPaths
from utils import first_line

ENDPOINT_VARIABLES = ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")  # the AWS tools' own names for an endpoint
SECRET_QUERY = ("access_key", "secret_key", "session_token", "key", "secret", "token")
START_SECONDS = 10.0  # how long the storage may take to answer the first look, before anything trains
CHUNK = 8 * 2**20


class StorageError(RuntimeError):
    """The storage did not answer (or refused) for the retry bound; the files already there are intact."""


@dataclass(frozen=True)
class StorageSpec:
    """How a trial reaches the storage: travels in the trial's config, so it never holds a credential.

    ``uri``: an absolute folder or ``s3://``/``gs://`` URI. ``endpoint``: an S3-compatible server that is not
    AWS (MinIO, Ceph, a test server), e.g. ``http://10.0.0.5:9000``; None reads ``AWS_ENDPOINT_URL_S3`` or
    ``AWS_ENDPOINT_URL`` on each node. ``heartbeat_seconds``: how often a trial renews its run's lease.
    ``scratch``: the node-local folder for the runs' working files (None: the system's temp folder)."""

    uri: str
    endpoint: Optional[str] = None
    retry_seconds: float = 120.0
    heartbeat_seconds: float = 30.0
    scratch: Optional[str] = None

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> StorageSpec:
        return cls(**values)


def check_uri(uri: str) -> str:
    """``uri`` as every node reads it: a folder made absolute, or an object-store URI without credentials.
    ``ValueError`` for anything else."""
    if not isinstance(uri, str) or not uri.strip():
        raise ValueError(f"--storage must be a folder or an s3:// or gs:// URI, got {uri!r}")
    if "://" not in uri:
        return str(Path(uri).expanduser().resolve())
    parts = urlsplit(uri)
    if parts.scheme not in ("s3", "gs", "gcs", "file"):
        raise ValueError(f"--storage supports folders, file://, s3:// and gs:// URIs, got {parts.scheme}://")
    secrets = sorted(set(parse_qs(parts.query)) & set(SECRET_QUERY))
    if "@" in parts.netloc or secrets:
        where = ", ".join(secrets) or "in its address"
        raise ValueError(
            f"--storage {parts.scheme}://{parts.hostname or ''}/... carries credentials ({where}), which would be "
            f"written into the sweep's files; remove them and set them in each node's environment instead "
            f"(AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or the cloud's own login)"
        )
    if parts.scheme != "file" and not parts.netloc:
        raise ValueError(f"--storage {uri!r} names no bucket: give {parts.scheme}://BUCKET/PREFIX")
    return uri.rstrip("/")


def check_endpoint(endpoint: Optional[str]) -> Optional[str]:
    """``endpoint`` if it is an http(s)://HOST[:PORT] address (``ValueError`` if not)."""
    if endpoint is None:
        return None
    parts = urlsplit(endpoint) if isinstance(endpoint, str) else None
    if parts is None or parts.scheme not in ("http", "https") or not parts.hostname or "@" in parts.netloc:
        raise ValueError(f"--storage-endpoint must be http(s)://HOST[:PORT] with no credentials, got {endpoint!r}")
    return endpoint.rstrip("/")


def _filesystem(spec: StorageSpec):
    """pyarrow's filesystem for ``spec`` and the path of its prefix in it."""
    import pyarrow.fs as pafs

    parts = urlsplit(spec.uri)
    if parts.scheme == "s3":
        endpoint = spec.endpoint or next((os.environ[v] for v in ENDPOINT_VARIABLES if os.environ.get(v)), None)
        options = dict(connect_timeout=5, request_timeout=30, retry_strategy=pafs.AwsStandardS3RetryStrategy(2))
        region = os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION")
        if endpoint:
            where = urlsplit(endpoint)
            options.update(endpoint_override=where.netloc, scheme=where.scheme, region=region or "us-east-1")
        elif region:
            options["region"] = region
        else:  # AWS: the bucket's own region, as pyarrow's from_uri finds it (the first call then fails if unreachable)
            try:
                options["region"] = pafs.resolve_s3_region(parts.netloc)
            except OSError:
                pass
        return pafs.S3FileSystem(**options), f"{parts.netloc}{parts.path}".rstrip("/")
    if "://" in spec.uri:
        fs, path = pafs.FileSystem.from_uri(spec.uri)
        return fs, path.rstrip("/")
    return pafs.LocalFileSystem(), spec.uri


class Storage:
    """The files of a sweep's runs in the storage ``spec`` names (module docstring): whole-file puts and
    gets, each retried for ``spec.retry_seconds``."""

    def __init__(self, spec: StorageSpec):
        self.spec = spec
        self.fs, self.root = _filesystem(spec)
        self.folders = self.fs.type_name == "local"
        self.token = uuid.uuid4().hex[:12]

    def __repr__(self) -> str:
        return f"Storage({self.spec.uri})"

    def key(self, *parts: str) -> str:
        return "/".join((self.root, *parts))

    def retry(self, what: str, call: Callable, seconds: Optional[float] = None):
        """``call()``, tried again on ``OSError`` (not on a missing file, which is an answer) for ``seconds``
        (default ``spec.retry_seconds``), then ``StorageError`` saying what it was doing."""
        seconds = self.spec.retry_seconds if seconds is None else seconds
        end, pause = time.monotonic() + seconds, 0.2
        while True:
            try:
                return call()
            except FileNotFoundError:
                raise
            except OSError as e:
                if time.monotonic() + pause > end:
                    raise StorageError(
                        f"the storage {self.spec.uri} kept failing for {seconds:.0f} s while {what} ({first_line(e)})"
                    ) from None
                time.sleep(pause)
                pause = min(5.0, 2 * pause)

    def check(self) -> None:
        """One look before anything trains: a small file written, read back and deleted within
        ``START_SECONDS``; ``StorageError`` in one line saying what to check."""
        key = self.key("tmp", f"check-{socket.gethostname()}-{self.token}")
        payload = b"dyt-cifar10 storage check\n"
        try:
            self.retry("writing a test file", lambda: self._put(lambda out: out.write(payload), key), START_SECONDS)
            back = self.retry("reading it back", lambda: self._read(key), START_SECONDS)
            self.retry("deleting it", lambda: self.fs.delete_file(key), START_SECONDS)
        except (StorageError, OSError) as e:  # a missing file right after writing it: not a usable storage
            where = f" (endpoint {self.spec.endpoint})" if self.spec.endpoint else ""
            raise StorageError(
                f"{e if isinstance(e, StorageError) else first_line(e)}{where}. Check the URI, that the bucket exists, "
                f"the endpoint and this machine's credentials (AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or the "
                f"cloud's login); nothing was trained"
            ) from None
        if back != payload:
            raise StorageError(
                f"the storage {self.spec.uri} gave back other bytes than were written; nothing was trained"
            )

    def _put(self, write: Callable, key: str) -> None:
        """Upload under ``tmp/`` with ``write(stream)``, then move to ``key``: visible whole or not at all."""
        tmp = self.key("tmp", f"{key.rsplit('/', 1)[-1]}.{self.token}.{uuid.uuid4().hex[:8]}.tmp")
        try:
            if self.folders:  # an object store has no folders to make
                self.fs.create_dir(tmp.rsplit("/", 1)[0], recursive=True)
                self.fs.create_dir(key.rsplit("/", 1)[0], recursive=True)
            with self.fs.open_output_stream(tmp) as out:
                write(out)
            self.fs.move(tmp, key)
        except BaseException:
            try:
                self.fs.delete_file(tmp)
            except OSError:
                pass  # unreachable now: a later trial's clean_up removes it
            raise

    def _read(self, key: str) -> bytes:
        with self.fs.open_input_stream(key) as f:
            return f.read()

    def put_file(self, path: Path, key: str, what: str) -> None:
        def write(out):
            with open(path, "rb") as f:
                shutil.copyfileobj(f, out, CHUNK)

        self.retry(what, lambda: self._put(write, key))

    def put_bytes(self, data: bytes, key: str, what: str) -> None:
        self.retry(what, lambda: self._put(lambda out: out.write(data), key))

    def read_bytes(self, key: str, what: str) -> Optional[bytes]:
        """The file's bytes, or None if it does not exist."""
        try:
            return self.retry(what, lambda: self._read(key))
        except FileNotFoundError:
            return None

    def read_json(self, key: str, what: str):
        data = self.read_bytes(key, what)
        try:
            return None if data is None else json.loads(data)
        except ValueError:
            return {}  # whole (every write is) but not this project's JSON: callers treat it as no record

    def get_file(self, key: str, path: Path, what: str) -> bool:
        """Download ``key`` over ``path`` atomically; False (and ``path`` removed) if it does not exist."""

        def fetch():
            with self.fs.open_input_stream(key) as f:
                atomic_write(path, lambda tmp: _copy_to(f, tmp))

        try:
            self.retry(what, fetch)
            return True
        except FileNotFoundError:
            Path(path).unlink(missing_ok=True)
            return False

    def delete(self, key: str, what: str) -> None:
        def gone():
            try:
                self.fs.delete_file(key)
            except FileNotFoundError:
                pass

        self.retry(what, gone)

    def clean_up(self, names: list[str]) -> int:
        """Remove the leftovers of killed uploads of the files ``names``; returns how many."""
        import pyarrow.fs as pafs

        def leftovers():
            found = self.fs.get_file_info(pafs.FileSelector(self.key("tmp"), allow_not_found=True))
            return [i.path for i in found if i.base_name.endswith(".tmp") and i.base_name.rsplit(".", 3)[0] in names]

        stale = self.retry("listing unfinished uploads", leftovers)
        for key in stale:
            self.delete(key, f"removing {key}")
        return len(stale)


def _copy_to(stream, tmp: str) -> None:
    with open(tmp, "wb") as out:
        shutil.copyfileobj(stream, out, CHUNK)


class RunMirror:
    """One run's files in the storage, for the trial that holds its lease: ``pull`` before training (the
    storage is the truth: a scratch file it lacks is removed), ``push`` after each epoch (only what changed,
    in the order a resume needs), ``push_result`` at the end."""

    def __init__(self, storage: Storage, paths: RunPaths):
        self.storage, self.paths = storage, paths
        self.stored_epoch: Optional[int] = None  # the epoch of the latest checkpoint in the storage (None: not known)
        self.error: Optional[StorageError] = None  # the push that failed, if any
        self._sent: dict[Path, tuple] = {}  # file -> its (inode, size, mtime) when pushed or pulled

    def key(self, path: Path) -> str:
        folder = "checkpoint" if path.parent == self.paths.checkpoint_dir else "log"
        return self.storage.key(folder, path.name)

    @property
    def epoch_files(self) -> list[Path]:
        """What an epoch changes, in the order they are pushed."""
        p = self.paths
        return [p.csv, p.log, p.config, p.latest, p.best]

    def pull(self, files: Optional[list[Path]] = None) -> None:
        """Fetch ``files`` (default: the epoch's files and the result) from the storage into scratch."""
        for path in files or [*self.epoch_files, self.paths.result]:
            if self.storage.get_file(self.key(path), path, f"fetching {path.name}"):
                self._sent[path] = _signature(path)

    def push(self, epoch: int) -> None:
        """Push what epoch ``epoch`` changed (latest before best); on failure ``StorageError`` naming the
        run and the last epoch the storage holds (``stopped``)."""
        if self.stored_epoch is None:  # the first push of this trial: it resumed from the epoch before
            self.stored_epoch = epoch - 1
        try:
            for path in self.epoch_files:
                now = _signature(path)
                if now is None or self._sent.get(path) == now:
                    continue
                self.storage.put_file(path, self.key(path), f"storing {path.name} (epoch {epoch})")
                self._sent[path] = now
                if path == self.paths.latest:
                    self.stored_epoch = epoch
        except StorageError as e:
            raise self.stopped(e) from None

    def stopped(self, error: StorageError) -> StorageError:
        """``error`` as the run's stop: which run, the last epoch the storage holds, and how to go on
        (kept in ``error`` for the trial to raise)."""
        if self.error is None:
            if self.stored_epoch is None:
                held = "This trial stored nothing; what the storage held of it before is kept"
            elif self.stored_epoch:
                held = f"The storage holds it up to epoch {self.stored_epoch}: nothing there is lost"
            else:
                held = "No epoch of it was stored yet"
            self.error = StorageError(
                f"run {self.paths.name} stopped: {error}. {held}. Run the same sweep again once the storage "
                f"answers; it continues from there."
            )
        return self.error

    def push_result(self) -> None:
        if self.paths.result.exists():
            try:
                self.storage.put_file(self.paths.result, self.key(self.paths.result), "storing the run's result")
            except StorageError as e:
                raise self.stopped(e) from None

    def remove_scratch(self) -> None:
        """Delete the run's checkpoints from scratch (the storage has them): a node's disk is not filled."""
        for path in (self.paths.latest, self.paths.best):
            path.unlink(missing_ok=True)


def _signature(path: Path) -> Optional[tuple]:
    try:
        s = path.stat()
    except FileNotFoundError:
        return None
    return s.st_ino, s.st_size, s.st_mtime_ns
