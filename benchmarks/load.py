"""The job service under a mixed load of many clients while a worker trains: throughput, latency, and no lost data.

    .venv/bin/python -m benchmarks.load [--database sqlite|postgresql|both] [--clients 200] [--seconds 60]
                                        [--dataset_root DIR]

Starts the embedded-default stack on loopback (devtools/local_servers.py, as benchmarks/api.py does):
redis-server, the database (a SQLite file, or a throwaway PostgreSQL cluster), the Alembic migrations, one uvicorn
process and one Celery worker on the CPU; ``--database both`` (the default) runs the whole benchmark on SQLite, then
on PostgreSQL. Then:

1. a real training job (single_image, 10 one-image episodes per epoch, more epochs than the run lasts) is submitted
   and the load starts once the worker has written its first epoch, so that the worker writes ``epoch_metric`` rows,
   job progress and heartbeats during the whole load window;
2. ``--clients`` simulated clients (asyncio tasks, one keep-alive connection each, closed loop: the next request as
   soon as the previous answer is in, or after its ``Retry-After`` on a 503) run for a short warm-up and then,
   without a pause, ``--seconds`` measured seconds (a request counts if it was sent in the window). Each
   iteration a client, at random: submits a job (``POST /jobs``; some with a new ``Idempotency-Key``, some replaying
   the key and body of an earlier keyed submission, possibly one still in flight, which races it), or polls
   ``GET /jobs/{id}/metrics?after_epoch=<last seen>`` of a job it knows (mostly the training one), or reads
   ``GET /jobs?limit=20`` or ``GET /jobs/{id}``. Submitted jobs wait in the queue behind the training job;
3. afterwards every job still queued or running is cancelled through the API and awaited.

Reported: requests per second; p50/p99 latency overall and per request kind; 5xx responses (target 0); other
non-2xx by status; requests without an answer in 60 s (target 0); the CPU that uvicorn, the worker and the client
spent; whether the training job was still running at the end of the window (target: yes); and
integrity checks read from the database directly: (a) duplicated epoch rows, one GROUP BY (job_id, epoch);
(b) lost epoch rows: for each job, epochs 1..current_epoch all present, and every epoch a client saw through the
API still there (and every metrics answer contiguous from ``after_epoch``); (c) idempotency: one job per (owner,
Idempotency-Key), every answer for a key naming the same job, at most one 201 per key; (d) every job a 201 (or a
replay's 200) named is in the database. Targets: zero 5xx, zero lost, zero duplicated. Then, for the whole run,
uvicorn's access log by status and the most frequent exceptions in the API's and the worker's logs. The exit
status is 1 when any target is missed.

Closed-loop clients measure the service at saturation: with 200 clients, latency is mostly waiting in line
(Little's law: latency ~ clients / throughput). The client runs on the same machine and takes CPU from the servers
and the worker, as in benchmarks/api.py: the figures are for the whole machine.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import platform
import random
import re
import sys
import tempfile
import time
import uuid
from collections import Counter, defaultdict
from contextlib import AsyncExitStack, ExitStack
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import httpx
from sqlmodel import Session, func, select

from benchmarks.api import (
    api_server,
    cpu_seconds,
    database,
    percentile_ms,
    redis_server,
    require_binaries,
    service_env,
    single_image_job,
    verdict,
    worker,
)
from benchmarks.common import dataset_root
from cape.data.catalog import MP100Catalog
from devtools.local_servers import Server, pool_children
from service.db import make_engine
from service.models import TERMINAL, EpochMetric, Job, JobStatus

# The request mix, per iteration of a client: the rest of the draws poll metrics.
POST_SHARE, LIST_SHARE, GET_SHARE = 0.05, 0.10, 0.15
KEYED_SHARE, REPLAY_SHARE = 0.4, 0.2  # of the submissions: with a new Idempotency-Key, replaying an earlier one
TRAINING_POLL_SHARE = 0.7  # of the metrics polls: on the training job (the rows that grow), else on an own job

# The worker's job: 1000 epochs (the most a job may have) of 10 one-image episodes outlast any load window; it is
# cancelled when the load ends. Heartbeats every second (default 10 s) so that they too are written during the
# window: the trainer's epoch rows reset the heartbeat clock, and an epoch here is shorter than 10 s.
TRAINING_JOB = dict(epochs=1000, episodes_per_epoch=10, batch_size=1, num_queries_per_episode=1)
HEARTBEAT_INTERVAL_S = 1.0
# The clients' jobs: the smallest there is, in case the worker ever gets to one.
CLIENT_JOB = dict(epochs=1, episodes_per_epoch=1, batch_size=1, num_queries_per_episode=1)
CLIENT_CATEGORIES = 5  # the clients' jobs use the first few train categories, any of their images

WARMUP_S = 2.0  # opens the connections, the database pools and uvicorn's threads; not measured
REQUEST_TIMEOUT_S = 60.0  # a slow answer is measured as slow; only one slower than this counts as no answer
MAX_RETRY_AFTER_S = 5.0
FIRST_EPOCH_TIMEOUT_S = 300.0  # the worker imports torch on its first job

POST, POST_KEYED, POST_REPLAY = "POST /jobs", "POST /jobs, new Idempotency-Key", "POST /jobs, replayed key"
METRICS, LIST, GET = "GET /jobs/{id}/metrics?after_epoch", "GET /jobs?limit=20", "GET /jobs/{id}"
KINDS = (METRICS, GET, LIST, POST, POST_KEYED, POST_REPLAY)


# --- what the clients saw -------------------------------------------------------------------------------------


@dataclass
class Tally:
    latencies: list[float] = field(default_factory=list)  # seconds, of answered requests, whatever their status
    statuses: Counter = field(default_factory=Counter)
    no_answer: Counter = field(default_factory=Counter)  # exception name: time-out, reset, refused


@dataclass
class Observed:
    """Everything the clients were told, kept for the integrity checks (whether measured or in the warm-up)."""

    training: list[str]
    created: set[str] = field(default_factory=set)  # ids that a 201 named
    acknowledged: set[str] = field(default_factory=set)  # ids that a 201 or a replay's 200 named
    keys: dict[str, dict] = field(default_factory=dict)  # Idempotency-Key -> the body sent with it, from its first send
    key_answers: dict[str, list] = field(
        default_factory=lambda: defaultdict(list)
    )  # key -> [(status, id)], None id: no answer
    seen: dict[str, set] = field(default_factory=lambda: defaultdict(set))  # job id -> epochs a metrics answer listed
    broken_answers: list[str] = field(default_factory=list)  # metrics answers not contiguous from after_epoch
    racing_replays: int = 0  # replays sent before any request with their key had been answered
    tallies: dict[str, Tally] = field(default_factory=lambda: {kind: Tally() for kind in KINDS})
    measure_from: float = math.inf  # perf_counter: requests sent from then on are measured (the warm-up's are not)
    deadline: float = math.inf  # no request is sent after it


async def timed(observed: Observed, kind: str, send) -> httpx.Response | None:
    """One request, its latency and status put in the tally of its kind if it was sent in the measured window;
    None when no answer came."""
    tally = observed.tallies[kind]
    started = time.perf_counter()
    measured = started >= observed.measure_from
    try:
        response = await send()
    except httpx.HTTPError as exc:
        if measured:
            tally.no_answer[type(exc).__name__] += 1
        return None
    if measured:
        tally.latencies.append(time.perf_counter() - started)
        tally.statuses[response.status_code] += 1
    if response.status_code in (429, 503) and "Retry-After" in response.headers:
        # A polite client waits as told (seconds only, capped) instead of asking again at once.
        await asyncio.sleep(min(float(response.headers["Retry-After"]), MAX_RETRY_AFTER_S))
    return response


# --- the simulated clients ------------------------------------------------------------------------------------


class SimulatedClient:
    """One user of the API: submits jobs now and then and follows the metrics of the jobs it knows."""

    def __init__(self, http: httpx.AsyncClient, index: int, observed: Observed, images: dict[int, int]):
        self.http, self.observed, self.images = http, observed, images
        self.rng = random.Random(index)  # the same draws on every run
        self.index = index
        self.own: list[str] = []  # jobs this client submitted
        self.after_epoch: dict[str, int] = {}  # job id -> the last epoch this client has seen

    async def run(self) -> None:
        while time.perf_counter() < self.observed.deadline:
            draw = self.rng.random()
            if draw < POST_SHARE:
                await self.submit()
            elif draw < POST_SHARE + LIST_SHARE:
                await timed(self.observed, LIST, lambda: self.http.get("/jobs", params={"limit": 20}))
            elif draw < POST_SHARE + LIST_SHARE + GET_SHARE:
                job_id = self.pick_job()
                await timed(self.observed, GET, partial(self.http.get, f"/jobs/{job_id}"))
            else:
                await self.poll_metrics(self.pick_job())

    def pick_job(self) -> str:
        if not self.own or self.rng.random() < TRAINING_POLL_SHARE:
            return self.rng.choice(self.observed.training)
        return self.rng.choice(self.own)

    def new_body(self) -> dict:
        category = self.rng.choice(list(self.images))
        return single_image_job(
            category,
            image_index=self.rng.randrange(self.images[category]),
            seed=self.rng.randrange(2**31),
            **CLIENT_JOB,
        )

    async def submit(self) -> None:
        draw = self.rng.random()
        headers, key = {}, None
        if draw < REPLAY_SHARE and self.observed.keys:
            # Any client's key, possibly one whose first request is still in flight: then the two race for the
            # unique (owner, key) constraint, and the loser must answer with the winner's job.
            key = self.rng.choice(list(self.observed.keys))
            body, kind = self.observed.keys[key], POST_REPLAY
            self.observed.racing_replays += not self.observed.key_answers.get(key)
        elif draw < REPLAY_SHARE + KEYED_SHARE:
            key, body, kind = f"load-{self.index}-{uuid.uuid4()}", self.new_body(), POST_KEYED
            self.observed.keys[key] = body  # before sending: a replay may overtake it
        else:
            body, kind = self.new_body(), POST
        if key is not None:
            headers["Idempotency-Key"] = key
        response = await timed(self.observed, kind, lambda: self.http.post("/jobs", json=body, headers=headers))
        job_id = response.json()["id"] if response is not None and response.status_code in (200, 201) else None
        if key is not None:
            self.observed.key_answers[key].append((response.status_code if response is not None else None, job_id))
        if job_id is not None:
            self.observed.acknowledged.add(job_id)
            if response.status_code == 201:
                self.observed.created.add(job_id)
            if job_id not in self.own:
                self.own.append(job_id)

    async def poll_metrics(self, job_id: str) -> None:
        after = self.after_epoch.get(job_id, 0)
        response = await timed(
            self.observed, METRICS, lambda: self.http.get(f"/jobs/{job_id}/metrics", params={"after_epoch": after})
        )
        if response is None or response.status_code != 200:
            return
        epochs = [item["epoch"] for item in response.json()["items"]]
        # The worker commits epochs in order, so an answer is always the next run of epochs: a hole in it is a
        # row that was (at least for a while) invisible.
        if epochs != list(range(after + 1, after + 1 + len(epochs))):
            self.observed.broken_answers.append(f"job {job_id} after_epoch={after}: epochs {epochs[:5]}...")
        self.observed.seen[job_id].update(epochs)
        self.after_epoch[job_id] = response.json()["next_after_epoch"]


async def run_clients(
    base: str, count: int, seconds: float, observed: Observed, images: dict[int, int], on_start
) -> float:
    """The clients' loops, without a pause: a warm-up, then the measured window. Returns the measured time, from the
    window's start until the last of its requests ended. ``on_start`` (run in a thread) takes the window's snapshot."""
    # A client per connection, made before any clock starts: making one takes long enough to skew the window.
    limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
    async with AsyncExitStack() as stack:
        https = [
            await stack.enter_async_context(httpx.AsyncClient(base_url=base, limits=limits, timeout=REQUEST_TIMEOUT_S))
            for _ in range(count)
        ]
        clients = [SimulatedClient(http, i, observed, images) for i, http in enumerate(https)]

        async def window() -> None:
            # The warm-up opens the connections, the database pools and uvicorn's threads. The clients go on
            # without a pause into the measured window: a barrier between the two would send 200 requests at once.
            await asyncio.sleep(WARMUP_S)
            await asyncio.to_thread(on_start)
            observed.measure_from = time.perf_counter()
            observed.deadline = observed.measure_from + seconds

        await asyncio.gather(window(), *(client.run() for client in clients))
        return time.perf_counter() - observed.measure_from  # before the 200 clients are closed


# --- the worker's job and the end of the run ------------------------------------------------------------------


def start_training(base: str, database_url: str, category: int) -> str:
    """Submits the training job and waits for its first epoch row: from then on the worker writes all the time."""
    with httpx.Client(base_url=base, timeout=30) as client:
        job_id = client.post("/jobs", json=single_image_job(category, **TRAINING_JOB)).raise_for_status().json()["id"]
    deadline = time.monotonic() + FIRST_EPOCH_TIMEOUT_S
    while time.monotonic() < deadline:
        status, epoch = training_progress(database_url, job_id)
        if status in TERMINAL:
            raise RuntimeError(f"training job {job_id} ended ({status}) before the load started")
        if epoch >= 1:
            return job_id
        time.sleep(0.5)
    raise TimeoutError(f"training job {job_id} wrote no epoch in {FIRST_EPOCH_TIMEOUT_S:.0f} s")


def training_progress(database_url: str, job_id: str) -> tuple[str, int]:
    engine = make_engine(database_url)
    try:
        with Session(engine) as session:
            job = session.get(Job, uuid.UUID(job_id))
            return job.status, job.current_epoch
    finally:
        engine.dispose()


async def cancel_all(base: str, job_ids: list[str], connections: int = 8) -> Counter:
    """Cancels the jobs through the API, a few connections at once; returns the answers' statuses."""
    statuses: Counter = Counter()
    pending = list(job_ids)

    async def canceller(http: httpx.AsyncClient) -> None:
        while pending:
            job_id = pending.pop()
            try:
                statuses[(await http.post(f"/jobs/{job_id}/cancel")).status_code] += 1
            except httpx.HTTPError as exc:
                statuses[type(exc).__name__] += 1

    async with AsyncExitStack() as stack:
        https = [
            await stack.enter_async_context(httpx.AsyncClient(base_url=base, timeout=REQUEST_TIMEOUT_S))
            for _ in range(connections)
        ]
        await asyncio.gather(*(canceller(http) for http in https))
    return statuses


