"""Predictions through HTTP: latency cold and warm, throughput with concurrent clients, and whether the answer is
what validation measured.

    python -m benchmarks.predict [--dataset_root data/synthetic]

On one machine: uvicorn, redis-server, SQLite, a training worker and a predict worker (CPU, small preset). It trains
a single-image job and a category job through the API, then:

- correctness: the single-image job's image as support and query (its box, its skeleton) must give validation's
  PCK@0.2 and its very predictions; the category job's checkpoint predicts other images of its category from one
  support, scored against their ground truth beside the job's own validation PCK;
- cold: the first request for each checkpoint (the worker loads it), one query;
- warm: sequential requests on a loaded checkpoint, p50 / p99 (targets: cold < 2 s, warm p50 < 150 ms on 2 cores),
  on the dataset's image and on a 12 MP photo-sized copy of it;
- throughput: 8 clients at once, requests per second and p50 / p99.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

from benchmarks.api import (
    REPO,
    api_server,
    database,
    percentile_ms,
    redis_server,
    require_binaries,
    service_env,
    verdict,
)
from benchmarks.common import dataset_root
from cape.data.catalog import MP100Catalog
from cape.evaluation.metrics import correct_keypoints
from devtools.local_servers import celery_worker
from service.models import TERMINAL

WARM_REQUESTS = 100
CLIENTS, THROUGHPUT_S = 8, 10.0


def wait(client: httpx.Client, job_id: str, timeout: float = 900) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.get(f"/jobs/{job_id}").json()
        if job["status"] in TERMINAL:
            if job["status"] != "succeeded":
                raise SystemExit(f"job {job_id} ended {job['status']}: {job['error']}")
            return job
        time.sleep(0.5)
    raise SystemExit(f"job {job_id} did not finish in {timeout:.0f} s")


def request_for(catalog: MP100Catalog, category: int, support_index: int, query_index: int, query_bytes=None):
    support, query = catalog.instance(category, support_index), catalog.instance(category, query_index)
    keypoints = [[x, y, int(v)] for (x, y), v in zip(support.keypoints.tolist(), support.visibility.tolist())]
    files = {
        "support_image": ("s.jpg", catalog.image_path(support).read_bytes(), "image/jpeg"),
        "query_image": ("q.jpg", query_bytes or catalog.image_path(query).read_bytes(), "image/jpeg"),
    }
    data = {
        "support_keypoints": json.dumps(keypoints),
        "support_bbox": json.dumps(list(support.bbox)),
        "skeleton": json.dumps([list(e) for e in catalog.category(category).skeleton]),
    }
    if query_bytes is None:
        data["query_bbox"] = json.dumps(list(query.bbox))
    return files, data, query


def pck(answer: dict, query) -> float:
    pred = np.array(answer["keypoints"])[None]
    norm = np.array([max(query.bbox[2], query.bbox[3])])
    correct = correct_keypoints(pred, query.keypoints[None], query.labelled[None], norm)[0]
    return float(correct[query.labelled].mean())


def post(client: httpx.Client, job_id: str, files, data, **fields) -> tuple[dict, float]:
    started = time.perf_counter()
    response = client.post(f"/jobs/{job_id}/predict", files=files, data={**data, **fields})
    elapsed = time.perf_counter() - started
    if response.status_code != 200:
        raise SystemExit(f"predict answered {response.status_code}: {response.text}")
    return response.json(), elapsed


def photo_sized(image: bytes, width: int = 4000, height: int = 3000) -> bytes:
    out = io.BytesIO()
    Image.open(io.BytesIO(image)).convert("RGB").resize((width, height)).save(out, format="JPEG", quality=90)
    return out.getvalue()


def throughput(base: str, job_id: str, files, data) -> tuple[float, list[float], int]:
    latencies: list[float] = []
    failures = 0
    stop = time.monotonic() + THROUGHPUT_S
    lock = threading.Lock()

    def client_loop():
        nonlocal failures
        with httpx.Client(base_url=base, timeout=60) as client:
            while time.monotonic() < stop:
                started = time.perf_counter()
                response = client.post(f"/jobs/{job_id}/predict", files=files, data=data)
                with lock:
                    if response.status_code == 200:
                        latencies.append(time.perf_counter() - started)
                    else:
                        failures += 1

    threads = [threading.Thread(target=client_loop) for _ in range(CLIENTS)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return len(latencies) / (time.perf_counter() - started), latencies, failures


def train(client: httpx.Client, body: dict) -> dict:
    response = client.post("/jobs", json=body)
    if response.status_code != 201:
        raise SystemExit(f"POST /jobs answered {response.status_code}: {response.text}")
    return wait(client, response.json()["id"])


@contextmanager
def predict_stack(root: Path, prefix: str) -> Iterator[tuple[httpx.Client, Path]]:
    """On this machine: redis-server, SQLite, a training worker, a predict worker and the API, in a temporary folder
    named with ``prefix``; yields a client of the API and the folder (the predict worker logs to predict.log)."""
    with tempfile.TemporaryDirectory(prefix=prefix) as tmp_name, ExitStack() as stack:
        tmp = Path(tmp_name)
        broker_url = stack.enter_context(redis_server(tmp)).url
        env = service_env(stack.enter_context(database("sqlite", tmp)), broker_url, root, tmp)
        stack.enter_context(celery_worker(env, tmp / "worker.log", name="bench", mingle=False, cwd=REPO))
        stack.enter_context(
            celery_worker(env, tmp / "predict.log", name="predict", queues="predict", mingle=False, cwd=REPO)
        )
        base = stack.enter_context(api_server(env, tmp / "api.log")).url
        yield stack.enter_context(httpx.Client(base_url=base, timeout=120)), tmp


def single_image(category: int, epochs: int) -> dict:
    """The single-image job body the predict benchmarks train: one query, 20 episodes per epoch."""
    return {
        "mode": "single_image",
        "category_id": category,
        "image_index": 0,
        "epochs": epochs,
        "batch_size": 1,
        "num_queries_per_episode": 1,
        "episodes_per_epoch": 20,
    }


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.predict", description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset_root")
    args = parser.parse_args()
    require_binaries(["sqlite"])
    root = dataset_root(args.dataset_root)
    catalog = MP100Catalog(root)
    category = catalog.category_ids("train")[0]
    print(
        f"predict benchmark: {os.cpu_count()} cores, CPU, small preset, SQLite, one training and one predict worker, "
        f"client on the same machine; dataset {root}, category {category}",
        flush=True,
    )
    with predict_stack(root, "cape-bench-predict-") as (client, _):
        print("training a single-image job (10 epochs) and a category job (8 epochs) ...", flush=True)
        single = train(client, single_image(category, epochs=10))
        whole = train(client, {"mode": "category", "category_id": category, "epochs": 8, "episodes_per_epoch": 40})

        print("\nlatency, one query per request, through HTTP (cold first: no checkpoint has been used yet)")
        cold = []
        for job in (single, whole):
            for name in ("best", "last"):
                files, data, _ = request_for(catalog, job["category_id"], 0, 0)
                answer, elapsed = post(client, job["id"], files, data, checkpoint=name)
                if answer["timing"]["cached"]:
                    raise SystemExit(f"the {name} checkpoint of job {job['id']} was loaded already: not a cold request")
                cold.append((elapsed, answer["timing"]["load_ms"]))
        worst = max(c[0] for c in cold)
        print(
            "  cold (first request for each of 4 checkpoints): median "
            f"{1000 * statistics.median(c[0] for c in cold):.0f} ms, "
            f"worst {1000 * worst:.0f} ms, of which loading the model {statistics.median(c[1] for c in cold):.0f} ms "
            f"(median)  target < 2000 ms: {verdict(worst < 2.0)}"
        )
        print("\ncorrectness")
        files, data, query = request_for(catalog, category, 0, 0)
        answer, _ = post(client, single["id"], files, data, checkpoint="last")
        validation = client.get(f"/jobs/{single['id']}/epochs/{single['total_epochs']}/predictions").json()["queries"][
            0
        ]
        gap = float(np.abs(np.array(answer["keypoints"]) - np.array(validation["pred"])).max())
        same = abs(pck(answer, query) - validation["pck"]) < 1e-9
        print(
            f"  single-image job, support = query = its image: PCK@0.2 {100 * pck(answer, query):.1f}% "
            f"(validation at epoch {single['total_epochs']}: {100 * validation['pck']:.1f}%), largest gap to "
            f"validation's predictions {gap:.2e} px  {verdict(same and gap < 1e-3)}"
        )
        n = len(catalog.instances(category, "train"))
        scores = []
        for index in range(1, min(n, 11)):
            files, data, query = request_for(catalog, category, 0, index)
            scores.append(pck(post(client, whole["id"], files, data)[0], query))
        print(
            f"  category job, support = image 0, queries = images 1..{len(scores)} of the category: mean PCK@0.2 "
            f"{100 * statistics.mean(scores):.1f}% (the job's best validation PCK on its train images: "
            f"{100 * whole['best_pck']:.1f}%)"
        )

        print("\nlatency, warm")
        files, data, _ = request_for(catalog, category, 0, 1)
        rows = [("dataset image", files, data)]
        big = photo_sized(files["query_image"][1])
        _, photo_data, _ = request_for(catalog, category, 0, 1)
        rows.append(
            (
                "12 MP photo (4000x3000 JPEG)",
                {**files, "query_image": ("q.jpg", big, "image/jpeg")},
                {k: v for k, v in photo_data.items() if k != "query_bbox"},
            )
        )
        for label, row_files, row_data in rows:
            post(client, whole["id"], row_files, row_data)
            took, inference = [], []
            for _ in range(WARM_REQUESTS):
                answer, elapsed = post(client, whole["id"], row_files, row_data)
                took.append(elapsed)
                inference.append(answer["timing"]["inference_ms"])
            p50 = percentile_ms(took, 0.5)
            print(
                f"  warm, {label}: p50 {p50:.0f} ms, p99 {percentile_ms(took, 0.99):.0f} ms over {WARM_REQUESTS} "
                "requests "
                f"(model alone p50 {statistics.median(inference):.0f} ms)"
                + (f"  target p50 < 150 ms: {verdict(p50 < 150)}" if label == "dataset image" else "")
            )

        rate, latencies, failures = throughput(str(client.base_url), whole["id"], files, data)
        print(
            f"\nthroughput, {CLIENTS} clients for {THROUGHPUT_S:.0f} s, one predict worker: {rate:.1f} requests/s, "
            f"p50 {percentile_ms(latencies, 0.5):.0f} ms, p99 {percentile_ms(latencies, 0.99):.0f} ms, {failures} "
            "failed"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
