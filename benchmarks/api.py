"""The job service under load: metrics reads at many connections, and how fast an idle worker picks up a job.

    .venv/bin/python -m benchmarks.api [--database sqlite|postgresql] [--dataset_root DIR] [--seconds 10]
                                       [--connections 32] [--repeats 3]

Starts the whole stack on loopback (devtools/local_servers.py): redis-server, the database (a SQLite file, or a
throwaway PostgreSQL cluster with ``--database postgresql``), the Alembic migrations, one uvicorn process and one
Celery worker on the CPU. Then it measures

1. read load, each endpoint alone: ``--connections`` concurrent keep-alive connections in closed loops (the next
   request as soon as the previous answer is in) for ``--seconds`` seconds, all on ``GET /jobs/{id}/metrics`` of a
   job with 300 epoch rows; then the same connections, all on ``GET /healthz`` (no database: the floor of what the
   app can serve). Each run opens its connections and warms up for a second, unmeasured. The two alternate,
   ``--repeats`` times, so that whatever else the machine does hits both alike. Per run and endpoint: requests per
   second, p50 and p99 latency, failed requests (non-2xx answers and requests without an answer) and the CPU
   uvicorn and the load generator spent per request; per run the ratio metrics req/s / healthz req/s. Then the
   medians over the runs: of each endpoint's figures, and of the ratio. Three metrics requests, each measured so:
   a poller's (``after_epoch=290``: the 10 newest rows), the endpoint's default answer (its first page, 100 rows),
   and the whole history in one answer (``limit=1000``: 300 rows; no target). Targets, on the medians of the first
   two: ratio at least 0.5 and metrics p99 under 50 ms; a failed request (either endpoint) misses both.
2. dispatch latency: 20 times, ``POST /jobs`` a tiny single_image job and time until ``GET /jobs/{id}`` says
   ``running`` (polled every 5 ms), then cancel it and wait until it is terminal. One warm-up job first (the worker
   imports torch on its first job). Target: median under 500 ms.

The load generator (benchmarks/http_load.py: keep-alive connections, httptools, uvloop) runs in this process on the
same machine as the servers, so it takes some CPU from them: the rates are for the whole machine, client included.
uvicorn's CPU per request is what to compare between runs on a noisy machine.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import tempfile
import time
import uuid
from collections.abc import Collection, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
from sqlmodel import Session

from benchmarks.common import dataset_root
from benchmarks.http_load import closed_loop_load
from cape.data.catalog import MP100Catalog
from cape.epoch_record import EpochRecord
from devtools.local_servers import (
    MissingBinary,
    RedisServer,
    Server,
    celery_worker,
    fresh_database,
    postgres_binaries,
    postgres_server,
    redis_binary,
    stack_env,
    uvicorn_server,
)
from service import job_state
from service.db import make_engine
from service.migrate import upgrade
from service.models import ACTIVE, TERMINAL, JobStatus

REPO = Path(__file__).resolve().parents[1]
HISTORY_EPOCHS = 300
POLL_AFTER_EPOCH = 290  # a poller that has seen up to here asks for the newest rows
DISPATCH_JOBS = 20
DISPATCH_POLL_S = 0.005
METRICS_RATIO_TARGET, METRICS_P99_TARGET_MS, DISPATCH_MEDIAN_TARGET_MS = 0.5, 50.0, 500.0


# --- the stack ------------------------------------------------------------------------------------------------


def require_binaries(databases: Collection[str]) -> None:
    """Exits with a message, before anything starts, when a server the benchmark needs is not installed."""
    try:
        redis_binary()
        if "postgresql" in databases:
            postgres_binaries()
    except MissingBinary as exc:
        raise SystemExit(f"cannot run this benchmark: {exc}") from None


def redis_server(tmp: Path) -> RedisServer:
    """A redis-server with its data in ``tmp``; a context manager (its ``url`` is the broker URL)."""
    return RedisServer(tmp)


@contextmanager
def database(kind: str, tmp: Path) -> Iterator[str]:
    """The database URL, migrated to head: a SQLite file in ``tmp`` or a fresh database on a throwaway cluster."""
    with ExitStack() as stack:
        if kind == "sqlite":
            url = f"sqlite:///{tmp / 'cape.sqlite3'}"
        else:
            url = fresh_database(stack.enter_context(postgres_server()), "bench_api")
        upgrade(url)
        yield url


def api_server(env: dict, log: Path):
    """One uvicorn process on a free loopback port, answering: a context manager yielding its Server (url, pid)."""
    return uvicorn_server(env, log, cwd=REPO)


def worker(env: dict, log: Path, name: str):
    """One Celery worker on the ``gpu`` queue, ready: a context manager yielding its Server (pid)."""
    return celery_worker(env, log, name=name, mingle=False, cwd=REPO)


def service_env(database_url: str, broker_url: str, root: Path, tmp: Path) -> dict:
    return stack_env(database_url, broker_url, {"synthetic": root}, tmp)


def single_image_job(category: int, **overrides) -> dict:
    body = {
        "mode": "single_image",
        "category_id": category,
        "image_index": 0,
        "epochs": 1,
        "episodes_per_epoch": 1,
        "batch_size": 1,
        "num_queries_per_episode": 1,
        "seed": 0,
    }
    return {**body, **overrides}


def job_with_history(base: str, database_url: str, category: int) -> str:
    """A job with HISTORY_EPOCHS epoch rows, made as the API and a worker would make it.

    The job is submitted through the API and cancelled at once, before any worker runs: a cancelled job is terminal,
    so the worker skips its message and nothing (no reaper either) ever trains it. The rows are then written with the
    worker's own ``record_epoch``; reading them costs the same whatever the job's status.
    """
    with httpx.Client(base_url=base, timeout=30) as client:
        job_id = (
            client.post("/jobs", json=single_image_job(category, epochs=HISTORY_EPOCHS)).raise_for_status().json()["id"]
        )
        client.post(f"/jobs/{job_id}/cancel").raise_for_status()
    engine = make_engine(database_url)
    try:
        with Session(engine) as session:
            for epoch in range(1, HISTORY_EPOCHS + 1):
                job_state.record_epoch(session, uuid.UUID(job_id), fake_epoch(epoch))
    finally:
        engine.dispose()
    return job_id


def fake_epoch(epoch: int) -> EpochRecord:
    loss = 2.0 / epoch
    return EpochRecord(
        epoch=epoch,
        loss=loss,
        loss_ce=loss / 2,
        loss_coords=loss / 2,
        pck=min(1.0, epoch / 100),
        mpck=min(1.0, epoch / 100),
        lr=5e-4,
        seconds=1.5,
    )


# --- measuring helpers ----------------------------------------------------------------------------------------


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


# --- read load ------------------------------------------------------------------------------------------------


@dataclass
class Alone:
    """One endpoint measured alone: all the connections on it, for one run."""

    rps: float  # answers per second, whatever their status
    p50: float  # ms
    p99: float  # ms
    failures: int  # non-2xx answers and requests without an answer
    server_cpu_ms: float  # uvicorn's CPU per answer
    client_cpu_ms: float  # the load generator's


def measure_alone(base: str, path: str, connections: int, seconds: float, server: Server) -> Alone:
    result = closed_loop_load(
        base,
        {"endpoint": path},
        connections,
        seconds,
        warm_up=min(1.0, seconds),
        server_cpu=lambda: cpu_seconds(server.pid),
    )
    tally = result.tallies["endpoint"]
    answers = len(tally.latencies)

    def per_answer(cpu: float) -> float:
        return 1000 * cpu / answers if answers else math.nan

    return Alone(
        answers / result.seconds,
        percentile_ms(tally.latencies, 0.50),
        percentile_ms(tally.latencies, 0.99),
        tally.non_2xx + tally.errors,
        per_answer(result.server_cpu),
        per_answer(result.client_cpu),
    )


def ratio(metrics: Alone, healthz: Alone) -> float:
    return metrics.rps / healthz.rps if healthz.rps else math.nan


def median_of(runs: list[Alone]) -> Alone:
    """Each figure's median over the runs; failures summed."""
    return Alone(
        *(statistics.median(getattr(r, name) for r in runs) for name in ("rps", "p50", "p99")),
        sum(r.failures for r in runs),
        *(statistics.median(getattr(r, name) for r in runs) for name in ("server_cpu_ms", "client_cpu_ms")),
    )


