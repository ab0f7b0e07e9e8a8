"""The datasets a caller may name: the server's own (CAPE_DATASETS: read-only, checked at the API's start) and the
ones the caller uploaded (POST /datasets, service.models.Dataset: theirs alone; another key's are not found)."""

from __future__ import annotations

import logging
import multiprocessing
import threading
import uuid
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from sqlmodel import Session, select

from cape.data.check import CheckReport, check_dataset
from cape.errors import CapeError
from service.dataset_files import local_root
from service.errors import unprocessable
from service.models import Dataset, DatasetStatus
from service.settings import get_settings

log = logging.getLogger(__name__)
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"


@dataclass(frozen=True)
class DatasetRef:
    """A dataset a job or a preview uses: its name, its root on this machine, and its row when it is an upload."""

    name: str
    root: Path
    id: uuid.UUID | None = None


def callers_upload(session: Session, owner: str, name: str) -> Dataset | None:
    return session.exec(select(Dataset).where(Dataset.owner == owner, Dataset.name == name)).first()


def callers_uploads(session: Session, owner: str) -> list[Dataset]:
    return list(session.exec(select(Dataset).where(Dataset.owner == owner).order_by(Dataset.created_at)).all())


def resolve(session: Session, owner: str, name: str | None, loc: tuple[str, ...]) -> DatasetRef:
    """The dataset ``name`` (the server's default when None) as the caller sees it: 422 for a name that is neither
    the server's nor one of the caller's uploads, or an upload that is not ready."""
    servers = get_settings().datasets
    name = name or get_settings().default_dataset
    if name in servers:
        return DatasetRef(name, Path(servers[name]))
    upload = callers_upload(session, owner, name)
    if upload is None:
        ready = [d.name for d in callers_uploads(session, owner) if d.status == DatasetStatus.ready]
        raise unprocessable(
            loc, f"unknown dataset {name!r}: valid datasets are {', '.join([*sorted(servers), *ready])}"
        )
    if upload.status != DatasetStatus.ready:
        why = (
            f"its report says why (GET /datasets/{name})"
            if upload.status == DatasetStatus.rejected
            else "it is still being imported and checked: try again when it is ready"
        )
        raise unprocessable(loc, f"dataset {name!r} is {upload.status}: {why}")
    return DatasetRef(name, local_root(upload.digest), upload.id)


# --- the server's datasets, checked once per API process ------------------------------------------------------------


class ServerChecks:
    """The check (cape.data.check, images read by their headers) of each server dataset, started with the API: a
    dataset that fails it is shown as such by GET /datasets/{name}, rather than failing the first job. Each runs in a
    process of its own (spawned, then gone), so that its minutes of reading never hold the API's event loop."""

    def __init__(self):
        self._lock = threading.Lock()
        self._reports: dict[tuple[str, str], CheckReport | str] = {}  # by (name, root): the settings may change
        self._started: set[tuple[str, str]] = set()

    def start(self) -> None:
        todo = []
        with self._lock:
            for entry in get_settings().datasets.items():
                if entry not in self._started:
                    self._started.add(entry)
                    todo.append(entry)
        for entry in todo:
            threading.Thread(target=self._check, args=entry, name=f"check {entry[0]}", daemon=True).start()

    def _check(self, name: str, root: str) -> None:
        with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
            report = pool.submit(checked, root).result()
        log.info("server dataset %s checked: %s", name, "usable" if _usable(report) else "not usable")
        with self._lock:
            self._reports[name, root] = report

    def report(self, name: str) -> CheckReport | str | None:
        """The check's report, the error that stopped it, or None while it runs."""
        self.start()
        with self._lock:
            return self._reports.get((name, get_settings().datasets[name]))


def checked(root: str) -> CheckReport | str:
    """A server dataset's check: its report, or why there is none (not a dataset folder at all)."""
    try:
        return check_dataset(root, images="header")
    except CapeError as exc:
        return str(exc)


def _usable(report: CheckReport | str | None) -> bool:
    return isinstance(report, CheckReport) and report.usable


server_checks = ServerChecks()


def job_dataset(session: Session, job) -> DatasetRef | None:
    """The dataset a job was accepted on, the same version (an upload by its row, the server's by its name); None
    when it is gone (an upload since deleted, a server dataset no longer configured)."""
    if job.dataset_id is not None:
        upload = session.get(Dataset, job.dataset_id)
        return DatasetRef(upload.name, local_root(upload.digest), upload.id) if upload and upload.digest else None
    root = get_settings().datasets.get(job.dataset)
    return DatasetRef(job.dataset, Path(root)) if root is not None else None


def summary_of(report: dict) -> dict:
    """What the list shows of a check's report (cape.data.check.CheckReport.to_json): the first split's categories and
    instances, the problems' counts."""
    splits = report.get("splits") or []
    counts = report.get("counts", {}).get(str(splits[0]), {}) if splits else {}
    return {
        "categories": sum(subset.get("categories", 0) for subset in counts.values()),
        "instances": sum(subset.get("instances", 0) for subset in counts.values()),
        "errors": report.get("errors", 0),
        "warnings": report.get("warnings", 0),
    }
