"""Real servers for the end-to-end tests: redis-server, PostgreSQL, moto's S3 server, a Celery worker process and
uvicorn.

The servers themselves are service/local_servers.py's; this adds only what is pytest's: a server whose binary is
missing makes the test skip with the reason (``.ci/run`` installs them all). Each starts on a free loopback port and
is stopped when its context ends; the worker and uvicorn run from the repository root, their output in a log file.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from types import SimpleNamespace

import pytest

from service import local_servers
from service.local_servers import (
    MissingBinary, fresh_database, free_port, pool_children, restart_postgres, stack_env, wait_until,
)
from service.migrate import upgrade

REPO = Path(__file__).resolve().parents[1]

__all__ = ["RestartableRedis", "celery_worker", "free_port", "fresh_database", "moto_server", "pool_children",
           "postgres_server", "redis_server", "restart_postgres", "sqlite_stack", "uvicorn_server", "wait_until"]


@contextmanager
def _skip_if_missing() -> Iterator[None]:
    try:
        yield
    except MissingBinary as exc:
        pytest.skip(str(exc))


@contextmanager
def redis_server(tmp: Path) -> Iterator[str]:
    """A redis-server with its data in ``tmp``; yields its URL."""
    with _skip_if_missing():
        server = local_servers.RedisServer(tmp)
    with server:
        yield server.url


@contextmanager
def postgres_server() -> Iterator[str]:
    """A throwaway PostgreSQL cluster; yields the URL of its ``postgres`` database (see fresh_database)."""
    with _skip_if_missing():
        local_servers.postgres_binaries()
    with local_servers.postgres_server() as url:
        yield url


@contextmanager
def moto_server(log: Path | None = None) -> Iterator[local_servers.MotoServer]:
    """moto's S3-compatible server on loopback; yields it (``create_bucket``, ``store_env``)."""
    with _skip_if_missing():
        server = local_servers.MotoServer(log=log)
    with server:
        yield server


@contextmanager
def celery_worker(env: dict, log: Path, name: str = "test", queues: str = "gpu"):
    """A Celery worker on ``queues`` (``predict`` for predictions), ready; yields its process (``.pid``: see
    pool_children)."""
    with local_servers.celery_worker(env, log, name=name, queues=queues, mingle=False, cwd=REPO) as worker:
        yield worker.process


@contextmanager
def uvicorn_server(env: dict, log: Path):
    """The API in its own uvicorn process, answering; yields its base URL."""
    with local_servers.uvicorn_server(env, log, cwd=REPO) as api:
        yield api.url


class RestartableRedis(local_servers.RedisServer):
    """A redis-server that a test can stop and start again on the same port and data folder (AOF on, fsync on
    every write), as an outage would: queued messages survive the restart."""

    def __init__(self, tmp: Path):
        with _skip_if_missing():
            super().__init__(tmp, fsync_always=True)


@contextmanager
def sqlite_stack(tmp: Path, datasets: dict[str, Path], predict_worker: bool = False, **settings: str):
    """The whole service in ``tmp``: redis-server, a migrated SQLite file, a training worker (and a predict worker),
    the API; ``settings`` are CAPE_ settings (``heartbeat_interval_s="1"``). Yields base URL, environment, folder."""
    with redis_server(tmp / "redis") as redis_url:
        database = f"sqlite:///{tmp / 'cape.sqlite3'}"
        env = stack_env(database, redis_url, datasets, tmp, **settings)
        upgrade(database)
        with ExitStack() as servers:
            servers.enter_context(celery_worker(env, tmp / "worker.log"))
            if predict_worker:
                servers.enter_context(celery_worker(env, tmp / "predict.log", name="predict", queues="predict"))
            base = servers.enter_context(uvicorn_server(env, tmp / "api.log"))
            yield SimpleNamespace(base=base, env=env, tmp=tmp)