def row(label: str, endpoint: str, a: Alone, last: str = "") -> str:
    return (
        f"  {label:<7} {endpoint:<8} {a.rps:>7.0f} {a.p50:>7.1f} {a.p99:>7.1f} {a.failures:>6}   "
        f"{a.server_cpu_ms:>7.2f} {a.client_cpu_ms:>6.2f}{last}"
    )


# (label, query, judged against the targets)
READ_LOADS = [
    ("a poller's request for the newest rows (10 rows)", f"after_epoch={POLL_AFTER_EPOCH}", True),
    ("the default answer, the first page (100 rows)", "", True),
    (f"the whole history in one answer ({HISTORY_EPOCHS} rows)", "limit=1000", False),
]


def read_load(base: str, job_id: str, connections: int, seconds: float, repeats: int, server: Server) -> None:
    for label, query, judged in READ_LOADS:
        path = f"/jobs/{job_id}/metrics" + (f"?{query}" if query else "")
        runs = f"{repeats} run{'s' if repeats != 1 else ''} of {seconds:g} s"
        print(
            f"\nread load: GET {path.replace(job_id, '{id}')}, {label}\n"
            f"  and GET /healthz; each endpoint alone at {connections} connections, in turn, {runs} each"
        )
        print(
            f"  {'run':<7} {'endpoint':<8} {'req/s':>7} {'p50 ms':>7} {'p99 ms':>7} {'failed':>6}   "
            f"CPU ms/request: uvicorn, client   ratio metrics/healthz req/s"
        )
        metrics_runs, healthz_runs = [], []
        for i in range(1, repeats + 1):
            metrics = measure_alone(base, path, connections, seconds, server)
            healthz = measure_alone(base, "/healthz", connections, seconds, server)
            metrics_runs.append(metrics)
            healthz_runs.append(healthz)
            print(row(str(i), "metrics", metrics))
            print(row(str(i), "healthz", healthz, f"   {ratio(metrics, healthz):>17.2f}"), flush=True)
        metrics, healthz = median_of(metrics_runs), median_of(healthz_runs)
        median_ratio = statistics.median(ratio(m, h) for m, h in zip(metrics_runs, healthz_runs))
        print(row("median", "metrics", metrics))
        print(row("median", "healthz", healthz, f"   {median_ratio:>17.2f}"))
        failed = metrics.failures + healthz.failures
        line = f"  metrics alone: {median_ratio:.2f} of healthz's rate, p99 {metrics.p99:.1f} ms"
        if judged:  # a fast answer that is an error does not count
            line += (
                f"  (targets: ratio >= {METRICS_RATIO_TARGET}: "
                f"{verdict(median_ratio >= METRICS_RATIO_TARGET and not failed)}; "
                f"p99 < {METRICS_P99_TARGET_MS:.0f} ms: {verdict(metrics.p99 < METRICS_P99_TARGET_MS and not failed)}; "
                f"failed requests {failed})"
            )
        else:
            line += f"  (no target: shown for what a {HISTORY_EPOCHS}-row answer costs; failed requests {failed})"
        print(line)


