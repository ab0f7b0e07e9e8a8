"""The page: plain HTML, JavaScript modules and one CSS file from service/static/, no build step, no CDN.

``/`` the jobs, ``/new`` the new-job form, ``/runs/{job_id}`` one run (a learning-rate range test's curve too),
``/compare`` several runs' curves overlaid, ``/sweep`` the sweeps, ``/sweep/{sweep_id}`` one sweep (its members
ranked, their curves overlaid): as a run's page is not the API's /jobs/{id}, a sweep's is not the API's /sweeps/{id}.
``/data`` the datasets (the list, an upload with its progress), ``/data/{name}`` one dataset (its report, categories
and a gallery of their instances), beside the API's /datasets and /datasets/{name}.
The pages are static and need no API key; the data they show comes from the public API, called from the browser
with the key the user gives (see static/api.js). Plotly comes from the installed ``plotly`` wheel (it ships
``package_data/plotly.min.js``), served at ``/static/vendor/plotly.min.js``: never copied into the repository.
None of these routes is part of the API, so none is in the OpenAPI schema.
"""

from __future__ import annotations

import gzip
import importlib.metadata
import importlib.util
from functools import lru_cache
from pathlib import Path

from fastapi import APIRouter, Header
from fastapi.responses import FileResponse, HTMLResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.types import Scope

STATIC = Path(__file__).resolve().parents[1] / "static"
PLOTLY_PATH = "/static/vendor/plotly.min.js"
# Our own files change with the code: the browser revalidates them every time (a 304 when unchanged). Plotly's URL
# carries the installed version (?v=), so it can be cached for a year: an upgrade changes the URL.
REVALIDATE = {"Cache-Control": "no-cache"}
FOREVER = {"Cache-Control": "public, max-age=31536000, immutable"}

router = APIRouter(include_in_schema=False)


def plotly_js() -> tuple[Path, str]:
    """The plotly.min.js of the installed wheel and the wheel's version, found without importing plotly. A declared
    dependency: without it the API does not start, rather than serve pages whose charts cannot load."""
    spec = importlib.util.find_spec("plotly")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the plotly package is not installed (pip install plotly)")
    for folder in spec.submodule_search_locations:
        path = Path(folder) / "package_data" / "plotly.min.js"
        if path.is_file():
            return path, importlib.metadata.version("plotly")
    raise FileNotFoundError("the installed plotly package has no package_data/plotly.min.js")


PLOTLY_FILE, PLOTLY_VERSION = plotly_js()


def _page(name: str) -> HTMLResponse:
    # Read per request (a few kB, rarely asked for): an edited page shows on reload, without a restart.
    html = (STATIC / f"{name}.html").read_text(encoding="utf-8")
    html = html.replace(f'src="{PLOTLY_PATH}"', f'src="{PLOTLY_PATH}?v={PLOTLY_VERSION}"')
    return HTMLResponse(html, headers=REVALIDATE)


@router.get("/")
def jobs_page() -> HTMLResponse:
    return _page("jobs")


@router.get("/new")
def new_job_page() -> HTMLResponse:
    return _page("new")


@router.get("/runs/{job_id}")
def run_page(job_id: str) -> HTMLResponse:
    return _page("run")


@router.get("/compare")
def compare_page() -> HTMLResponse:
    return _page("compare")


@router.get("/sweep")
def sweeps_page() -> HTMLResponse:
    return _page("sweeps")


@router.get("/sweep/{sweep_id}")
def sweep_page(sweep_id: str) -> HTMLResponse:
    return _page("sweep")


@router.get("/data")
def datasets_page() -> HTMLResponse:
    return _page("data")


@router.get("/data/{name}")
def dataset_page(name: str) -> HTMLResponse:
    return _page("dataset")


@lru_cache
def _plotly_gzip() -> bytes:
    # 4.8 MB as it ships, 1.4 MB compressed: compressed once, on the first request that accepts gzip.
    return gzip.compress(PLOTLY_FILE.read_bytes(), compresslevel=6, mtime=0)


@router.get(PLOTLY_PATH)
def plotly(accept_encoding: str = Header(default="")) -> Response:
    headers = {**FOREVER, "Vary": "Accept-Encoding"}
    if "gzip" in accept_encoding:
        return Response(_plotly_gzip(), media_type="text/javascript", headers={**headers, "Content-Encoding": "gzip"})
    return FileResponse(PLOTLY_FILE, media_type="text/javascript", headers=headers)


class _Static(StaticFiles):
    async def get_response(self, path: str, scope: Scope):
        response = await super().get_response(path, scope)
        response.headers.update(REVALIDATE)
        return response


# After the plotly route, so that route answers its path first.
router.mount("/static", _Static(directory=STATIC), name="static")
