import atexit
import gc
import ipaddress
import os
import shutil
import socket
import tempfile
import urllib.request
from pathlib import Path

import pytest
import torch

from cape.data.synthetic import generate
from tests.helpers import CLOSED_PORT_PROXY, KEY_A, KEY_B, catalog_of, chrome, reset_service_caches

# Tests never download model weights: a test that would need ImageNet weights gets the offline error instead (the
# worker and API processes the tests start inherit this).
os.environ["CAPE_DOWNLOAD_WEIGHTS"] = "false"
# The crop cache of this test session only (the processes the tests start inherit it): a test sees the crops its own
# session cut, never a stale cache of an earlier checkout, and nothing accumulates in the user's ~/.cache.
os.environ["CAPE_CROP_CACHE_DIR"] = tempfile.mkdtemp(prefix="cape-test-crops-")
atexit.register(shutil.rmtree, os.environ["CAPE_CROP_CACHE_DIR"], ignore_errors=True)
# Torch on one thread, here and in the processes the tests start (they inherit OMP_NUM_THREADS): the tests' models
# are tiny, so a second intra-op thread costs more in synchronisation than it saves, and far more beside the other
# busy processes of an end-to-end test.
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
# What is loaded by now (torch, the service, the project) lives as long as the session: frozen once, the collector no
# longer scans it, and the apps the tests start leave a frozen heap as it is (service.main.lifespan) instead of
# collecting it all at every start (half a second per TestClient).
gc.freeze()


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory) -> Path:
    """A synthetic MP-100-layout dataset (seed 0), generated once per test session.

    To skip the generation, point CAPE_TEST_SYNTHETIC_ROOT at a folder written by
    ``python -m cape.data.synthetic --out DIR`` (seed 0): it is used as it is when it has ``annotations/``.
    """
    reuse = os.environ.get("CAPE_TEST_SYNTHETIC_ROOT")
    if reuse and (Path(reuse) / "annotations").is_dir():
        return Path(reuse)
    root = tmp_path_factory.mktemp("synthetic")
    generate(root, seed=0)
    return root


@pytest.fixture(scope="session")
def category(synthetic_root) -> int:
    """The synthetic dataset's first train category: what a test trains when any category will do."""
    return catalog_of(synthetic_root).category_ids("train")[0]


@pytest.fixture(scope="module")
def browser():
    """Headless Chromium for a module's page tests (skips, saying why, without chromium, chromedriver or selenium)."""
    driver = chrome()
    yield driver
    driver.quit()


@pytest.fixture
def service_env(tmp_path, synthetic_root, monkeypatch):
    """Environment of a service on a fresh migrated SQLite file and the synthetic dataset."""
    from service.migrate import upgrade

    env = {
        "CAPE_DATABASE_URL": f"sqlite:///{tmp_path / 'cape.sqlite3'}",
        "CAPE_BROKER_URL": "redis://127.0.0.1:1/0",  # nothing listens there: unit tests use a fake dispatcher
        "CAPE_DATASETS": f'{{"synthetic": "{synthetic_root}"}}',
        "CAPE_DEFAULT_DATASET": "synthetic",
        "CAPE_ARTIFACTS_DIR": str(tmp_path / "artifacts"),
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    reset_service_caches()
    upgrade()
    yield env
    reset_service_caches()


@pytest.fixture
def dispatched():
    return []


@pytest.fixture
def client(service_env, dispatched):
    from fastapi.testclient import TestClient

    from service.dispatch import get_dispatcher
    from service.main import create_app

    app = create_app()

    def record(job_id):
        dispatched.append(job_id)
        return True

    app.dependency_overrides[get_dispatcher] = lambda: record
    with TestClient(app) as test_client:
        yield test_client


@pytest.fixture
def secured(service_env, monkeypatch):
    """The API through TestClient with two API keys, KEY_A and KEY_B (see auth)."""
    from fastapi.testclient import TestClient

    from service.dispatch import get_dispatcher
    from service.main import create_app

    monkeypatch.setenv("CAPE_API_KEYS", f"{KEY_A}, {KEY_B}")
    reset_service_caches()
    app = create_app()
    app.dependency_overrides[get_dispatcher] = lambda: lambda job_id: True
    with TestClient(app) as client:
        yield client


@pytest.fixture
def offline(tmp_path, monkeypatch) -> dict:
    """Downloads off, an empty torchvision cache (TORCH_HOME in ``tmp_path``), proxies to a closed port, and no
    socket may connect beyond loopback; returns the environment it set, for the processes a test starts."""
    env = {
        "TORCH_HOME": str(tmp_path / "torch-home"),
        "CAPE_DOWNLOAD_WEIGHTS": "false",
        **dict.fromkeys(("https_proxy", "HTTPS_PROXY", "http_proxy", "HTTP_PROXY"), CLOSED_PORT_PROXY),
    }
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    for name in ("no_proxy", "NO_PROXY", "XDG_CACHE_HOME"):
        monkeypatch.delenv(name, raising=False)
    connect = socket.socket.connect

    def loopback_only(sock, address):
        if sock.family in (socket.AF_INET, socket.AF_INET6) and not ipaddress.ip_address(address[0]).is_loopback:
            raise AssertionError(f"a test tried to reach {address}")
        return connect(sock, address)

    monkeypatch.setattr(socket.socket, "connect", loopback_only)
    # urlopen (torch.hub's download) keeps the opener it built first, with the proxies of that moment: an earlier
    # test's call would make this one's download skip the closed proxy.
    monkeypatch.setattr(urllib.request, "_opener", None)
    return env
