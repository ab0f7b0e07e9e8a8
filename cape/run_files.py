"""The human-readable files of a run in its output folder: ``config.json``, ``metrics.jsonl`` (one EpochRecord a
line) and, in full mode, ``test_metrics.json``. Torch-free. Checkpoints are in cape/checkpoints.py."""

from __future__ import annotations

import json
import math
from pathlib import Path

from cape.config import TrainConfig
from cape.epoch_record import EpochRecord

METRICS, CONFIG, TEST_METRICS = "metrics.jsonl", "config.json", "test_metrics.json"


def json_safe(x):
    """JSON has no NaN: a PCK that does not exist (nothing counted) is written as null."""
    if isinstance(x, dict):
        return {k: json_safe(v) for k, v in x.items()}
    return None if isinstance(x, float) and math.isnan(x) else x


class RunFiles:
    def __init__(self, folder: Path):
        self.folder = folder

    def start(self, config: TrainConfig, completed_epochs: int) -> list[EpochRecord]:
        """Write the config; return the records of the epochs already done, cutting metrics.jsonl back to them so
        that a resumed run never repeats a line."""
        self.folder.mkdir(parents=True, exist_ok=True)
        (self.folder / CONFIG).write_text(config.model_dump_json(indent=2))
        path = self.folder / METRICS
        lines = path.read_text().splitlines() if path.is_file() else []
        kept = [r for r in map(EpochRecord.model_validate_json, lines) if r.epoch <= completed_epochs]
        path.write_text("".join(r.model_dump_json() + "\n" for r in kept))
        return kept

    def append(self, record: EpochRecord) -> None:
        with open(self.folder / METRICS, "a") as f:
            f.write(record.model_dump_json() + "\n")

    def write_test(self, result: dict) -> None:
        (self.folder / TEST_METRICS).write_text(json.dumps(json_safe(result), indent=2))
