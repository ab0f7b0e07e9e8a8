"""The artifact store: every file of a job (checkpoints, run files, its log, pictures, prediction data), written by
the workers and read by the API, through this one module.

Backed by fsspec. The default is a local folder, CAPE_ARTIFACTS_DIR (``make run`` needs nothing else);
``CAPE_ARTIFACTS_URL=s3://bucket/prefix`` puts the files in S3-compatible object storage (s3fs; endpoint and keys:
CAPE_S3_*), which workers on other machines and the API reach too. A job's files are named as in its run folder
(cape/run_files.py's layout) under ``<job id>/``; uploaded datasets under ``datasets/<digest>/`` and their
archives, until a worker imports them, under ``uploads/<dataset id>/`` (service/dataset_files.py).

A reader never sees half a file that matters: a put is atomic (S3: one object per PUT, a multipart upload appears
whole when it completes; local: a temporary file, then ``os.replace``), and a file opened for reading stays the
version that was opened (local: the open file; S3: every ranged read is conditional on the ETag first seen, s3fs's
If-Match, so a replaced object fails the read rather than mixing two versions).

The worker writes a job into a run folder on its own disk (``RunFolder``): with the local store that folder is the
store's own, nothing is copied; with a remote store it is a scratch folder under CAPE_WORK_DIR, filled from the store
when the worker claims the job and pushed to it at the points the worker chooses.

A remote store that cannot be reached for now (down, restarting, asking to slow down) raises ``StoreUnavailable``
from every method: the API answers 503, and a worker's run folder tries again for up to CAPE_STORE_RETRY_S
(service/retry.py) before the job fails with it.
"""

from __future__ import annotations

import errno
import functools
import os
import shutil
import threading
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import lru_cache
from pathlib import Path, PurePosixPath
from typing import BinaryIO, TypeVar

import fsspec

from cape.errors import CheckpointError
from cape.run_files import CHECKPOINT_FILES, EPOCHS, LOG, METRICS, PREDICTIONS_JSON, complete_epochs, epoch_folder
from service.retry import Unavailable, persist
from service.settings import get_settings

T = TypeVar("T")
# What the store's files are under: a job's id, or a folder of the store's own ("datasets/<digest>").
Key = uuid.UUID | str
LOG_CHUNK = 64 * 1024  # the most a log request returns at once
# Bytes per ranged GET when a remote object is read in a stream: few requests per checkpoint, bounded memory.
READ_BLOCK = 16 * 1024 * 1024


@dataclass(frozen=True)
class ObjectInfo:
    size: int
    etag: str  # quoted, as in HTTP; changes whenever the object is replaced
    modified_at: datetime


def _local_info(stat: os.stat_result) -> ObjectInfo:
    # The inode changes with every os.replace, so two versions written in the same clock tick differ too.
    return ObjectInfo(
        stat.st_size,
        f'"{stat.st_ino:x}-{stat.st_mtime_ns:x}-{stat.st_size:x}"',
        datetime.fromtimestamp(stat.st_mtime, UTC),
    )


def _remote_info(details: dict) -> ObjectInfo:
    return ObjectInfo(details["size"], details["ETag"], details["LastModified"].astimezone(UTC))


class StoreUnavailable(Unavailable):
    """The artifact store could not be reached (see _unreachable); the message names the store."""


def _unreachable(exc: BaseException) -> bool:
    """Whether a remote store's error means it cannot be reached for now, or asked to be asked again later, as
    opposed to a refusal (no such bucket, no permission) or a bug. What s3fs raises, found by stopping moto's server
    under it: botocore's EndpointConnectionError (refused), and beside it closed connections and timeouts; a 5xx
    answer or a SlowDown becomes an OSError (EBUSY, EREMOTEIO, or EIO caused by the ClientError)."""
    import aiohttp  # s3fs's own dependencies: only a remote store gets here, with them loaded already
    from botocore.exceptions import ClientError, HTTPClientError
    from botocore.exceptions import ConnectionError as BotoConnectionError

    if isinstance(
        exc,
        (BotoConnectionError, HTTPClientError, aiohttp.ClientConnectionError, aiohttp.ClientPayloadError, TimeoutError),
    ):
        return True
    if isinstance(exc, ConnectionError) or (isinstance(exc, OSError) and exc.errno in (errno.EBUSY, errno.EREMOTEIO)):
        return True
    cause = exc.__cause__
    return isinstance(cause, ClientError) and cause.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) >= 500


def _reaching(method):
    """A remote store's method whose failure to reach the store raises StoreUnavailable (the original error as its
    cause); any other error stays as it is."""

    @functools.wraps(method)
    def wrapper(self: ArtifactStore, *args, **kwargs):
        try:
            return method(self, *args, **kwargs)
        except Exception as exc:
            if self.local or not _unreachable(exc):
                raise
            raise StoreUnavailable(f"{self.where} unreachable: {type(exc).__name__}: {exc}") from exc

    return wrapper


