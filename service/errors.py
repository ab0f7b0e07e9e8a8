"""Errors as the API answers them. A 422 always has FastAPI's own shape: {"detail": [{"loc", "msg", "type"}]}."""

from fastapi import HTTPException


def unprocessable(loc: tuple[str, ...], message: str) -> HTTPException:
    return HTTPException(status_code=422, detail=[{"loc": list(loc), "msg": message, "type": "value_error"}])


def not_found(what: str) -> HTTPException:
    return HTTPException(status_code=404, detail=f"{what} not found")
