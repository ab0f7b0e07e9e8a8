"""What the tests share, in one module (no test module imports another; the fixtures are in conftest.py).

Sections, in this order:

- Real servers for the end-to-end tests: redis-server, PostgreSQL, moto's S3 server, a Celery worker process and
  uvicorn, and the whole stack on SQLite.
- The service in-process: its caches, API keys.
- Job bodies and playing a user through HTTP: submitting, polling the metrics, waiting for a status or for rows.
- Playing a worker in-process: claiming a job, writing its epochs, ending it.
- Training in-process: a tiny model and training config, a callback that stops a run.
- Pretrained backbone weights offline: a stand-in ImageNet file, the error when it is missing.
- Images for uploads.
- A browser for the page's tests (headless Chromium through Selenium) and what they do with it.
- The real MP-100 annotation files.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import struct
import time
import uuid
import zlib
from collections.abc import Iterable, Iterator
from contextlib import ExitStack, contextmanager
from functools import lru_cache
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest
import torch
import torchvision
from PIL import Image
from sqlmodel import Session

from cape.backbone_weights import IMAGENET_WEIGHTS, cache_dir, imagenet_file
from cape.config import ModelConfig, TrainConfig
from cape.data.catalog import MP100Catalog
from cape.epoch_record import EpochRecord
from cape.health import PART_NAMES, EpochHealth
from cape.training.trainer import Callback
from devtools import local_servers
from devtools.local_servers import (
    MissingBinary,
    free_port,
    fresh_database,
    pool_children,
    postgres_stopped,
    stack_env,
    wait_until,
)
from service import job_state
from service.db import get_engine
from service.migrate import upgrade
from service.models import TERMINAL, JobStatus

REPO = Path(__file__).resolve().parents[1]

__all__ = ["free_port", "fresh_database", "pool_children", "postgres_stopped", "wait_until"]  # re-exported


# --- real servers ----------------------------------------------------------------------------------------------------
# The servers themselves are devtools/local_servers.py's; this adds only what is pytest's: a server whose binary is
# missing makes the test skip with the reason (.ci/run installs them all). Each starts on a free loopback port and is
# stopped when its context ends; the worker and uvicorn run from the repository root.


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


class RestartableRedis(local_servers.RedisServer):
    """A redis-server that a test can stop and start again on the same port and data folder (AOF on, fsync on
    every write), as an outage would: queued messages survive the restart."""

    def __init__(self, tmp: Path):
        with _skip_if_missing():
            super().__init__(tmp, fsync_always=True)


@contextmanager
def postgres_server() -> Iterator[str]:
    """A throwaway PostgreSQL cluster; yields the URL of its ``postgres`` database (see fresh_database, and
    postgres_stopped for an outage)."""
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


class RestartableMoto(local_servers.RestartableMotoServer):
    """moto's S3 server in this process, which a test can stop and start again with its buckets and objects, as an
    outage of the store would (see devtools/local_servers.py)."""

    def __init__(self):
        with _skip_if_missing():
            super().__init__()


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


@contextmanager
def service_stack(
    tmp: Path,
    datasets: dict[str, Path],
    database: str | None = None,
    predict_worker: bool = False,
    api: bool = True,
    datasets_worker: bool = False,
    **settings: str,
):
    """The whole service in ``tmp``: redis-server, the database migrated (``database``'s URL; by default a SQLite
    file in ``tmp``), a training worker (and a predict worker, a datasets worker), the API (unless ``api`` is False:
    a test that starts its own); ``settings`` are CAPE_ settings (``heartbeat_interval_s="1"``). Yields base URL
    (None without the API), environment, folder, and the training worker's process and log."""
    with redis_server(tmp / "redis") as redis_url:
        database = database or f"sqlite:///{tmp / 'cape.sqlite3'}"
        env = stack_env(database, redis_url, datasets, tmp, **settings)
        upgrade(database)
        with ExitStack() as servers:
            worker = servers.enter_context(celery_worker(env, tmp / "worker.log"))
            if predict_worker:
                servers.enter_context(celery_worker(env, tmp / "predict.log", name="predict", queues="predict"))
            if datasets_worker:
                servers.enter_context(celery_worker(env, tmp / "datasets.log", name="datasets", queues="datasets"))
            base = servers.enter_context(uvicorn_server(env, tmp / "api.log")) if api else None
            yield SimpleNamespace(base=base, env=env, tmp=tmp, worker=worker, worker_log=tmp / "worker.log")