class ArtifactStore:
    """Jobs' files at ``url`` (a local folder or an fsspec URL such as s3://bucket/prefix). Every method names a
    file by its job and its name in the run folder (``epochs/3/predictions.json``)."""

    def __init__(self, url: str, **storage_options):
        self.url = url
        self.fs, root = fsspec.core.url_to_fs(url, **storage_options)
        self.root = root.rstrip("/")
        protocols = self.fs.protocol if isinstance(self.fs.protocol, tuple) else (self.fs.protocol,)
        self.local = "file" in protocols
        endpoint = storage_options.get("client_kwargs", {}).get("endpoint_url")
        self.where = f"artifact store {url}" + (f" at {endpoint}" if endpoint else "")  # for errors: which store

    def patiently(self, doing: str, call: Callable[[], T], patience_s: float) -> T:
        """``call()`` (of this store's methods), tried again while the store cannot be reached, for up to
        ``patience_s`` seconds (service/retry.py); then StoreUnavailable saying what it was ``doing``. No patience:
        one try."""
        if patience_s <= 0:
            return call()
        return persist(
            call,
            transient=lambda exc: isinstance(exc, StoreUnavailable),
            patience_s=patience_s,
            setting="CAPE_STORE_RETRY_S",
            what=self.where,
            doing=doing,
            unavailable=StoreUnavailable,
        )

    def path(self, job_id: Key, name: str = "") -> str:
        return f"{self.root}/{job_id}/{name}" if name else f"{self.root}/{job_id}"

    @_reaching
    def remove(self, key: Key) -> None:
        """Every file under ``key``; nothing when there is none."""
        try:
            self.fs.rm(self.path(key), recursive=True)
        except FileNotFoundError:
            pass

    @_reaching
    def info(self, job_id: Key, name: str) -> ObjectInfo | None:
        """Size, ETag and time of the file now; None when there is none."""
        path = self.path(job_id, name)
        try:
            if self.local:
                return _local_info(os.stat(path))
            details = self.fs.info(path)
        except FileNotFoundError:
            return None
        return _remote_info(details) if details["type"] == "file" else None

    def exists(self, job_id: Key, name: str) -> bool:
        return self.info(job_id, name) is not None

    @_reaching
    def read_range(self, job_id: Key, name: str, offset: int, length: int) -> tuple[bytes, int]:
        """Up to ``length`` bytes from ``offset``, and the file's size when read (0 and nothing when there is no
        file)."""
        info = self.info(job_id, name)
        if info is None or offset >= info.size:
            return b"", info.size if info else 0
        end = min(info.size, offset + length)
        return self.fs.cat_file(self.path(job_id, name), start=offset, end=end), info.size

    @_reaching
    def read(self, job_id: Key, name: str) -> bytes | None:
        """The whole file (a picture, a JSON), or None when there is none."""
        try:
            return self.fs.cat_file(self.path(job_id, name))
        except FileNotFoundError:
            return None

    @_reaching
    def names(self, job_id: Key, under: str = "") -> list[str]:
        """The names of the job's files (only those under the sub-folder ``under``), sorted. A local folder's
        temporary files (a put or a checkpoint being written) are not files of the job yet."""
        base = self.path(job_id)
        found = self.fs.find(f"{base}/{under}" if under else base)
        names = (path[len(base) + 1 :] for path in found if path.startswith(base + "/"))
        return sorted(name for name in names if not name.endswith(".tmp"))

    @_reaching
    def open(self, job_id: Key, name: str) -> tuple[BinaryIO, ObjectInfo] | None:
        """The file opened for reading, with the info of the version opened (every read of the handle is of that
        version; see the module's note); None when there is none. The caller closes it."""
        path = self.path(job_id, name)
        try:
            if self.local:
                handle = open(path, "rb")  # noqa: SIM115 (the caller closes it: see the docstring)
                return handle, _local_info(os.fstat(handle.fileno()))
            handle = self.fs.open(path, "rb", block_size=READ_BLOCK)
        except FileNotFoundError:
            return None
        return handle, _remote_info(handle.details)

    @_reaching
    def put_file(self, local: Path, job_id: Key, name: str) -> None:
        """Store a local file under ``name``, atomically: a reader sees the old file or the new one, never part."""
        path = self.path(job_id, name)
        if not self.local:
            self.fs.put_file(str(local), path)
            return
        with open(local, "rb") as handle:
            _write_whole(handle, Path(path))

    @_reaching
    def get_file(self, job_id: Key, name: str, local: Path) -> ObjectInfo | None:
        """Copy one version of the file to ``local`` (written whole, then renamed into place); None when there is
        none."""
        opened = self.open(job_id, name)
        if opened is None:
            return None
        handle, info = opened
        with handle:
            _write_whole(handle, local)
        return info

    @_reaching
    def local_copy(self, job_id: Key, name: str, cache_dir: Path) -> tuple[Path, ObjectInfo] | None:
        """A file on this machine with the content of ``name`` (for torch.load), and the info of that version;
        None when there is none. The local store's own file; else a copy in ``cache_dir`` named by its ETag, so
        each version (a running job's new best) is fetched once, and the older copies of the name are removed."""
        if self.local:
            info = self.info(job_id, name)
            return (Path(self.path(job_id, name)), info) if info else None
        info = self.info(job_id, name)
        if info is None:
            return None
        folder = cache_dir / str(job_id)
        cached = folder / _versioned(name, info.etag)
        if cached.is_file():
            return cached, info
        opened = self.open(job_id, name)  # the version opened may be newer than the one asked about: named by it
        if opened is None:
            return None
        handle, info = opened
        cached = folder / _versioned(name, info.etag)
        with handle:
            _write_whole(handle, cached)
        for old in folder.glob(f"{name}@*"):
            if old != cached:
                old.unlink(missing_ok=True)  # another process of this machine may have removed it already
        return cached, info


