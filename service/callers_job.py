"""The caller's job, or 404: every route's one answer to "is this the caller's job?".

A job belongs to the API key that created it (service/auth.py). Another key's job answers exactly like a missing one, so
that not even its existence leaks. The sync job routes take the job as a dependency (``CallersJobDep``; a router whose
every route is a job's has ``callers_job`` among its dependencies), the async ones its status (``CallersJobStatusDep``,
read on the event loop, its connection back in the pool before the route runs: the predict route then waits up to
CAPE_PREDICT_TIMEOUT_S for a worker, and 45 such waits holding a connection each would take the whole PostgreSQL read
pool, 20 + 10, from the metrics polls). The two routes whose one read brings the job's owner along with their answer
(the metrics poll, the event feed) check that owner with ``check_callers``: a read of their own for it would be one more
round trip on the path pollers hit all the time. An evaluate job names its source in the body, so ``find_callers_job``
lets it refuse another key's job as it refuses a missing one, with a 422.
"""

from __future__ import annotations

import uuid
from contextlib import asynccontextmanager
from typing import Annotated

from fastapi import Depends
from sqlalchemy import bindparam, select
from sqlmodel import Session

from service.auth import OwnerDep
from service.db import SessionDep, get_reads
from service.errors import not_found
from service.models import Job


def check_callers(job_id: uuid.UUID, job_owner: str | None, caller: str) -> None:
    """404 unless the job is the caller's; ``job_owner`` None: there is no such job."""
    if job_owner != caller:
        raise not_found(f"job {job_id}")


def find_callers_job(session: Session, job_id: uuid.UUID, caller: str) -> Job | None:
    """The job if it is the caller's; None for a missing job and for another key's alike."""
    job = session.get(Job, job_id)
    return job if job is not None and job.owner == caller else None


def callers_job(job_id: uuid.UUID, session: SessionDep, owner: OwnerDep) -> Job:
    job = find_callers_job(session, job_id, owner)
    if job is None:
        raise not_found(f"job {job_id}")
    return job


CallersJobDep = Annotated[Job, Depends(callers_job)]

OWNER_AND_STATUS = select(Job.owner, Job.status).where(Job.id == bindparam("job_id"))


_reads = asynccontextmanager(get_reads)


async def callers_job_status(job_id: uuid.UUID, owner: OwnerDep) -> str:
    async with _reads() as db:  # not ReadsDep: that connection would be held until the route returns
        rows = await db.fetch(OWNER_AND_STATUS, {"job_id": job_id})
    check_callers(job_id, rows[0].owner if rows else None, owner)
    return rows[0].status


CallersJobStatusDep = Annotated[str, Depends(callers_job_status)]
