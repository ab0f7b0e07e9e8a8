"""What the service survives: the fault-injection tests, run once, one line per fault.

    .venv/bin/python -m benchmarks.faults [-k EXPRESSION]

Runs the end-to-end fault tests (real redis-server, PostgreSQL, moto's S3 server, Celery workers and uvicorn; see
FAULT_TESTS) and prints, per fault, what was injected and for how long, the jobs (or requests) that ran through it
and how many succeeded, and the epoch rows lost and repeated. The scenarios are the tests' own, not a copy: each
test appends its line to the file CAPE_FAULT_REPORT names (tests/helpers.py report_fault) before it asserts, so a
fault that breaks the service is reported too, and the tests' verdicts follow the table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FAULT_TESTS = [
    "tests/e2e/test_faults.py",
    "tests/e2e/test_store_outage.py",
    "tests/e2e/test_database_restart.py",
    "tests/e2e/test_disk_full.py",
    "tests/e2e/test_api_restart.py",
    "tests/e2e/test_predict_load.py",
]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-k", default="", help="pytest's -k: only the tests it selects")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "faults.jsonl"
        missing = [name for name in FAULT_TESTS if not (REPO / name).is_file()]
        if missing:
            raise SystemExit(f"fault tests missing: {missing}")
        command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *FAULT_TESTS]
        if args.k:
            command += ["-k", args.k]
        started = time.monotonic()
        tests = subprocess.run(
            command, cwd=REPO, env={**os.environ, "CAPE_FAULT_REPORT": str(report)}, capture_output=True, text=True
        )
        elapsed = time.monotonic() - started
        lines = [json.loads(line) for line in report.read_text().splitlines()] if report.is_file() else []
    width = max((len(line["injected"]) for line in lines), default=10)
    print(f"{'fault injected':<{width}}  {'lasted':>8}  {'jobs':>5}  {'succeeded':>9}  {'lost':>5}  {'repeated':>8}")
    for line in lines:
        print(
            f"{line['injected']:<{width}}  {line['seconds']:>7.1f}s  {line['jobs']:>5}  {line['succeeded']:>9}  "
            f"{line['epochs_lost']:>5}  {line['epochs_repeated']:>8}"
        )
    print(
        "(lost, repeated: epoch rows of the jobs, against one row for each of their epochs; for predictions, requests "
        "that got an error other than an answer or a prompt 'retry', and requests computed for a client gone)"
    )
    summary = tests.stdout.strip().splitlines()[-1] if tests.stdout.strip() else "no output"
    print(f"the tests behind these lines: {summary} ({elapsed:.0f} s)")
    if tests.returncode != 0:
        print(tests.stdout[-4000:], tests.stderr[-2000:], sep="\n")
    return tests.returncode


if __name__ == "__main__":
    raise SystemExit(main())
