"""Predictions under load (issue 17): latency with and without a training job on the same machine, and many requests
at once to one predict worker.

    python -m benchmarks.predict_load [--dataset_root data/synthetic] [--requests 100] [--concurrent 45] [--photos DIR]

On one machine: uvicorn, redis-server, SQLite, a training worker and one predict worker (CPU, small preset), the
client too. It trains a single-image job for a checkpoint, warms the model, then, in one run:

- alone: N requests in a row, p50 / p99;
- beside training: a category job training on the same machine (the training worker), the same N requests, p50 / p99,
  and the ratio of each to alone;
- at once: C requests at the same instant, twice in a row (in issue 17 the second round fared worse, behind the first
  round's abandoned requests), alone and then beside training: how many were answered (200), refused at once (503
  "predict workers busy" with Retry-After), refused while waiting (the same 503, when a re-check of the estimate found
  it could no longer be answered in time), timed out (504) or anything else (a 503 that says the broker is down),
  the answered ones' p50 / p99, the slowest refusal, and how many requests the worker computed (computed = answered:
  nothing for a client that had gone).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

from benchmarks.api import percentile_ms, require_binaries
from benchmarks.common import dataset_root
from benchmarks.predict import predict_stack, request_for, single_image, train
from cape.data.catalog import MP100Catalog

COMPUTED = re.compile(r"prediction \w+ for job \S+ answered")


def in_a_row(client: httpx.Client, job_id: str, files, data, n: int) -> tuple[list[float], list[str]]:
    took, failures = [], []
    for _ in range(n):
        started = time.perf_counter()
        response = client.post(f"/jobs/{job_id}/predict", files=files, data=data)
        if response.status_code == 200:
            took.append(time.perf_counter() - started)
        else:
            failures.append(f"{response.status_code} {response.text[:120]}")
    return took, failures


def at_once(base: str, job_id: str, files, data, n: int) -> list[tuple[httpx.Response, float]]:
    def one(client):
        started = time.perf_counter()
        response = client.post(f"/jobs/{job_id}/predict", files=files, data=data)
        return response, time.perf_counter() - started

    limits = httpx.Limits(max_connections=n, max_keepalive_connections=n)
    with httpx.Client(base_url=base, timeout=120, limits=limits) as client, ThreadPoolExecutor(n) as pool:
        return list(pool.map(lambda _: one(client), range(n)))


def outcome(response: httpx.Response) -> str:
    if response.status_code == 200:
        return "answered"
    detail = str(response.json().get("detail", ""))
    if response.status_code == 503 and detail.startswith("predict workers busy") and "retry-after" in response.headers:
        return "withdrawn" if "still ahead" in detail else "refused"
    if response.status_code == 504:
        return "timed out"
    return "other"


def round_line(label: str, results, computed: int) -> str:
    kinds = [outcome(r) for r, _ in results]
    answered = [t for (r, t), k in zip(results, kinds) if k == "answered"]
    refused = [t for (r, t), k in zip(results, kinds) if k == "refused"]
    withdrawn = [t for (r, t), k in zip(results, kinds) if k == "withdrawn"]
    others = {
        f"{r.status_code} {str(r.json().get('detail'))[:80]}" for (r, _), k in zip(results, kinds) if k == "other"
    }
    line = (
        f"  {label}: {kinds.count('answered')} answered (p50 {percentile_ms(answered, 0.5):.0f} ms, p99 "
        f"{percentile_ms(answered, 0.99):.0f} ms), {kinds.count('refused')} refused at once"
        + (f" (slowest {1000 * max(refused):.0f} ms)" if refused else "")
        + f", {kinds.count('withdrawn')} refused while waiting"
        + (f" (after {min(withdrawn):.1f} to {max(withdrawn):.1f} s)" if withdrawn else "")
        + f", {kinds.count('timed out')} timed out, {kinds.count('other')} other; the worker computed {computed}"
    )
    return line + ("".join(f"\n    other: {o}" for o in sorted(others)) if others else "")


def photo_request(folder: Path) -> tuple[dict, dict]:
    """A request on real photos (a COCO keypoints file and its images): the first annotated image is the support,
    with its labelled keypoints, box and skeleton; another image of the folder is the query, whole."""
    from pycocotools.coco import COCO

    with contextlib.redirect_stdout(io.StringIO()):  # COCO announces its loading
        coco = COCO(str(next(folder.glob("*.json"))))
    annotation = coco.loadAnns(coco.getAnnIds())[0]
    support = coco.loadImgs(annotation["image_id"])[0]
    query = next(image for image in coco.loadImgs(coco.getImgIds()) if image["id"] != support["id"])
    flat = annotation["keypoints"]
    keypoints = [[flat[i], flat[i + 1], int(flat[i + 2] > 0)] for i in range(0, len(flat), 3)]
    skeleton = [[a - 1, b - 1] for a, b in coco.loadCats(annotation["category_id"])[0].get("skeleton", [])]

    def upload(image: dict) -> tuple[str, bytes, str]:
        path = folder / image["file_name"]
        return path.name, path.read_bytes(), "image/png" if path.suffix == ".png" else "image/jpeg"

    files = {"support_image": upload(support), "query_image": upload(query)}
    data = {
        "support_keypoints": json.dumps(keypoints),
        "support_bbox": json.dumps(annotation["bbox"]),
        "skeleton": json.dumps(skeleton),
    }
    return files, data


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.predict_load", description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset_root")
    parser.add_argument("--requests", type=int, default=100, help="requests in a row, alone and beside training")
    parser.add_argument("--concurrent", type=int, default=45, help="requests at once")
    parser.add_argument(
        "--photos",
        type=Path,
        help="predict on real photos instead: a folder with a COCO keypoints file and its images (e.g. "
        "../shared/real-photos/300w); the first annotated image is the support, another the query",
    )
    args = parser.parse_args()
    require_binaries(["sqlite"])
    root = dataset_root(args.dataset_root)
    catalog = MP100Catalog(root)
    category = catalog.category_ids("train")[0]
    print(
        f"predictions under load: {os.cpu_count()} cores, CPU, small preset, SQLite, one training and one predict "
        f"worker, the client on the same machine; dataset {root}, category {category}",
        flush=True,
    )
    with predict_stack(root, "cape-bench-predict-load-") as (client, tmp):
        predict_log, base = tmp / "predict.log", str(client.base_url)

        def computed() -> int:
            return len(COMPUTED.findall(predict_log.read_text(errors="replace")))

        print("training a single-image job (4 epochs) for its checkpoint ...", flush=True)
        single = train(client, single_image(category, epochs=4))
        files, data = photo_request(args.photos) if args.photos else request_for(catalog, category, 0, 1)[:2]
        in_a_row(client, single["id"], files, data, 5)  # the model loaded, service times recorded

        def rounds(label: str) -> None:
            for n in (1, 2):
                before = computed()
                results = at_once(base, single["id"], files, data, args.concurrent)
                time.sleep(1.0)  # the worker's log line for a request it had in hand
                print(round_line(f"{args.concurrent} at once, {label}, round {n}", results, computed() - before))

        print(
            f"\n{args.requests} requests in a row (one query each, through HTTP), then {args.concurrent} at once",
            flush=True,
        )
        alone, failed_alone = in_a_row(client, single["id"], files, data, args.requests)
        print(
            f"  alone:          p50 {percentile_ms(alone, 0.5):.0f} ms, p99 {percentile_ms(alone, 0.99):.0f} ms"
            + (f", {len(failed_alone)} failed: {sorted(set(failed_alone))}" if failed_alone else ""),
            flush=True,
        )
        rounds("alone")

        response = client.post(
            "/jobs", json={"mode": "category", "category_id": category, "epochs": 200, "episodes_per_epoch": 40}
        )
        if response.status_code != 201:
            raise SystemExit(f"POST /jobs answered {response.status_code}: {response.text}")
        training = response.json()["id"]
        deadline = time.monotonic() + 300
        while client.get(f"/jobs/{training}").json()["status"] != "running":
            if time.monotonic() > deadline:
                raise SystemExit("the training job did not start in 300 s")
            time.sleep(0.5)
        time.sleep(3)  # past its start (the dataset, the model): training proper
        try:
            beside, failed_beside = in_a_row(client, single["id"], files, data, args.requests)
            still = client.get(f"/jobs/{training}").json()
            print(
                f"  beside training: p50 {percentile_ms(beside, 0.5):.0f} ms, p99 {percentile_ms(beside, 0.99):.0f} ms"
                + (f", {len(failed_beside)} failed: {sorted(set(failed_beside))}" if failed_beside else "")
                + f" (the category job {still['status']}, at epoch {still['current_epoch']} by the end)",
                flush=True,
            )
            rounds("beside training")
        finally:
            client.post(f"/jobs/{training}/cancel")
        p50, p99 = (percentile_ms(beside, q) / percentile_ms(alone, q) for q in (0.5, 0.99))
        print(f"\nratio beside training / alone, {args.requests} in a row: p50 x{p50:.2f}, p99 x{p99:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