def wait_until_serving(base: str, timeout: float) -> float:
    """Seconds until the API answers a database read again: after an overload it may still be working through the
    requests of clients that gave up."""
    started = time.monotonic()
    with httpx.Client(base_url=base, timeout=10) as client:
        while time.monotonic() - started < timeout:
            try:
                if client.get("/jobs", params={"limit": 1}).status_code == 200:
                    return time.monotonic() - started
            except httpx.HTTPError:
                pass
            time.sleep(1)
    raise TimeoutError(f"the API answered no GET /jobs for {timeout:.0f} s after the load")


def wind_down(base: str, database_url: str, timeout: float = 300.0) -> str:
    """Cancels every job still queued or running (the clients' queued jobs, the training job) and waits until all
    are terminal, so that the worker trains nothing after the benchmark and the checks see final rows. Returns
    what happened; a wind-down that does not finish is reported, and the stack's shutdown stops the rest."""
    engine = make_engine(database_url)
    try:
        drained = wait_until_serving(base, timeout)
        with Session(engine) as session:
            active = [str(i) for i in session.exec(select(Job.id).where(Job.status.not_in(TERMINAL)))]
        statuses = asyncio.run(cancel_all(base, active))
        deadline = time.monotonic() + timeout
        while True:
            with Session(engine) as session:
                left = session.exec(select(func.count()).select_from(Job).where(Job.status.not_in(TERMINAL))).one()
            if left == 0:
                return (
                    f"API serving again {drained:.1f} s after the load; {len(active)} queued or running jobs "
                    f"cancelled (answers {dict(statuses)}), all terminal"
                )
            if time.monotonic() > deadline:
                return f"INCOMPLETE: {left} jobs still active {timeout:.0f} s after they were cancelled"
            time.sleep(0.2)
    except TimeoutError as exc:
        return f"INCOMPLETE: {exc}"
    finally:
        engine.dispose()


