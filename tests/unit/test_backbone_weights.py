"""Pretrained backbones (cape.backbone_weights, python -m cape.weights): ImageNet weights through torchvision's weights
API and cache, a local file, or random initialisation; offline with an empty cache, one clear error in the library,
the CLI and the API (the CLIs in their own processes: tests/e2e/test_cli.py).

Nothing here is downloaded: every test runs offline (the ``offline`` fixture): downloads off
(CAPE_DOWNLOAD_WEIGHTS=false), an empty TORCH_HOME of its own, proxies that point at a closed loopback port, and a
socket guard that fails any connection leaving the machine. The "ImageNet" files are small local state dicts written
under torchvision's file names.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
import typing
from pathlib import Path

import pytest
import torch
import torchvision
from torchvision.ops import FrozenBatchNorm2d

from cape.backbone_weights import (
    IMAGENET_WEIGHTS,
    cache_dir,
    check_backbone_weights,
    imagenet_file,
)
from cape.config import PRESETS, ModelConfig, TrainConfig
from cape.data.catalog import MP100Catalog
from cape.errors import CheckpointError
from cape.model import CapeModel
from cape.model.backbone import load_imagenet_state_dict
from tests.helpers import OFF, REPO, TINY, not_cached_message, place_imagenet_file

pytestmark = pytest.mark.usefixtures("offline")


def test_the_guard_refuses_a_connection_beyond_loopback():
    with socket.socket() as sock, pytest.raises(AssertionError, match="a test tried to reach"):
        sock.connect(("192.0.2.1", 443))  # TEST-NET-1: never routed, and never tried


# --- the table and the cache rule ---------------------------------------------------------------------------------


def test_the_table_is_torchvisions_metadata_for_every_backbone():
    assert set(IMAGENET_WEIGHTS) == set(typing.get_args(ModelConfig.model_fields["backbone"].annotation))
    for backbone, entry in IMAGENET_WEIGHTS.items():
        weights = torchvision.models.get_model_weights(backbone)[entry.member]
        assert weights.url == entry.url, backbone
        assert weights.meta["_metrics"]["ImageNet-1K"]["acc@1"] > 69, backbone  # ImageNet-1K classifiers, not others
        assert entry.file_name == Path(entry.url).name


@pytest.mark.parametrize("torch_home, xdg", [("th", None), (None, "xdg"), (None, None), ("~/th", "xdg")])
def test_the_cache_folder_follows_torch_hubs_rule(tmp_path, monkeypatch, torch_home, xdg):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    for name, value in (("TORCH_HOME", torch_home), ("XDG_CACHE_HOME", xdg)):
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, value if value.startswith("~") else str(tmp_path / value))
    assert cache_dir() == Path(torch.hub.get_dir()) / "checkpoints"


# --- the library --------------------------------------------------------------------------------------------------


def test_imagenet_loads_the_cached_file_through_torchvisions_weights_api():
    resnet = place_imagenet_file()
    cached = sorted(cache_dir().iterdir())
    model = CapeModel(TINY.model_copy(update={"backbone_weights": "imagenet"}))
    assert torch.equal(model.backbone.body[0].weight, resnet.conv1.weight)
    layer1 = model.backbone.body[4]
    assert torch.equal(layer1[0].conv1.weight, resnet.layer1[0].conv1.weight)
    assert torch.equal(layer1[0].bn1.running_var, resnet.layer1[0].bn1.running_var)
    assert isinstance(model.backbone.body[1], FrozenBatchNorm2d), "pretrained statistics stay frozen"
    assert sorted(cache_dir().iterdir()) == cached, "nothing was downloaded or written"


def test_the_presets_defaults_and_an_explicit_override():
    assert PRESETS["base"].backbone_weights == "imagenet" and PRESETS["small"].backbone_weights == "none"
    assert TrainConfig(preset="base").resolved_model.backbone_weights == "imagenet"
    assert TrainConfig(preset="base", backbone_weights="none").resolved_model.backbone_weights == "none"
    assert TrainConfig(backbone_weights="imagenet").resolved_model.backbone == "resnet18"
    assert TrainConfig().resolved_model.backbone_weights == "none", "the small preset never needs weights"
    random = CapeModel(TINY)
    assert isinstance(random.backbone.body[1], torch.nn.BatchNorm2d), "random weights learn their statistics"
    # checkpoints written before "none" existed said None: they still load, as random initialisation
    assert ModelConfig(backbone_weights=None).backbone_weights == "none"


def test_an_empty_cache_offline_is_a_clear_error_that_names_the_file_and_the_place():
    message = not_cached_message("resnet18", OFF)
    assert str(cache_dir()).startswith(os.environ["TORCH_HOME"])
    with pytest.raises(CheckpointError) as torch_free:
        check_backbone_weights(TINY.model_copy(update={"backbone_weights": "imagenet"}))
    assert str(torch_free.value) == message
    with pytest.raises(CheckpointError) as building:
        CapeModel(TINY.model_copy(update={"backbone_weights": "imagenet"}))
    assert str(building.value) == message
    with pytest.raises(CheckpointError, match="put resnet50-0676ba61.pth .*resnet50-0676ba61.pth\\) in "):
        check_backbone_weights(PRESETS["base"])
    assert not Path(os.environ["TORCH_HOME"]).exists(), "nothing was created"


def test_downloads_allowed_but_no_network_is_the_same_clear_error(monkeypatch):
    """The download really starts (torch.hub, urllib) and fails at the closed loopback proxy: what an offline machine
    with downloads on meets. Nothing is left in the cache."""
    monkeypatch.setenv("CAPE_DOWNLOAD_WEIGHTS", "true")
    check_backbone_weights(TINY.model_copy(update={"backbone_weights": "imagenet"}))  # may download: no objection
    with pytest.raises(CheckpointError) as failed:
        load_imagenet_state_dict("resnet18")
    message = str(failed.value)
    assert message.startswith("ImageNet weights for resnet18 are not in torchvision's cache (the download failed: ")
    assert "Connection refused" in message
    assert f"put resnet18-f37072fd.pth (from {IMAGENET_WEIGHTS['resnet18'].url}) in {cache_dir()}/" in message
    assert list(cache_dir().iterdir()) == []


def test_a_file_in_the_cache_that_is_not_a_state_dict_says_so():
    imagenet_file("resnet18").parent.mkdir(parents=True)
    imagenet_file("resnet18").write_bytes(b"<html>a proxy's error page</html>")
    expected = f"{imagenet_file('resnet18')} is not resnet18's ImageNet state dict \\(torch.load: .*\\): delete it"
    with pytest.raises(CheckpointError, match=expected):
        CapeModel(TINY.model_copy(update={"backbone_weights": "imagenet"}))


def test_a_local_state_dict_file_keeps_working_and_a_missing_one_is_named(tmp_path):
    torch.manual_seed(2)
    resnet = torchvision.models.resnet18(weights=None)
    torch.save(resnet.state_dict(), tmp_path / "mine.pth")
    model = CapeModel(TINY.model_copy(update={"backbone_weights": str(tmp_path / "mine.pth")}))
    assert torch.equal(model.backbone.body[0].weight, resnet.conv1.weight)
    with pytest.raises(CheckpointError, match="backbone weights file not found: .*nope.pth \\(give a local state-dict"):
        check_backbone_weights(TINY.model_copy(update={"backbone_weights": str(tmp_path / "nope.pth")}))


def test_a_checkpoint_of_an_imagenet_run_loads_without_the_cache_file(tmp_path):
    from cape.model import checkpoint
    from cape.model.checkpoint import load_trained

    place_imagenet_file()
    config = TrainConfig(model=TINY, backbone_weights="imagenet")
    model = CapeModel(config.resolved_model)
    checkpoint.save(
        {"config": config.model_dump(), "model": model.state_dict(), "epoch": 2, "val_pck": 0.25}, tmp_path / "c.pt"
    )
    imagenet_file("resnet18").unlink()
    trained = load_trained(tmp_path / "c.pt", torch.device("cpu"))
    assert trained.config.resolved_model.backbone_weights == "imagenet"
    assert isinstance(trained.model.backbone.body[1], FrozenBatchNorm2d)
    for (name, a), b in zip(model.state_dict().items(), trained.model.state_dict().values()):
        assert torch.equal(a, b), name


def test_a_trainer_fails_before_training_when_the_weights_are_missing(synthetic_root, tmp_path):
    """What a worker meets: the job fails with this message (worker.tasks.failure_reason keeps a CapeError's text)."""
    from cape.training.trainer import Trainer

    catalog = MP100Catalog(synthetic_root)
    config = TrainConfig(
        mode="category",
        category_id=catalog.category_ids("train")[0],
        dataset_root=str(synthetic_root),
        model=TINY,
        backbone_weights="imagenet",
        epochs=1,
        episodes_per_epoch=2,
        batch_size=1,
        device="cpu",
    )
    with pytest.raises(CheckpointError) as failed:
        Trainer(config, tmp_path / "run").fit()
    assert str(failed.value) == not_cached_message("resnet18", OFF)
    assert not list((tmp_path / "run").glob("*.pt")) and not (tmp_path / "run" / "metrics.jsonl").exists()


# --- the fetcher ----------------------------------------------------------------------------------------------------


def test_the_fetcher_checks_a_cached_file_and_reports_a_failed_download(capsys):
    from cape.weights import main

    place_imagenet_file()
    assert main(["--backbone", "resnet18"]) == 0
    assert capsys.readouterr().out == f"resnet18: {imagenet_file('resnet18')}\n"
    with pytest.raises(SystemExit) as exit:  # under the socket guard: it does try to download
        main(["--backbone", "resnet34"])
    assert exit.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(
        "python -m cape.weights: error: ImageNet weights for resnet34 are not in torchvision's cache "
        "(the download failed: "
    )
    assert "Traceback" not in err and sorted(p.name for p in cache_dir().iterdir()) == ["resnet18-f37072fd.pth"]


# --- the CLI --------------------------------------------------------------------------------------------------------


def test_the_cli_flag_takes_a_name_or_a_file():
    from cape.train import config_from_args, parser

    def config(*flags: str) -> TrainConfig:
        return config_from_args(parser().parse_args(list(flags)))

    assert config("--preset", "base").resolved_model.backbone_weights == "imagenet"
    assert config("--preset", "base", "--backbone_weights", "none").backbone_weights == "none"
    assert config("--preset", "base", "--backbone_weights", "none").resolved_model.backbone_weights == "none"
    assert config("--backbone_weights", "imagenet").resolved_model.backbone_weights == "imagenet"
    from_file = config("--preset", "base", "--backbone_weights", "w.pth", "--model", '{"d_model": 64}')
    assert (from_file.resolved_model.backbone_weights, from_file.resolved_model.d_model) == ("w.pth", 64)
    assert from_file.resolved_model.backbone == "resnet50"


@pytest.mark.parametrize(
    "flags, file",
    [(["--preset", "base"], "resnet50-0676ba61.pth"), (["--backbone_weights", "imagenet"], "resnet18-f37072fd.pth")],
)
def test_the_cli_offline_prints_one_error_line_before_torch_loads(offline, synthetic_root, flags, file):
    code = f"""
        import sys
        from cape.train import main
        try:
            main(["--dataset_root", {str(synthetic_root)!r}, "--epochs", "1", *{flags!r}])
        except SystemExit as exit:
            assert exit.code == 2, exit.code
        else:
            raise AssertionError("no error")
        assert "torch" not in sys.modules, "torch was imported before the weights were checked"
    """
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **offline},
    )
    assert result.returncode == 0, result.stdout + result.stderr
    backbone = file.split("-")[0]
    assert result.stderr == f"python -m cape.train: error: {not_cached_message(backbone, OFF)}\n"


