"""An uploaded dataset's states, each change one conditional UPDATE (as service/job_state.py does for jobs):

queued ──claim──▶ checking ──end──▶ ready | rejected
   ▲                 │
   └──(claim again: a redelivered message, its first worker died)
"""

from __future__ import annotations

import uuid

from sqlalchemy import update
from sqlmodel import Session

from service.models import Dataset, DatasetStatus, utcnow


def dispatch_dataset(session: Session, dataset_id: uuid.UUID, dispatcher) -> bool:
    """Send the import's message and remember when it reached the broker (the reaper resends the ones that did
    not)."""
    if not dispatcher(dataset_id):
        return False
    session.execute(update(Dataset).where(Dataset.id == dataset_id).values(dispatched_at=utcnow()))
    session.commit()
    return True


def claim(session: Session, dataset_id: uuid.UUID, worker: str) -> Dataset | None:
    """queued (or checking: a message redelivered after its worker died) -> checking; the dataset, or None when it is
    not this worker's to import."""
    result = session.execute(
        update(Dataset)
        .where(Dataset.id == dataset_id, Dataset.status.in_([DatasetStatus.queued, DatasetStatus.checking]))
        .values(status=DatasetStatus.checking, worker=worker, updated_at=utcnow())
    )
    session.commit()
    return session.get(Dataset, dataset_id) if result.rowcount else None


def end(session: Session, dataset_id: uuid.UUID, status: DatasetStatus, fields: dict) -> bool:
    """checking -> ready | rejected, with the import's results (report, digest, summary, error)."""
    result = session.execute(
        update(Dataset)
        .where(Dataset.id == dataset_id, Dataset.status == DatasetStatus.checking)
        .values(status=status, updated_at=utcnow(), **fields)
    )
    session.commit()
    return bool(result.rowcount)
