"""The benchmarks' load generator against a real uvicorn: it counts every answer, tells non-2xx apart, and its
latencies are the requests it made."""

import json
import uuid

from benchmarks.http_load import closed_loop_load
from service.migrate import upgrade
from tests.helpers import uvicorn_server


def test_closed_loop_load_counts_answers_and_statuses(tmp_path, synthetic_root):
    database = f"sqlite:///{tmp_path / 'cape.sqlite3'}"
    upgrade(database)
    env = {
        "CAPE_DATABASE_URL": database,
        "CAPE_BROKER_URL": "redis://127.0.0.1:1/0",
        "CAPE_API_KEYS": "",
        "CAPE_DATASETS": json.dumps({"synthetic": str(synthetic_root)}),
        "CAPE_DEFAULT_DATASET": "synthetic",
    }
    with uvicorn_server(env, tmp_path / "api.log") as base:
        calls = iter([10.0, 12.5])
        result = closed_loop_load(
            base,
            {"ok": "/healthz", "missing": f"/jobs/{uuid.uuid4()}/metrics"},
            connections=4,
            seconds=1.0,
            warm_up=0.2,
            server_cpu=lambda: next(calls),
        )
    ok, missing = result.tallies["ok"], result.tallies["missing"]
    assert len(ok.latencies) > 10 and ok.non_2xx == 0 and ok.errors == 0
    assert len(missing.latencies) > 10 and missing.non_2xx == len(missing.latencies), "every 404 is counted as such"
    assert all(0 < latency < 1.5 for latency in ok.latencies + missing.latencies)
    assert 1.0 <= result.seconds < 2.0 and result.server_cpu == 2.5 and result.client_cpu > 0
    log = (tmp_path / "api.log").read_text()
    assert log.count('"GET /healthz HTTP/1.1" 200') >= len(ok.latencies), "each counted answer was a real request"
