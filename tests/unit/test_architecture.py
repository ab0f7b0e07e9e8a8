"""The architecture's promises (docs/architecture.md), each checked where it can break: who imports whom, no import
cycle, no torch in the API process, and an API surface that grows only on purpose."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _python(code: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **(env or {})},
    )


def test_import_contracts_hold_and_there_is_no_import_cycle():
    """import-linter with every contract in pyproject.toml: no cycle among the modules of a package (at any depth,
    function-level imports included), cape free of web/DB/Celery, the service free of the worker and importing only
    cape's torch-free modules, those free of torch, and cape's layers."""
    lint = Path(sys.executable).parent / "lint-imports"
    result = subprocess.run([str(lint), "--no-cache"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    contracts = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]
    assert f"{len(contracts)} kept, 0 broken" in result.stdout, result.stdout


def test_the_api_and_the_worker_modules_load_without_torch():
    """The API must start fast and never load torch; the worker imports it inside the task only, after the prefork
    pool has forked. Importing the application (and so every module it imports) must leave torch out."""
    result = _python(
        """
        import sys
        import service.main, worker.celery_app, worker.tasks, worker.lifecycle
        app = service.main.create_app()
        app.openapi()
        loaded = sorted(m for m in sys.modules if m == "torch" or m.startswith(("torch.", "torchvision")))
        print(loaded)
        assert not loaded, loaded
        """
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_cli_checks_its_arguments_against_the_dataset_before_importing_torch(synthetic_root):
    result = _python(
        f"""
        import sys
        from cape.train import main
        try:
            main(["--dataset_root", {str(synthetic_root)!r}, "--debug_single_image", "12345"])
        except SystemExit as exit:
            assert exit.code == 2, exit.code
        assert "torch" not in sys.modules, "torch was imported before the arguments were checked"
        """
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "category 12345 does not exist in split 1: valid ids are" in result.stderr


def _job_create_schema(extra_field: bool) -> dict:
    """POST /jobs's request schema from a fresh process, optionally with a field added to TrainConfig first."""
    result = _python(
        f"""
        import json
        import cape.config

        if {extra_field}:
            class Extended(cape.config.TrainConfig):
                secret_knob: int = 3

            cape.config.TrainConfig = Extended

        from service.main import create_app
        schema = create_app().openapi()
        body = schema["paths"]["/jobs"]["post"]["requestBody"]["content"]["application/json"]["schema"]
        print(json.dumps({{"body": body, "JobCreate": schema["components"]["schemas"]["JobCreate"]}}))
        """
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_a_field_added_to_train_config_is_not_api_surface():
    plain, extended = _job_create_schema(False), _job_create_schema(True)
    assert "secret_knob" not in json.dumps(extended)
    assert plain == extended
    assert {"mode", "category_id", "image_index", "epochs", "lr", "dataset"} <= set(plain["JobCreate"]["properties"])
