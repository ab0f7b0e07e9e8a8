"""Valid categories of a dataset split, and their instances: what a user needs to pick a category and an image."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Depends, Path, Query
from fastapi.responses import FileResponse
from pydantic import BaseModel, Field

from cape.data.catalog import Instance, MP100Catalog
from cape.errors import DatasetError
from service.auth import OwnerDep
from service.catalogs import get_catalog
from service.db import SessionDep
from service.errors import responses, unprocessable
from service.models import CategoryList

router = APIRouter(prefix="/categories", tags=["categories"])
DatasetQuery = Annotated[
    str | None, Query(description="dataset name (the server's, or one you uploaded); the server's default when unset")
]
PAGE_MAX = 100
SplitQuery = Annotated[int, Query(ge=1, le=5)]
# Where a choice's error points: the catalog names TrainConfig's fields, this route calls them by its own.
PATH_OF = {"category_id": "category_id", "image_index": "index"}


class InstancePublic(BaseModel):
    category_id: int
    index: int
    annotation_id: int
    file_name: str
    width: int
    height: int
    bbox: list[float] = Field(min_length=4, max_length=4, description="COCO x, y, w, h in image pixels")
    keypoints: list[list[float]] = Field(description="[x, y, v] per keypoint in image pixels; v = 0: not labelled")
    skeleton: list[list[int]] = Field(description="0-based keypoint pairs")


class InstancePage(BaseModel):
    total: int = Field(description="the category's instances in the subset")
    offset: int
    limit: int
    items: list[InstancePublic]


Subset = Literal["train", "val", "test"]


@router.get("", response_model=CategoryList, responses=responses(401, 503))
def list_categories(session: SessionDep, owner: OwnerDep, dataset: DatasetQuery = None, split: SplitQuery = 1):
    ref, catalog = get_catalog(session, owner, dataset, split, loc=("query", "dataset"))
    return CategoryList(dataset=ref.name, split=split, items=catalog.summary)


def _catalog(session: SessionDep, owner: OwnerDep, dataset: DatasetQuery = None, split: SplitQuery = 1) -> MP100Catalog:
    """The catalog of the dataset and split the query names, as the caller sees them."""
    return get_catalog(session, owner, dataset, split, loc=("query", "dataset"))[1]


CatalogDep = Annotated[MP100Catalog, Depends(_catalog)]


def _instance(catalog: MP100Catalog, category_id: int, index: int, subset: str) -> Instance:
    try:
        return catalog.instance(category_id, index, subset)
    except DatasetError as exc:
        raise unprocessable(("path", PATH_OF.get(exc.field, "category_id")), str(exc)) from None


def _public(catalog: MP100Catalog, category_id: int, index: int, x: Instance) -> InstancePublic:
    return InstancePublic(
        category_id=category_id,
        index=index,
        annotation_id=x.id,
        file_name=x.file_name,
        width=x.image_width,
        height=x.image_height,
        bbox=list(x.bbox),
        skeleton=[list(e) for e in catalog.category(category_id).skeleton],
        keypoints=[[px, py, v] for (px, py), v in zip(x.keypoints.tolist(), x.visibility.tolist())],
    )


@router.get("/{category_id}/instances", response_model=InstancePage, responses=responses(401, 503))
def list_instances(
    catalog: CatalogDep,
    category_id: int,
    subset: Subset = "train",
    offset: Annotated[int, Query(ge=0, le=10**6)] = 0,
    limit: Annotated[int, Query(ge=1, le=PAGE_MAX)] = 24,
) -> InstancePage:
    """A page of the category's instances in ``subset``, in ``image_index`` order: a gallery of what it holds."""
    try:
        # An empty subset is a page of nothing here, not an error: the gallery shows that there is nothing.
        records = catalog.instances(category_id, subset) if catalog.subset_of(category_id) == subset else ()
    except DatasetError as exc:
        raise unprocessable(("path", "category_id"), str(exc)) from None
    page = records[offset : offset + limit]
    items = [_public(catalog, category_id, offset + i, x) for i, x in enumerate(page)]
    return InstancePage(total=len(records), offset=offset, limit=limit, items=items)


@router.get("/{category_id}/instances/{index}", response_model=InstancePublic, responses=responses(401, 503))
def get_instance(
    catalog: CatalogDep, category_id: int, index: Annotated[int, Path(ge=0, le=10**6)], subset: Subset = "train"
) -> InstancePublic:
    """The ``index``-th instance of the category (by annotation id, as a job's ``image_index``): its box, keypoints
    and skeleton, to show it before training on it."""
    return _public(catalog, category_id, index, _instance(catalog, category_id, index, subset))


@router.get(
    "/{category_id}/instances/{index}/image",
    response_class=FileResponse,
    responses={
        200: {"content": {"image/jpeg": {}, "image/png": {}}, "description": "The original image"},
        **responses(401, 503),
    },
)
def get_instance_image(
    catalog: CatalogDep, category_id: int, index: Annotated[int, Path(ge=0, le=10**6)], subset: Subset = "train"
) -> FileResponse:
    """The instance's original image file."""
    x = _instance(catalog, category_id, index, subset)
    try:
        return FileResponse(catalog.image_path(x))
    except DatasetError as exc:
        raise unprocessable(("path", "index"), str(exc)) from None
