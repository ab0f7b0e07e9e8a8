"""The job service under load: metrics reads at many connections, and how fast an idle worker picks up a job.

    .venv/bin/python benchmarks/api.py [--database sqlite|postgresql] [--dataset_root DIR] [--seconds 10] [--connections 32]

Starts the whole stack on loopback (the servers of tests/servers.py): redis-server, the database (a SQLite file, or
a throwaway PostgreSQL cluster with ``--database postgresql``), the Alembic migrations, one uvicorn process and one
Celery worker on the CPU. Then it measures

1. read load: ``--connections`` concurrent keep-alive connections for ``--seconds`` seconds, half of them polling
   ``GET /jobs/{id}/metrics?after_epoch=290`` of a job with 300 epoch rows (a poller asking for the newest rows),
   half ``GET /healthz`` (no database: the floor of what the app can serve). Per endpoint: requests per second,
   p50 and p99 latency, non-2xx responses, and metrics rps / healthz rps. A second run does the same with the full
   history, ``after_epoch=0&limit=1000`` (300 rows). Targets: metrics at least half the rate of healthz, metrics
   p99 under 50 ms.
2. dispatch latency: 20 times, ``POST /jobs`` a tiny single_image job and time until ``GET /jobs/{id}`` says
   ``running`` (polled every 5 ms), then cancel it and wait until it is terminal. One warm-up job first (the worker
   imports torch on its first job). Target: median under 500 ms.

The load generator (asyncio + httpx, one client per connection) runs in this process on the same machine as the
servers, so on a small machine it takes CPU from them: the figures are for the whole machine, client included. Each
load run also prints the CPU that uvicorn and the client spent per request, which is what to compare between runs
on a noisy machine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import uuid
from contextlib import AsyncExitStack, ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import httpx  # noqa: E402
from sqlmodel import Session  # noqa: E402

from benchmarks.common import dataset_root  # noqa: E402
from cape.data.catalog import MP100Catalog  # noqa: E402
from service import jobs  # noqa: E402
from service.db import make_engine  # noqa: E402
from service.migrate import upgrade  # noqa: E402
from tests.servers import celery_worker, fresh_database, postgres_server, redis_server, uvicorn_server  # noqa: E402

HISTORY_EPOCHS = 300
POLL_AFTER_EPOCH = 290  # a poller that has seen up to here asks for the newest rows
DISPATCH_JOBS = 20
DISPATCH_POLL_S = 0.005
TERMINAL = {"succeeded", "failed", "cancelled"}
METRICS_RATIO_TARGET, METRICS_P99_TARGET_MS, DISPATCH_MEDIAN_TARGET_MS = 0.5, 50.0, 500.0


# --- the stack ------------------------------------------------------------------------------------------------


@contextmanager
def database(kind: str, tmp: Path):
    """The database URL, migrated to head: a SQLite file in ``tmp`` or a fresh database on a throwaway cluster."""
    with ExitStack() as stack:
        if kind == "sqlite":
            url = f"sqlite:///{tmp / 'cape.sqlite3'}"
        else:
            url = fresh_database(stack.enter_context(postgres_server()), "bench_api")
        upgrade(url)
        yield url


def service_env(database_url: str, broker_url: str, root: Path, tmp: Path) -> dict:
    return {
        "CAPE_DATABASE_URL": database_url,
        "CAPE_BROKER_URL": broker_url,
        "CAPE_DATASETS": json.dumps({"synthetic": str(root)}),
        "CAPE_DEFAULT_DATASET": "synthetic",
        "CAPE_ARTIFACTS_DIR": str(tmp / "artifacts"),
        "CAPE_DEVICE": "cpu",
        "CAPE_API_KEYS": "",  # an open API, whatever this shell exports: no request is refused for its key
    }


def single_image_job(category: int, **overrides) -> dict:
    body = {"mode": "single_image", "category_id": category, "image_index": 0, "epochs": 1, "episodes_per_epoch": 1,
            "batch_size": 1, "num_queries_per_episode": 1, "seed": 0}
    return {**body, **overrides}


def job_with_history(base: str, database_url: str, category: int) -> str:
    """A job with HISTORY_EPOCHS epoch rows, made as the API and a worker would make it.

    The job is submitted through the API and cancelled at once, before any worker runs: a cancelled job is terminal,
    so the worker skips its message and nothing (no reaper either) ever trains it. The rows are then written with the
    worker's own ``record_epoch``; reading them costs the same whatever the job's status.
    """
    with httpx.Client(base_url=base, timeout=30) as client:
        job_id = client.post("/jobs", json=single_image_job(category, epochs=HISTORY_EPOCHS)).raise_for_status().json()["id"]
        client.post(f"/jobs/{job_id}/cancel").raise_for_status()
    engine = make_engine(database_url)
    try:
        with Session(engine) as session:
            for epoch in range(1, HISTORY_EPOCHS + 1):
                jobs.record_epoch(session, uuid.UUID(job_id), fake_epoch(epoch))
    finally:
        engine.dispose()
    return job_id


def fake_epoch(epoch: int) -> dict:
    loss = 2.0 / epoch
    return {"epoch": epoch, "loss": loss, "loss_ce": loss / 2, "loss_coords": loss / 2, "pck": min(1.0, epoch / 100),
            "mpck": min(1.0, epoch / 100), "lr": 5e-4, "seconds": 1.5}


# --- read load ------------------------------------------------------------------------------------------------


@dataclass
class Tally:
    latencies: list[float] = field(default_factory=list)  # seconds, 2xx and non-2xx alike
    non_2xx: int = 0
    errors: int = 0  # no response at all: time-out, refused, reset


async def hammer(client: httpx.AsyncClient, path: str, deadline: float, tally: Tally) -> None:
    """One connection's closed loop: the next request as soon as the previous answer is in, until the deadline."""
    while time.perf_counter() < deadline:
        started = time.perf_counter()
        try:
            response = await client.get(path)
        except httpx.HTTPError:
            tally.errors += 1
            continue
        tally.latencies.append(time.perf_counter() - started)
        if not response.is_success:
            tally.non_2xx += 1


