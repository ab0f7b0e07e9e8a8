"""Many Server-Sent Event streams on one API process while a worker trains: every epoch to every stream, how fast,
and what the streams cost the API.

    .venv/bin/python -m benchmarks.streams [--streams 500] [--epochs 30] [--idle_seconds 30] [--dataset_root DIR]

Starts the embedded-default stack on loopback (devtools/local_servers.py, as benchmarks/api.py does): redis-server,
a SQLite file, the Alembic migrations and one uvicorn process. Then:

1. a real single_image job (``--epochs`` epochs of two one-image episodes) is submitted; no worker runs yet, so it
   waits in the queue;
2. the API's CPU is read for a few seconds with no stream open; then ``--streams`` clients open
   ``GET /jobs/{id}/events`` at once (one asyncio process: raw sockets, httptools, uvloop, as
   benchmarks/http_load.py) and receive the job's first ``status``;
3. idle: for ``--idle_seconds`` the streams stay open on the queued job; the API's CPU (from /proc/<pid>/stat) and
   memory (RSS) are read;
4. one Celery worker starts (CPU), takes the job and trains it to the end while the streams follow; each stream ends
   with the server's ``end`` event.

Reported: for every stream, the epochs it received against 1..epochs (target: zero streams with a missing,
repeated or out-of-order epoch, and every stream ended by ``end``); commit -> client latency of every epoch on
every stream, p50 / p99 / max (target: p99 < 1 s), where the commit time is the row's ``created_at``, stamped by the
worker just before its insert, so the figure includes the commit itself; the API's CPU, in % of one core, while the
streams idle (target: < 1 %; beside it, the same process before any stream opened) and while the job trains (no
target: shown with the CPU per epoch for all the streams), and its RSS before the streams, with them open and at
the end.

The client, the worker and the API share the machine's cores: the latencies are for the whole machine, client
included, and the client's CPU is printed beside the API's.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import resource
import tempfile
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from datetime import datetime
from functools import partial
from pathlib import Path
from urllib.parse import urlsplit

import httptools
import httpx
import uvloop

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

P99_TARGET_MS, IDLE_CPU_TARGET = 1000.0, 1.0  # % of one core
BASELINE_S = 10.0  # the API's CPU with no stream open, for comparison
# Two one-image episodes and one validation query an epoch: short epochs, so that many come while the streams are
# open and the whole job takes minutes, not hours, on a CPU.
JOB = dict(episodes_per_epoch=2, batch_size=1, num_queries_per_episode=1, val_queries_per_episode=1)


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


# --- one stream -----------------------------------------------------------------------------------------------


@dataclass
class Stream:
    """What one client received."""

    statuses: int = 0
    pings: int = 0
    epochs: list[int] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)  # seconds, row created_at -> received here
    ended: bool = False  # the server's `end` event
    http_status: int | None = None
    error: str | None = None


class _Client(asyncio.Protocol):
    """An SSE client on one connection: httptools undoes the chunked encoding, events are split on blank lines."""

    def __init__(self, stream: Stream, first_status: asyncio.Event, closed: asyncio.Event, commits: dict) -> None:
        self.stream, self.first_status, self.closed, self.commits = stream, first_status, closed, commits
        self.parser = httptools.HttpResponseParser(self)
        self.buffer = b""
        self.received_at = 0.0

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.stream.ended and self.stream.error is None:
            self.stream.error = f"connection lost: {exc!r}"
        self.closed.set()

    def data_received(self, data: bytes) -> None:
        self.received_at = time.time()  # the same clock as the rows' created_at: one machine
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self.stream.error = repr(exc)

    def on_headers_complete(self) -> None:
        self.stream.http_status = self.parser.get_status_code()

    def on_body(self, body: bytes) -> None:
        self.buffer += body
        *events, self.buffer = self.buffer.split(b"\n\n")
        for event in events:
            self._event(event)

    def on_message_complete(self) -> None:
        self.closed.set()

    def _event(self, raw: bytes) -> None:
        fields = dict(line.split(b": ", 1) if b": " in line else (line, b"") for line in raw.split(b"\n"))
        kind = fields.get(b"event")
        if kind == b"epoch":
            row = json.loads(fields[b"data"])
            epoch = row["epoch"]
            if epoch not in self.commits:
                self.commits[epoch] = datetime.fromisoformat(row["created_at"]).timestamp()
            self.stream.epochs.append(epoch)
            self.stream.latencies.append(self.received_at - self.commits[epoch])
        elif kind == b"status":
            self.stream.statuses += 1
            self.first_status.set()
        elif kind == b"end":
            self.stream.ended = True
        elif b"" in fields:  # a comment line ": ping"
            self.stream.pings += 1


@dataclass
class Crowd:
    streams: list[Stream]
    closed: list[asyncio.Event]
    transports: list[asyncio.Transport]


async def open_streams(base: str, job_id: str, count: int, commits: dict) -> Crowd:
    url = urlsplit(base)
    request = f"GET /jobs/{job_id}/events HTTP/1.1\r\nHost: {url.netloc}\r\nAccept: text/event-stream\r\n\r\n".encode()
    loop = asyncio.get_running_loop()
    streams, firsts, closed, transports = [], [], [], []
    for _ in range(count):
        stream, first, done = Stream(), asyncio.Event(), asyncio.Event()
        transport, _ = await loop.create_connection(
            partial(_Client, stream, first, done, commits), url.hostname, url.port
        )
        transport.write(request)
        streams.append(stream), firsts.append(first), closed.append(done), transports.append(transport)
    await asyncio.wait_for(asyncio.gather(*(first.wait() for first in firsts)), 120)
    return Crowd(streams, closed, transports)


# --- the run --------------------------------------------------------------------------------------------------


@dataclass
class Figures:
    baseline_cpu: float = 0.0  # % of one core, no stream open
    connect_s: float = 0.0
    idle_s: float = 0.0
    idle_cpu: float = 0.0  # % of one core
    idle_pings: int = 0
    train_s: float = 0.0
    train_cpu: float = 0.0
    train_client_cpu: float = 0.0
    rss: dict = field(default_factory=dict)


async def follow(base: str, job_id: str, args: argparse.Namespace, api_pid: int, start_worker) -> tuple[Crowd, Figures]:
    figures, commits = Figures(), {}
    figures.rss["before the streams"] = rss_mib(api_pid)
    cpu, started = cpu_seconds(api_pid), time.monotonic()
    await asyncio.sleep(BASELINE_S)
    figures.baseline_cpu = 100 * (cpu_seconds(api_pid) - cpu) / (time.monotonic() - started)
    started = time.monotonic()
    crowd = await open_streams(base, job_id, args.streams, commits)
    figures.connect_s = time.monotonic() - started
    figures.rss[f"{args.streams} streams open, idle"] = rss_mib(api_pid)

    cpu, started = cpu_seconds(api_pid), time.monotonic()
    await asyncio.sleep(args.idle_seconds)
    figures.idle_s = time.monotonic() - started
    figures.idle_cpu = 100 * (cpu_seconds(api_pid) - cpu) / figures.idle_s
    figures.idle_pings = sum(s.pings for s in crowd.streams)
    figures.rss[f"{args.streams} streams open, idle"] = rss_mib(api_pid)

    print(f"  idle window done ({figures.idle_s:.0f} s); starting the worker", flush=True)
    await asyncio.to_thread(start_worker)
    while not commits:  # the clocks of the training window start at the first epoch (the worker imports torch first)
        await asyncio.sleep(0.05)
    cpu, client_cpu, started = cpu_seconds(api_pid), time.process_time(), time.monotonic()
    deadline = started + args.epochs * 60
    await asyncio.wait_for(asyncio.gather(*(done.wait() for done in crowd.closed)), deadline - time.monotonic())
    figures.train_s = time.monotonic() - started
    figures.train_cpu = 100 * (cpu_seconds(api_pid) - cpu) / figures.train_s
    figures.train_client_cpu = 100 * (time.process_time() - client_cpu) / figures.train_s
    figures.rss["at the end"] = rss_mib(api_pid)
    for transport in crowd.transports:
        transport.close()
    return crowd, figures


def report(crowd: Crowd, figures: Figures, args: argparse.Namespace) -> bool:
    expected = list(range(1, args.epochs + 1))
    wrong = [s for s in crowd.streams if s.epochs != expected]
    missing = sum(len(set(expected) - set(s.epochs)) for s in crowd.streams)
    repeated = sum(len(s.epochs) - len(set(s.epochs)) for s in crowd.streams)
    out_of_order = sum(any(a >= b for a, b in zip(s.epochs, s.epochs[1:])) for s in crowd.streams)
    not_ended = sum(not s.ended for s in crowd.streams)
    errors = [s.error for s in crowd.streams if s.error] + [
        f"HTTP {s.http_status}" for s in crowd.streams if s.http_status != 200
    ]
    latencies = [x for s in crowd.streams for x in s.latencies]
    p50, p99, worst = percentile_ms(latencies, 0.50), percentile_ms(latencies, 0.99), 1000 * max(latencies, default=0)
    n = args.streams
    complete = not wrong and not not_ended and not errors

    print(f"\nstreams: {n} opened in {figures.connect_s:.1f} s, each got its first status")
    print(
        f"  delivery: {len(latencies)} epoch events of {n * args.epochs} expected; streams with a missing, repeated "
        f"or out-of-order epoch: {len(wrong)} (missing {missing}, repeated {repeated}, out of order in "
        f"{out_of_order} streams); streams not ended by `end`: {not_ended}; errors: {len(errors)} "
        f"{errors[:3] if errors else ''}(target 0: {verdict(complete)})"
    )
    print(
        f"  commit -> client latency, every epoch on every stream: p50 {p50:.0f} ms, p99 {p99:.0f} ms, max "
        f"{worst:.0f} ms (target p99 < {P99_TARGET_MS:.0f} ms: {verdict(p99 < P99_TARGET_MS and complete)})"
    )
    print(
        f"  API CPU, streams idle on a queued job ({figures.idle_s:.0f} s, {figures.idle_pings} keep-alive pings "
        f"sent): {figures.idle_cpu:.2f} % of a core (target < {IDLE_CPU_TARGET:g} %: "
        f"{verdict(figures.idle_cpu < IDLE_CPU_TARGET)}); with no stream open: {figures.baseline_cpu:.2f} %"
    )
    per_epoch_ms = 10 * figures.train_cpu * figures.train_s / args.epochs  # CPU ms per epoch: % * s * 10
    print(
        f"  API CPU while the job trains ({figures.train_s:.0f} s, {args.epochs} epochs): {figures.train_cpu:.1f} % "
        f"of a core, {per_epoch_ms:.0f} ms per epoch for all {n} streams ({per_epoch_ms * 1000 / n:.0f} us per "
        f"stream); the client: {figures.train_client_cpu:.1f} %"
    )
    print("  API RSS: " + ", ".join(f"{label} {mib:.0f} MiB" for label, mib in figures.rss.items()))
    before, idle = list(figures.rss.values())[:2]
    print(f"  memory per open stream: {1024 * (idle - before) / n:.0f} KiB")
    return complete and p99 < P99_TARGET_MS and figures.idle_cpu < IDLE_CPU_TARGET


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.streams", description=__doc__.split("\n\n")[0])
    parser.add_argument("--streams", type=int, default=500)
    parser.add_argument("--epochs", type=int, default=30, help="the training job's epochs")
    parser.add_argument("--idle_seconds", type=float, default=30.0, help="how long the streams idle before training")
    parser.add_argument(
        "--dataset_root", default=None, help="synthetic dataset; generated into data/synthetic when unset and absent"
    )
    return parser.parse_args()


def main() -> int:
    args = parse_args()
    require_binaries(["sqlite"])
    root = dataset_root(args.dataset_root)
    category = MP100Catalog(root).category_ids("train")[0]
    # Each stream is a socket in this process and in uvicorn (which inherits the limit).
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 4 * args.streams + 256)), hard))
    print(
        f"SSE streams benchmark: {args.streams} streams of one job, {args.epochs} epochs, database sqlite, "
        f"{os.cpu_count()} cores ({platform.processor() or platform.machine()}), one uvicorn process, one Celery "
        f"worker (cpu), client on the same machine; dataset {root}, category {category}",
        flush=True,
    )
    with tempfile.TemporaryDirectory(prefix="cape-bench-streams-") as tmp_name, ExitStack() as stack:
        tmp = Path(tmp_name)
        broker_url = stack.enter_context(redis_server(tmp)).url
        database_url = stack.enter_context(database("sqlite", tmp))
        env = service_env(database_url, broker_url, root, tmp)
        api = stack.enter_context(api_server(env, tmp / "api.log"))
        body = single_image_job(category, epochs=args.epochs, **JOB)
        job_id = httpx.post(f"{api.url}/jobs", json=body, timeout=30).raise_for_status().json()["id"]
        crowd, figures = uvloop.run(
            follow(
                api.url, job_id, args, api.pid, lambda: stack.enter_context(worker(env, tmp / "worker.log", "bench"))
            )
        )
        job = httpx.get(f"{api.url}/jobs/{job_id}", timeout=30).json()
        if job["status"] != "succeeded":
            print(f"  the job ended {job['status']}: {job['error']}")
        return 0 if report(crowd, figures, args) else 1


if __name__ == "__main__":
    raise SystemExit(main())