# --- integrity, read from the database ------------------------------------------------------------------------


def integrity(database_url: str, observed: Observed) -> dict[str, int]:
    """The checks (a) to (d) of the module docstring; every figure's target is 0."""
    engine = make_engine(database_url)
    try:
        with Session(engine) as session:
            duplicated = session.exec(
                select(EpochMetric.job_id, EpochMetric.epoch)
                .group_by(EpochMetric.job_id, EpochMetric.epoch)
                .having(func.count() > 1)
            ).all()
            rows = defaultdict(set)
            for job_id, epoch in session.exec(select(EpochMetric.job_id, EpochMetric.epoch)).all():
                rows[str(job_id)].add(epoch)
            jobs = {str(job.id): job for job in session.exec(select(Job))}
            key_counts = session.exec(
                select(Job.owner, Job.idempotency_key, func.count())
                .where(Job.idempotency_key.is_not(None))
                .group_by(Job.owner, Job.idempotency_key)
            ).all()
    finally:
        engine.dispose()

    gaps = sum(len(set(range(1, job.current_epoch + 1)) - rows[job_id]) for job_id, job in jobs.items())
    seen_lost = sum(len(epochs - rows[job_id]) for job_id, epochs in observed.seen.items())
    key_jobs = {key: job_id for job_id, job in jobs.items() if (key := job.idempotency_key) is not None}
    return {
        "(a) duplicated (job_id, epoch) rows": len(duplicated),
        "(b) missing epochs in 1..current_epoch": gaps,
        "(b) epochs seen through the API, not in the database": seen_lost,
        "(b) metrics answers with a hole": len(observed.broken_answers),
        "(c) (owner, key) with more than one job": sum(1 for *_, count in key_counts if count > 1),
        "(c) keys answered with different jobs": sum(
            1 for answers in observed.key_answers.values() if len({job for _, job in answers if job}) > 1
        ),
        "(c) keys answered 201 more than once": sum(
            1 for answers in observed.key_answers.values() if sum(status == 201 for status, _ in answers) > 1
        ),
        "(c) keys whose job in the database is not the one answered": sum(
            1
            for key, answers in observed.key_answers.items()
            if any(job and key_jobs.get(key) != job for _, job in answers)
        ),
        "(d) acknowledged jobs not in the database": len(observed.acknowledged - set(jobs)),
    } | {
        "_jobs in the database that no answer named": len(set(jobs) - observed.acknowledged - set(observed.training)),
        "_replays sent while their key's first request was in flight": observed.racing_replays,
        "_epoch rows": sum(len(epochs) for epochs in rows.values()),
    }


