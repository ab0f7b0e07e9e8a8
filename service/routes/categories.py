"""Valid categories of a dataset split: what a user needs to pick a category and an image index."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Query

from service.auth import current_owner
from service.catalogs import get_catalog
from service.errors import responses
from service.models import CategoryList
from service.settings import get_settings

router = APIRouter(prefix="/categories", tags=["categories"], dependencies=[Depends(current_owner)])


@router.get("", response_model=CategoryList, responses=responses(401, 503))
def list_categories(
    dataset: Annotated[str | None, Query(description="dataset name; the server's default when unset")] = None,
    split: Annotated[int, Query(ge=1, le=5)] = 1,
) -> CategoryList:
    name = dataset or get_settings().default_dataset
    catalog = get_catalog(name, split, loc=("query", "dataset"))
    return CategoryList(dataset=name, split=split, items=catalog.summary)
