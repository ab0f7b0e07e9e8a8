"""``answer_prediction(request)``, the predict worker's task: keypoints on a person's images with a job's checkpoint,
answered on the request's reply list.

Runs on its own queue (``predict``) and its own worker, so a prediction never waits behind a training job. The
worker keeps the most recently used trained models loaded (CAPE_PREDICT_CACHE_SIZE), each keyed by its checkpoint's
ETag in the artifact store, so a newer best checkpoint of a running job is fetched (a remote store: once, into a
local copy under CAPE_WORK_DIR) and loaded afresh.

A request is computed only if the worker takes it first (service.predict_queue.take): one the API has given up on
is dropped unread, so a backlog of abandoned requests never delays the next ones. Each pool process of a worker that
consumes the ``predict`` queue sends a heartbeat, and each answer says how long it took: the API's admission
estimate counts on both.
"""

from __future__ import annotations

import base64
import logging
import os
import socket
import threading
import time
import uuid
from collections import OrderedDict

import redis
from celery.signals import celeryd_after_setup, worker_process_init, worker_process_shutdown

from cape.errors import CheckpointError
from cape.inference.inputs import InputError, PredictInputs
from service.artifacts import StoreUnavailable, checkpoint_copy
from service.dispatch import DATASETS_QUEUE
from service.predict_admission import HEARTBEAT_S, heartbeat, leave, take
from service.predict_queue import PREDICT_QUEUE, PREDICT_TASK, send_reply
from service.settings import get_settings
from worker.celery_app import app

log = logging.getLogger(__name__)


_answers_predictions = False  # this worker consumes the predict queue (-Q): set in the main process, before any fork
_runs_models = True  # it consumes a queue whose tasks load torch (not only the datasets queue's imports)
_heartbeat_name: str | None = None  # this pool process's, when it answers predictions


@celeryd_after_setup.connect
def _note_queues(instance=None, **_):
    # Read here, in the main process before the pool forks and before its threads run, never in a pool process:
    # Celery's lazily computed attributes (app.amqp) take a lock that a thread of the main process (the reaper,
    # dispatching) may hold at the moment of a fork, and a pool process that waits for it waits for ever.
    global _answers_predictions, _runs_models
    queues = set(instance.app.amqp.queues.consume_from)
    _answers_predictions = PREDICT_QUEUE in queues
    _runs_models = bool(queues - {DATASETS_QUEUE})


@worker_process_init.connect
def _load_torch(**_):
    # In the pool process, after the fork (no CUDA state crosses it): a first request then costs the model's load,
    # not torch's import too. Training tasks import the same modules anyway; a dataset import never does.
    if _runs_models:
        import cape.inference.keypoints  # noqa: F401

    global _heartbeat_name
    if _answers_predictions:
        _heartbeat_name = f"{socket.gethostname()}:{os.getpid()}"
        threading.Thread(target=_heartbeats, args=(_heartbeat_name,), name="predict heartbeat", daemon=True).start()


def _heartbeats(name: str) -> None:
    """This pool process answers predictions: say so every HEARTBEAT_S (the API counts the live ones)."""
    failing = False
    while True:
        try:
            heartbeat(name)
            failing = False
        except redis.RedisError as exc:
            if not failing:  # once per outage
                log.warning("predict heartbeat not sent (%s): the API counts this worker again when it is", exc)
            failing = True
        time.sleep(HEARTBEAT_S)


@worker_process_shutdown.connect
def _leave(**_):
    if _heartbeat_name is None:
        return
    try:
        leave(_heartbeat_name)
    except redis.RedisError:
        pass  # its heartbeat ages out of the count anyway


