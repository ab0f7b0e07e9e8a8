"""What a worker process does around its tasks (Celery signals):

- every pool process drops the database connections it inherited through fork (sharing a socket corrupts it) and
  makes its own artifact store client;
- the main process runs the reaper once at start and then periodically, in a thread: a pool process can be busy
  training for hours, so the reaper must not wait in the task queue behind it;
- on a warm shutdown (SIGTERM) the main process asks this worker's running jobs to hand off: they stop at the
  next step, checkpoint, and go back to the queue for another worker, instead of failing or holding the shutdown.
"""

from __future__ import annotations

import logging
import threading

from celery.signals import worker_process_init, worker_ready, worker_shutting_down
from sqlalchemy.exc import SQLAlchemyError
from sqlmodel import Session

from service import job_state
from service.artifacts import get_store
from service.db import get_engine
from service.dispatch import dispatch, dispatch_dataset
from service.reaper import reap
from service.retry import database_down
from service.settings import get_settings

log = logging.getLogger(__name__)
_stop = threading.Event()


@worker_process_init.connect
def _fresh_connections(**_):
    get_engine().dispose(close=False)
    get_store()  # this process's own store client (none survives a fork), made before a job waits for it


def _reap_periodically() -> None:
    interval = get_settings().reaper_interval_s
    while True:
        try:
            with Session(get_engine()) as session:
                reap(session, dispatch, get_settings(), dispatch_dataset)
        except SQLAlchemyError as exc:
            # The database is unreachable for a moment: the next round tries again; the error is in the log (a line
            # for an outage, the traceback for anything else).
            if database_down(exc):
                log.warning("reaper round failed (database unreachable: %s)", getattr(exc, "orig", exc))
            else:
                log.exception("reaper round failed")
        if _stop.wait(interval):
            return


@worker_ready.connect
def _start_reaper(**_):
    threading.Thread(target=_reap_periodically, name="cape-reaper", daemon=True).start()


@worker_shutting_down.connect
def _hand_off(sender=None, **_):
    _stop.set()
    with Session(get_engine()) as session:
        count = job_state.request_handoff(session, sender)
    if count:
        log.warning("shutting down: %d running job(s) of %s asked to hand off", count, sender)
