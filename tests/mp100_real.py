"""Where the real MP-100 annotation files (no images) are: ``shared/mp100/annotations`` beside the checkout."""

import os
from pathlib import Path

import pytest


def real_annotations_dir() -> Path | None:
    if env := os.environ.get("CAPE_MP100_ANNOTATIONS"):
        return Path(env)
    for parent in Path(__file__).resolve().parents:
        candidate = parent / "shared" / "mp100" / "annotations"
        if candidate.is_dir():
            return candidate
    return None


REAL_DIR = real_annotations_dir()
REAL_FILES = sorted(REAL_DIR.glob("mp100_split*.json")) if REAL_DIR else []
requires_real = pytest.mark.skipif(
    not REAL_FILES,
    reason="real MP-100 annotations not found: set CAPE_MP100_ANNOTATIONS or place shared/mp100/annotations beside the checkout",
)
