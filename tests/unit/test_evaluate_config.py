"""One evaluation configuration (cape.config.EvaluateConfig): ``python -m cape.evaluate``'s flags and an evaluate job's
fields have the same names, defaults and bounds, and a device name is checked the same way by the CLIs, the runs and
the service's settings."""

from __future__ import annotations

import subprocess
import sys
import typing

import pytest
from pydantic import ValidationError

from cape import evaluate
from cape.config import EvaluateConfig, Shots, TrainConfig
from service.main import create_app
from service.models import EvaluateJobConfig
from service.settings import Settings
from tests.helpers import REPO

CLIENT_FIELDS = {"shots", "episodes_per_category", "seed"}


@pytest.fixture(scope="module")
def job_schema() -> dict:
    """The evaluate job's request schema, as /openapi.json serves it to clients and the page."""
    return create_app().openapi()["components"]["schemas"]["EvaluateCreate"]["properties"]


def cli_defaults() -> dict:
    args = evaluate.parser().parse_args(["--checkpoint", "run.pt"])
    return {name: getattr(args, name) for name in EvaluateConfig.model_fields}


def test_the_cli_has_a_flag_per_field_with_its_default():
    defaults = cli_defaults()
    assert defaults.pop("shots") == [EvaluateConfig.model_fields["shots"].default]  # the paper table takes several
    assert defaults == {name: field.default for name, field in EvaluateConfig.model_fields.items() if name != "shots"}
    assert evaluate.config_from_args(evaluate.parser().parse_args(["--checkpoint", "run.pt"])) == EvaluateConfig()


def test_the_job_and_the_cli_agree_on_defaults_and_bounds(job_schema):
    assert set(job_schema) & set(EvaluateConfig.model_fields) == CLIENT_FIELDS
    defaults = cli_defaults()
    assert job_schema["shots"]["default"] == defaults["shots"][0]
    for name in CLIENT_FIELDS - {"shots"}:
        assert job_schema[name]["default"] == defaults[name], name
        # the CLI takes the schema's bounds and refuses one step beyond either
        low, high = int(job_schema[name]["minimum"]), int(job_schema[name]["maximum"])
        for value in (low, high):
            args = evaluate.parser().parse_args(["--checkpoint", "run.pt", f"--{name}", str(value)])
            assert getattr(evaluate.config_from_args(args), name) == value
        for value in (low - 1, high + 1):
            args = evaluate.parser().parse_args(["--checkpoint", "run.pt", f"--{name}", str(value)])
            with pytest.raises(ValidationError) as refused:
                evaluate.config_from_args(args)
            assert refused.value.errors()[0]["loc"] == (name,)


def test_the_shot_counts_are_one_list_for_the_cli_the_job_and_the_config(job_schema, capsys):
    assert tuple(job_schema["shots"]["enum"]) == typing.get_args(Shots) == (1, 5)
    accepted = set()
    for shots in range(7):
        try:
            evaluate.parser().parse_args(["--checkpoint", "run.pt", "--shots", str(shots)])
            accepted.add(shots)
        except SystemExit:
            assert "--shots: invalid choice" in capsys.readouterr().err
    assert accepted == set(typing.get_args(Shots))


def test_the_job_schema_exposes_the_bounds_a_form_needs(job_schema):
    """The page builds its evaluate form from these: shots as a choice, episodes per category as a range."""
    assert job_schema["shots"]["enum"] == [1, 5]
    episodes = job_schema["episodes_per_category"]
    assert (episodes["minimum"], episodes["maximum"], episodes["default"]) == (1, 1000, 20)


def test_the_job_stores_the_configs_own_fields():
    """The worker turns a job's config into an EvaluateConfig: the fields they share are EvaluateConfig's."""

    def rules(field) -> tuple:
        return field.annotation, field.default, field.metadata, field.description

    for name in CLIENT_FIELDS:
        assert rules(EvaluateJobConfig.model_fields[name]) == rules(EvaluateConfig.model_fields[name]), name
    stored = EvaluateJobConfig(from_job="6f1c1c8e-6c43-4f1e-9a52-0b8f1b7f8f11", shots=5).model_dump()
    assert EvaluateConfig(**{k: v for k, v in stored.items() if k in CLIENT_FIELDS}) == EvaluateConfig(shots=5)


def test_a_bad_cli_value_is_one_error_line_before_torch_loads():
    code = (
        "import sys\n"
        "from cape.evaluate import main\n"
        "try:\n"
        "    main(['--checkpoint', 'run.pt', '--episodes_per_category', '0', '--device', 'gpu'])\n"
        "except SystemExit as exit:\n"
        "    assert exit.code == 2, exit.code\n"
        "assert 'torch' not in sys.modules, 'torch was imported before the arguments were checked'\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stderr.strip() == (
        "python -m cape.evaluate: error: --episodes_per_category: Input should be greater than or equal to 1; "
        "--device: Input should be auto (CUDA when there is one), cpu, cuda, cuda:N or mps, not 'gpu'"
    )


VALID_DEVICES = ("auto", "cpu", "cuda", "cuda:0", "cuda:12", "mps")
BAD_DEVICES = ("gpu", "cuda0", "cuda:", "cuda:x", "CPU", " cpu", "")


@pytest.mark.parametrize("device", VALID_DEVICES)
def test_a_valid_device_setting_loads(monkeypatch, device):
    monkeypatch.setenv("CAPE_DEVICE", device)
    assert Settings().device == device


@pytest.mark.parametrize("device", BAD_DEVICES)
def test_a_bad_device_setting_fails_to_load_naming_the_valid_forms(monkeypatch, device):
    monkeypatch.setenv("CAPE_DEVICE", device)
    with pytest.raises(ValidationError) as refused:
        Settings()
    (error,) = refused.value.errors()
    assert error["loc"] == ("device",)
    assert error["msg"] == f"Input should be auto (CUDA when there is one), cpu, cuda, cuda:N or mps, not {device!r}"


@pytest.mark.parametrize("device", VALID_DEVICES + BAD_DEVICES)
def test_runs_evaluations_and_the_service_accept_the_same_device_names(device, monkeypatch):
    def accepts(make) -> bool:
        try:
            make()
        except ValidationError:
            return False
        return True

    monkeypatch.setenv("CAPE_DEVICE", device)
    verdicts = {
        accepts(lambda: TrainConfig(device=device)),
        accepts(lambda: EvaluateConfig(device=device)),
        accepts(Settings),
    }
    assert verdicts == {device in VALID_DEVICES}


def test_the_services_default_device_is_the_configs(monkeypatch):
    monkeypatch.delenv("CAPE_DEVICE", raising=False)
    assert Settings().device == TrainConfig().device == EvaluateConfig().device == "auto"
