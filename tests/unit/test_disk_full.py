"""A disk with no room left while a run writes its files: DiskFull says so and where, and the checkpoint written
before stays whole. The kernel's own errors: /dev/full answers every write with ENOSPC, and a file-size limit
(RLIMIT_FSIZE) makes a larger write fail with EFBIG."""

from __future__ import annotations

import resource
from pathlib import Path

import pytest
import torch

from cape.epoch_record import EpochRecord
from cape.errors import DiskFull
from cape.model import checkpoint
from cape.run_files import METRICS, RunFiles

FULL = Path("/dev/full")
needs_dev_full = pytest.mark.skipif(not FULL.exists(), reason="no /dev/full on this machine")


def state(value: float) -> dict:
    return {"epoch": int(value), "weights": torch.full((256, 256), value)}


@needs_dev_full
def test_a_checkpoint_on_a_full_disk_raises_disk_full_and_the_previous_one_stays(tmp_path):
    path = tmp_path / checkpoint.LAST
    checkpoint.save(state(1), path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.symlink_to(FULL)  # the next checkpoint is written where there is no room
    with pytest.raises(DiskFull) as raised:
        checkpoint.save(state(2), path)
    message = str(raised.value)
    assert message.startswith(
        f"the disk is full: cannot write {checkpoint.LAST} in {tmp_path} (No space left on device;"
    )
    assert "free of" in message and message.endswith("then resume it from its last checkpoint")
    assert not tmp.exists() and not tmp.is_symlink(), "the part written is removed"
    assert checkpoint.load(path)["epoch"] == 1, "the previous checkpoint is whole"


@needs_dev_full
def test_a_metrics_line_on_a_full_disk_raises_disk_full(tmp_path):
    (tmp_path / METRICS).symlink_to(FULL)
    record = EpochRecord(epoch=1, loss=1.0, loss_ce=0.5, loss_coords=0.5, pck=0.5, mpck=0.5, lr=1e-3, seconds=1.0)
    with pytest.raises(DiskFull, match=f"cannot write {METRICS} in {tmp_path}"):
        RunFiles(tmp_path).append(record)


def test_a_checkpoint_beyond_the_file_size_limit_raises_disk_full(tmp_path):
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    # Python ignores SIGXFSZ, so a write past the limit fails with EFBIG rather than killing the process.
    resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, hard))
    try:
        with pytest.raises(DiskFull, match=r"^the file outgrew this process's file-size limit \(ulimit -f\)"):
            checkpoint.save(state(1), tmp_path / checkpoint.LAST)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert list(tmp_path.iterdir()) == []
