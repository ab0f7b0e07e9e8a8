"""Admission to the predict queue, in Redis, so that every API process and predict worker sees the same: whether a
request can be answered in time, which requests are still waiting, and which a worker has taken.

- **Admission.** Before a request is sent, the API estimates its wait: the requests not yet taken by a worker
  (``cape:predict:pending``), over the live predict workers (``cape:predict:workers``, each pool process's heartbeat),
  times the mean time a worker took for its recent requests (``cape:predict:service_s``), plus one round for the
  requests in progress and its own. Over PREDICT_ADMIT_FRACTION of the API's wait, it is refused at once (PredictBusy:
  503 with Retry-After) instead of waiting its whole timeout for a 504. With no service time known yet, it is
  admitted. One Lua script counts, decides and enqueues, so two API processes never both take the last place, and
  every time in it is Redis's own clock (TIME): no two machines' clocks are compared. While it waits, every
  RECHECK_S, the estimate is made again (``recheck``) with the requests still ahead of it and the latest service
  times, and after OBSERVE_AFTER of its wait with the drain observed since its admission too: service times change
  under a burst (a training job beside the worker), and a request that can no longer be answered before its deadline
  is withdrawn then and refused the same way, rather than kept to the end of its wait for a 504.
- **Taking.** An admitted request's id is in ``cape:predict:pending`` until a worker takes it with ZREM (``take``: 1,
  it is the worker's; 0, the API gave up on it, and the worker drops it without computing it). The API that gives up
  removes it the same way (service/predict_queue.py). The entry of an API process that died is removed STALE_AFTER_S
  after its deadline.

Torch-free: the API's side is service/predict_queue.py, the worker's worker/prediction_task.py.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import redis
import redis.asyncio

from service.settings import get_settings

PENDING = "cape:predict:pending"  # sorted set: request id -> its deadline (Redis time), until a worker takes it
SERVICE_S = "cape:predict:service_s"  # list: how long a worker took for each of its latest requests, newest first
WORKERS = "cape:predict:workers"  # sorted set: predict pool process -> its last heartbeat (Redis time)

# Admission: a request is refused when its estimated wait is over this fraction of the API's wait. The rest is the
# margin for the spread of a sum of service times and for the API's own time before and after the wait.
PREDICT_ADMIT_FRACTION = 0.8
# The mean of this many latest service times. The mean, not the median: a queue drains in the sum of its service
# times, and on a busy machine (a training job beside the worker) they are skewed, a few slow ones among many fast,
# so the median underestimated the drain by a quarter (benchmarks/predict_load.py). A model's load is not a sample.
SERVICE_SAMPLES = 30
SERVICE_SAMPLES_TTL_S = 3600  # after an hour without a request the estimate starts afresh (admits until it knows)
# A predict pool process says it is alive this often; one silent for WORKER_WINDOW_S is not counted.
HEARTBEAT_S = 5.0
WORKER_WINDOW_S = 3 * HEARTBEAT_S
# While a request waits, its estimate is made again this often, until a worker takes it; after this fraction of its
# wait, with the drain observed since it was admitted too: the service times lag behind a sudden slow-down (a
# request that takes 5 s is one sample after 5 s), what the queue did meanwhile does not.
RECHECK_S = 1.0
OBSERVE_AFTER = 0.25
STALE_AFTER_S = 30.0  # a pending entry this long past its deadline belonged to an API process that died
# The quick commands (admission, re-check, withdrawal, the worker's) wait this long for the broker's answer; the
# BLPOPs' socket waits this much longer than the longest BLPOP.
BROKER_ANSWER_S = 2.0
SOCKET_MARGIN_S = 5.0
CONNECT_TIMEOUT_S = 1.0


class PredictBusy(RuntimeError):
    """Refused at once: the predict workers could not answer within the wait. ``retry_after_s``: when to try again."""

    def __init__(self, message: str, retry_after_s: int):
        super().__init__(message)
        self.retry_after_s = retry_after_s


# --- admission -------------------------------------------------------------------------------------------------

# What both scripts estimate, from KEYS (pending, service times, workers) and ARGV[3] (the worker window, s): Redis's
# time, the live workers (at least one) and the mean service time (-1: none known).
ESTIMATE_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now - tonumber(ARGV[3]))
local live = redis.call('ZCARD', KEYS[3])
local workers = math.max(1, live)
local samples = redis.call('LRANGE', KEYS[2], 0, -1)
local mean = -1
if #samples > 0 then
  local sum = 0
  for _, v in ipairs(samples) do sum = sum + tonumber(v) end
  mean = sum / #samples
end
"""

# ARGV: request id, the API's wait (s), worker window (s), admit fraction, stale after (s). Returns {1 admitted or 0
# refused, requests ahead, live workers, mean service time or -1, estimated wait}: numbers as strings (a Lua number
# comes back truncated to an integer).
ADMIT_SCRIPT = (
    ESTIMATE_LUA
    + """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - tonumber(ARGV[5]))
local ahead = redis.call('ZCARD', KEYS[1])
local wait = 0
if mean >= 0 then
  wait = (ahead / workers + 2) * mean
  if wait > tonumber(ARGV[4]) * tonumber(ARGV[2]) then
    return {0, ahead, workers, tostring(mean), tostring(wait)}
  end
end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
return {1, ahead, workers, tostring(mean), tostring(wait)}
"""
)