def s3_service_env(stack: ExitStack, tmp: Path, datasets: dict[str, Path], prefix: str, **settings: str) -> dict:
    """Redis, a migrated SQLite database and moto's S3 server (bucket "cape"), entered on ``stack``: the CAPE_
    environment of a service whose files are all in S3 under ``prefix``. Its CAPE_ARTIFACTS_DIR names a folder that
    must never be made."""
    moto = stack.enter_context(moto_server())
    moto.create_bucket("cape")
    broker = stack.enter_context(redis_server(tmp / "redis"))
    database = f"sqlite:///{tmp / 'cape.sqlite3'}"
    upgrade(database)
    return {
        **stack_env(database, broker, datasets, tmp / "no-local-store"),
        **moto.store_env("cape", prefix),
        **settings,
    }


def sqlite_stack(
    tmp: Path,
    datasets: dict[str, Path],
    predict_worker: bool = False,
    api: bool = True,
    datasets_worker: bool = False,
    **settings: str,
):
    """service_stack on a SQLite file in ``tmp``."""
    return service_stack(tmp, datasets, None, predict_worker, api, datasets_worker, **settings)


# --- the service in-process ------------------------------------------------------------------------------------------


def reset_service_caches() -> None:
    """The service caches its settings, engine and broker producer per process: tests change them. Its catalogs
    (service.catalogs) are kept: each is a dataset root's files, which no test changes, and reading the synthetic
    dataset's again for every test took a third of a second each time."""
    from service.db import _sqlite_loop_engine, get_engine
    from service.dispatch import producer
    from service.settings import get_settings

    for cached in (get_settings, get_engine, _sqlite_loop_engine, producer):
        cached.cache_clear()


KEY_A, KEY_B = "key-a-0123456789", "key-b-9876543210"


def auth(key):
    """The header that presents an API key."""
    return {"Authorization": f"Bearer {key}"}


# --- job bodies, and playing a user through HTTP ---------------------------------------------------------------------


@lru_cache
def catalog_of(root: str | Path) -> MP100Catalog:
    """A dataset's catalog (split 1), read once per session: reading the synthetic dataset's takes a third of a
    second, and a catalog is never changed."""
    return MP100Catalog(root)


def single(catalog, **overrides):
    """A single-image job body for the API tests, where nothing trains it."""
    body = {"mode": "single_image", "category_id": catalog.category_ids("train")[0], "image_index": 3, "epochs": 5}
    body.update(overrides)
    return body


def single_image(category: int, **overrides) -> dict:
    """A single-image job body that a real worker trains in seconds (one query, 20 episodes per epoch)."""
    body = {
        "mode": "single_image",
        "category_id": category,
        "image_index": 0,
        "epochs": 6,
        "batch_size": 1,
        "num_queries_per_episode": 1,
        "episodes_per_epoch": 20,
        "seed": 0,
    }
    body.update(overrides)
    return body


def trained_single_image(client: httpx.Client, root: Path, epochs: int) -> tuple[dict, tuple, bytes]:
    """A single-image job on the first train category of the dataset at ``root``, trained to its end by the stack's
    worker: the succeeded job, its image's (instance, skeleton) and the image's bytes (see same_image_request)."""
    catalog = catalog_of(root)
    category = catalog.category_ids("train")[0]
    response = client.post("/jobs", json=single_image(category, epochs=epochs))
    assert response.status_code == 201, response.text
    job = wait_for(client, response.json()["id"], {"succeeded", "failed"}, timeout=600)
    assert job["status"] == "succeeded", job["error"]
    instance = catalog.instance(category, 0)
    return job, (instance, catalog.category(category).skeleton), catalog.image_path(instance).read_bytes()


def same_image_request(annotated, image: bytes) -> tuple[dict, dict]:
    """The request that is the job's validation episode: the image, its keypoints, its category's skeleton (the
    support encoder reads the graph) and its annotated box for both crops."""
    instance, skeleton = annotated
    keypoints = [[x, y, int(v)] for (x, y), v in zip(instance.keypoints.tolist(), instance.visibility.tolist())]
    files = {"support_image": ("support.jpg", image, "image/jpeg"), "query_image": ("query.jpg", image, "image/jpeg")}
    box = json.dumps(list(instance.bbox))
    return files, {
        "support_keypoints": json.dumps(keypoints),
        "support_bbox": box,
        "query_bbox": box,
        "skeleton": json.dumps([list(e) for e in skeleton]),
    }


def rows_of(client, job_id):
    """The job's epoch rows so far (TestClient or httpx.Client)."""
    return client.get(f"/jobs/{job_id}/metrics", params={"limit": 1000}).json()["items"]


