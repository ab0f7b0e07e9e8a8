"""Telling the workers there is work: a ``run_job(job_id)`` message on the ``gpu`` queue, an
``import_dataset(dataset_id)`` message on the ``datasets`` queue (a CPU worker's: an upload never waits behind a
night-long training job, nor delays a prediction).

The database is the source of truth; the message only says "look at job X". The API sends it by task name, so it
never imports the worker (nor torch).
"""

from __future__ import annotations

import logging
import uuid
from functools import lru_cache
from typing import Annotated, Protocol

from celery import Celery
from fastapi import Depends
from kombu.exceptions import OperationalError

from service.settings import get_settings

RUN_JOB_TASK = "cape.run_job"
IMPORT_DATASET_TASK = "cape.import_dataset"
DATASETS_QUEUE = "datasets"
PUBLISH_TIMEOUT_S = 2.0  # a broker's answer to a publish comes in milliseconds; this long without one, it is down
GPU_QUEUE = "gpu"
log = logging.getLogger(__name__)


class Dispatcher(Protocol):
    def __call__(self, job_id: uuid.UUID) -> bool: ...


@lru_cache
def producer() -> Celery:
    app = Celery("cape-api", broker=get_settings().broker_url)
    # With the broker down, POST /jobs must still answer promptly: the job is stored and the reaper resends it. Down
    # includes frozen (its port accepts connections, nothing answers): kombu's Redis transport waits for an answer
    # for ever unless told otherwise, and the request with it (a prediction's, on the event loop).
    app.conf.broker_connection_timeout = 1
    app.conf.broker_transport_options = {"socket_connect_timeout": 1, "socket_timeout": PUBLISH_TIMEOUT_S}
    return app


def _send(task: str, queue: str, key: uuid.UUID) -> bool:
    try:
        producer().send_task(
            task, args=[str(key)], queue=queue, retry=True, retry_policy={"max_retries": 1, "interval_start": 0.1}
        )
    except OperationalError as exc:
        log.error("%s %s stored as queued but not dispatched: broker unreachable (%s)", task, key, exc)
        return False
    return True


def dispatch(job_id: uuid.UUID) -> bool:
    """Send the job's message. False when the broker cannot be reached: the job stays queued in the database."""
    return _send(RUN_JOB_TASK, GPU_QUEUE, job_id)


def dispatch_dataset(dataset_id: uuid.UUID) -> bool:
    """Send an uploaded dataset's import message. False when the broker cannot be reached."""
    return _send(IMPORT_DATASET_TASK, DATASETS_QUEUE, dataset_id)


def get_dispatcher() -> Dispatcher:
    return dispatch


def get_dataset_dispatcher() -> Dispatcher:
    return dispatch_dataset


DispatchDep = Annotated[Dispatcher, Depends(get_dispatcher)]
DatasetDispatchDep = Annotated[Dispatcher, Depends(get_dataset_dispatcher)]