# --- report ---------------------------------------------------------------------------------------------------


def report_load(observed: Observed, elapsed: float, cpu: dict[str, float]) -> Tally:
    """Prints the per-kind table and where the CPU went; returns the tally of all kinds together."""
    print(f"  {'request':<38} {'req/s':>7} {'p50 ms':>8} {'p99 ms':>8} {'5xx':>5}  other non-2xx   no answer")
    everything = Tally()
    for kind in KINDS:
        tally = observed.tallies[kind]
        everything.latencies += tally.latencies
        everything.statuses += tally.statuses
        everything.no_answer += tally.no_answer
        print_row(kind, tally, elapsed)
    print_row("all", everything, elapsed)
    requests = len(everything.latencies)
    per_request = (
        f"uvicorn {1000 * cpu['server'] / requests:.2f} ms, client {1000 * cpu['client'] / requests:.2f} ms"
        if requests
        else "n/a (no answers)"
    )
    print(
        f"  CPU per answered request: {per_request}; share of a core: uvicorn {cpu['server'] / elapsed:.0%}, "
        f"worker {cpu['worker'] / elapsed:.0%}, client {cpu['client'] / elapsed:.0%}"
    )
    return everything


def print_row(name: str, tally: Tally, elapsed: float) -> None:
    fives = sum(count for status, count in tally.statuses.items() if status >= 500)
    others = ", ".join(
        f"{status}: {count}"
        for status, count in sorted(tally.statuses.items())
        if not 200 <= status < 300 and status < 500
    )
    missing = ", ".join(f"{name}: {count}" for name, count in tally.no_answer.items())
    print(
        f"  {name:<38} {len(tally.latencies) / elapsed:>7.1f} {percentile_ms(tally.latencies, 0.50):>8.1f} "
        f"{percentile_ms(tally.latencies, 0.99):>8.1f} {fives:>5}  {others or '-':<13}  {missing or '-'}"
    )


