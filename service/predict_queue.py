"""Predictions on a worker: the request goes out as a Celery task on the ``predict`` queue, the answer comes back
on a Redis list that the API waits on.

Why not Celery's result backend: the API waits for many answers at once from one process, and the Redis result
backend's ``AsyncResult.get`` is not safe to call from several threads (celery/celery#4480, #6335). A list per
request, pushed by the worker and popped with BLPOP by the API, is one key, one blocking call and nothing shared.


Under load (service/predict_admission.py): a request the workers could not answer in time is refused at once, or
withdrawn as soon as that shows while it waits (PredictBusy: 503 with Retry-After); a request the API gave up on is
never computed later: a worker takes a request only while it is still pending, and the API that gives up withdraws
it (1: no worker had taken it, and none ever will; 0: a worker is computing it right now, and the API waits
PREDICT_GRACE_S more for that answer). So a backlog of abandoned requests cannot delay the next ones. Celery's
``expires`` stays as the backstop.

Honest errors: redis-py (8.x) gives every client a 5 s ``socket_timeout`` by default, so a BLPOP told to wait 30 s
was cut at 5 s and reported as "broker unreachable". Every client here says its timeouts: the waiting one's is longer
than its BLPOP. A refused or lost connection is "broker unreachable" (PredictUnavailable, 503); a broker that does
not answer in time says so (503 too, another message); no worker in time is PredictTimeout (504).

Torch-free, like the rest of the service: the worker side is worker/prediction_task.py, with its half here
(``send_reply``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from collections.abc import Awaitable, Callable
from typing import Annotated

import redis
import redis.asyncio
from fastapi import Depends
from kombu.exceptions import OperationalError
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import NoBackoff

from service.dispatch import producer
from service.predict_admission import (
    BROKER_ANSWER_S,
    CONNECT_TIMEOUT_S,
    RECHECK_S,
    SERVICE_S,
    SERVICE_SAMPLES,
    SERVICE_SAMPLES_TTL_S,
    admit,
    recheck,
    withdraw,
    worker_client,
)
from service.settings import get_settings

PREDICT_TASK = "cape.predict"
PREDICT_QUEUE = "predict"
REPLY_PREFIX = "cape:predict:reply:"
REPLY_TTL_S = 120  # an answer nobody collects (the API gave up) is gone after this
# Abandonment: after giving up, the API waits this much more for a request a worker was already computing.
PREDICT_GRACE_S = 5.0
# The BLPOPs' socket waits this much longer than the longest BLPOP.
SOCKET_MARGIN_S = 5.0


class PredictUnavailable(RuntimeError):
    """The broker cannot be reached, or does not answer: nothing was computed for this request."""


class PredictTimeout(RuntimeError):
    """No worker answered within the wait."""


# --- the API's side --------------------------------------------------------------------------------------------


# A client per request, its connections fresh: no retries inside redis-py (each try of a broker that does not answer
# would cost the whole timeout again); a failure is a 503 with Retry-After.


def _quick_client() -> redis.asyncio.Redis:
    return redis.asyncio.Redis.from_url(
        get_settings().broker_url,
        socket_connect_timeout=CONNECT_TIMEOUT_S,
        socket_timeout=BROKER_ANSWER_S,
        retry=AsyncRetry(NoBackoff(), 0),
    )


def _waiting_client() -> redis.asyncio.Redis:
    # Its socket waits longer than any BLPOP it makes (RECHECK_S, or PREDICT_GRACE_S once): with redis-py's default
    # socket timeout (5 s), a BLPOP told to wait 30 s was cut at 5 s.
    return redis.asyncio.Redis.from_url(
        get_settings().broker_url,
        socket_connect_timeout=CONNECT_TIMEOUT_S,
        socket_timeout=max(RECHECK_S, PREDICT_GRACE_S) + SOCKET_MARGIN_S,
        retry=AsyncRetry(NoBackoff(), 0),
    )


def broker_error(exc: redis.RedisError, doing: str) -> PredictUnavailable:
    """What a Redis error means, in words: a timeout is a broker that does not answer, not an unreachable one."""
    if isinstance(exc, redis.TimeoutError):
        return PredictUnavailable(f"the broker did not answer in time {doing}: {exc}")
    return PredictUnavailable(f"broker unreachable {doing}: {exc}")


async def request_prediction(request: dict, timeout_s: float) -> dict:
    """Send ``request`` to a predict worker and wait up to ``timeout_s`` for its answer (PREDICT_GRACE_S more when a
    worker is computing it by then). Raises PredictBusy when the workers could not answer in time: at once, or as soon
    as the estimate made again while it waits says so."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    request_id = uuid.uuid4().hex
    reply_to = REPLY_PREFIX + request_id
    async with _quick_client() as quick, _waiting_client() as waiting:
        try:
            admission = await admit(quick, request_id, timeout_s)
        except redis.RedisError as exc:
            raise broker_error(exc, "(nothing was sent)") from exc
        if not admission.state:
            raise admission.refusal(timeout_s)
        try:
            # In a thread: a publish is one round trip, but a broker that does not answer holds it for
            # dispatch.PUBLISH_TIMEOUT_S, and the event loop must not wait with it.
            await asyncio.to_thread(
                producer().send_task,
                PREDICT_TASK,
                args=[{**request, "request_id": request_id, "reply_to": reply_to}],
                queue=PREDICT_QUEUE,
                expires=timeout_s,  # the backstop: a worker drops it after this even if it is still pending
                retry=True,
                retry_policy={"max_retries": 1, "interval_start": 0.1},
            )
        except OperationalError as exc:
            with contextlib.suppress(redis.RedisError):
                await withdraw(quick, request_id)
            raise PredictUnavailable(f"broker unreachable: {exc}") from exc
        try:
            answer = await _wait_until(quick, waiting, request_id, reply_to, deadline, timeout_s, admission.ahead)
        except (PredictUnavailable, asyncio.CancelledError):  # the broker lost, or the API stopping: nobody will wait
            with contextlib.suppress(redis.RedisError):
                await withdraw(quick, request_id)
            raise
        if answer is not None:
            return answer
        try:
            withdrawn = await withdraw(quick, request_id)
        except redis.RedisError as exc:
            raise broker_error(exc, "when giving up") from exc
        if withdrawn:
            raise PredictTimeout(
                f"no predict worker took the request within {timeout_s:g} s (the workers may be loading a model, or "
                "none consumes the 'predict' queue); it was withdrawn and will not be computed"
            )
        # A worker took it before the API gave up: it is being computed right now, and its answer is due.
        answer = await _pop(waiting, reply_to, PREDICT_GRACE_S)
    if answer is None:
        raise PredictTimeout(
            f"the predict worker computing the request did not answer within {timeout_s:g} s "
            f"(and {PREDICT_GRACE_S:g} s more)"
        )
    return answer