def _write_whole(handle: BinaryIO, local: Path) -> None:
    """The handle's bytes into ``local``: written under a temporary name in its folder, then renamed into place
    (``os.replace`` is atomic), so that a reader of ``local`` never sees part of it."""
    local.parent.mkdir(parents=True, exist_ok=True)
    tmp = local.with_name(f"{local.name}.{uuid.uuid4().hex}.tmp")
    with open(tmp, "wb") as out:
        shutil.copyfileobj(handle, out, READ_BLOCK)
    os.replace(tmp, local)


def _versioned(name: str, etag: str) -> str:
    """``checkpoint_best.pt@<etag>``: the cached copy of one version."""
    return f"{name}@{etag.strip(chr(34)).replace('/', '_')}"


def epoch_file(epoch: int, name: str) -> str:
    """The name of an epoch's file (``epochs/3/predictions.png``), as cape/run_files.py lays it out."""
    return (epoch_folder(PurePosixPath(), epoch) / name).as_posix()


def picture_epochs(store: ArtifactStore, job_id: uuid.UUID) -> list[int]:
    """The epochs whose prediction pictures are complete (their JSON is written, and pushed, last), in order."""
    return complete_epochs(store.names(job_id, EPOCHS))


def read_log(store: ArtifactStore, job_id: uuid.UUID, offset: int, limit: int = LOG_CHUNK) -> tuple[bytes, int]:
    """Up to ``limit`` bytes of the job's log from ``offset``, ending at a line end when there is one (a line being
    written now is sent whole next time), and the log's size; empty when there is no log yet."""
    data, size = store.read_range(job_id, LOG, offset, limit)
    end = data.rfind(b"\n")
    return (data[: end + 1] if end >= 0 else (data if len(data) == limit else b"")), size


def get_store() -> ArtifactStore:
    """This process's store, from the settings."""
    s = get_settings()
    secret = s.s3_secret_access_key.get_secret_value() if s.s3_secret_access_key else None
    url = s.artifacts_url or str(s.artifacts_dir.resolve())
    return _store(url, s.s3_endpoint_url, s.s3_access_key_id, secret, s.s3_region, os.getpid())


@lru_cache(maxsize=4)
def _store(
    url: str, endpoint: str | None, key: str | None, secret: str | None, region: str | None, pid: int
) -> ArtifactStore:
    # Keyed by the process id as well: a forked pool process makes its own (an S3 client's connections and event
    # loop do not survive a fork).
    if not url.startswith(("s3://", "s3a://")):
        return ArtifactStore(url)
    client = {k: v for k, v in {"endpoint_url": endpoint, "region_name": region}.items() if v}
    return ArtifactStore(
        url,
        key=key,
        secret=secret,
        client_kwargs=client,
        # Files change while a job runs: every question goes to the server, never to a cached listing.
        use_listings_cache=False,
        skip_instance_cache=True,
    )


# --- the worker's side ---------------------------------------------------------------------------------------


def _push_rank(name: str) -> int:
    """Order of a push, so that the store is consistent at every moment: pictures before the predictions.json that
    marks them complete, an epoch's files before metrics.jsonl, metrics.jsonl before the checkpoints (resuming cuts
    metrics.jsonl back to the checkpoint's epoch, never forward), checkpoint_best before checkpoint_last."""
    if name == CHECKPOINT_FILES["last"]:
        return 4
    if name == CHECKPOINT_FILES["best"]:
        return 3
    if name == METRICS:
        return 2
    return 1 if name.endswith("/" + PREDICTIONS_JSON) else 0