def wait_for_rows(client, job_id, n, timeout=120):
    """Until the job has written ``n`` epoch rows."""
    wait_until(lambda: len(rows_of(client, job_id)) >= n, f"{n} epochs of job {job_id}", timeout=timeout)


def poll(client: httpx.Client, job_id: str, timeout: float = 240) -> tuple[str, list[dict]]:
    """Poll the metrics as a user would: only newer rows each time, until the status is terminal."""
    rows, after, deadline = [], 0, time.monotonic() + timeout
    while time.monotonic() < deadline:
        page = client.get(f"/jobs/{job_id}/metrics", params={"after_epoch": after}).json()
        rows += page["items"]
        after = page["next_after_epoch"]
        if page["status"] in TERMINAL:
            return page["status"], rows
        time.sleep(0.3)
    raise TimeoutError(f"job {job_id} still {page['status']} after {timeout} s")


def sse_events(lines: Iterable[str]) -> Iterator[dict]:
    """The events of a Server-Sent Events stream's lines as dicts: {"event", "id", "data" (decoded JSON)} or
    {"comment"}. An event counts once its blank line came, as in a browser: one cut short by a dropped connection
    never does."""
    event: dict = {}
    for line in lines:
        if line == "":
            if event:
                yield event
            event = {}
        elif line.startswith(":"):
            yield {"comment": line[1:].strip()}
        else:
            field, _, value = line.partition(":")
            value = value.removeprefix(" ")
            event[field] = json.loads(value) if field == "data" else value


def epochs_lost_and_repeated(epochs: list[int], expected: int) -> tuple[int, int]:
    """Of a job's epoch rows (their epoch numbers), how many of 1..expected are missing and how many rows repeat one."""
    return len(set(range(1, expected + 1)) - set(epochs)), len(epochs) - len(set(epochs))


def report_fault(injected: str, seconds: float, jobs: int, succeeded: int | bool, lost: int, repeated: int) -> None:
    """One line for benchmarks/faults.py: a fault test appends what it injected and what came of it to the JSON lines
    file CAPE_FAULT_REPORT names (nothing when it is not set). Written before the test's asserts, so a failing run
    is reported too."""
    path = os.environ.get("CAPE_FAULT_REPORT")
    if not path:
        return
    line = {"injected": injected, "seconds": round(seconds, 1), "jobs": jobs, "succeeded": int(succeeded)}
    with open(path, "a") as out:
        out.write(json.dumps({**line, "epochs_lost": lost, "epochs_repeated": repeated}) + "\n")


def wait_for(client: httpx.Client, job_id: str, statuses: set[str], timeout: float = 120) -> dict:
    """Until the job's status is one of ``statuses``; returns the job."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.get(f"/jobs/{job_id}").json()
        if job["status"] in statuses:
            return job
        time.sleep(0.1)
    raise TimeoutError(f"job {job_id} is {job['status']}, not {statuses}, after {timeout} s")


# --- playing a worker in-process -------------------------------------------------------------------------------------


def made_health(parts: dict[str, dict] | None = None, **fields) -> EpochHealth:
    """A made-up epoch's instruments, those of a healthy single-image epoch (the small preset's, measured) unless
    ``fields`` say otherwise; ``parts`` overrides fields of the named parts."""
    part = {"grad_norm": 0.2, "grad_norm_max": 0.3, "update_ratio": 3e-4, "trainable": True}
    values = {
        "steps": 20,
        "chance_loss": 6.951,
        "grad_norm": 0.26,
        "grad_norm_max": 0.36,
        "clip_rate": 0.0,
        "clip_max_norm": 1.0,
        "parts": {name: dict(part) for name in PART_NAMES},
        "data_seconds": 0.002,
        "compute_seconds": 0.09,
        "samples_per_second": 11.0,
        "rss_peak_mib": 800.0,
        "keypoints_per_query": 8.0,
        "support_labelled": 0.75,
        "support_visible": 0.75,
        "query_labelled": 0.75,
        "query_visible": 0.75,
        "outside_crop": 0,
    }
    for name, changes in (parts or {}).items():
        values["parts"][name] |= {"grad_norm_max": changes.get("grad_norm", part["grad_norm_max"])} | changes
    return EpochHealth.model_validate(values | fields)


def epoch_row(epoch: int) -> EpochRecord:
    """A made-up epoch's row whose loss falls and PCK rises with the epoch."""
    return EpochRecord(
        epoch=epoch,
        loss=1.0 / epoch,
        loss_ce=0.9 / epoch,
        loss_coords=0.1 / epoch,
        pck=epoch / 10,
        mpck=epoch / 20,
        lr=1e-3,
        seconds=1.5,
    )


