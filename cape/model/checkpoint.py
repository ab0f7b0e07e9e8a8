"""Checkpoint files of a run: how they are written, how they are read back, and a trained model from one.

A checkpoint holds everything a resumed run needs to reach the result it would have reached without stopping:
the config, model, optimiser and scheduler states, the epoch and step it stopped at with the partial sums of an
unfinished epoch, the best validation PCK so far and every RNG state.

``load_trained`` rebuilds the model from the checkpoint's own config, which is what evaluation and prediction start
from. A checkpoint works on any machine: the backbone's pretrained-weights file, if the run had one, is not needed
(its trained values are in the checkpoint), only the module types it implies (frozen batch norm).
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from cape.config import TrainConfig
from cape.errors import CheckpointError, writing
from cape.model.cape_model import CapeModel
from cape.run_files import CHECKPOINT_FILES

LAST, BEST = CHECKPOINT_FILES["last"], CHECKPOINT_FILES["best"]


def save(state: dict, path: Path) -> None:
    """Write the checkpoint whole or not at all: a crash or a full disk mid-write leaves the previous one as it was
    (DiskFull says so, and where)."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    with writing(path):
        try:
            # Into a file object, not to a path: torch's own writer reports a full disk as a bare RuntimeError,
            # Python's file as the OSError it is (ENOSPC).
            with open(tmp, "wb") as out:
                torch.save(state, out)
        except BaseException:
            tmp.unlink(missing_ok=True)  # half a checkpoint would only take the room a later one needs
            raise
    os.replace(tmp, path)


def load(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    return torch.load(path, map_location="cpu", weights_only=False)


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@dataclass
class TrainedModel:
    model: CapeModel  # in eval mode, on its device
    config: TrainConfig
    epoch: int  # epochs completed when it was saved
    val_pck: float | None  # validation PCK@0.2 of these weights (None: not recorded, or nothing countable)
    path: Path


def load_trained(path: str | Path, device: torch.device) -> TrainedModel:
    path = Path(path)
    state = load(path)
    try:
        config = TrainConfig(**state["config"])
        model = CapeModel(config.resolved_model, load_backbone_weights=False)
        model.load_state_dict(state["model"])
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"{path} is not a checkpoint of this project's model: {exc}") from exc
    return TrainedModel(
        model=model.to(device).eval(),
        config=config,
        epoch=int(state["epoch"]),
        val_pck=state.get("val_pck"),
        path=path,
    )
