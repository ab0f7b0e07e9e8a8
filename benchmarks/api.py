"""The job service under load: metrics reads at many connections, and how fast an idle worker picks up a job.

    .venv/bin/python benchmarks/api.py [--database sqlite|postgresql] [--dataset_root DIR] [--seconds 10] [--connections 32]

Starts the whole stack on loopback (the servers of tests/servers.py): redis-server, the database (a SQLite file, or
a throwaway PostgreSQL cluster with ``--database postgresql``), the Alembic migrations, one uvicorn process and one
Celery worker on the CPU. Then it measures

1. read load: ``--connections`` concurrent keep-alive connections in closed loops for ``--seconds`` seconds, half
   of them on ``GET /jobs/{id}/metrics`` of a job with 300 epoch rows, half on ``GET /healthz`` (no database: the
   floor of what the app can serve), ``--repeats`` times. Per run and endpoint: requests per second, p50 and p99
   latency, failures, and the metrics/healthz rate ratio; then the medians over the runs. Three metrics requests:
   a poller's (``after_epoch=290``: the 10 newest rows), the endpoint's default answer (its first page, 100 rows),
   and the whole history in one answer (``limit=1000``: 300 rows). Targets, on the medians of the first two:
   metrics at least half the rate of healthz, metrics p99 under 50 ms.
2. dispatch latency: 20 times, ``POST /jobs`` a tiny single_image job and time until ``GET /jobs/{id}`` says
   ``running`` (polled every 5 ms), then cancel it and wait until it is terminal. One warm-up job first (the worker
   imports torch on its first job). Target: median under 500 ms.

The load generator (benchmarks/http_load.py: keep-alive connections, httptools, uvloop) runs in this process on the
same machine as the servers, so it takes some CPU from them: the figures are for the whole machine, client
included. Each load run also prints the CPU that uvicorn and the client spent per request, which is what to compare
between runs on a noisy machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import uuid
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import httpx  # noqa: E402
from sqlmodel import Session  # noqa: E402

from benchmarks.common import dataset_root  # noqa: E402
from benchmarks.http_load import LoadResult, closed_loop_load  # noqa: E402
from cape.data.catalog import MP100Catalog  # noqa: E402
from service import job_state  # noqa: E402
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
                job_state.record_epoch(session, uuid.UUID(job_id), fake_epoch(epoch))
    finally:
        engine.dispose()
    return job_id


def fake_epoch(epoch: int) -> dict:
    loss = 2.0 / epoch
    return {"epoch": epoch, "loss": loss, "loss_ce": loss / 2, "loss_coords": loss / 2, "pck": min(1.0, epoch / 100),
            "mpck": min(1.0, epoch / 100), "lr": 5e-4, "seconds": 1.5}


# --- read load ------------------------------------------------------------------------------------------------


def load_run(base: str, paths: dict[str, str], connections: int, seconds: float) -> LoadResult:
    server = uvicorn_pid()
    return closed_loop_load(base, paths, connections, seconds, warm_up=min(1.0, seconds),
                            server_cpu=lambda: cpu_seconds(server))


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


@dataclass
class ReadRun:
    """One measured run of a metrics request beside healthz."""

    metrics_rps: float
    metrics_p50: float
    metrics_p99: float
    healthz_rps: float
    healthz_p50: float
    healthz_p99: float
    failures: int  # non-2xx answers and errors, both endpoints
    server_cpu_ms: float  # per request, both endpoints
    client_cpu_ms: float

    @property
    def ratio(self) -> float:
        return self.metrics_rps / self.healthz_rps if self.healthz_rps else float("nan")


def read_run(base: str, metrics_path: str, connections: int, seconds: float) -> ReadRun:
    result = load_run(base, {"metrics": metrics_path, "healthz": "/healthz"}, connections, seconds)
    metrics, healthz = result.tallies["metrics"].latencies, result.tallies["healthz"].latencies
    requests = len(metrics) + len(healthz)
    return ReadRun(
        len(metrics) / result.seconds, percentile_ms(metrics, 0.50), percentile_ms(metrics, 0.99),
        len(healthz) / result.seconds, percentile_ms(healthz, 0.50), percentile_ms(healthz, 0.99),
        sum(t.non_2xx + t.errors for t in result.tallies.values()),
        1000 * result.server_cpu / requests, 1000 * result.client_cpu / requests,
    )


# (label, query, judged against the targets)
READ_LOADS = [
    ("a poller's request for the newest rows (10 rows)", f"after_epoch={POLL_AFTER_EPOCH}", True),
    ("the default answer, the first page (100 rows)", "", True),
    (f"the whole history in one answer ({HISTORY_EPOCHS} rows)", "limit=1000", False),
]


def read_load(base: str, job_id: str, connections: int, seconds: float, repeats: int) -> None:
    for label, query, judged in READ_LOADS:
        path = f"/jobs/{job_id}/metrics" + (f"?{query}" if query else "")
        print(f"\nread load: GET {path.replace(job_id, '{id}')}, {label}, beside GET /healthz; "
              f"{connections} connections (half on each), {repeats} runs of {seconds:g} s")
        print(f"  {'run':<6} {'metrics req/s':>13} {'p50':>6} {'p99 ms':>7} | {'healthz req/s':>13} {'p50':>6} {'p99 ms':>7} "
              f"| {'ratio':>5} | {'failed':>6} | CPU ms/request: uvicorn, client")
        runs = [read_run(base, path, connections, seconds) for _ in range(repeats)]
        for i, r in enumerate(runs, 1):
            print(f"  {i:<6} {r.metrics_rps:>13.0f} {r.metrics_p50:>6.1f} {r.metrics_p99:>7.1f} | {r.healthz_rps:>13.0f} "
                  f"{r.healthz_p50:>6.1f} {r.healthz_p99:>7.1f} | {r.ratio:>5.2f} | {r.failures:>6} | "
                  f"{r.server_cpu_ms:.2f}, {r.client_cpu_ms:.2f}")
        ratio, p99 = statistics.median(r.ratio for r in runs), statistics.median(r.metrics_p99 for r in runs)
        line = f"  median: metrics/healthz rate ratio {ratio:.2f}, metrics p99 {p99:.1f} ms"
        failed = sum(r.failures for r in runs)
        if judged:  # a fast answer that is an error does not count
            line += (f"  (targets: ratio >= {METRICS_RATIO_TARGET}: {verdict(ratio >= METRICS_RATIO_TARGET and not failed)}; "
                     f"p99 < {METRICS_P99_TARGET_MS:.0f} ms: {verdict(p99 < METRICS_P99_TARGET_MS and not failed)}; "
                     f"failed requests {failed})")
        else:
            line += "  (no target: shown for what a 300-row answer costs)"
        print(line)


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
    parser.add_argument("--repeats", type=int, default=3, help="measured runs per read load; the verdicts use their medians")
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
        read_load(base, job_id, args.connections, args.seconds, args.repeats)
        dispatch_latency(base, category)


if __name__ == "__main__":
    main()
