"""The files of a run in its output folder, and where each lies. Torch-free: the API reads some of them.

``config.json``, ``metrics.jsonl`` (one EpochRecord a line), ``diagnosis.json`` (the run's latest Diagnosis),
``test_metrics.json`` (full mode), ``log.txt`` (a job's log, written by the worker), ``inputs.png`` and
``epochs/<n>/predictions.{png,json}`` (cape/training/pictures.py).
Checkpoints are written and read by cape/model/checkpoint.py; their file names are here, with the names users choose
them by, so that the API can find them without torch.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from pathlib import Path
from typing import Literal

from cape.config import TrainConfig
from cape.diagnosis import Diagnosis
from cape.epoch_record import EpochRecord
from cape.errors import writing

METRICS, CONFIG, TEST_METRICS, LOG = "metrics.jsonl", "config.json", "test_metrics.json", "log.txt"
DIAGNOSIS = "diagnosis.json"
LR_RANGE = "lr_range_test.json"  # a learning-rate range test's curve and suggestion (cape.lr_range.LRRangeResult)
INPUTS, EPOCHS, PREDICTIONS_PNG, PREDICTIONS_JSON = "inputs.png", "epochs", "predictions.png", "predictions.json"
CheckpointName = Literal["best", "last"]  # the best validation PCK so far, the latest epoch
CHECKPOINT_FILES: dict[str, str] = {"best": "checkpoint_best.pt", "last": "checkpoint_last.pt"}


def epoch_folder(run_folder: Path, epoch: int) -> Path:
    return run_folder / EPOCHS / str(epoch)


def complete_epochs(names: Iterable[str]) -> list[int]:
    """Of a run folder's file names (``epochs/3/predictions.json``, relative, with slashes), the epochs whose
    prediction pictures are complete (their JSON is written last), in order. For a local folder and a store alike."""
    epochs = []
    for name in names:
        parts = name.split("/")
        if len(parts) == 3 and parts[0] == EPOCHS and parts[1].isdigit() and parts[2] == PREDICTIONS_JSON:
            epochs.append(int(parts[1]))
    return sorted(epochs)


def picture_epochs(run_folder: Path) -> list[int]:
    """complete_epochs of a local run folder."""
    return complete_epochs(
        p.relative_to(run_folder).as_posix() for p in run_folder.glob(f"{EPOCHS}/*/{PREDICTIONS_JSON}")
    )


def never_correct(run_folder: Path) -> list[int] | None:
    """Keypoints of the first validation query that no epoch's prediction got right (counted ones only); None
    when no epoch was drawn. For the single-image verdict: there the first query is the one image."""
    correct_once: set[int] = set()
    counted: set[int] = set()
    epochs = picture_epochs(run_folder)
    for epoch in epochs:
        first = json.loads((epoch_folder(run_folder, epoch) / PREDICTIONS_JSON).read_text())["queries"][0]
        counted |= {i for i, c in enumerate(first["counted"]) if c}
        correct_once |= {i for i, c in enumerate(first["correct"]) if c}
    return sorted(counted - correct_once) if epochs else None


def json_safe(x):
    """JSON has no NaN: a PCK that does not exist (nothing counted) is written as null."""
    if isinstance(x, dict):
        return {k: json_safe(v) for k, v in x.items()}
    return None if isinstance(x, float) and math.isnan(x) else x


class RunFiles:
    """The run's config, metrics and test result in its folder. A disk with no room left raises DiskFull."""

    def __init__(self, folder: Path):
        self.folder = folder

    def start(self, config: TrainConfig, completed_epochs: int) -> list[EpochRecord]:
        """Write the config; return the records of the epochs already done, cutting metrics.jsonl back to them so
        that a resumed run never repeats a line."""
        self.folder.mkdir(parents=True, exist_ok=True)
        with writing(self.folder / CONFIG):
            (self.folder / CONFIG).write_text(config.model_dump_json(indent=2))
        path = self.folder / METRICS
        lines = path.read_text().splitlines() if path.is_file() else []
        kept = [r for r in map(EpochRecord.model_validate_json, lines) if r.epoch <= completed_epochs]
        with writing(path):
            path.write_text("".join(r.model_dump_json() + "\n" for r in kept))
        return kept

    def append(self, record: EpochRecord) -> None:
        with writing(self.folder / METRICS), open(self.folder / METRICS, "a") as f:
            f.write(record.model_dump_json() + "\n")

    def write_test(self, result: dict) -> None:
        with writing(self.folder / TEST_METRICS):
            (self.folder / TEST_METRICS).write_text(json.dumps(json_safe(result), indent=2))

    def write_diagnosis(self, diagnosis: Diagnosis) -> None:
        with writing(self.folder / DIAGNOSIS):
            (self.folder / DIAGNOSIS).write_text(diagnosis.model_dump_json(indent=2))
