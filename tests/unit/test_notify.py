"""service/notify.py's Listener (the API's one subscription for the event streams) against a real redis-server: it
stays subscribed through silence longer than redis-py's default socket timeout (5 s), and it still notices a
connection that no longer answers (a frozen broker), reconnecting when the broker is back."""

from __future__ import annotations

import asyncio
import os
import signal
import time
import uuid

import pytest
import redis

from service import notify
from tests.helpers import RestartableRedis


@pytest.fixture(scope="module")
def broker(tmp_path_factory):
    with RestartableRedis(tmp_path_factory.mktemp("redis")) as server:
        yield server


async def until(condition, timeout: float) -> float:
    started = time.monotonic()
    while not condition():
        assert time.monotonic() - started < timeout, "timed out"
        await asyncio.sleep(0.05)
    return time.monotonic() - started


def test_the_subscription_survives_silence_longer_than_the_default_socket_timeout(broker):
    async def scenario():
        jobs, connections = [], []
        listener = notify.Listener(broker.url, jobs.append, lambda: connections.append(time.monotonic()))
        listener.start()
        try:
            await asyncio.wait_for(listener.connected.wait(), 10)
            await asyncio.sleep(6.5)  # nothing published: more than redis-py's 5 s, less than KEEPALIVE_S
            job = uuid.uuid4()
            with redis.Redis.from_url(broker.url) as client:
                client.publish(notify.CHANNEL, str(job))
            await until(lambda: jobs, 5)
            return jobs, connections
        finally:
            await listener.stop()

    jobs, connections = asyncio.run(scenario())
    assert len(jobs) == 1 and len(connections) == 1  # one connection all along: no reconnection woke the streams


def test_a_connection_that_stops_answering_is_noticed_and_replaced(broker):
    async def scenario():
        jobs, connections = [], []
        listener = notify.Listener(broker.url, jobs.append, lambda: connections.append(1), keepalive_s=0.5)
        listener.start()
        try:
            await asyncio.wait_for(listener.connected.wait(), 10)
            await asyncio.sleep(1.5)  # pings answered: still the first connection
            assert len(connections) == 1
            os.kill(broker.process.pid, signal.SIGSTOP)  # the connection stays open; nothing answers on it
            try:
                noticed = await until(lambda: not listener.connected.is_set(), 5)
            finally:
                os.kill(broker.process.pid, signal.SIGCONT)
            await asyncio.wait_for(listener.connected.wait(), 15)
            job = uuid.uuid4()
            with redis.Redis.from_url(broker.url) as client:
                client.publish(notify.CHANNEL, str(job))
            await until(lambda: jobs, 5)
            return noticed, jobs, connections
        finally:
            await listener.stop()

    noticed, jobs, connections = asyncio.run(scenario())
    assert noticed <= 1.5  # the unanswered PING: within two keep-alive intervals
    assert len(connections) == 2 and len(jobs) == 1
