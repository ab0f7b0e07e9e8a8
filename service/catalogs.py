"""Dataset catalogs for validating jobs and serving previews, loaded once per (dataset root, split). Torch-free."""

from __future__ import annotations

from functools import lru_cache

from fastapi import HTTPException
from sqlmodel import Session

from cape.data.catalog import MP100Catalog
from cape.errors import DatasetError
from service.datasets import DatasetRef, resolve


@lru_cache(maxsize=32)
def _load(root: str, split: int) -> MP100Catalog:
    # An upload's root is named by its content, so a cached catalog is never stale.
    return MP100Catalog(root, split)


def catalog_of(ref: DatasetRef, split: int) -> MP100Catalog:
    """The dataset's catalog: 503 for a dataset this server cannot load (the operator's problem, not the user's)."""
    try:
        return _load(str(ref.root), split)
    except DatasetError as exc:
        raise HTTPException(
            status_code=503, detail=f"dataset {ref.name!r} is not available on this server: {exc}"
        ) from exc


def get_catalog(
    session: Session, owner: str, name: str | None, split: int, loc: tuple[str, ...]
) -> tuple[DatasetRef, MP100Catalog]:
    """The dataset ``name`` as the caller sees it (service.datasets.resolve: 422 for one they cannot name), and its
    catalog."""
    ref = resolve(session, owner, name, loc)
    return ref, catalog_of(ref, split)