def _signature(stat: os.stat_result) -> tuple[int, int, int]:
    return stat.st_ino, stat.st_mtime_ns, stat.st_size


class RunFolder:
    """A job's run folder on this worker: where the trainer writes its files, and how they reach the store.

    With the local store, the folder is the store's own (``mirrored`` False: nothing to fill or push). With a remote
    store, a scratch folder under ``work_dir``: ``fill`` makes it the job's files in the store (a job resumed on any
    machine continues from its checkpoint, metrics, pictures and log), ``push`` copies what changed since. Both wait
    out a store that cannot be reached for up to ``patience_s`` (CAPE_STORE_RETRY_S), then raise StoreUnavailable."""

    def __init__(self, store: ArtifactStore, job_id: uuid.UUID, work_dir: Path, patience_s: float = 0.0):
        self.store, self.job_id, self.patience_s = store, job_id, patience_s
        self.mirrored = not store.local
        self.path = work_dir.resolve() / str(job_id) if self.mirrored else Path(store.path(job_id))
        self._pushed: dict[str, tuple[int, int, int]] = {}  # name -> signature of the version in the store
        self._filled = False
        self._lock = threading.Lock()  # a thread pushes the log while the task pushes the rest

    def fill(self) -> None:
        """Make the folder hold exactly the job's files in the store (a copy left by an earlier attempt on this
        machine may be behind the store: another worker may have continued the job since)."""
        with self._lock:
            if self.mirrored:
                self.store.patiently(f"filling the run folder of job {self.job_id}", self._copy_store, self.patience_s)
            self.path.mkdir(parents=True, exist_ok=True)
            self._filled = True

    def _copy_store(self) -> None:
        # Whole, each try: a try cut short by the store leaves some files behind, which the next one starts over.
        if self.path.exists():
            shutil.rmtree(self.path)
        self._pushed.clear()
        for name in self.store.names(self.job_id):
            local = self.path / name
            if self.store.get_file(self.job_id, name, local) is not None:
                self._pushed[name] = _signature(local.stat())

    def push(self, names: Iterable[str] | None = None, patient: bool = True) -> list[str]:
        """Copy to the store the files changed since their last push (all, or only ``names``), in _push_rank's
        order; returns their names. Nothing before ``fill``: a folder not filled yet is not the job's. Not
        ``patient``: one try per file, for a caller that tries again later anyway, or has given up on the store."""
        if not self.mirrored:
            return []
        with self._lock:
            if not self._filled:
                return []
            candidates = (
                list(names)
                if names is not None
                else [p.relative_to(self.path).as_posix() for p in self.path.rglob("*") if p.is_file()]
            )
            changed = {}
            for name in candidates:
                if name.endswith(".tmp"):  # a file still being written (checkpoints.save): not a version yet
                    continue
                try:
                    signature = _signature((self.path / name).stat())
                except FileNotFoundError:
                    continue
                if self._pushed.get(name) != signature:
                    changed[name] = signature
            patience = self.patience_s if patient else 0.0
            for name in sorted(changed, key=_push_rank):
                # The signature was taken before the upload: a file that changes during it is pushed again next time.
                self.store.patiently(
                    f"pushing {name} of job {self.job_id}",
                    functools.partial(self.store.put_file, self.path / name, self.job_id, name),
                    patience,
                )
                self._pushed[name] = changed[name]
            return sorted(changed, key=_push_rank)

    def discard(self) -> None:
        """Remove a remote store's scratch copy once everything is pushed (a worker runs many jobs; their
        checkpoints would fill its disk). The local store's folder is the store: it stays."""
        if self.mirrored and self.path.exists():
            shutil.rmtree(self.path)


def checkpoint_copy(job_id: uuid.UUID, name: str, patience_s: float = 0.0) -> tuple[Path, ObjectInfo]:
    """The job's ``best`` or ``last`` checkpoint as a file on this machine (for torch.load), with the version it is;
    CheckpointError when the job has none. A remote store's is fetched once per version (see local_copy), waiting out
    a store that cannot be reached for up to ``patience_s`` (none: a prediction's caller waits for the answer)."""
    store, file = get_store(), CHECKPOINT_FILES[name]
    fetch = functools.partial(store.local_copy, job_id, file, get_settings().work_dir / "cache")
    copy = store.patiently(f"fetching {file} of job {job_id}", fetch, patience_s)
    if copy is None:
        raise CheckpointError(f"job {job_id} has no {name} checkpoint in the artifact store")
    return copy


def run_folder(job_id: uuid.UUID) -> Path:
    """The job's run folder on this machine: the store's own folder when the store is local, else the worker's
    scratch folder (see RunFolder)."""
    return RunFolder(get_store(), job_id, get_settings().work_dir).path
