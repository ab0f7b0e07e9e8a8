"""Checkpoint files of a run: where they are, how they are written, how they are read back.

A checkpoint holds everything a resumed run needs to reach the result it would have reached without stopping:
the config, model, optimiser and scheduler states, the epoch and step it stopped at with the partial sums of an
unfinished epoch, the best validation PCK so far and every RNG state.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import torch

from cape.errors import CheckpointError
from cape.run_files import CHECKPOINT_FILES

LAST, BEST = CHECKPOINT_FILES["last"], CHECKPOINT_FILES["best"]


def save(state: dict, path: Path) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)  # a crash mid-write never leaves a truncated checkpoint behind


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
