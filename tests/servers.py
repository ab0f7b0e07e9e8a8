"""Real servers for the end-to-end tests: redis-server, PostgreSQL, a Celery worker process and uvicorn.

Each starts on a free loopback port in a temporary folder and is stopped when its context ends. A server whose
binary is missing makes the test skip with the reason (``.ci/run`` installs them all).
"""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(check, what: str, process: subprocess.Popen | None = None, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    last_error = None
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"{what} exited with code {process.returncode} while starting")
        try:
            if check():
                return
        except Exception as exc:  # noqa: BLE001 - not up yet; the last error is reported on time-out
            last_error = exc
        time.sleep(0.2)
    raise TimeoutError(f"{what} not ready after {timeout:.0f} s (last error: {last_error!r})")


def stop(process: subprocess.Popen, timeout: float = 20.0) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@contextmanager
def redis_server(tmp: Path):
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("redis-server not installed (apt-get install redis-server)")
    port = free_port()
    process = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(tmp), "--save", "", "--appendonly", "yes"],
        stdout=subprocess.DEVNULL,
    )
    url = f"redis://127.0.0.1:{port}/0"
    try:
        import redis

        wait_until(lambda: redis.Redis.from_url(url).ping(), "redis-server", process)
        yield url
    finally:
        stop(process)


def _pg_bin(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return candidates[-1] if candidates else None


@contextmanager
def postgres_server():
    """A throwaway PostgreSQL cluster. As root, it runs as the ``postgres`` user (PostgreSQL refuses root), in a
    folder of its own: pytest's temporary folders are private to root."""
    initdb, pg_ctl = _pg_bin("initdb"), _pg_bin("pg_ctl")
    if initdb is None or pg_ctl is None:
        pytest.skip("PostgreSQL server binaries not installed (apt-get install postgresql)")
    tmp = Path(tempfile.mkdtemp(prefix="cape-test-pg-"))
    data, sockets = tmp / "pgdata", tmp / "pgsock"
    sockets.mkdir(parents=True)
    as_user: list[str] = []
    if os.geteuid() == 0:
        for path in (tmp, sockets):
            shutil.chown(path, "postgres")
        as_user = ["runuser", "-u", "postgres", "--"]
    subprocess.run([*as_user, initdb, "-D", str(data), "-A", "trust", "-U", "cape", "--no-sync"], check=True,
                   capture_output=True)
    port = free_port()
    options = f"-p {port} -k {sockets} -c listen_addresses=127.0.0.1 -c fsync=off"
    start = [*as_user, pg_ctl, "-D", str(data), "-o", options, "-l", str(tmp / "pg.log"), "-w", "start"]
    subprocess.run(start, check=True, capture_output=True)
    url = f"postgresql+psycopg://cape@127.0.0.1:{port}/postgres"
    _PG_RESTART[url] = [[*as_user, pg_ctl, "-D", str(data), "-m", "fast", "-w", "stop"], start]
    try:
        yield url
    finally:
        _PG_RESTART.pop(url, None)
        subprocess.run([*as_user, pg_ctl, "-D", str(data), "-m", "immediate", "stop"], capture_output=True)
        shutil.rmtree(tmp, ignore_errors=True)


_PG_RESTART: dict[str, list[list[str]]] = {}  # server URL -> its stop and start commands


def restart_postgres(server_url: str) -> None:
    """Stop a postgres_server() cluster (closing every connection) and start it again on the same port and data."""
    for command in _PG_RESTART[server_url]:
        subprocess.run(command, check=True, capture_output=True, timeout=60)


def fresh_database(server_url: str, name: str) -> str:
    """A new empty database on the server, so each test starts from nothing."""
    import psycopg

    plain = server_url.replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(plain, autocommit=True) as connection:
        connection.execute(f'CREATE DATABASE "{name}"')
    return server_url.rsplit("/", 1)[0] + f"/{name}"


@contextmanager
def celery_worker(env: dict, log: Path, name: str = "test"):
    with open(log, "w") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "worker.celery_app", "worker", "-Q", "gpu", "-c", "1",
             "--loglevel", "INFO", "-n", f"{name}@%h", "--without-gossip", "--without-mingle"],
            cwd=REPO, env={**os.environ, **env}, stdout=out, stderr=subprocess.STDOUT,
        )
        try:
            wait_until(lambda: "ready." in log.read_text(), "celery worker", process)
            yield process
        finally:
            stop(process, timeout=30)


@contextmanager
def uvicorn_server(env: dict, log: Path):
    port = free_port()
    with open(log, "w") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "service.main:app", "--host", "127.0.0.1", "--port", str(port)],
            cwd=REPO, env={**os.environ, **env}, stdout=out, stderr=subprocess.STDOUT,
        )
        base = f"http://127.0.0.1:{port}"
        try:
            wait_until(lambda: httpx.get(f"{base}/healthz").status_code == 200, "uvicorn", process)
            yield base
        finally:
            stop(process)


class RestartableRedis:
    """A redis-server that a test can stop and start again on the same port and data folder (AOF on), as an
    outage would: queued messages survive the restart."""

    def __init__(self, tmp: Path):
        self.binary = shutil.which("redis-server")
        if self.binary is None:
            pytest.skip("redis-server not installed (apt-get install redis-server)")
        self.tmp, self.port, self.process = tmp, free_port(), None
        self.url = f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        import redis

        self.process = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.tmp), "--save", "",
             "--appendonly", "yes", "--appendfsync", "always"],
            stdout=subprocess.DEVNULL,
        )
        wait_until(lambda: redis.Redis.from_url(self.url).ping(), "redis-server", self.process)

    def stop(self) -> None:
        if self.process is not None:
            stop(self.process)
            self.process = None


def pool_children(pid: int) -> list[int]:
    """The pool processes of a Celery worker (its main process's children): the ones that run the tasks."""
    result = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True)
    return [int(line) for line in result.stdout.split()]
