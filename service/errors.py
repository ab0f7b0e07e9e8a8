"""Errors as the API answers them. A 422 always has FastAPI's own shape: {"detail": [{"loc", "msg", "type"}]}."""

from fastapi import HTTPException


def unprocessable(loc: tuple[str, ...], message: str) -> HTTPException:
    return HTTPException(status_code=422, detail=[{"loc": list(loc), "msg": message, "type": "value_error"}])


def not_found(what: str) -> HTTPException:
    return HTTPException(status_code=404, detail=f"{what} not found")


_DESCRIPTIONS = {
    400: "The body cannot be parsed (not JSON, not UTF-8, or malformed multipart form data)",
    401: "Missing or invalid API key",
    404: "No such job (or it belongs to another API key)",
    409: "Conflict with the job's state or with an earlier request",
    413: "Request body too large",
    503: "A dependency (dataset, database or broker) is not available",
    504: "No worker answered in time: try again (Retry-After)",
}


def responses(*codes: int) -> dict:
    """OpenAPI entries for the error answers of a route, so clients and schema checks know them."""
    schema = {"type": "object", "properties": {"detail": {"type": "string"}}, "required": ["detail"]}
    return {
        code: {"description": _DESCRIPTIONS[code], "content": {"application/json": {"schema": schema}}}
        for code in codes
    }