def report_integrity(figures: dict[str, int]) -> int:
    """Prints the checks with their target; returns how many missed it."""
    missed = 0
    for name, value in figures.items():
        if name.startswith("_"):  # for information: no target
            print(f"  {name[1:]:<62} {value:>6}")
            continue
        missed += value != 0
        print(f"  {name:<62} {value:>6}   (target 0: {verdict(value == 0)})")
    return missed


EXCEPTION_LINE = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Timeout)\w*(: |$)")


def log_exceptions(log: Path, limit: int = 3) -> list[str]:
    """The most frequent exceptions in a server's or worker's log, with their counts: what went wrong inside,
    whatever the clients saw. The last line of a traceback is the exception and its message."""
    lines = log.read_text(errors="replace").splitlines()
    counts = Counter(line[:200] for line in lines if EXCEPTION_LINE.match(line))
    return [f"{count} x {line}" for line, count in counts.most_common(limit)]


ACCESS_LINE = re.compile(r'" (\d{3}) ')


def access_statuses(log: Path) -> Counter:
    """uvicorn's access log by status, for the whole run: it also lists the answers that came after the client
    had given up waiting."""
    return Counter(
        int(m.group(1))
        for line in log.read_text(errors="replace").splitlines()
        if "HTTP/1.1" in line and (m := ACCESS_LINE.search(line))
    )