def run_epochs(job_id, epochs):
    """Claim the job and write its epoch rows, as a worker would (without training)."""
    with Session(get_engine()) as session:
        assert job_state.claim(session, job_id, "test-worker")
        for epoch in range(1, epochs + 1):
            row = epoch_row(epoch)
            assert job_state.record_epoch(session, job_id, row)
        assert not job_state.record_epoch(session, job_id, row), "a repeated epoch makes no second row"


def run_to(job_id: str, status: JobStatus) -> None:
    """End a queued job as a worker would, without running it."""
    with Session(get_engine()) as session:
        assert job_state.claim(session, uuid.UUID(job_id), "w")
        assert job_state.finish(session, uuid.UUID(job_id), status, worker="w")


# --- training in-process ---------------------------------------------------------------------------------------------

TINY = ModelConfig(
    input_size=64, d_model=32, num_heads=2, encoder_layers=1, decoder_layers=2, graph_layers=1, num_bins=16
)


def tiny_config(root, **overrides) -> TrainConfig:
    """A TINY model trained on the first train category of ``root``: 4 epochs of 2 steps, on the CPU."""
    fields = dict(
        mode="category",
        category_id=catalog_of(root).category_ids("train")[0],
        dataset_root=str(root),
        model=TINY,
        epochs=4,
        episodes_per_epoch=4,
        batch_size=2,
        num_queries_per_episode=2,
        val_episodes_per_category=1,
        val_queries_per_episode=3,
        lr=1e-3,
        device="cpu",
    )
    fields.update(overrides)
    return TrainConfig(**fields)


class StopAfter(Callback):
    """should_stop() turns True once ``calls`` questions have been answered with False; records the epochs."""

    def __init__(self, calls: int):
        self.calls, self.asked, self.epochs = calls, 0, []

    def on_epoch_end(self, metrics):
        self.epochs.append(metrics)

    def should_stop(self) -> bool:
        self.asked += 1
        return self.asked > self.calls


# --- pretrained backbone weights, offline (the ``offline`` fixture) -------------------------------------------------

CLOSED_PORT_PROXY = "http://127.0.0.1:1"  # nothing listens there: a download attempt is refused on loopback
OFF = "downloads are off: CAPE_DOWNLOAD_WEIGHTS=false"


def place_imagenet_file(backbone: str = "resnet18", seed: int = 7) -> torchvision.models.ResNet:
    """A ResNet with seeded random weights, saved where torchvision's cache keeps the backbone's ImageNet file."""
    torch.manual_seed(seed)
    resnet = getattr(torchvision.models, backbone)(weights=None)
    imagenet_file(backbone).parent.mkdir(parents=True, exist_ok=True)
    torch.save(resnet.state_dict(), imagenet_file(backbone))
    return resnet


def not_cached_message(backbone: str, why: str) -> str:
    """The error for a backbone whose ImageNet weights are not in the cache; ``why``: OFF, or the failed download."""
    weights = IMAGENET_WEIGHTS[backbone]
    return (
        f"ImageNet weights for {backbone} are not in torchvision's cache ({why}): put {weights.file_name} "
        f"(from {weights.url}) in {cache_dir()}/ or set TORCH_HOME to a folder whose hub/checkpoints/ has it"
    )


# --- images for uploads ----------------------------------------------------------------------------------------------


def encoded(size=(64, 48), fmt="PNG", **save) -> bytes:
    """A plain image file of ``size`` in ``fmt``."""
    out = io.BytesIO()
    Image.new("RGB", size, (90, 120, 200)).save(out, format=fmt, **save)
    return out.getvalue()


PNG = encoded()


def png_claiming(width: int, height: int) -> bytes:
    """A tiny PNG file whose header claims width x height: a decompression bomb as far as a decoder is concerned."""
    data = bytearray(encoded((1, 1)))
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))  # the IHDR chunk's CRC, so the header is valid
    return bytes(data)


# --- the real MP-100 annotation files --------------------------------------------------------------------------------


def shared_folder(relative: str) -> Path | None:
    """``shared/<relative>`` beside the checkout (or above it); None without it."""
    for parent in Path(__file__).resolve().parents:
        if (parent / "shared" / relative).is_dir():
            return parent / "shared" / relative
    return None


def _real_annotations_dir() -> Path | None:
    """CAPE_MP100_ANNOTATIONS, else shared/mp100/annotations beside the checkout."""
    if env := os.environ.get("CAPE_MP100_ANNOTATIONS"):
        return Path(env)
    return shared_folder("mp100/annotations")


