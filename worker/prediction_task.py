"""``answer_prediction(request)``, the predict worker's task: keypoints on a person's images with a job's checkpoint,
answered on the request's reply list.

Runs on its own queue (``predict``) and its own worker, so a prediction never waits behind a training job. The
worker keeps the most recently used trained models loaded (CAPE_PREDICT_CACHE_SIZE), each keyed by its checkpoint's
ETag in the artifact store, so a newer best checkpoint of a running job is fetched (a remote store: once, into a
local copy under CAPE_WORK_DIR) and loaded afresh.
"""

from __future__ import annotations

import base64
import logging
import time
import uuid
from collections import OrderedDict

from celery.signals import worker_process_init

from cape.errors import CheckpointError
from cape.inference.inputs import InputError, PredictInputs
from service.artifacts import checkpoint_copy
from service.predict_queue import PREDICT_TASK, send_reply
from service.settings import get_settings
from worker.celery_app import app

log = logging.getLogger(__name__)


@worker_process_init.connect
def _load_torch(**_):
    # In the pool process, after the fork (no CUDA state crosses it): a first request then costs the model's load,
    # not torch's import too. Training tasks import the same modules anyway.
    import cape.inference.keypoints  # noqa: F401


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
    try:
        answer = {"status": 200, **_answer(request)}
    except InputError as exc:  # an image whose header was fine but whose data is not
        answer = {"status": 422, "detail": [{"loc": ["body", exc.field], "msg": str(exc), "type": "value_error"}]}
    except CheckpointError as exc:
        answer = {"status": 409, "detail": str(exc)}
    except Exception as exc:  # a bug: the client gets a 500 that says so, the log gets the traceback
        log.exception("prediction for job %s failed", request.get("job_id"))
        answer = {"status": 500, "detail": f"prediction failed: {type(exc).__name__}: {exc}"}
    send_reply(request["reply_to"], answer)
