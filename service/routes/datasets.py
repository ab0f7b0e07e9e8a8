"""Datasets: the server's (read-only) and your own, uploaded as an archive of COCO keypoint files and their images,
imported and checked by a worker (never in the API process), then named by jobs like any other."""

from __future__ import annotations

import shutil
import uuid
from pathlib import Path, PurePath
from typing import Annotated

from fastapi import APIRouter, File, Form, HTTPException, Query, Response, UploadFile
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, func, select

from cape.data.check import CheckReport
from cape.data.coco_import import SplitChoice
from cape.errors import DatasetError
from service import dataset_state
from service.archives import ArchiveRefused, inspect_archive
from service.artifacts import get_store
from service.auth import OwnerDep
from service.catalogs import catalog_of
from service.dataset_files import archive_limits, content_key, upload_key
from service.datasets import NAME_PATTERN, DatasetRef, callers_upload, callers_uploads, server_checks, summary_of
from service.db import SessionDep
from service.dispatch import DatasetDispatchDep
from service.errors import not_found, responses, unprocessable
from service.models import (
    TERMINAL,
    ArchivePublic,
    Dataset,
    DatasetDeleted,
    DatasetDetail,
    DatasetList,
    DatasetPublic,
    DatasetStatus,
    Job,
)
from service.settings import get_settings

router = APIRouter(prefix="/datasets", tags=["datasets"])
UPLOAD_PATH = r"^/datasets/?$"  # its body limit is CAPE_MAX_DATASET_BYTES
CHUNK = 1024 * 1024
Split = Annotated[int, Query(ge=1, le=5, description="the split whose categories are listed")]


# --- how a dataset is shown ---------------------------------------------------------------------------------------


def _server_dataset(name: str, split: int | None = None) -> DatasetDetail:
    report = server_checks.report(name)
    if report is None:
        status, error, data = DatasetStatus.checking, None, None
    elif isinstance(report, str):
        status, error, data = DatasetStatus.rejected, report, None
    else:
        data = report.to_json()
        status = DatasetStatus.ready if report.usable else DatasetStatus.rejected
        error = None if report.usable else f"its check found {data['errors']} error(s): see the report"
    categories = None
    if split is not None and isinstance(report, CheckReport) and report.usable and split in report.splits:
        ref = DatasetRef(name, Path(get_settings().datasets[name]))
        categories = catalog_of(ref, split).summary
    return DatasetDetail(
        name=name,
        kind="server",
        status=status,
        read_only=True,
        created_at=None,
        updated_at=None,
        archive=None,
        splits=data["splits"] if data else [],
        summary=summary_of(data) if data else None,
        error=error,
        split=split or 1,
        report=data,
        categories=categories,
    )


def _uploaded_dataset(row: Dataset, split: int | None = None) -> DatasetDetail:
    summary = row.summary or {}
    return DatasetDetail(
        name=row.name,
        kind="uploaded",
        status=row.status,
        read_only=False,
        created_at=row.created_at,
        updated_at=row.updated_at,
        archive=ArchivePublic(name=row.archive_name, bytes=row.archive_bytes),
        splits=summary.get("splits", []),
        summary={k: summary[k] for k in ("categories", "instances", "errors", "warnings")} if summary else None,
        error=row.error,
        split=split or 1,
        report=row.report,
        categories=summary.get("by_split", {}).get(str(split)) if split is not None else None,
    )


def _listed(detail: DatasetDetail) -> DatasetPublic:
    return DatasetPublic.model_validate(detail.model_dump(include=set(DatasetPublic.model_fields)))


# --- the routes -----------------------------------------------------------------------------------------------------


@router.get("", response_model=DatasetList, responses=responses(401, 503))
def list_datasets(session: SessionDep, owner: OwnerDep) -> DatasetList:
    """The server's datasets (read-only), then yours, oldest first."""
    servers = [_listed(_server_dataset(name)) for name in sorted(get_settings().datasets)]
    return DatasetList(items=[*servers, *(_listed(_uploaded_dataset(row)) for row in callers_uploads(session, owner))])


@router.get("/{name}", response_model=DatasetDetail, responses=responses(401, 404, 503))
def get_dataset(session: SessionDep, owner: OwnerDep, name: str, split: Split = 1) -> DatasetDetail:
    """Its status, the report of its check (every problem, with the place it names) and, once ready, the split's
    categories with K and their instances per subset."""
    if name in get_settings().datasets:
        return _server_dataset(name, split)
    row = callers_upload(session, owner, name)
    if row is None:
        raise not_found(f"dataset {name!r}")
    return _uploaded_dataset(row, split)