# The real photos' COCO files (shared/real-photos: fifteen public datasets, read-only).
REAL_PHOTOS = shared_folder("real-photos")
REAL_PHOTO_FILES = sorted(REAL_PHOTOS.glob("*/*.json")) if REAL_PHOTOS else []


def real_photo_archive(path: Path, sources: Iterable[str]) -> Path:
    """A .zip (or, by ``path``'s name, a .tar.gz) of real-photo sources as a user packs their own: each source's
    folder, its COCO file and its photos, at the archive's top level."""
    import tarfile
    import zipfile

    files = [f for source in sources for f in sorted((REAL_PHOTOS / source).iterdir())]
    if path.name.endswith(".tar.gz"):
        with tarfile.open(path, "w:gz") as archive:
            for f in files:
                archive.add(f, arcname=f.relative_to(REAL_PHOTOS).as_posix())
    else:
        with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
            for f in files:
                archive.write(f, f.relative_to(REAL_PHOTOS).as_posix())
    return path


_REAL_DIR = _real_annotations_dir()
REAL_FILES = sorted(_REAL_DIR.glob("mp100_split*.json")) if _REAL_DIR else []

requires_real = pytest.mark.skipif(
    not REAL_FILES,
    reason="real MP-100 annotations not found: set CAPE_MP100_ANNOTATIONS "
    "or place shared/mp100/annotations beside the checkout",
)


# --- a browser, for the page's tests ---------------------------------------------------------------------------------
# Moved from tests/e2e/test_page.py, unchanged but for chrome() (was _chrome) and selenium's imports, which are made
# where they are used: a machine without selenium still imports this module (the page tests skip, saying why).

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
browser_test = pytest.mark.skipif(
    not (Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()),
    reason="chromium and chromedriver not installed (apt-get install chromium chromium-driver)",
)
SHOTS = Path("/tmp/page_shots")  # where the lead looks at them


def chrome(performance_log: bool = False):
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium not installed (pip install -e '.[test]')")
    from selenium.common.exceptions import WebDriverException
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1000"):
        options.add_argument(argument)
    options.set_capability(
        "goog:loggingPrefs", {"browser": "ALL", **({"performance": "ALL"} if performance_log else {})}
    )
    try:
        return webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    except WebDriverException as exc:
        pytest.skip(f"chromium does not start here: {exc.msg}")


def wait(driver, condition, timeout: float = 30, message: str = ""):
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.support.ui import WebDriverWait

    # The pages redraw what changed (the list every few seconds): an element can go stale between two looks.
    return WebDriverWait(
        driver, timeout, poll_frequency=0.2, ignored_exceptions=[StaleElementReferenceException]
    ).until(condition, message)


def js(driver, script: str, *args):
    return driver.execute_script(script, *args)


def body_data(driver, name: str):
    return js(driver, f"return document.body.dataset.{name} ?? null")


def open_page(driver, url: str, ready: str) -> None:
    driver.get(url)
    wait(driver, lambda d: body_data(d, ready), message=f"{url} never got ready")


def trace_points(driver, chart: str) -> list[int]:
    return js(driver, f"return (document.getElementById('{chart}').data || []).map(t => t.x.length)")


def fill(driver, field: str, value: str) -> None:
    element = driver.find_element("id", field)
    element.clear()
    element.send_keys(value)


def error_next_to(driver, field: str) -> str:
    return driver.find_element("css selector", f'[data-field="{field}"] [data-error-for="{field}"]').text


def grow_to_page(driver) -> None:
    """The window as tall as the page (up to 4000 pixels), its own frame counted: a screenshot shows what the window
    shows."""
    height = js(driver, "return document.documentElement.scrollHeight + window.outerHeight - window.innerHeight")
    driver.set_window_size(1400, min(max(height, 1000), 4000))


def screenshot(driver, folder: Path, name: str) -> Path:
    """The whole page (the window grown to its height), in the test's folder and in /tmp/page_shots/."""
    grow_to_page(driver)
    try:
        path = folder / f"{name}.png"
        driver.save_screenshot(str(path))
        SHOTS.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, SHOTS / path.name)
        return path
    finally:
        driver.set_window_size(1400, 1000)


def severe_console_errors(driver) -> list[str]:
    """Console errors other than the answers the page expects (a 422 it shows, a 401 before the key)."""
    return [
        entry["message"]
        for entry in driver.get_log("browser")
        if entry["level"] == "SEVERE"
        and not any(f"status of {code}" in entry["message"] for code in (401, 404, 409, 422))
    ]
