"""``python -m benchmarks.gpu_check`` on a machine without CUDA: it says so, names the torch build, and succeeds, so
that ``make gpu-check`` anywhere is safe. With CUDA the check itself runs for minutes: too slow for the suite."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is here: the check would run for minutes")
def test_without_cuda_the_gpu_check_says_so_and_exits_0(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.gpu_check", "--dataset_root", str(tmp_path / "never-written")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "no CUDA device" in done.stdout and f"torch {torch.__version__}" in done.stdout, done.stdout
    assert not (tmp_path / "never-written").exists(), "without CUDA nothing is generated or measured"