@router.post(
    "",
    status_code=201,
    response_model=DatasetPublic,
    responses=responses(400, 401, 409, 413, 503),
)
def upload_dataset(
    session: SessionDep,
    owner: OwnerDep,
    dispatch: DatasetDispatchDep,
    response: Response,
    file: Annotated[UploadFile, File(description="a .zip or .tar.gz of COCO keypoint JSON files and their images")],
    name: Annotated[str, Form(pattern=NAME_PATTERN, description="what jobs will call it (yours alone)")],
    num_splits: Annotated[int, Form(description="benchmark splits to write: 1, or 5 as MP-100")] = 1,
    proportions: Annotated[
        str | None, Form(max_length=100, description="train,val,test shares of the categories, e.g. 0.6,0.2,0.2")
    ] = None,
    seed: Annotated[int, Form(ge=0, le=2**31 - 1, description="for the automatic assignment")] = 0,
    category_split: Annotated[
        str | None,
        Form(
            max_length=1_000_000,
            description='JSON: {"train": [...], "val": [...], "test": [...]} (a list of five for five splits); '
            'entries "<source>" or "<source>:<category id>"; without it and without proportions every category '
            "is a train category",
        ),
    ] = None,
    zero_based_skeleton: Annotated[
        bool, Form(description="a skeleton that uses index 0 is 0-based: shift it (otherwise it is refused)")
    ] = False,
    skip_invalid: Annotated[
        bool, Form(description="leave out (and count) annotations that cannot be imported, instead of refusing")
    ] = False,
) -> DatasetPublic:
    """Upload a dataset. The archive is checked for what it may not hold (entries outside its folder, links, more
    than CAPE_MAX_DATASET_EXPANDED_BYTES once expanded) before anything is kept; a worker then imports it
    (cape.data.coco_import) and checks it (cape.data.check): GET /datasets/{name} follows it from queued through
    checking to ready or rejected, with the report."""
    if name in get_settings().datasets:
        raise HTTPException(409, f"{name!r} is one of the server's datasets: choose another name")
    if callers_upload(session, owner, name) is not None:
        raise HTTPException(409, f"you have a dataset named {name!r} already: delete it first, or choose another name")
    options = _import_options(num_splits, proportions, seed, category_split, zero_based_skeleton, skip_invalid)
    dataset = Dataset(
        owner=owner, name=name, options=options, archive_name=_display_name(file.filename), archive_bytes=0
    )
    incoming = get_settings().work_dir.resolve() / "incoming" / str(dataset.id)
    try:
        archive = incoming / "archive"
        dataset.archive_bytes = _save(file, archive)
        try:
            listing = inspect_archive(archive, archive_limits())
        except ArchiveRefused as exc:
            raise _refused_archive(exc) from None
        dataset.options = {**options, "format": listing.format}
        get_store().put_file(archive, upload_key(dataset.id), f"archive.{listing.format}")
    finally:
        shutil.rmtree(incoming, ignore_errors=True)
    session.add(dataset)
    try:
        session.commit()
    except IntegrityError:  # the same name, uploaded at the same moment by another request of this key
        session.rollback()
        get_store().remove(upload_key(dataset.id))
        raise HTTPException(409, f"you have a dataset named {name!r} already") from None
    dataset_state.dispatch_dataset(session, dataset.id, dispatch)  # a broker that is down: the reaper resends it
    session.refresh(dataset)
    response.headers["Location"] = f"/datasets/{name}"
    return _listed(_uploaded_dataset(dataset))


@router.delete("/{name}", response_model=DatasetDeleted, responses=responses(401, 404, 409, 503))
def delete_dataset(session: SessionDep, owner: OwnerDep, name: str) -> DatasetDeleted:
    """Delete one of your datasets and its files. Not while a job uses it (409). Jobs that trained on it keep their
    metrics, checkpoints and predictions on your own images; they can no longer be resumed, cloned or evaluated on
    it."""
    if name in get_settings().datasets:
        raise HTTPException(403, f"{name!r} is one of the server's datasets: it is read-only")
    row = callers_upload(session, owner, name)
    if row is None:
        raise not_found(f"dataset {name!r}")
    if row.status in (DatasetStatus.queued, DatasetStatus.checking):
        raise HTTPException(409, f"dataset {name!r} is {row.status}: delete it once it is ready or rejected")
    active = session.exec(select(Job.id).where(Job.dataset_id == row.id, Job.status.not_in(TERMINAL))).all()
    if active:
        raise HTTPException(
            409, f"jobs {', '.join(map(str, active))} use dataset {name!r}: cancel them or let them end first"
        )
    jobs = session.exec(select(func.count()).select_from(Job).where(Job.dataset_id == row.id)).one()
    digest = row.digest
    session.delete(row)
    session.commit()
    _remove_files(session, digest, row.id)
    return DatasetDeleted(
        name=name,
        deleted=True,
        jobs=jobs,
        message=f"{jobs} job(s) trained on it keep their metrics, checkpoints and predictions on your own images; "
        "they can no longer be resumed, cloned or evaluated on it",
    )


# --- the upload's parts ---------------------------------------------------------------------------------------------


def _import_options(
    num_splits: int,
    proportions: str | None,
    seed: int,
    category_split: str | None,
    zero_based_skeleton: bool,
    skip_invalid: bool,
) -> dict:
    """The import's choices, checked now (a bad split choice is the caller's 422, not a rejected import later)."""
    try:
        SplitChoice.parse(num_splits=num_splits, proportions=proportions, seed=seed, category_split=category_split)
    except DatasetError as exc:
        field = exc.field or ("category_split" if category_split else "proportions")
        raise unprocessable(("body", field), str(exc)) from None
    return {
        "num_splits": num_splits,
        "proportions": proportions,
        "seed": seed,
        "category_split": category_split,
        "zero_based_skeleton": zero_based_skeleton,
        "skip_invalid": skip_invalid,
    }


def _display_name(filename: str | None) -> str:
    # The client's name for its file, for people only: never a path on this machine.
    return PurePath((filename or "archive").replace("\\", "/")).name[:255] or "archive"


def _save(file: UploadFile, path: Path) -> int:
    """The upload (already spooled to disk by the multipart parser, under the body limit) copied to ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    file.file.seek(0)
    with open(path, "wb") as out:
        shutil.copyfileobj(file.file, out, CHUNK)
    return path.stat().st_size


def _refused_archive(exc: ArchiveRefused) -> HTTPException:
    if exc.status_code == 422:
        return unprocessable(("body", "file"), str(exc))
    return HTTPException(exc.status_code, str(exc))


def _remove_files(session: Session, digest: str | None, dataset_id: uuid.UUID) -> None:
    store = get_store()
    store.remove(upload_key(dataset_id))
    # Named by content: another upload of the same files shares them.
    if digest and session.exec(select(Dataset.id).where(Dataset.digest == digest)).first() is None:
        store.remove(content_key(digest))
