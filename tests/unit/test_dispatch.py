"""service/dispatch.py against a real redis-server that stops answering (SIGSTOP: its port still accepts
connections): the job's message is not sent, and the caller learns so in seconds, not never."""

from __future__ import annotations

import os
import signal
import time
import uuid

from service.dispatch import dispatch
from tests.helpers import RestartableRedis, reset_service_caches


def test_a_broker_that_does_not_answer_fails_a_dispatch_in_seconds(tmp_path, monkeypatch):
    with RestartableRedis(tmp_path) as broker:
        monkeypatch.setenv("CAPE_BROKER_URL", broker.url)
        reset_service_caches()
        assert dispatch(uuid.uuid4()), "sent while the broker answers"
        os.kill(broker.process.pid, signal.SIGSTOP)
        try:
            started = time.monotonic()
            sent = dispatch(uuid.uuid4())
            took = time.monotonic() - started
        finally:
            os.kill(broker.process.pid, signal.SIGCONT)
    reset_service_caches()
    assert not sent, "a message to a broker that does not answer is not sent"
    assert took < 10, f"the caller waited {took:.1f} s"
