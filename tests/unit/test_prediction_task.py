"""The predict worker's task in-process, its Redis calls replaced: what it answers when the artifact store is down,
and that a request the API gave up on is not computed."""

from __future__ import annotations

import uuid

import pytest

from service.artifacts import StoreUnavailable
from worker import prediction_task

REQUEST = {"request_id": "r1", "job_id": str(uuid.uuid4()), "checkpoint": "best", "reply_to": "cape:predict:reply:r1"}


@pytest.fixture
def replies(monkeypatch):
    sent = []
    monkeypatch.setattr(prediction_task, "take", lambda request: True)
    monkeypatch.setattr(prediction_task, "send_reply", lambda reply_to, answer, service_s=None: sent.append(answer))
    return sent


def test_a_store_that_cannot_be_reached_is_a_503_to_try_again(replies, monkeypatch):
    def store_down(job_id, name):
        raise StoreUnavailable("artifact store s3://b/p at http://127.0.0.1:1 unreachable: EndpointConnectionError")

    monkeypatch.setattr(prediction_task, "checkpoint_copy", store_down)
    prediction_task.answer_prediction(REQUEST)
    assert replies == [{"status": 503, "detail": "artifact store unreachable, try again"}]


def test_a_request_the_api_gave_up_on_is_neither_computed_nor_answered(replies, monkeypatch):
    monkeypatch.setattr(prediction_task, "take", lambda request: False)
    monkeypatch.setattr(prediction_task, "_answer", lambda request: pytest.fail("computed"))
    prediction_task.answer_prediction(REQUEST)
    assert replies == []
