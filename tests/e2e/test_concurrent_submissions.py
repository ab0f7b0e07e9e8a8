"""Twenty identical submissions with one Idempotency-Key, all at once through real HTTP: one job, on SQLite and
on PostgreSQL. The unique constraint decides, not a check-then-insert."""

import json
import threading

import httpx
import pytest
from sqlmodel import Session, func, select

from cape.data.catalog import MP100Catalog
from service.db import make_engine
from service.migrate import upgrade
from service.models import Job
from tests.helpers import fresh_database, postgres_server, redis_server, uvicorn_server


@pytest.fixture(params=["sqlite", "postgresql"])
def api(request, tmp_path, synthetic_root):
    with redis_server(tmp_path) as broker:
        if request.param == "sqlite":
            database = f"sqlite:///{tmp_path / 'cape.sqlite3'}"
            yield from _serve(database, broker, synthetic_root, tmp_path)
        else:
            with postgres_server() as server:
                yield from _serve(fresh_database(server, "concurrent"), broker, synthetic_root, tmp_path)


def _serve(database, broker, synthetic_root, tmp_path):
    upgrade(database)
    env = {
        "CAPE_DATABASE_URL": database,
        "CAPE_BROKER_URL": broker,
        "CAPE_API_KEYS": "",
        "CAPE_DATASETS": json.dumps({"synthetic": str(synthetic_root)}),
        "CAPE_DEFAULT_DATASET": "synthetic",
    }
    with uvicorn_server(env, tmp_path / "api.log") as base:
        yield base, database


def test_twenty_concurrent_identical_submissions_create_one_job(api, synthetic_root):
    base, database = api
    body = {"mode": "single_image", "category_id": MP100Catalog(synthetic_root).category_ids("train")[0], "epochs": 3}
    start = threading.Barrier(20)
    answers = []

    def submit():
        with httpx.Client(base_url=base, timeout=30) as client:
            start.wait()  # all twenty leave together
            response = client.post("/jobs", json=body, headers={"Idempotency-Key": "same-run"})
            answers.append((response.status_code, response.json()["id"]))

    threads = [threading.Thread(target=submit) for _ in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    codes = sorted(code for code, _ in answers)
    assert codes == [200] * 19 + [201], codes
    assert len({job_id for _, job_id in answers}) == 1
    with Session(make_engine(database)) as session:
        assert session.exec(select(func.count()).select_from(Job)).one() == 1
