"""Shared by the benchmarks: the synthetic dataset they run on, the single-image guide's recipe and this machine's
measured matmul rate."""

from __future__ import annotations

import statistics
import time
from pathlib import Path

from cape.config import TrainConfig
from cape.data.synthetic import generate
from cape.verdict import EXPECTED_EPOCHS

DEFAULT_ROOT = Path(__file__).resolve().parents[1] / "data" / "synthetic"


def dataset_root(root: str | None) -> Path:
    path = Path(root) if root else DEFAULT_ROOT
    if not (path / "annotations").is_dir():
        print(f"generating the synthetic dataset in {path}")
        generate(path)
    return path


def single_image_recipe(
    dataset: Path, category_id: int, image_index: int = 0, epochs: int = EXPECTED_EPOCHS, **fields
) -> TrainConfig:
    """The single-image guide's settings: one image, batch 1, 1 query, 20 episodes per epoch, seed 0, small preset,
    CPU; ``fields`` override them (the learning rate, for one)."""
    return TrainConfig(
        **{
            "mode": "single_image",
            "category_id": category_id,
            "image_index": image_index,
            "dataset_root": str(dataset),
            "preset": "small",
            "epochs": epochs,
            "batch_size": 1,
            "num_queries_per_episode": 1,
            "episodes_per_epoch": 20,
            "device": "cpu",
            "seed": 0,
            **fields,
        }
    )


def matmul_flops_per_second(n: int = 1024, repeats: int = 20) -> float:
    """Median float32 matmul rate of this machine (FLOP/s), the yardstick for achieved efficiency."""
    import torch  # here, not at the top: the service benchmarks use this module and need no torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    for _ in range(3):
        a @ b
    rates = []
    for _ in range(repeats):
        t = time.perf_counter()
        a @ b
        rates.append(2 * n**3 / (time.perf_counter() - t))
    return statistics.median(rates)
