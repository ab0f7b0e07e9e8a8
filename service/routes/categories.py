"""Valid categories of a dataset split, and their instances: what a user needs to pick a category and an image."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Depends, Path, Query
from fastapi.responses import FileResponse
from pydantic import BaseModel, Field

from cape.data.catalog import Instance, MP100Catalog
from cape.errors import DatasetError
from service.auth import current_owner
from service.catalogs import get_catalog
from service.errors import responses, unprocessable
from service.models import CategoryList
from service.settings import get_settings

router = APIRouter(prefix="/categories", tags=["categories"], dependencies=[Depends(current_owner)])
DatasetQuery = Annotated[str | None, Query(description="dataset name; the server's default when unset")]
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


@router.get("", response_model=CategoryList, responses=responses(401, 503))
def list_categories(dataset: DatasetQuery = None, split: SplitQuery = 1) -> CategoryList:
    name = dataset or get_settings().default_dataset
    catalog = get_catalog(name, split, loc=("query", "dataset"))
    return CategoryList(dataset=name, split=split, items=catalog.summary)


def _instance(
    dataset: str | None, split: int, category_id: int, index: int, subset: str
) -> tuple[MP100Catalog, Instance]:
    catalog = get_catalog(dataset or get_settings().default_dataset, split, loc=("query", "dataset"))
    try:
        return catalog, catalog.instance(category_id, index, subset)
    except DatasetError as exc:
        raise unprocessable(("path", PATH_OF.get(exc.field, "category_id")), str(exc)) from None


@router.get("/{category_id}/instances/{index}", response_model=InstancePublic, responses=responses(401, 503))
def get_instance(
    category_id: int,
    index: Annotated[int, Path(ge=0, le=10**6)],
    dataset: DatasetQuery = None,
    split: SplitQuery = 1,
    subset: Literal["train", "val", "test"] = "train",
) -> InstancePublic:
    """The ``index``-th instance of the category (by annotation id, as a job's ``image_index``): its box, keypoints
    and skeleton, to show it before training on it."""
    catalog, x = _instance(dataset, split, category_id, index, subset)
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


@router.get(
    "/{category_id}/instances/{index}/image",
    response_class=FileResponse,
    responses={
        200: {"content": {"image/jpeg": {}, "image/png": {}}, "description": "The original image"},
        **responses(401, 503),
    },
)
def get_instance_image(
    category_id: int,
    index: Annotated[int, Path(ge=0, le=10**6)],
    dataset: DatasetQuery = None,
    split: SplitQuery = 1,
    subset: Literal["train", "val", "test"] = "train",
) -> FileResponse:
    """The instance's original image file."""
    catalog, x = _instance(dataset, split, category_id, index, subset)
    try:
        return FileResponse(catalog.image_path(x))
    except DatasetError as exc:
        raise unprocessable(("path", "index"), str(exc)) from None
