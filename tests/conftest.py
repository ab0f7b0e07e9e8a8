import atexit
import os
import shutil
import tempfile
from pathlib import Path

import pytest

from cape.data.synthetic import generate
from tests.helpers import KEY_A, KEY_B, reset_service_caches

# Tests never download model weights: a test that would need ImageNet weights gets the offline error instead (the
# worker and API processes the tests start inherit this).
os.environ["CAPE_DOWNLOAD_WEIGHTS"] = "false"
# The crop cache of this test session only (the processes the tests start inherit it): a test sees the crops its own
# session cut, never a stale cache of an earlier checkout, and nothing accumulates in the user's ~/.cache.
os.environ["CAPE_CROP_CACHE_DIR"] = tempfile.mkdtemp(prefix="cape-test-crops-")
atexit.register(shutil.rmtree, os.environ["CAPE_CROP_CACHE_DIR"], ignore_errors=True)


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