async def mixed_load(clients: list[httpx.AsyncClient], paths: dict[str, str], seconds: float) -> tuple[dict[str, Tally], float]:
    """One closed loop per client, the clients alternately given to each path, all at once for ``seconds``."""
    tallies = {name: Tally() for name in paths}
    names = [list(paths)[i % len(paths)] for i in range(len(clients))]
    started = time.perf_counter()
    deadline = started + seconds
    await asyncio.gather(*(hammer(client, paths[name], deadline, tallies[name]) for client, name in zip(clients, names)))
    return tallies, time.perf_counter() - started  # the last requests end a little after the deadline


async def load_run(base: str, paths: dict[str, str], connections: int, seconds: float):
    """A short unmeasured run, then the measured one on the same connections, with the CPU spent on it by the server
    and by this process (the client)."""
    # A client per connection, like separate pollers: one AsyncClient shared by 32 connections is the bottleneck
    # (httpcore's pool costs ~10 ms of client CPU per request there, ~1.5 ms with a client each). The clients are
    # made before any clock starts: making one takes ~20 ms (its SSL context), which would count as latency.
    limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
    async with AsyncExitStack() as stack:
        clients = [await stack.enter_async_context(httpx.AsyncClient(base_url=base, limits=limits, timeout=10))
                   for _ in range(connections)]
        # Warm-up: opens the connections, the database pool's connections and the server's worker threads.
        await mixed_load(clients, paths, min(1.0, seconds))
        server = uvicorn_pid()
        server_before, client_before = cpu_seconds(server), time.process_time()
        tallies, elapsed = await mixed_load(clients, paths, seconds)
        cpu = {"server": cpu_seconds(server) - server_before, "client": time.process_time() - client_before}
    return tallies, elapsed, cpu


def uvicorn_pid() -> int | None:
    """Our uvicorn child process (tests.servers does not hand it out), to read how much CPU it used."""
    for proc in Path("/proc").iterdir():
        try:
            stat = (proc / "stat").read_text()
            cmdline = (proc / "cmdline").read_bytes()
        except (OSError, ValueError):
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == os.getpid() and b"uvicorn" in cmdline:
            return int(proc.name)
    return None


