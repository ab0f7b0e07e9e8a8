"""A trained model from its checkpoint file: what evaluation and prediction start from.

The model is rebuilt from the checkpoint's own config, so a checkpoint works on any machine: the backbone's
pretrained-weights file, if the run had one, is not needed (its trained values are in the checkpoint), only the
module types it implies (frozen batch norm).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from cape import checkpoints
from cape.config import TrainConfig
from cape.errors import CheckpointError
from cape.model import CapeModel


@dataclass
class TrainedModel:
    model: CapeModel  # in eval mode, on its device
    config: TrainConfig
    epoch: int  # epochs completed when it was saved
    val_pck: float | None  # validation PCK@0.2 of these weights (None: not recorded, or nothing countable)
    path: Path


def load_trained(path: str | Path, device: torch.device) -> TrainedModel:
    path = Path(path)
    state = checkpoints.load(path)
    try:
        config = TrainConfig(**state["config"])
        model = CapeModel(config.resolved_model, load_backbone_weights=False)
        model.load_state_dict(state["model"])
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"{path} is not a checkpoint of this project's model: {exc}") from exc
    return TrainedModel(
        model=model.to(device).eval(), config=config, epoch=int(state["epoch"]), val_pck=state.get("val_pck"), path=path,
    )
