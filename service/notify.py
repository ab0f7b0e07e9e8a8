"""Wake-ups for the event streams: "job X changed, look at the database" over Redis pub/sub.

A message carries only a job id: the database stays the source of truth, and a lost message costs a stream nothing
but latency (the streams re-read it at a slow interval anyway). So publishing is best effort, after the commit: with
Redis down it logs and returns (a refused connection fails at once; a broker that does not answer costs at most
PUBLISH_TIMEOUT_S a try).

``publish`` is for the writer (job_state's transitions: sync code in workers and the API's threads); ``Listener`` is
the API process's one subscription, which hands each job id to the streams waiting on it.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Callable
from functools import lru_cache, wraps

import redis
import redis.asyncio
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import NoBackoff
from redis.retry import Retry

from service.settings import get_settings

CHANNEL = "cape:job-changed"
log = logging.getLogger(__name__)

# A publish waits this long at most for a broker that does not answer: a worker's epoch or a cancel request must not
# hang on a wake-up.
PUBLISH_TIMEOUT_S = 0.5
# The listener's reconnection delays: short first, so a Redis restart costs streams little, then backing off so an
# outage costs the API nothing.
RECONNECT_FIRST_S, RECONNECT_MAX_S = 0.2, 5.0
# The subscription's liveness: after KEEPALIVE_S without a message it sends a PING, and a connection that has not
# answered within KEEPALIVE_S more is dead (the broker's host gone without closing it, a frozen broker): reconnect.
KEEPALIVE_S = 10.0
# The listener's commands (the connection's handshake, SUBSCRIBE): its reads of messages set their own timeout.
LISTENER_COMMAND_TIMEOUT_S = 5.0


@lru_cache
def _client(url: str) -> redis.Redis:
    # One retry, no back-off: after a Redis restart the pooled connection is dead and the retry reconnects; with
    # Redis down it fails at once. (The pool notices a fork, so a Celery pool process gets its own connections.)
    return redis.Redis.from_url(
        url, socket_connect_timeout=PUBLISH_TIMEOUT_S, socket_timeout=PUBLISH_TIMEOUT_S, retry=Retry(NoBackoff(), 1)
    )


_broker_down = False  # logged once per outage, not at every publish


def publish(job_id: uuid.UUID | str) -> None:
    """Tell every API process that the job changed. Call it after the change is committed."""
    global _broker_down
    try:
        _client(get_settings().broker_url).publish(CHANNEL, str(job_id))
    except redis.RedisError as exc:
        if not _broker_down:
            log.warning("job wake-ups not published, broker unreachable (streams fall back to re-reading): %s", exc)
        _broker_down = True
        return
    if _broker_down:
        log.info("job wake-ups published again")
    _broker_down = False


def publishes(transition: Callable) -> Callable:
    """Decorates a job_state transition ``f(session, job_id, ...)`` that commits: publishes ``job_id`` after it."""

    @wraps(transition)
    def published(session, job_id, *args, **kwargs):
        result = transition(session, job_id, *args, **kwargs)
        publish(job_id)
        return result

    return published


class Listener:
    """The API process's single subscription (one Redis connection however many streams are open).

    ``on_job(job_id)`` runs on the event loop for each message; ``on_connected()`` after each (re)connection, since
    anything published while the connection was down was lost: the streams must look at the database again.

    Each read of it waits ``keepalive_s`` at most, a timeout of its own, never the client's ``socket_timeout``:
    redis-py 8 gives every client a 5 s default, and whether a pub/sub read obeys it has changed between versions
    (8.2's ``listen()`` opts out; one that obeyed would drop an idle subscription, and wake every stream, at each 5 s
    of silence); and a read with no timeout at all, as ``listen()``'s now is, never notices a dead connection. After
    a silent ``keepalive_s`` it pings, and a ping unanswered for another ``keepalive_s`` ends the connection.
    """

    def __init__(
        self,
        url: str,
        on_job: Callable[[uuid.UUID], None],
        on_connected: Callable[[], None],
        keepalive_s: float = KEEPALIVE_S,
    ) -> None:
        self.url, self.on_job, self.on_connected, self.keepalive_s = url, on_job, on_connected, keepalive_s
        self.connected = asyncio.Event()  # for tests and benchmarks: the subscription is live
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="job wake-ups")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _run(self) -> None:
        delay, reported = RECONNECT_FIRST_S, False
        while True:
            try:
                await self._listen()
            except (redis.RedisError, OSError) as exc:
                if self.connected.is_set():
                    delay, reported = RECONNECT_FIRST_S, False
                if not reported:
                    log.warning("job wake-ups: no broker (%s); streams re-read at their slow interval", exc)
                    reported = True
                self.connected.clear()
            await asyncio.sleep(delay)
            delay = min(2 * delay, RECONNECT_MAX_S)

    async def _listen(self) -> None:
        # No retries inside redis-py: every disconnection comes here, so a reconnection always wakes the streams.
        client = redis.asyncio.Redis.from_url(
            self.url,
            socket_connect_timeout=1,
            socket_timeout=LISTENER_COMMAND_TIMEOUT_S,
            retry=AsyncRetry(NoBackoff(), 0),
        )
        try:
            async with client.pubsub() as pubsub:
                await pubsub.subscribe(CHANNEL)
                self.connected.set()
                self.on_connected()
                pinged = False
                while True:
                    message = await pubsub.get_message(timeout=self.keepalive_s)  # None: nothing in that time
                    if message is None:
                        if pinged:
                            raise redis.TimeoutError(f"no answer to a PING within {self.keepalive_s:g} s")
                        await pubsub.ping()
                        pinged = True
                        continue
                    pinged = False  # anything heard (a message, the subscription's confirmation, a PONG) is a life sign
                    if message["type"] != "message":
                        continue
                    try:
                        job_id = uuid.UUID(message["data"].decode())
                    except (ValueError, AttributeError, UnicodeDecodeError):
                        continue  # not ours
                    self.on_job(job_id)
        finally:
            await client.aclose()
