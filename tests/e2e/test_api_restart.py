"""The API restarted mid-job while 100 clients follow the job's event stream: stopped as a deploy does (SIGTERM:
it must stop promptly, open streams and all) or as a crash does (SIGKILL), then started again on the same port (real
uvicorn, redis-server, a Celery worker, SQLite). Each client reconnects as a browser's EventSource does, with
Last-Event-ID, and in the end has had every epoch once, in order, and the `end`.

SQLite only: nothing here is the database's. The database stays up; what a reconnection reads is the one statement
(service.epoch_rows) that test_events.py checks on both databases' drivers, and the new API's one feed reads it once
for all 100 clients.
"""

from __future__ import annotations

import signal
import subprocess
import threading
import time
from contextlib import suppress
from functools import partial

import httpx
import pytest

from devtools import local_servers
from tests.helpers import (
    REPO,
    catalog_of,
    epochs_lost_and_repeated,
    free_port,
    report_fault,
    single_image,
    sqlite_stack,
    sse_events,
    wait_until,
)

CLIENTS = 100
EPOCHS = 6
# EventSource's reconnection time: the server sends no `retry:`, and browsers wait a few seconds by default; shorter
# here, and the same for every client, so that they all come back at once.
RECONNECT_S = 0.5
TIMEOUT_S = 180  # for the whole job, and for each client to have its `end`
STOP_S = 5.0  # the old API's graceful shutdown, open streams and all


class Follower:
    """One client following the job in a thread, as a browser's EventSource does: a dropped or refused connection is
    tried again after RECONNECT_S with Last-Event-ID, the last id it received; a 503 after its Retry-After, as the
    page does (service/static/api.js followJob). It stops at `end`. Epochs are recorded as they came, not
    deduplicated: a repeat is what the test looks for."""

    def __init__(self, base: str, job_id: str) -> None:
        self.epochs: list[int] = []
        self.connections: list[list[int]] = []  # the epochs of each stream the server answered, in turn
        self.end: dict | None = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, args=(base, f"/jobs/{job_id}/events"), daemon=True)
        self.thread.start()

    def _run(self, base: str, path: str) -> None:
        try:
            self._follow(base, path)
        except BaseException as exc:  # the test raises it: a thread's own exception would only be printed
            self.error = exc

    def _follow(self, base: str, path: str) -> None:
        last_id, deadline = None, time.monotonic() + TIMEOUT_S
        with httpx.Client(base_url=base, timeout=httpx.Timeout(30, connect=5)) as client:
            while time.monotonic() < deadline:
                wait = RECONNECT_S
                headers = {} if last_id is None else {"Last-Event-ID": last_id}
                try:
                    with client.stream("GET", path, headers=headers) as response:
                        if response.status_code == 503:
                            wait = float(response.headers["Retry-After"])
                        else:
                            assert response.status_code == 200, (response.status_code, response.read())
                            received: list[int] = []
                            self.connections.append(received)
                            for event in sse_events(response.iter_lines()):
                                last_id = event.get("id", last_id)
                                if event.get("event") == "epoch":
                                    received.append(event["data"]["epoch"])
                                    self.epochs.append(event["data"]["epoch"])
                                elif event.get("event") == "end":
                                    self.end = event["data"]
                                    return
                except httpx.TransportError:  # refused, reset, or cut mid-event: EventSource reconnects
                    pass
                time.sleep(wait)
        raise TimeoutError(f"no `end` within {TIMEOUT_S} s; epochs {self.epochs}")


@pytest.fixture(scope="module")
def stack(tmp_path_factory, synthetic_root):
    """redis-server, SQLite and a training worker, for both tests: each starts, and restarts, an API of its own."""
    with sqlite_stack(tmp_path_factory.mktemp("stack"), {"synthetic": synthetic_root}, api=False) as stack:
        yield stack


@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGKILL], ids=["deploy", "crash"])
def test_every_client_has_every_epoch_once_across_an_api_restart(stack, synthetic_root, tmp_path, stop):
    category = catalog_of(synthetic_root).category_ids("train")[0]
    # The new API takes the old one's port, as behind a proxy or at a service's address.
    api = partial(local_servers.uvicorn_server, stack.env, port=free_port(), cwd=REPO)
    with api(log=tmp_path / "api-before.log") as before:
        job = httpx.post(f"{before.url}/jobs", json=single_image(category, epochs=EPOCHS), timeout=30).json()
        followers = [Follower(before.url, job["id"]) for _ in range(CLIENTS)]
        wait_until(
            lambda: all(len(f.epochs) >= 2 or not f.thread.is_alive() for f in followers),
            f"every client's epoch 2 of job {job['id']}",
            timeout=120,
        )
        restarted = time.monotonic()
        before.process.send_signal(stop)
        with suppress(subprocess.TimeoutExpired):  # asserted after the report; leaving the block kills it
            before.process.wait(2 * STOP_S)
        stopped_in = time.monotonic() - restarted
    with api(log=tmp_path / "api-after.log") as after:
        outage = time.monotonic() - restarted
        wait_until(lambda: not any(f.thread.is_alive() for f in followers), "every client's end", timeout=TIMEOUT_S)
        job = httpx.get(f"{after.url}/jobs/{job['id']}", timeout=30).json()
    counts = [epochs_lost_and_repeated(f.epochs, EPOCHS) for f in followers]
    report_fault(
        f"API restarted ({stop.name}) under {CLIENTS} event streams",
        outage,
        1,
        job["status"] == "succeeded",
        sum(lost for lost, _ in counts),  # epoch events, summed over the clients
        sum(repeated for _, repeated in counts),
    )
    for follower in followers:
        if follower.error is not None:
            raise follower.error
    assert job["status"] == "succeeded", job
    assert stopped_in < STOP_S, f"the old API took {stopped_in:.1f} s to stop"
    for follower in followers:
        assert follower.epochs == list(range(1, EPOCHS + 1)), follower.connections
        assert follower.end == {"status": "succeeded"}
        # Mid-job for every client: epochs on a stream before the restart and on one after it.
        assert follower.connections[0] and any(follower.connections[1:]), follower.connections
