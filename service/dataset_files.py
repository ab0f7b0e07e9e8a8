"""Where an uploaded dataset's files are: its archive until a worker imports it, then the imported MP-100-layout
folder, in the artifact store under its content's digest, and on each machine that uses it.

    uploads/<dataset id>/<archive name>     the archive as uploaded (removed once imported)
    datasets/<digest>/annotations/...       the imported dataset: read-only, named by its content, so two uploads of
    datasets/<digest>/images/...            the same files share it and a machine's copy is never stale

With the local store the folder in the store is the dataset's root. With a remote one, each machine (the API for
its catalogs and previews, a worker for training) keeps a copy under CAPE_WORK_DIR/datasets/<digest>/, fetched once.
"""

from __future__ import annotations

import hashlib
import shutil
import uuid
from pathlib import Path

from service.archives import ArchiveLimits
from service.artifacts import ArtifactStore, get_store
from service.settings import get_settings

UPLOADS, DATASETS = "uploads", "datasets"


def archive_limits() -> ArchiveLimits:
    """What an uploaded archive may expand to: checked on its listing by the API, counted again by the worker."""
    s = get_settings()
    return ArchiveLimits(max_expanded_bytes=s.max_dataset_expanded_bytes, max_entries=s.max_dataset_entries)


def upload_key(dataset_id: uuid.UUID) -> str:
    return f"{UPLOADS}/{dataset_id}"


def content_key(digest: str) -> str:
    return f"{DATASETS}/{digest}"


def folder_digest(root: Path) -> str:
    """sha256 over every file's relative path and content, in path order: what the dataset is, wherever it lies."""
    total = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        total.update(path.relative_to(root).as_posix().encode() + b"\0")
        with open(path, "rb") as handle:
            total.update(hashlib.file_digest(handle, "sha256").digest())
    return total.hexdigest()


def publish(root: Path, digest: str, store: ArtifactStore | None = None) -> None:
    """Put the imported folder in the store under its digest (every file; putting the same content twice is
    harmless)."""
    store = store or get_store()
    key = content_key(digest)
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        store.put_file(path, key, path.relative_to(root).as_posix())


def local_root(digest: str) -> Path:
    """The dataset's root on this machine: the local store's own folder, or this machine's copy of the remote one
    (fetched whole into a temporary folder and renamed into place, so a half copy is never a dataset)."""
    store = get_store()
    key = content_key(digest)
    if store.local:
        return Path(store.path(key))
    root = get_settings().work_dir.resolve() / DATASETS / digest
    if root.is_dir():
        return root
    partial = root.with_name(f"{digest}.{uuid.uuid4().hex}.partial")
    for name in store.names(key):
        store.get_file(key, name, partial / name)
    try:
        partial.rename(root)
    except OSError:  # another process of this machine put its copy there first: the same content
        shutil.rmtree(partial, ignore_errors=True)
    return root
