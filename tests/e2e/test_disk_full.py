"""The worker's disk fills up while it writes a checkpoint: the job fails with a message that says so and where (it
is not retried: on a one-worker setup a retry would only fill the same disk again), the checkpoint written before is
whole, and a run resumed from it starts at the next epoch. The disk is a size-limited tmpfs the test mounts, holding
the worker's artifacts folder; Redis, SQLite (on the real disk), the worker and uvicorn are real processes."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import httpx
import pytest

from cape.config import TrainConfig
from cape.model import checkpoint
from cape.training.trainer import Callback, Trainer
from tests.helpers import (
    catalog_of,
    epochs_lost_and_repeated,
    poll,
    report_fault,
    single_image,
    sqlite_stack,
)

EPOCHS = 6


@contextmanager
def small_disk(path: Path, size: int) -> Iterator[Path]:
    """A tmpfs of ``size`` bytes mounted at ``path``, unmounted on exit (the processes writing to it stopped)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    path.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], check=True)


def checkpoint_bytes(config: TrainConfig, folder: Path) -> int:
    """The size of the job's checkpoints: one epoch of one step in ``folder`` (the optimiser's state, two tensors per
    weight, exists once a step is taken)."""
    Trainer(config.model_copy(update={"epochs": 1, "episodes_per_epoch": 1}), folder, log=lambda _: None).fit()
    return (folder / checkpoint.LAST).stat().st_size


class FirstEpoch(Callback):
    """Stops a run once it has reported one epoch; records it."""

    def __init__(self):
        self.epochs: list[int] = []

    def on_epoch_end(self, record):
        self.epochs.append(record.epoch)

    def should_stop(self) -> bool:
        return bool(self.epochs)


def test_a_full_disk_fails_the_job_and_keeps_the_checkpoint_before(tmp_path, synthetic_root):
    category = catalog_of(synthetic_root).category_ids("train")[0]
    body = single_image(category, epochs=EPOCHS)
    config = TrainConfig(**body, dataset_root=str(synthetic_root), device="cpu")
    size = checkpoint_bytes(config, tmp_path / "measure")
    # Room for two checkpoints (last and best) and the small files, not for a third being written beside them: the
    # first checkpoint written once both exist fills the disk.
    disk_size = 2 * size + size // 2
    with ExitStack() as stack:
        artifacts = stack.enter_context(small_disk(tmp_path / "artifacts", disk_size))  # the stack's artifacts folder
        service = stack.enter_context(sqlite_stack(tmp_path, {"synthetic": synthetic_root}))
        client = stack.enter_context(httpx.Client(base_url=service.base, timeout=30))
        started = time.monotonic()
        job_id = client.post("/jobs", json=body).json()["id"]
        status, rows = poll(client, job_id, timeout=300)
        job = client.get(f"/jobs/{job_id}").json()
        folder = artifacts / job_id
        last = checkpoint.load(folder / checkpoint.LAST)
        best = checkpoint.load(folder / checkpoint.BEST)
        leftovers = sorted(p.name for p in folder.glob("*.tmp"))

        # Resumed elsewhere (the disk is still full), from the checkpoint on the full disk.
        resumed, lines = FirstEpoch(), []
        run = Trainer(TrainConfig(**last["config"]), tmp_path / "elsewhere", callbacks=[resumed], log=lines.append)
        run.fit(resume=folder / checkpoint.LAST)
    epochs = [r["epoch"] for r in rows]
    report_fault(
        "the worker's disk full while it writes a checkpoint (the job must fail, resumable)",
        time.monotonic() - started,
        1,
        status == "succeeded",
        *epochs_lost_and_repeated(epochs, len(epochs)),
    )
    assert status == "failed", job
    full = epochs[-1]  # the epoch reported, then not checkpointed: its checkpoint found no room
    assert 2 <= full < EPOCHS and epochs == list(range(1, full + 1)), epochs
    assert job["error"].startswith(
        f"the disk is full: cannot write {checkpoint.LAST} in {folder} (No space left on device; "
    ), job["error"]
    assert job["error"].endswith("then resume it from its last checkpoint"), job["error"]
    assert last["epoch"] == full - 1 and best["epoch"] <= full - 1, "the checkpoints before are whole"
    assert leftovers == [], "the checkpoint that found no room is removed"
    assert f"resumed from {folder / checkpoint.LAST} at epoch {full}, step 0" in lines
    assert resumed.epochs == [full], "the resumed run starts at the epoch after the checkpoint"
