"""Shared by the benchmarks: the synthetic dataset they run on and this machine's measured matmul rate."""

from __future__ import annotations

import statistics
import time
from pathlib import Path

from cape.data.synthetic import generate

DEFAULT_ROOT = Path(__file__).resolve().parents[1] / "data" / "synthetic"


def dataset_root(root: str | None) -> Path:
    path = Path(root) if root else DEFAULT_ROOT
    if not (path / "annotations").is_dir():
        print(f"generating the synthetic dataset in {path}")
        generate(path)
    return path


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
