"""Which torch device a run uses: ``auto`` is CUDA when there is one, else the CPU."""

from __future__ import annotations

import torch

from cape.errors import CapeError


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CapeError(f"device {name!r} requested but CUDA is not available here: use --device cpu or auto")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise CapeError(f"device {name!r} requested but MPS is not available here: use --device cpu or auto")
    return device


def autocast_dtype(use_amp: bool, device: torch.device) -> torch.dtype | None:
    """bf16 autocast on CUDA when the run asks for it; full precision everywhere else."""
    return torch.bfloat16 if use_amp and device.type == "cuda" else None
