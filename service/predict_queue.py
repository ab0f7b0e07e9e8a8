"""Predictions on a worker: the request goes out as a Celery task on the ``predict`` queue, the answer comes back
on a Redis list that the API waits on.

Why not Celery's result backend: the API waits for many answers at once from one process, and the Redis result
backend's ``AsyncResult.get`` is not safe to call from several threads (celery/celery#4480, #6335). A list per
request, pushed by the worker and popped with BLPOP by the API, is one key, one blocking call and nothing shared.
The request expires with the API's wait: a worker that takes it up later drops it (Celery's ``expires``), so a
backlog after an outage is not computed for clients that have gone.

Torch-free, like the rest of the service: the worker side is worker/prediction_task.py.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Awaitable, Callable
from typing import Annotated

import redis
import redis.asyncio
from fastapi import Depends
from kombu.exceptions import OperationalError

from service.dispatch import producer
from service.settings import get_settings

PREDICT_TASK = "cape.predict"
PREDICT_QUEUE = "predict"
REPLY_PREFIX = "cape:predict:reply:"
REPLY_TTL_S = 120  # an answer nobody collects (the API gave up) is gone after this


class PredictUnavailable(RuntimeError):
    """The broker cannot be reached: nothing was sent."""


class PredictTimeout(RuntimeError):
    """No worker answered within the wait."""


async def request_prediction(request: dict, timeout_s: float) -> dict:
    """Send ``request`` to a predict worker and wait up to ``timeout_s`` for its answer."""
    reply_to = REPLY_PREFIX + uuid.uuid4().hex
    try:
        producer().send_task(
            PREDICT_TASK,
            args=[{**request, "reply_to": reply_to}],
            queue=PREDICT_QUEUE,
            expires=timeout_s,
            retry=True,
            retry_policy={"max_retries": 1, "interval_start": 0.1},
        )
    except OperationalError as exc:
        raise PredictUnavailable(f"broker unreachable: {exc}") from exc
    try:
        async with redis.asyncio.Redis.from_url(get_settings().broker_url, socket_connect_timeout=1) as client:
            popped = await client.blpop([reply_to], timeout=timeout_s)
    except redis.RedisError as exc:
        raise PredictUnavailable(f"broker unreachable: {exc}") from exc
    if popped is None:
        raise PredictTimeout(f"no predict worker answered within {timeout_s:g} s")
    return json.loads(popped[1])


def send_reply(reply_to: str, answer: dict) -> None:
    """The worker's half: push the answer where the API waits for it."""
    with redis.Redis.from_url(get_settings().broker_url) as client:
        client.pipeline().rpush(reply_to, json.dumps(answer)).expire(reply_to, REPLY_TTL_S).execute()


PredictionRequester = Callable[[dict, float], Awaitable[dict]]


def get_prediction_requester() -> PredictionRequester:
    return request_prediction


PredictionRequesterDep = Annotated[PredictionRequester, Depends(get_prediction_requester)]
