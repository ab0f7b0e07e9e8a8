"""The retry policy of a worker facing an outage (service/retry.py): what is tried again, for how long, what it says
when it gives up; which errors of the artifact store and the database count as an outage; and the API's 503 when the
store cannot be reached."""

from __future__ import annotations

import errno
import re
import time
import uuid

import pytest
from botocore.exceptions import ClientError, EndpointConnectionError
from sqlalchemy.exc import DBAPIError, IntegrityError, OperationalError

from devtools.local_servers import free_port
from service.artifacts import ArtifactStore, StoreUnavailable, _unreachable
from service.retry import Unavailable, database_down, persist
from tests.helpers import catalog_of, single


class Flaky:
    """A call that raises ``errors`` in turn, then returns "done"; counts its calls."""

    def __init__(self, *errors: Exception):
        self.errors, self.calls = list(errors), 0

    def __call__(self) -> str:
        self.calls += 1
        if self.errors:
            raise self.errors.pop(0)
        return "done"


def persisting(call, patience_s: float = 30.0):
    return persist(
        call,
        transient=lambda exc: isinstance(exc, ConnectionError),
        patience_s=patience_s,
        setting="CAPE_TEST_RETRY_S",
        what="test server at http://127.0.0.1:1",
        doing="pushing a file",
        unavailable=Unavailable,
    )


def test_transient_errors_are_tried_again_until_the_call_succeeds():
    call = Flaky(ConnectionRefusedError("refused"), ConnectionResetError("reset"))
    assert persisting(call) == "done"
    assert call.calls == 3


def test_any_other_error_is_raised_at_once():
    call = Flaky(PermissionError("access denied"))
    with pytest.raises(PermissionError):
        persisting(call)
    assert call.calls == 1


def test_patience_bounds_the_retries_and_the_message_says_what_failed():
    call = Flaky(*[ConnectionRefusedError(f"refused {i}") for i in range(100)])
    started = time.monotonic()
    with pytest.raises(Unavailable) as raised:
        persisting(call, patience_s=1.0)
    elapsed = time.monotonic() - started
    # Tries at 0, 0.5 and 1.5 s (the wait doubles from 0.5 s): the third one is past the patience.
    assert call.calls == 3 and 1.0 <= elapsed < 3.0
    assert re.fullmatch(
        r"test server at http://127\.0\.0\.1:1 unreachable for \d s \(CAPE_TEST_RETRY_S=1\): pushing a file failed "
        r"3 times; last error: ConnectionRefusedError: refused 2",
        str(raised.value),
    ), str(raised.value)
    assert isinstance(raised.value.__cause__, ConnectionRefusedError)


def test_what_counts_as_the_database_being_down():
    dropped = OperationalError("SELECT 1", {}, Exception("server closed the connection unexpectedly"))
    assert database_down(dropped)
    invalidated = DBAPIError("SELECT 1", {}, Exception("connection lost"), connection_invalidated=True)
    assert database_down(invalidated)
    assert not database_down(IntegrityError("INSERT", {}, Exception("duplicate key")))
    assert not database_down(ValueError("a bug"))


def client_error(status: int, code: str) -> ClientError:
    return ClientError({"Error": {"Code": code}, "ResponseMetadata": {"HTTPStatusCode": status}}, "PutObject")


def caused_by(error: Exception, cause: Exception) -> Exception:
    error.__cause__ = cause
    return error


@pytest.mark.parametrize(
    "error, unreachable",
    [
        (EndpointConnectionError(endpoint_url="http://127.0.0.1:1"), True),  # what a stopped moto server gives
        (ConnectionResetError("reset by peer"), True),
        (TimeoutError("read timed out"), True),
        (OSError(errno.EBUSY, "Please reduce your request rate."), True),  # s3fs's SlowDown, 503
        (OSError(errno.EREMOTEIO, "We encountered an internal error."), True),  # s3fs's 500
        (caused_by(OSError(errno.EIO, "Bad Gateway"), client_error(502, "502")), True),
        (FileNotFoundError("no such bucket"), False),
        (PermissionError("access denied"), False),
        (caused_by(OSError(errno.EIO, "odd"), client_error(400, "Odd")), False),
        (ValueError("a bug"), False),
    ],
)
def test_what_counts_as_the_store_being_unreachable(error, unreachable):
    assert _unreachable(error) == unreachable


def dead_store() -> ArtifactStore:
    """An S3 store whose endpoint nothing listens on, asked once per call (botocore's own retries off: fast)."""
    return ArtifactStore(
        "s3://cape/jobs",
        key="k",
        secret="s",
        client_kwargs={"endpoint_url": f"http://127.0.0.1:{free_port()}", "region_name": "us-east-1"},
        config_kwargs={"retries": {"total_max_attempts": 1}},
        skip_instance_cache=True,
    )


def test_a_store_that_cannot_be_reached_raises_store_unavailable_naming_it(tmp_path):
    store = dead_store()
    with pytest.raises(
        StoreUnavailable, match=r"^artifact store s3://cape/jobs at http://127\.0\.0\.1:\d+ unreachable"
    ):
        store.info(uuid.uuid4(), "log.txt")
    local = ArtifactStore(str(tmp_path))
    with pytest.raises(IsADirectoryError):  # a local store's own errors are no outage
        local.put_file(tmp_path, uuid.uuid4(), "log.txt")


def test_the_api_answers_503_while_the_store_cannot_be_reached(client, synthetic_root, monkeypatch):
    from service.routes import artifacts

    job_id = client.post("/jobs", json=single(catalog_of(synthetic_root))).json()["id"]
    monkeypatch.setattr(artifacts, "get_store", dead_store)
    response = client.get(f"/jobs/{job_id}/pictures")
    assert response.status_code == 503, response.text
    assert response.json() == {"detail": "artifact store unreachable, try again"}
    assert response.headers["retry-after"] == "5"