class ModelCache:
    """The ``size`` most recently used trained models, by a key that names one version of a checkpoint on one
    device ((job, checkpoint name, ETag, device))."""

    def __init__(self, size: int):
        self.size = size
        self._models: OrderedDict[tuple, object] = OrderedDict()

    def get(self, key: tuple, path, device):
        from cape.model.checkpoint import load_trained

        if key in self._models:
            self._models.move_to_end(key)
            return self._models[key], True
        trained = load_trained(path, device)
        self._models[key] = trained
        while len(self._models) > self.size:
            self._models.popitem(last=False)
        return trained, False


_cache: ModelCache | None = None


def _answer(request: dict) -> dict:
    from cape.inference.keypoints import decode, predict_keypoints
    from cape.model.device import resolve_device
    from cape.training.pictures import draw_prediction

    global _cache
    settings = get_settings()
    _cache = _cache or ModelCache(settings.predict_cache_size)
    name, job_id = request["checkpoint"], uuid.UUID(request["job_id"])
    started = time.perf_counter()
    path, info = checkpoint_copy(job_id, name)
    device = resolve_device(settings.device)
    trained, cached = _cache.get((job_id, name, info.etag, str(device)), path, device)
    load_ms = 1000 * (time.perf_counter() - started)
    inputs = PredictInputs.from_json(request["inputs"])
    query = decode(base64.b64decode(request["query_image"]), inputs.query, "query_image")
    support = decode(base64.b64decode(request["support_image"]), inputs.support, "support_image")
    result = predict_keypoints(trained, support, query, inputs)
    answer = {
        "checkpoint": {"name": name, "epoch": trained.epoch, "val_pck": trained.val_pck},
        "keypoints": result.keypoints.tolist(),
        "confidence": result.confidence.tolist(),
        "timing": {"load_ms": load_ms, "inference_ms": result.inference_ms, "cached": cached},
    }
    if request.get("png"):
        import torch

        png = draw_prediction(query, torch.from_numpy(result.keypoints), inputs.skeleton)
        answer["png"] = base64.b64encode(png).decode()
    return answer


# At most once: a prediction that killed its process is not retried (the client has its 504 by then).
@app.task(name=PREDICT_TASK, acks_late=False, ignore_result=True)
def answer_prediction(request: dict) -> None:
    request_id, job_id = request.get("request_id"), request.get("job_id")
    try:
        taken = take(request)
    except redis.RedisError as exc:  # no broker to say whether the API still waits, nor to answer it
        log.warning("prediction %s for job %s dropped: cannot take it (%s)", request_id, job_id, exc)
        return
    if not taken:
        log.info("prediction %s for job %s dropped: the API gave up on it before a worker took it", request_id, job_id)
        return
    started, service_s = time.perf_counter(), None
    try:
        answer = {"status": 200, **_answer(request)}
        # A sample of the time a request keeps a worker busy, for the API's admission: a model's load is not one
        # (it happens once per model, not per request).
        timing = answer["timing"]
        service_s = time.perf_counter() - started - (0 if timing["cached"] else timing["load_ms"] / 1000)
    except InputError as exc:  # an image whose header was fine but whose data is not
        answer = {"status": 422, "detail": [{"loc": ["body", exc.field], "msg": str(exc), "type": "value_error"}]}
    except CheckpointError as exc:
        answer = {"status": 409, "detail": str(exc)}
    except StoreUnavailable as exc:  # the checkpoint is there, the store is not, for now: the log says which store
        log.warning("prediction %s for job %s: %s", request_id, job_id, exc)
        answer = {"status": 503, "detail": "artifact store unreachable, try again"}
    except Exception as exc:  # a bug: the client gets a 500 that says so, the log gets the traceback
        log.exception("prediction for job %s failed", request.get("job_id"))
        answer = {"status": 500, "detail": f"prediction failed: {type(exc).__name__}: {exc}"}
    # Logged before the answer goes: whoever has the answer finds the line (the load tests count computed = answered).
    log.info(
        "prediction %s for job %s answered %d in %.3f s",
        request_id,
        job_id,
        answer["status"],
        time.perf_counter() - started,
    )
    send_reply(request["reply_to"], answer, service_s)