# --- dispatch latency -----------------------------------------------------------------------------------------


def wait_for_status(client: httpx.Client, job_id: str, statuses: Collection[str], timeout: float, poll: float) -> str:
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
    wait_for_status(client, job_id, (*ACTIVE, *TERMINAL), timeout, DISPATCH_POLL_S)
    latency = time.perf_counter() - started
    # 409: the one-step job finished before the cancel arrived; either way the worker is free once it is terminal.
    cancel = client.post(f"/jobs/{job_id}/cancel")
    if cancel.status_code not in (200, 409):
        cancel.raise_for_status()
    status = wait_for_status(client, job_id, TERMINAL, timeout, 0.05)
    if status == JobStatus.failed:
        raise RuntimeError(f"job {job_id} failed: {client.get(f'/jobs/{job_id}').json()['error']}")
    return latency


def dispatch_latency(base: str, category: int) -> None:
    with httpx.Client(base_url=base, timeout=30) as client:
        warm_up = dispatch_once(client, category, timeout=300)  # the worker imports torch on its first job
        latencies = [dispatch_once(client, category, timeout=120) for _ in range(DISPATCH_JOBS)]
    median_ms, max_ms = 1000 * statistics.median(latencies), 1000 * max(latencies)
    print(
        f"\ndispatch latency, POST /jobs -> status running, idle worker, {DISPATCH_JOBS} jobs "
        f"(warm-up job, not counted: {1000 * warm_up:.0f} ms):"
    )
    print(
        f"  median {median_ms:.0f} ms, max {max_ms:.0f} ms "
        f"(target median < {DISPATCH_MEDIAN_TARGET_MS:.0f} ms: {verdict(median_ms < DISPATCH_MEDIAN_TARGET_MS)})"
    )


# --- main -----------------------------------------------------------------------------------------------------


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.api", description=__doc__.split("\n\n")[0])
    parser.add_argument("--database", choices=["sqlite", "postgresql"], default="sqlite")
    parser.add_argument(
        "--dataset_root", default=None, help="synthetic dataset; generated into data/synthetic when unset and absent"
    )
    parser.add_argument("--seconds", type=float, default=10.0, help="duration of each measured read-load run")
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument(
        "--repeats",
        type=int,
        default=3,
        help="measured runs per endpoint and read load; the verdicts use their medians",
    )
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    require_binaries([args.database])
    root = dataset_root(args.dataset_root)
    category = MP100Catalog(root).category_ids("train")[0]
    print(
        f"API benchmark: database {args.database}, {args.connections} connections, {args.seconds:g} s per run, "
        f"{os.cpu_count()} cores ({platform.processor() or platform.machine()}), one uvicorn process, one Celery "
        f"worker (cpu), client on the same machine; dataset {root}, category {category}"
    )
    with tempfile.TemporaryDirectory(prefix="cape-bench-api-") as tmp_name, ExitStack() as stack:
        tmp = Path(tmp_name)
        broker_url = stack.enter_context(redis_server(tmp)).url
        database_url = stack.enter_context(database(args.database, tmp))
        env = service_env(database_url, broker_url, root, tmp)
        api = stack.enter_context(api_server(env, tmp / "api.log"))
        job_id = job_with_history(api.url, database_url, category)  # before the worker: it must not train this job
        stack.enter_context(worker(env, tmp / "worker.log", name="bench"))
        read_load(api.url, job_id, args.connections, args.seconds, args.repeats, api)
        dispatch_latency(api.url, category)


if __name__ == "__main__":
    main()