# --- main -----------------------------------------------------------------------------------------------------


def worker_cpu(server: Server) -> float:
    """CPU of the worker's main process and its pool child (which trains)."""
    return sum(cpu_seconds(pid) for pid in [server.pid, *pool_children(server.pid)])


def run_on(kind: str, root: Path, category: int, images: dict[int, int], clients: int, seconds: float) -> int:
    """The whole benchmark on one database; returns the number of missed targets."""
    print(f"\n=== {kind}: {clients} clients, {WARMUP_S:g} s warm-up + {seconds:g} s measured")
    with tempfile.TemporaryDirectory(prefix="cape-bench-load-") as tmp_name, ExitStack() as stack:
        tmp = Path(tmp_name)
        broker_url = stack.enter_context(redis_server(tmp)).url
        database_url = stack.enter_context(database(kind, tmp))
        env = service_env(database_url, broker_url, root, tmp) | {
            "CAPE_HEARTBEAT_INTERVAL_S": str(HEARTBEAT_INTERVAL_S)
        }
        api = stack.enter_context(api_server(env, tmp / "api.log"))
        base = api.url
        training_worker = stack.enter_context(worker(env, tmp / "worker.log", name="load"))
        training = start_training(base, database_url, category)
        observed = Observed(training=[training])

        snapshot = {}

        def on_start() -> None:  # the measured window starts: where the training job and the CPU clocks are
            snapshot["epoch"] = training_progress(database_url, training)[1]
            snapshot["cpu"] = {
                "server": cpu_seconds(api.pid),
                "worker": worker_cpu(training_worker),
                "client": time.process_time(),
            }

        elapsed = asyncio.run(run_clients(base, clients, seconds, observed, images, on_start))
        cpu = {"server": cpu_seconds(api.pid), "worker": worker_cpu(training_worker), "client": time.process_time()}
        cpu = {name: value - snapshot["cpu"][name] for name, value in cpu.items()}
        status, epoch = training_progress(database_url, training)

        print(f"load, {elapsed:.1f} s measured (from the window's start until its last request ended):")
        everything = report_load(observed, elapsed, cpu)
        busy = status == JobStatus.running
        print(
            f"  worker during the window: training job {status}, epochs {snapshot['epoch']} -> {epoch} "
            f"({(epoch - snapshot['epoch']) / elapsed:.2f} epoch rows/s; target: still running at the end: "
            f"{verdict(busy)})"
        )
        fives = {code: count for code, count in sorted(everything.statuses.items()) if code >= 500}
        unanswered = sum(everything.no_answer.values())
        by_status = f" {fives}" if fives else ""
        print(
            f"  5xx answers: {sum(fives.values())}{by_status} (target 0: {verdict(not fives)}); requests without an "
            "answer in "
            f"{REQUEST_TIMEOUT_S:.0f} s: {unanswered} (target 0: {verdict(unanswered == 0)})"
        )

        ended = wind_down(base, database_url)
        print(f"wind-down: {ended}")
        print(
            f"integrity ({len(observed.created)} jobs created by 201, {len(observed.key_answers)} Idempotency-Keys "
            f"sent {sum(map(len, observed.key_answers.values()))} times):"
        )
        missed = report_integrity(integrity(database_url, observed))
        missed += bool(fives) + (unanswered != 0) + (not busy) + ended.startswith("INCOMPLETE")
        print(
            f"uvicorn's access log, whole run (warm-up, wind-down and abandoned requests included): "
            f"{dict(sorted(access_statuses(tmp / 'api.log').items()))}"
        )
        for name in ("api.log", "worker.log"):
            for line in log_exceptions(tmp / name):
                print(f"  {name}: {line}")
        for line in observed.broken_answers[:5]:
            print(f"  hole: {line}")
    return missed


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--database", choices=["sqlite", "postgresql", "both"], default="both")
    parser.add_argument("--clients", type=int, default=200)
    parser.add_argument("--seconds", type=float, default=60.0, help="length of the measured load window")
    parser.add_argument(
        "--dataset_root", default=None, help="synthetic dataset; generated into data/synthetic when unset and absent"
    )
    return parser.parse_args()


def main() -> int:
    args = parse_args()
    root = dataset_root(args.dataset_root)
    catalog = MP100Catalog(root)
    categories = catalog.category_ids("train")
    images = {c: catalog.instance_counts(c)["train"] for c in categories[:CLIENT_CATEGORIES]}
    print(
        f"load benchmark: {args.clients} clients, {args.seconds:g} s, {os.cpu_count()} cores "
        f"({platform.processor() or platform.machine()}), one uvicorn process, one Celery worker (cpu) training, "
        f"client on the same machine; dataset {root}, training category {categories[0]}"
    )
    kinds = ["sqlite", "postgresql"] if args.database == "both" else [args.database]
    require_binaries(kinds)
    missed = sum(run_on(kind, root, categories[0], images, args.clients, args.seconds) for kind in kinds)
    print(f"\n{'all targets met' if missed == 0 else f'{missed} targets MISSED'}")
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