def cpu_seconds(pid: int | None) -> float:
    """User + system CPU of a process so far (Linux /proc); NaN when unknown."""
    if pid is None:
        return float("nan")
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def percentile_ms(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return 1000 * ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def verdict(ok: bool) -> str:
    return "met" if ok else "MISSED"


def report_load(title: str, tallies: dict[str, Tally], elapsed: float, metrics_name: str, cpu: dict[str, float]) -> None:
    print(f"\n{title}")
    print(f"  {'endpoint':<44} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'non-2xx':>8} {'errors':>7}")
    rates = {}
    for name, tally in tallies.items():
        rates[name] = len(tally.latencies) / elapsed
        print(f"  {name:<44} {rates[name]:>8.0f} {percentile_ms(tally.latencies, 0.50):>8.1f} "
              f"{percentile_ms(tally.latencies, 0.99):>8.1f} {tally.non_2xx:>8} {tally.errors:>7}")
    ratio = rates[metrics_name] / rates["healthz"] if rates["healthz"] else float("nan")
    p99 = percentile_ms(tallies[metrics_name].latencies, 0.99)
    print(f"  metrics/healthz rate ratio {ratio:.3f} (target >= {METRICS_RATIO_TARGET}: {verdict(ratio >= METRICS_RATIO_TARGET)}), "
          f"metrics p99 {p99:.1f} ms (target < {METRICS_P99_TARGET_MS:.0f} ms: {verdict(p99 < METRICS_P99_TARGET_MS)})")
    # Where the machine's time went: the client shares the cores with the server.
    requests = sum(len(t.latencies) for t in tallies.values())
    print(f"  CPU per request: uvicorn {1000 * cpu['server'] / requests:.2f} ms, client {1000 * cpu['client'] / requests:.2f} ms "
          f"(uvicorn {cpu['server'] / elapsed:.0%} of a core, client {cpu['client'] / elapsed:.0%})")


def read_load(base: str, job_id: str, connections: int, seconds: float) -> None:
    runs = {
        f"metrics after_epoch={POLL_AFTER_EPOCH} (10 rows)": f"/jobs/{job_id}/metrics?after_epoch={POLL_AFTER_EPOCH}",
        f"metrics after_epoch=0 limit=1000 ({HISTORY_EPOCHS} rows)": f"/jobs/{job_id}/metrics?after_epoch=0&limit=1000",
    }
    for metrics_name, path in runs.items():
        paths = {metrics_name: path, "healthz": "/healthz"}
        tallies, elapsed, cpu = asyncio.run(load_run(base, paths, connections, seconds))
        title = f"read load, {connections} connections (half on each endpoint), {elapsed:.1f} s:"
        report_load(title, tallies, elapsed, metrics_name, cpu)


# --- dispatch latency -----------------------------------------------------------------------------------------


def wait_for_status(client: httpx.Client, job_id: str, statuses: set[str], timeout: float, poll: float) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = client.get(f"/jobs/{job_id}").raise_for_status().json()["status"]
        if status in statuses:
            return status
        time.sleep(poll)
    raise TimeoutError(f"job {job_id} not {sorted(statuses)} after {timeout:.0f} s (last: {status})")


def dispatch_once(client: httpx.Client, category: int, timeout: float) -> float:
    """Seconds from submitting a job until the API reports it running; the job is then cancelled and awaited."""
    started = time.perf_counter()
    response = client.post("/jobs", json=single_image_job(category)).raise_for_status()
    job_id = response.json()["id"]
    wait_for_status(client, job_id, {"running", "cancelling", *TERMINAL}, timeout, DISPATCH_POLL_S)
    latency = time.perf_counter() - started
    # 409: the one-step job finished before the cancel arrived; either way the worker is free once it is terminal.
    cancel = client.post(f"/jobs/{job_id}/cancel")
    if cancel.status_code not in (200, 409):
        cancel.raise_for_status()
    status = wait_for_status(client, job_id, TERMINAL, timeout, 0.05)
    if status == "failed":
        raise RuntimeError(f"job {job_id} failed: {client.get(f'/jobs/{job_id}').json()['error']}")
    return latency


def dispatch_latency(base: str, category: int) -> None:
    with httpx.Client(base_url=base, timeout=30) as client:
        warm_up = dispatch_once(client, category, timeout=300)  # the worker imports torch on its first job
        latencies = [dispatch_once(client, category, timeout=120) for _ in range(DISPATCH_JOBS)]
    median_ms, max_ms = 1000 * statistics.median(latencies), 1000 * max(latencies)
    print(f"\ndispatch latency, POST /jobs -> status running, idle worker, {DISPATCH_JOBS} jobs "
          f"(warm-up job, not counted: {1000 * warm_up:.0f} ms):")
    print(f"  median {median_ms:.0f} ms, max {max_ms:.0f} ms "
          f"(target median < {DISPATCH_MEDIAN_TARGET_MS:.0f} ms: {verdict(median_ms < DISPATCH_MEDIAN_TARGET_MS)})")


# --- main -----------------------------------------------------------------------------------------------------


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--database", choices=["sqlite", "postgresql"], default="sqlite")
    parser.add_argument("--dataset_root", default=None, help="synthetic dataset; generated into data/synthetic when unset and absent")
    parser.add_argument("--seconds", type=float, default=10.0, help="duration of each measured read-load run")
    parser.add_argument("--connections", type=int, default=32)
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    root = dataset_root(args.dataset_root)
    category = MP100Catalog(root).category_ids("train")[0]
    print(f"API benchmark: database {args.database}, {args.connections} connections, {args.seconds:g} s per run, "
          f"{os.cpu_count()} cores ({platform.processor() or platform.machine()}), one uvicorn process, one Celery "
          f"worker (cpu), client on the same machine; dataset {root}, category {category}")
    with tempfile.TemporaryDirectory(prefix="cape-bench-api-") as tmp_name, ExitStack() as stack:
        tmp = Path(tmp_name)
        broker_url = stack.enter_context(redis_server(tmp))
        database_url = stack.enter_context(database(args.database, tmp))
        env = service_env(database_url, broker_url, root, tmp)
        base = stack.enter_context(uvicorn_server(env, tmp / "api.log"))
        job_id = job_with_history(base, database_url, category)  # before the worker: it must not train this job
        stack.enter_context(celery_worker(env, tmp / "worker.log", name="bench"))
        read_load(base, job_id, args.connections, args.seconds)
        dispatch_latency(base, category)


if __name__ == "__main__":
    main()
