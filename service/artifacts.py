"""A job's files: its run folder under CAPE_ARTIFACTS_DIR, written by the worker (checkpoints, log, pictures) and
read by the API. The layout inside the folder is cape's (cape/run_files.py)."""

from __future__ import annotations

import uuid
from pathlib import Path

from service.settings import get_settings

LOG_CHUNK = 64 * 1024  # the most a log request returns at once


def run_folder(job_id: uuid.UUID) -> Path:
    return get_settings().artifacts_dir / str(job_id)


def read_from(path: Path, offset: int, limit: int = LOG_CHUNK) -> bytes:
    """Up to ``limit`` bytes of ``path`` from ``offset``, ending at a line end when there is one (a line being written
    now is sent whole next time); empty when the file does not exist yet."""
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            data = f.read(limit)
    except FileNotFoundError:
        return b""
    end = data.rfind(b"\n")
    return data[: end + 1] if end >= 0 else (data if len(data) == limit else b"")
