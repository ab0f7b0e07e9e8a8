import os
from pathlib import Path

import pytest

from cape.data.synthetic import generate


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory) -> Path:
    """A synthetic MP-100-layout dataset (seed 0), generated once per test session.

    To skip the generation, point CAPE_TEST_SYNTHETIC_ROOT at a folder written by
    ``python -m cape.data.synthetic --out DIR`` (seed 0): it is used as it is when it has ``annotations/``.
    """
    reuse = os.environ.get("CAPE_TEST_SYNTHETIC_ROOT")
    if reuse and (Path(reuse) / "annotations").is_dir():
        return Path(reuse)
    root = tmp_path_factory.mktemp("synthetic")
    generate(root, seed=0)
    return root