# ARGV: request id, the seconds left of its wait, worker window (s), requests ahead at its admission, seconds waited,
# 1 to count the drain observed since its admission too. Returns {state, requests ahead, live workers, mean service
# time, estimated wait}: state -1 a worker took it, 1 still pending, 0 withdrawn (it would be answered after its
# deadline), atomically, so that no worker takes it in between. The observed drain: the time waited per request
# taken from ahead of it (at least the whole wait when none was), for each still ahead and its own; used only with a
# live worker (without one, the request waits for its 504 that says no worker took it).
RECHECK_SCRIPT = (
    ESTIMATE_LUA
    + """
local ahead = redis.call('ZRANK', KEYS[1], ARGV[1])
if not ahead then return {-1, 0, workers, tostring(mean), '0'} end
local wait = 0
if mean >= 0 then wait = (ahead / workers + 2) * mean end
if ARGV[6] == '1' and live > 0 then
  local drained = math.max(1, tonumber(ARGV[4]) - ahead)
  wait = math.max(wait, (ahead + 1) * tonumber(ARGV[5]) / drained)
end
if wait > tonumber(ARGV[2]) then
  redis.call('ZREM', KEYS[1], ARGV[1])
  return {0, ahead, workers, tostring(mean), tostring(wait)}
end
return {1, ahead, workers, tostring(mean), tostring(wait)}
"""
)


@dataclass
class Estimate:
    state: int  # admission: 1 admitted, 0 refused; re-check: 1 still pending, 0 withdrawn, -1 taken by a worker
    ahead: int
    workers: int
    service_s: float | None  # the mean; None: not known yet
    wait_s: float  # the estimate (0 when not known)

    def refusal(self, timeout_s: float, waited_s: float | None = None) -> PredictBusy:
        """PredictBusy for a request whose estimated wait is over what it may wait: PREDICT_ADMIT_FRACTION of
        ``timeout_s`` at admission; what is left of it after ``waited_s`` at a re-check (then it is withdrawn)."""
        workers = f"{self.workers} worker{'s' if self.workers != 1 else ''}"
        if waited_s is None:
            allowed = PREDICT_ADMIT_FRACTION * timeout_s
            why = (
                f"{self.ahead} requests ahead at about {self.service_s:.2g} s each on {workers}, an answer in about "
                f"{self.wait_s:.1f} s"
            )
        else:
            allowed = timeout_s - waited_s
            why = (
                f"{self.ahead} requests still ahead after {waited_s:.1f} s on {workers}, an answer in about "
                f"{self.wait_s:.1f} s more; withdrawn, not computed"
            )
        retry = max(1, math.ceil(self.wait_s - allowed))  # by then that much more of the queue has drained
        return PredictBusy(
            f"predict workers busy: {why}, and a request waits at most {timeout_s:g} s; retry in {retry} s", retry
        )


def _estimate(reply: list) -> Estimate:
    state, ahead, workers, mean, wait = reply
    mean = float(mean)
    return Estimate(int(state), int(ahead), int(workers), None if mean < 0 else mean, float(wait))


async def admit(client: redis.asyncio.Redis, request_id: str, timeout_s: float) -> Estimate:
    """Enqueue ``request_id`` in the pending set if the workers can answer it within ``timeout_s``."""
    keys_and_args = (PENDING, SERVICE_S, WORKERS, request_id, timeout_s, WORKER_WINDOW_S, PREDICT_ADMIT_FRACTION)
    return _estimate(await client.eval(ADMIT_SCRIPT, 3, *keys_and_args, STALE_AFTER_S))


async def recheck(
    client: redis.asyncio.Redis, request_id: str, left_s: float, ahead_at_admission: int, waited_s: float
) -> Estimate:
    """Whether the pending ``request_id`` can still be answered within ``left_s``; withdrawn when not. The drain
    observed since its admission counts once it has waited OBSERVE_AFTER (of its whole wait, or 2 s at least)."""
    observe = waited_s >= max(2.0, OBSERVE_AFTER * (left_s + waited_s))
    keys_and_args = (PENDING, SERVICE_S, WORKERS, request_id, left_s, WORKER_WINDOW_S, ahead_at_admission, waited_s)
    return _estimate(await client.eval(RECHECK_SCRIPT, 3, *keys_and_args, int(observe)))


async def withdraw(client: redis.asyncio.Redis, request_id: str) -> bool:
    """Take the request back: True if no worker had taken it (and now none will)."""
    return bool(await client.zrem(PENDING, request_id))


# --- the worker's side ---------------------------------------------------------------------------------------


@lru_cache
def _worker_client(url: str) -> redis.Redis:
    # Quick commands only; the pool notices a fork, so each pool process gets its own connections.
    return redis.Redis.from_url(url, socket_connect_timeout=CONNECT_TIMEOUT_S, socket_timeout=BROKER_ANSWER_S)


def worker_client() -> redis.Redis:
    return _worker_client(get_settings().broker_url)


def take(request: dict) -> bool:
    """The worker's claim on a request: False when the API gave up on it (or its entry expired), so it must not be
    computed. A request without an id (sent by an API from before the pending set) is always taken."""
    if "request_id" not in request:
        return True
    return bool(worker_client().zrem(PENDING, request["request_id"]))


HEARTBEAT_SCRIPT = """
local t = redis.call('TIME')
redis.call('ZADD', KEYS[1], tonumber(t[1]) + tonumber(t[2]) / 1000000, ARGV[1])
"""


def heartbeat(name: str) -> None:
    """One predict pool process is alive (the admission counts those heard from within WORKER_WINDOW_S)."""
    worker_client().eval(HEARTBEAT_SCRIPT, 1, WORKERS, name)


def leave(name: str) -> None:
    worker_client().zrem(WORKERS, name)
