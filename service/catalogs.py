"""Dataset catalogs for validating jobs, loaded once per (dataset, split). Torch-free."""

from __future__ import annotations

from functools import lru_cache

from fastapi import HTTPException

from cape.data.catalog import MP100Catalog
from cape.errors import DatasetError
from service.errors import unprocessable
from service.settings import get_settings


@lru_cache(maxsize=32)
def _load(root: str, split: int) -> MP100Catalog:
    return MP100Catalog(root, split)


def get_catalog(name: str, split: int, loc: tuple[str, ...]) -> MP100Catalog:
    """The catalog of a dataset by name: 422 for a name the server does not know, 503 for one it cannot load."""
    datasets = get_settings().datasets
    if name not in datasets:
        raise unprocessable(loc, f"unknown dataset {name!r}: valid datasets are {', '.join(sorted(datasets))}")
    try:
        return _load(datasets[name], split)
    except DatasetError as exc:
        # The request was fine; the server's dataset is not there: the operator's problem, not the user's.
        raise HTTPException(status_code=503, detail=f"dataset {name!r} is not available on this server: {exc}") from exc
