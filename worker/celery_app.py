"""The Celery application of the GPU workers.

    celery -A worker.celery_app worker -Q gpu -c 1 --loglevel INFO      (one per GPU, CUDA_VISIBLE_DEVICES=N)
    celery -A worker.celery_app worker -Q predict -c 1 -n predict@%h    (predictions: never behind a training job)
    celery -A worker.celery_app worker -Q datasets -c 1 -n datasets@%h  (uploaded datasets: imported and checked)

Delivery guarantees come from Celery's own settings: a message is acknowledged only after its task returns
(late acks), a worker holds one message at a time (prefetch 1), a task whose worker process died is redelivered
(reject on worker lost), and Redis waits longer than any job before handing an unacknowledged message to someone
else (visibility timeout). The database decides whether a delivered message still means work
(service.job_state.claim).
"""

from __future__ import annotations

from celery import Celery

from service.dispatch import DATASETS_QUEUE, GPU_QUEUE, IMPORT_DATASET_TASK, RUN_JOB_TASK
from service.predict_queue import PREDICT_QUEUE, PREDICT_TASK
from service.settings import get_settings

settings = get_settings()
app = Celery(
    "cape",
    broker=settings.broker_url,
    include=["worker.tasks", "worker.prediction_task", "worker.dataset_task", "worker.lifecycle"],
)
app.conf.update(
    task_acks_late=True,
    task_reject_on_worker_lost=True,
    worker_prefetch_multiplier=1,
    task_default_queue=GPU_QUEUE,
    task_routes={
        RUN_JOB_TASK: {"queue": GPU_QUEUE},
        PREDICT_TASK: {"queue": PREDICT_QUEUE},
        IMPORT_DATASET_TASK: {"queue": DATASETS_QUEUE},
    },
    task_ignore_result=True,
    broker_transport_options={"visibility_timeout": settings.visibility_timeout_s},
    broker_connection_retry_on_startup=True,
    broker_connection_max_retries=None,  # a broker outage is waited out, not a reason for the worker to exit
    # A lost broker connection must not kill the running job: its message is redelivered, and the atomic claim
    # turns the duplicate into a no-op.
    worker_cancel_long_running_tasks_on_connection_loss=False,
    worker_hijack_root_logger=False,
    # A new pool process imports torch before it reports up (worker.prediction_task). On a busy machine that can take
    # longer than Celery's default 4 s, and the pool would then kill every replacement of a lost process in turn.
    worker_proc_alive_timeout=60,
)