async def _wait_until(
    quick, waiting, request_id: str, reply_to: str, deadline: float, timeout_s: float, ahead_at_admission: int
) -> dict | None:
    """The answer, or None at the deadline, waited for RECHECK_S at a time. Until a worker takes the request, the
    estimate is made again each time: PredictBusy (the request withdrawn) when it says the answer would come after the
    deadline."""
    loop = asyncio.get_running_loop()
    pending = True
    while (left := deadline - loop.time()) > 0:
        answer = await _pop(waiting, reply_to, min(RECHECK_S, left))
        if answer is not None:
            return answer
        left = deadline - loop.time()
        if not pending or left <= 0:
            continue
        try:
            estimate = await recheck(quick, request_id, left, ahead_at_admission, timeout_s - left)
        except redis.RedisError as exc:
            raise broker_error(exc, "while waiting for the answer") from exc
        if estimate.state == 0:
            raise estimate.refusal(timeout_s, waited_s=timeout_s - left)
        pending = estimate.state == 1
    return None


async def _pop(client: redis.asyncio.Redis, reply_to: str, wait_s: float) -> dict | None:
    wait_s = max(wait_s, 0.01)  # BLPOP's 0 waits for ever
    try:
        popped = await client.blpop([reply_to], timeout=wait_s)
    except redis.RedisError as exc:
        raise broker_error(exc, f"while waiting up to {wait_s:.3g} s for the answer") from exc
    return None if popped is None else json.loads(popped[1])


PredictionRequester = Callable[[dict, float], Awaitable[dict]]


def get_prediction_requester() -> PredictionRequester:
    return request_prediction


PredictionRequesterDep = Annotated[PredictionRequester, Depends(get_prediction_requester)]


# --- the worker's side -----------------------------------------------------------------------------------------


def send_reply(reply_to: str, answer: dict, service_s: float | None = None) -> None:
    """The worker's half: push the answer where the API waits for it, and how long it took (``service_s``, the time a
    worker is busy with such a request, for the admission estimate; None: not a sample, e.g. a model was loaded)."""
    pipe = worker_client().pipeline(transaction=False).rpush(reply_to, json.dumps(answer)).expire(reply_to, REPLY_TTL_S)
    if service_s is not None:
        pipe.lpush(SERVICE_S, f"{service_s:.6f}").ltrim(SERVICE_S, 0, SERVICE_SAMPLES - 1)
        pipe.expire(SERVICE_S, SERVICE_SAMPLES_TTL_S)
    pipe.execute()