# --- the API ------------------------------------------------------------------------------------------------------


def test_the_api_refuses_at_submit_time_and_records_the_choice_by_name(client, synthetic_root, dispatched):
    full = {"mode": "full", "epochs": 1}
    refused = client.post("/jobs", json={**full, "preset": "base"})
    assert refused.status_code == 422
    assert refused.json()["detail"] == [
        {"loc": ["body", "backbone_weights"], "msg": not_cached_message("resnet50", OFF), "type": "value_error"}
    ]
    assert client.post("/jobs", json={**full, "backbone_weights": "imagenet"}).status_code == 422  # small + imagenet
    assert client.get("/jobs").json()["total"] == 0 and dispatched == []

    random_base = client.post("/jobs", json={**full, "preset": "base", "backbone_weights": "none"})
    assert random_base.status_code == 201, random_base.text
    assert random_base.json()["config"]["backbone_weights"] == "none"
    small = client.post("/jobs", json=full)
    assert small.status_code == 201 and small.json()["config"]["backbone_weights"] == "none", "the preset's, by name"

    imagenet_file("resnet50").parent.mkdir(parents=True)
    imagenet_file("resnet50").write_bytes(b"the API only looks for the file; the worker reads it")
    base = client.post("/jobs", json={**full, "preset": "base"})
    assert base.status_code == 201, base.text
    assert base.json()["config"]["backbone_weights"] == "imagenet"
    assert len(dispatched) == 3


def test_the_api_takes_names_only_never_a_file(client):
    schema = client.get("/openapi.json").json()["components"]["schemas"]["JobCreate"]["properties"]["backbone_weights"]
    assert [option.get("enum", option["type"]) for option in schema["anyOf"]] == [["imagenet", "none"], "null"], schema
    response = client.post("/jobs", json={"mode": "full", "backbone_weights": "/etc/passwd"})
    assert response.status_code == 422
    assert response.json()["detail"][0]["loc"] == ["body", "backbone_weights"]
    assert "Input should be 'imagenet' or 'none'" in response.text


def test_with_downloads_on_the_api_leaves_the_check_to_the_worker(client, monkeypatch):
    monkeypatch.setenv("CAPE_DOWNLOAD_WEIGHTS", "true")
    accepted = client.post("/jobs", json={"mode": "full", "epochs": 1, "preset": "base"})
    assert accepted.status_code == 201, accepted.text
    assert accepted.json()["config"]["backbone_weights"] == "imagenet"
