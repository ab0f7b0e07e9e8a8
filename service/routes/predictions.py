"""Using a trained job: predict keypoints on your own images, with its checkpoint.

The API checks the upload (cape/inference/inputs.py: header-only, no decoding) and hands it to a predict worker
(service/predict_queue.py); it never loads the model, nor torch.
"""

from __future__ import annotations

import base64
import time
import uuid
from typing import Annotated

from fastapi import APIRouter, File, Form, Header, HTTPException, Response, UploadFile
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel, Field

from cape.inference.inputs import InputError, check_predict_inputs
from cape.run_files import CHECKPOINT_FILES, CheckpointName
from service.artifacts import get_store
from service.callers_job import CallersJobStatusDep
from service.errors import responses, unprocessable
from service.predict_admission import PredictBusy
from service.predict_queue import PredictionRequesterDep, PredictTimeout, PredictUnavailable
from service.settings import get_settings

router = APIRouter(prefix="/jobs", tags=["use a trained job"])
PREDICT_PATH = r"^/jobs/[^/]+/predict$"  # its body limit is CAPE_MAX_UPLOAD_BYTES, not CAPE_MAX_BODY_BYTES
JSON_FIELD = 64 * 1024  # characters of a JSON form field: K <= 100 keypoints fit many times over


class CheckpointUsed(BaseModel):
    name: CheckpointName
    epoch: int = Field(description="epochs completed when it was saved")
    val_pck: float | None = Field(description="validation PCK@0.2 of these weights")


class Timing(BaseModel):
    total_ms: float = Field(description="in the API, from the upload read to the answer")
    load_ms: float = Field(description="getting the model: near 0 when the worker had it loaded")
    inference_ms: float
    cached: bool = Field(description="the worker had this checkpoint loaded already")


class PredictionPublic(BaseModel):
    job_id: uuid.UUID
    checkpoint: CheckpointUsed
    k: int
    keypoints: list[list[float]] = Field(description="[x, y] in query-image pixels, one per support keypoint, in order")
    confidence: list[float] = Field(description="per keypoint, 0..1: the probability of the chosen x bin times y bin")
    support_labelled: list[bool] = Field(description="which support keypoints were labelled (v > 0)")
    skeleton: list[list[int]]
    support_bbox: list[float] = Field(description="[x, y, w, h] used for the support crop")
    query_bbox: list[float] = Field(description="[x, y, w, h] used for the query crop")
    query_size: list[int] = Field(description="[width, height] of the query image as shown (EXIF orientation applied)")
    timing: Timing


PNG = {"content": {"image/png": {}}}
RETRY_AFTER = {"Retry-After": {"description": "seconds to wait before trying again", "schema": {"type": "integer"}}}
ERRORS = responses(400, 401, 404, 409, 413, 503, 504)
ERRORS[503] = {
    **ERRORS[503],
    "headers": RETRY_AFTER,
    "description": 'Not computed, try again after Retry-After: the predict workers are busy ("predict workers busy: '
    'N requests ahead ...", answered at once when they could not answer within CAPE_PREDICT_TIMEOUT_S), the broker '
    'is unreachable ("broker unreachable") or does not answer in time, or the database is unavailable',
}
ERRORS[504] = {
    **ERRORS[504],
    "headers": RETRY_AFTER,
    "description": "No predict worker answered within CAPE_PREDICT_TIMEOUT_S: try again after Retry-After. A request "
    "no worker had taken by then is withdrawn and never computed",
}


@router.post(
    "/{job_id}/predict",
    response_model=PredictionPublic,
    responses={
        200: {**PNG, "description": "The prediction; with Accept: image/png, the query image with it drawn"},
        **ERRORS,
    },
    # The summary, operationId and form schema (Body_<operationId>) it had when this function was called predict:
    # clients generated from the schema keep their names.
    summary="Predict",
    operation_id="predict_jobs__job_id__predict_post",
)
async def predict_keypoints(
    job_id: uuid.UUID,
    status: CallersJobStatusDep,
    predictor: PredictionRequesterDep,
    support_image: Annotated[UploadFile, File(description="the support image: JPEG, PNG or WebP")],
    support_keypoints: Annotated[
        str,
        Form(
            max_length=JSON_FIELD,
            description="JSON [[x, y], ...] or [[x, y, v], ...] in support-image pixels (v = 0: not labelled); "
            "K comes from it",
        ),
    ],
    query_image: Annotated[UploadFile, File(description="the query image: JPEG, PNG or WebP")],
    skeleton: Annotated[str | None, Form(max_length=JSON_FIELD, description="JSON [[a, b], ...], 0-based")] = None,
    support_bbox: Annotated[
        str | None, Form(max_length=200, description="JSON [x, y, w, h]; default: around the labelled keypoints")
    ] = None,
    query_bbox: Annotated[
        str | None, Form(max_length=200, description="JSON [x, y, w, h]; default: the whole image")
    ] = None,
    checkpoint: Annotated[CheckpointName, Form()] = "best",
    accept: Annotated[str | None, Header(include_in_schema=False)] = None,
) -> PredictionPublic | Response:
    """Keypoints of the support's K on the query image, predicted by the job's checkpoint on a predict worker."""
    started = time.perf_counter()
    # In a worker thread: with a remote store this is a request to it, and the event loop serves others meanwhile.
    if not await run_in_threadpool(get_store().exists, job_id, CHECKPOINT_FILES[checkpoint]):
        raise HTTPException(409, f"job {job_id} has no {checkpoint} checkpoint yet (status {status})")
    support, query = await support_image.read(), await query_image.read()
    settings = get_settings()
    try:
        inputs = await run_in_threadpool(
            check_predict_inputs,
            support,
            support_keypoints,
            query,
            skeleton,
            support_bbox,
            query_bbox,
            settings.max_image_pixels,
        )
    except InputError as exc:
        raise unprocessable(("body", exc.field), str(exc)) from None
    png = "image/png" in (accept or "")
    request = {
        "job_id": str(job_id),
        "checkpoint": checkpoint,
        "inputs": inputs.to_json(),
        "png": png,
        "support_image": base64.b64encode(support).decode(),
        "query_image": base64.b64encode(query).decode(),
    }
    try:
        answer = await predictor(request, settings.predict_timeout_s)
    except PredictBusy as exc:  # refused before it was sent: prompt, and when to come back
        raise HTTPException(503, str(exc), headers={"Retry-After": str(exc.retry_after_s)}) from None
    except PredictUnavailable as exc:
        raise HTTPException(503, f"prediction not possible now: {exc}", headers={"Retry-After": "5"}) from None
    except PredictTimeout as exc:
        raise HTTPException(504, f"{exc}; try again", headers={"Retry-After": "5"}) from None
    if answer["status"] != 200:
        retry = {"Retry-After": "5"} if answer["status"] == 503 else None  # the worker found the store down
        raise HTTPException(answer["status"], answer["detail"], headers=retry)
    if png:
        return Response(base64.b64decode(answer["png"]), media_type="image/png")
    return PredictionPublic(
        job_id=job_id,
        checkpoint=answer["checkpoint"],
        k=inputs.k,
        keypoints=answer["keypoints"],
        confidence=answer["confidence"],
        support_labelled=list(inputs.labelled),
        skeleton=[list(e) for e in inputs.skeleton],
        support_bbox=list(inputs.support_bbox),
        query_bbox=list(inputs.query_bbox),
        query_size=[inputs.query.width, inputs.query.height],
        timing=Timing(total_ms=1000 * (time.perf_counter() - started), **answer["timing"]),
    )
