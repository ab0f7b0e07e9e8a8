"""The page in a real browser: headless Chromium driven by Selenium, against the real stack (uvicorn, redis-server, a
Celery worker, SQLite), through the page's own forms and buttons.

One stack for the module: submit a single-image job through the form and watch it live (curves, verdict, pictures,
log), clone it into a second run with another learning rate and cancel a third, compare the two runs, a faulty run
(lr 1e-7) whose Health card names the cause and draws the training-health instruments, any instrument overlaid in a
comparison, try the first run's checkpoint on dataset images ("Try it": place keypoints, predict, download the
checkpoint), a tiny full-mode run and its test table, an evaluation of it started from its page, then the page with API
keys on.

Each test gets the jobs it needs from the `made` fixture: the one an earlier test made through the page when there is
one and it is what this test needs, else one made through the API. So a test never skips for want of another test's
job and any test runs on its own (-k): a failure stays the failing test's (the jobs are shared only to keep the module
as short as it is: no job is trained twice).
Screenshots go to the tests' output folders and to /tmp/page_shots/. The browser tests skip, saying why, without
chromium and chromedriver (.ci/run installs them); the first test (the files, through TestClient) needs no browser.
"""

from __future__ import annotations

import colorsys
import json
import re
import shutil
from pathlib import Path

import httpx
import pytest

from service.models import TERMINAL
from tests.helpers import (
    SHOTS,
    body_data,
    browser_test,
    chrome,
    error_next_to,
    fill,
    grow_to_page,
    js,
    open_page,
    screenshot,
    severe_console_errors,
    sqlite_stack,
    trace_points,
    uvicorn_server,
    wait,
    wait_for,
)

webdriver = pytest.importorskip("selenium.webdriver", reason="selenium not installed (pip install -e '.[test]')")
from selenium.webdriver.common.action_chains import ActionChains  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.support.ui import Select  # noqa: E402

KEY = "page-test-key-7f3a"
# Small, so that the module runs in a couple of minutes on a busy 2-core machine: a healthy model memorises one image
# in a few hundred steps; what the page shows is the same with fewer.
FIRST = {"epochs": "3", "batch_size": "1", "num_queries_per_episode": "1", "episodes_per_epoch": "10"}
FULL = {"epochs": "1", "episodes_per_epoch": "2", "batch_size": "1", "num_queries_per_episode": "1"}
FULL_MORE = {"val_episodes_per_category": "1", "val_queries_per_episode": "1", "test_episodes_per_category": "1"}
# A learning rate far too low to move the weights: the diagnosis needs 20 steps before it reads a trend.
FAULTY = {"lr": 1e-7, "epochs": 2, "episodes_per_epoch": 10, "batch_size": 1, "num_queries_per_episode": 1}
# How a verdict looks, on the run page (its box) and in the list and the comparison (its badge): the same everywhere.
VERDICT_STYLE = {"memorised": "good", "not yet": "pending", "not memorised": "bad"}


def _bodies(category: int) -> dict[str, dict]:
    """The jobs the tests make through the page, as API bodies: what `made` makes for a test that finds none."""
    first = {
        "mode": "single_image",
        "category_id": category,
        "image_index": 0,
        **{name: int(value) for name, value in FIRST.items()},
        "name": "lr 5e-4",
        "tags": ["page-sweep", "first"],
    }
    return {
        "first": first,
        "second": {**first, "lr": 0.002, "epochs": 2, "name": "lr 2e-3", "tags": ["page-sweep"]},
        "cancelled": {**first, "epochs": 200, "name": "to cancel", "tags": []},
        "faulty": {**first, **FAULTY, "name": "lr 1e-7", "tags": []},
        "full": {"mode": "full", **{n: int(v) for n, v in {**FULL, **FULL_MORE}.items()}, "name": "full, tiny"},
    }


class Jobs:
    """The jobs the browser tests work on, by role: "first" (a succeeded single-image run, lr 5e-4), "second" (its
    clone with lr 2e-3, not failed: it may still be training), "cancelled", "faulty" (a succeeded single-image run
    with lr 1e-7), "full" (a succeeded tiny full run).

    A test that makes one through the page records it (`record`); a test that needs one asks for it (`need`) and gets
    the recorded one when it is what the test needs, else a new one made through the API, as the page would have made
    it. Nothing here skips: a job that cannot be had fails the test that needs it."""

    def __init__(self, base: str, category: int):
        self.base, self.bodies, self.ids = base, _bodies(category), {}

    def record(self, role: str, job_id: str) -> None:
        self.ids[role] = job_id

    def need(self, role: str) -> str:
        wanted = {"second": None, "cancelled": "cancelled"}.get(role, "succeeded")  # None: not failed, maybe running
        with httpx.Client(base_url=self.base, timeout=30) as api:
            job_id = self.ids.get(role)
            if job_id and self._is(api, job_id, wanted):
                return job_id
            response = api.post("/jobs", json=self.bodies[role])
            assert response.status_code == 201, f"{role}: {response.text}"
            job_id = self.ids[role] = response.json()["id"]
            if role == "cancelled":
                assert api.post(f"/jobs/{job_id}/cancel").status_code == 200
            assert self._is(api, job_id, wanted), (
                f"the {role} job made through the API: {api.get(f'/jobs/{job_id}').text}"
            )
            return job_id

    @staticmethod
    def _is(api: httpx.Client, job_id: str, wanted: str | None) -> bool:
        if wanted is None:
            return api.get(f"/jobs/{job_id}").json()["status"] not in ("failed", "cancelled")
        return wait_for(api, job_id, TERMINAL, timeout=300)["status"] == wanted


# --- fixtures -----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def stack(tmp_path_factory, synthetic_root):
    """The API (open), a training worker, a predict worker, Redis and SQLite; yields base URL, environment, folder."""
    with sqlite_stack(
        tmp_path_factory.mktemp("page"), {"synthetic": synthetic_root}, predict_worker=True, heartbeat_interval_s="1"
    ) as stack:
        yield stack


@pytest.fixture(scope="module")
def keyed_base(stack):
    """A second API process on the same database and broker, with CAPE_API_KEYS set."""
    with uvicorn_server({**stack.env, "CAPE_API_KEYS": KEY}, stack.tmp / "api-keys.log") as base:
        yield base


@pytest.fixture(scope="module")
def made(stack, category) -> Jobs:
    """The jobs the tests work on, by role: see Jobs."""
    return Jobs(stack.base, category)


# --- helpers ------------------------------------------------------------------------------------------------------


def click(driver, css: str) -> None:
    """Clicks the element, finding it again if the page redrew it meanwhile."""
    wait(driver, lambda d: d.find_element(By.CSS_SELECTOR, css).click() or True)


def listed(driver) -> list[str]:
    """The job ids in the list, top to bottom."""
    return js(driver, "return [...document.querySelectorAll('#jobs tbody tr[data-job-id]')].map(r => r.dataset.jobId)")


def text(driver, css: str) -> str | None:
    """An element's text, read in one go (the run page redraws its summary on every status event)."""
    return js(driver, "return document.querySelector(arguments[0])?.innerText ?? null", css)


def element_screenshot(element, folder: Path, name: str) -> None:
    """One element, in the test's folder and in /tmp/page_shots/: whole, the window grown to the page's height (a
    screenshot of an element stops at the window's edge)."""
    driver = element.parent
    grow_to_page(driver)
    try:
        path = folder / f"{name}.png"
        element.screenshot(str(path))
        SHOTS.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, SHOTS / path.name)
    finally:
        driver.set_window_size(1400, 1000)


def authorization(request: dict) -> str | None:
    """The Authorization header of a request in Chrome's performance log."""
    return {name.lower(): value for name, value in request["headers"].items()}.get("authorization")


def job_body(base: str, mode: str) -> dict:
    """The properties of the POST /jobs body for a mode, from the API's schema: the union's alternative whose `mode`
    accepts it (const or enum), each property with its $ref followed and its optional (null) alternative dropped."""
    spec = httpx.get(f"{base}/openapi.json", timeout=30).json()

    def resolved(node: dict) -> dict:
        if "$ref" in node:
            target = spec
            for part in node["$ref"].removeprefix("#/").split("/"):
                target = target[part]
            return resolved({**target, **{k: v for k, v in node.items() if k != "$ref"}})
        if "allOf" in node:
            merged: dict = {"properties": {}}
            for part in [*map(resolved, node["allOf"]), {k: v for k, v in node.items() if k != "allOf"}]:
                merged = {**merged, **part, "properties": {**merged["properties"], **part.get("properties", {})}}
            return merged
        return node

    def alternatives(node: dict) -> list[dict]:
        node = resolved(node)
        union = node.get("oneOf") or node.get("anyOf")
        return [a for part in union for a in alternatives(part)] if union else [node]

    def accepts(prop: dict) -> bool:
        return any(p.get("const") == mode or mode in p.get("enum", []) for p in alternatives(prop))

    def plain(prop: dict) -> dict:
        outer = resolved(prop)
        parts = [p for p in alternatives(outer) if p.get("type") != "null"]
        return (
            {**parts[0], **{k: v for k, v in outer.items() if k not in ("anyOf", "oneOf")}}
            if len(parts) == 1
            else outer
        )

    body = spec["paths"]["/jobs"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    (found,) = [s for s in alternatives(body) if "mode" in s.get("properties", {}) and accepts(s["properties"]["mode"])]
    return {name: plain(prop) for name, prop in found["properties"].items()}


def rgb(css_hsl: str) -> tuple[int, int, int]:
    """An "hsl(h, s%, l%)" colour as 8-bit RGB."""
    h, s, light = map(float, re.findall(r"[\d.]+", css_hsl))
    return tuple(round(255 * c) for c in colorsys.hls_to_rgb(h / 360, light / 100, s / 100))


def keypoint_colour(n: int) -> tuple[int, int, int]:
    """The page's one colour rule for keypoint n (static/keypoints.js)."""
    return rgb(f"hsl({round(n * 137.508) % 360}, 85%, 52%)")


def painted(driver, canvas_id: str) -> dict[int, tuple[int, int, int]]:
    """The colour at the centre of each keypoint a canvas shows, by its number: those at least 40 canvas pixels from
    any other (a neighbour's dot or number would cover the centre otherwise)."""
    drawn = js(
        driver,
        "const c = document.getElementById(arguments[0]), ctx = c.getContext('2d');"
        "return JSON.parse(c.dataset.painted || '[]')"
        ".map(([n, x, y]) => [n, x, y, Array.from(ctx.getImageData(x, y, 1, 1).data).slice(0, 3)])",
        canvas_id,
    )
    return {
        n: tuple(colour)
        for n, x, y, colour in drawn
        if all((x - x2) ** 2 + (y - y2) ** 2 >= 40**2 for m, x2, y2, _ in drawn if m != n)
    }


def loss_chart_guide(driver) -> list[float]:
    """The horizontal guides of the loss chart (the memorisation check's 0.1), and that it is the loss chart."""
    layout = js(
        driver,
        "const l = document.getElementById('loss-chart').layout;"
        "return {title: l.title.text, type: l.yaxis.type, guides: (l.shapes || []).map(s => s.y0)}",
    )
    assert layout["title"] == "Training loss" and layout["type"] == "log", layout
    return layout["guides"]


# --- tests --------------------------------------------------------------------------------------------------------


def test_the_pages_and_their_files_are_served_without_a_key_and_stay_out_of_the_schema(client, monkeypatch):
    """The pages are static: they need no key, even with keys on (the data calls do). Plotly comes from the
    installed wheel, under a URL with its version, cached for a year and compressed; our own files revalidate."""
    from importlib.metadata import version

    from tests.helpers import reset_service_caches

    monkeypatch.setenv("CAPE_API_KEYS", KEY)
    reset_service_caches()
    for path in ("/", "/new", "/runs/00000000-0000-0000-0000-000000000000", "/compare?tag=x"):
        page = client.get(path)
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html"), path
        assert page.headers["cache-control"] == "no-cache"
    assert f'src="/static/vendor/plotly.min.js?v={version("plotly")}"' in client.get("/runs/x").text
    assert client.get("/jobs").status_code == 401  # the data is not open
    for name in (
        "api.js",
        "charts.js",
        "ui.js",
        "app.css",
        "run.js",
        "tryit.js",
        "checkpoints.js",
        "schema.js",
        "keypoints.js",
        "health.js",
    ):
        assert client.get(f"/static/{name}").status_code == 200, name
    assert client.get("/static/../main.py").status_code == 404
    assert client.get("/static/%2e%2e/main.py").status_code == 404

    plotly = client.get("/static/vendor/plotly.min.js", headers={"Accept-Encoding": "gzip"})
    assert plotly.status_code == 200 and plotly.headers["content-encoding"] == "gzip"
    assert plotly.headers["cache-control"] == "public, max-age=31536000, immutable"
    assert plotly.text.lstrip().startswith("/**") and "plotly.js" in plotly.text[:200]
    assert int(plotly.headers["content-length"]) < len(plotly.content) / 2
    plain = client.get("/static/vendor/plotly.min.js", headers={"Accept-Encoding": "identity"})
    assert plain.content == plotly.content and "content-encoding" not in plain.headers
    assert not (Path(__file__).parents[2] / "service" / "static" / "vendor").exists(), "plotly is never copied in"

    paths = client.get("/openapi.json").json()["paths"]
    assert not [p for p in paths if p in ("/", "/new", "/compare") or p.startswith(("/runs", "/static"))]


@browser_test
def test_submit_a_job_through_the_form_and_watch_it_live(browser, stack, category, made, tmp_path):
    d = browser
    open_page(d, f"{stack.base}/", "loaded")
    if httpx.get(f"{stack.base}/jobs", timeout=30).json()["total"] == 0:  # the module's first job
        assert "No jobs yet" in d.find_element(By.ID, "jobs").text
    d.find_element(By.LINK_TEXT, "New job").click()
    wait(d, lambda d: body_data(d, "ready"))
    # The fixed inputs' bounds are the schema's too.
    schema = job_body(stack.base, "single_image")
    split = schema["split"]
    assert [o.get_attribute("value") for o in Select(d.find_element(By.ID, "split")).options] == [
        str(n) for n in range(int(split["minimum"]), int(split["maximum"]) + 1)
    ]
    assert d.find_element(By.ID, "name").get_attribute("maxlength") == str(schema["name"]["maxLength"])
    assert d.find_element(By.ID, "epochs").get_attribute("max") == str(int(schema["epochs"]["maximum"]))

    # The picker shows id, name, K and the train images; the chosen instance is previewed with its keypoints.
    Select(d.find_element(By.ID, "category_id")).select_by_value(str(category))
    option = d.find_element(By.CSS_SELECTOR, f'#category_id option[value="{category}"]').text
    assert option.startswith(f"{category} · ") and "K=" in option and "train images" in option
    wait(d, lambda d: d.find_element(By.ID, "preview").get_attribute("data-instance") == f"{category}/0")
    assert d.find_element(By.ID, "preview").is_displayed()

    d.find_element(By.ID, "guide-values").click()
    for field, value in FIRST.items():
        fill(d, field, value)
    fill(d, "name", "lr 5e-4")
    fill(d, "tags", "page-sweep, first")

    # An index out of range: the API's 422 message appears next to the field, and nothing is submitted.
    fill(d, "image_index", "999")
    d.find_element(By.ID, "submit").click()
    wait(d, lambda d: "index must be 0.." in error_next_to(d, "image_index"), message="no 422 message at image_index")
    assert "/new" in d.current_url
    screenshot(d, tmp_path, "new_job_with_422")
    fill(d, "image_index", "0")
    d.find_element(By.ID, "submit").click()
    wait(d, lambda d: "/runs/" in d.current_url)
    job_id = d.current_url.rsplit("/", 1)[1]
    made.record("first", job_id)
    js(d, "window.__sameDocument = true")  # gone if anything reloads the page

    # The curves grow as epochs arrive, with no reload.
    seen: set[int] = set()

    def points(d):
        counts = trace_points(d, "loss-chart")
        seen.add(counts[0] if counts else 0)
        return counts and counts[0] == 3 and trace_points(d, "pck-chart")[0] == 3

    wait(d, lambda d: points(d) is not None and max(seen) >= 1, timeout=240, message="no epoch on the curve")
    # The user zooms into the PCK chart (what its zoom tool does: a relayout); the next epochs keep the zoom.
    js(d, "return Plotly.relayout('pck-chart', {'xaxis.range': [0.5, 1.5], 'yaxis.range': [0.4, 1.01]})")
    wait(d, points, timeout=300, message=f"the loss curve never reached 3 points (saw {sorted(seen)})")
    assert seen & {1, 2}, f"the curve appeared at once, never seen growing: {sorted(seen)}"
    zoom = js(d, "const l = document.getElementById('pck-chart').layout; return [l.xaxis.range, l.yaxis.range]")
    assert zoom == [[0.5, 1.5], [0.4, 1.01]], f"the zoom was lost: {zoom}"
    wait(d, lambda d: body_data(d, "status") == "succeeded", timeout=60)
    assert js(d, "return window.__sameDocument === true"), "the page reloaded"
    assert text(d, "#progress .progress span") == "3/3" and text(d, "#attempts") == "1"
    assert "stream" in body_data(d, "liveSeen"), body_data(d, "liveSeen")
    wait(d, lambda d: body_data(d, "live") == "ended")
    assert loss_chart_guide(d) == [0.1]  # a single-image run: the memorisation check's line

    # The verdict, in words, without a reload, in its style.
    verdict = d.find_element(By.ID, "verdict")
    wait(d, lambda d: verdict.get_attribute("data-state") in VERDICT_STYLE)
    assert verdict.text.startswith("Verdict: ") and len(verdict.text) > 30, verdict.text
    style = VERDICT_STYLE[verdict.get_attribute("data-state")]
    assert verdict.get_attribute("class").split() == ["verdict", "box", style]

    # The prediction picture follows the last epoch; the slider goes back to an earlier one.
    picture = d.find_element(By.ID, "prediction")
    wait(d, lambda d: picture.get_attribute("data-epoch") == "3" and picture.get_attribute("src").startswith("blob:"))
    wait(d, lambda d: js(d, "return arguments[0].complete && arguments[0].naturalWidth > 0", picture))
    before = picture.get_attribute("src")
    d.find_element(By.ID, "epoch-slider").send_keys(Keys.ARROW_LEFT)
    wait(d, lambda d: picture.get_attribute("data-epoch") == "2" and picture.get_attribute("src") != before)
    assert d.find_element(By.ID, "picture-epoch").text == "2"
    wait(d, lambda d: d.find_element(By.ID, "inputs").is_displayed(), message="no input picture")
    wait(d, lambda d: "epoch 3/3" in d.find_element(By.ID, "log").text, message="the log tail lacks the last epoch")

    js(d, "return Plotly.relayout('pck-chart', {'xaxis.autorange': true, 'yaxis.range': [0, 1.05]})")  # unzoom
    screenshot(d, tmp_path, "run")
    assert severe_console_errors(d) == []


@browser_test
def test_clone_a_run_with_another_learning_rate_and_cancel_a_third(browser, stack, made):
    d, first = browser, made.need("first")
    open_page(d, f"{stack.base}/runs/{first}", "status")
    d.find_element(By.ID, "clone").click()
    wait(d, lambda d: "clone=" in d.current_url and body_data(d, "ready"))
    # pre-filled with the first job's settings
    values = {
        name: d.find_element(By.ID, name).get_attribute("value") for name in [*FIRST, "lr", "name", "image_index"]
    }
    assert values == {**FIRST, "lr": "0.0005", "name": "lr 5e-4", "image_index": "0"}
    assert d.find_element(By.ID, "mode").get_attribute("value") == "single_image"
    assert "page-sweep" in d.find_element(By.ID, "tags").get_attribute("value")

    fill(d, "lr", "0.002")
    fill(d, "epochs", "2")
    fill(d, "name", "lr 2e-3")
    fill(d, "tags", "page-sweep")
    d.find_element(By.ID, "submit").click()
    wait(d, lambda d: "/runs/" in d.current_url and first not in d.current_url)
    second = d.current_url.rsplit("/", 1)[1]
    made.record("second", second)
    wait(d, lambda d: body_data(d, "status"))

    # a third one, cancelled from its page (queued behind the second, or already running)
    d.find_element(By.ID, "clone").click()
    wait(d, lambda d: body_data(d, "ready"))
    fill(d, "epochs", "200")
    fill(d, "name", "to cancel")
    fill(d, "tags", "")
    d.find_element(By.ID, "submit").click()
    wait(d, lambda d: "/runs/" in d.current_url and second not in d.current_url)
    made.record("cancelled", d.current_url.rsplit("/", 1)[1])
    cancel = d.find_element(By.ID, "cancel")
    wait(d, lambda d: cancel.is_displayed())
    cancel.click()
    assert cancel.text == "Really cancel?"  # a stray click does not stop a run
    cancel.click()
    wait(d, lambda d: body_data(d, "status") in ("cancelling", "cancelled"), timeout=15)
    wait(d, lambda d: body_data(d, "status") == "cancelled", timeout=120)
    assert not cancel.is_displayed()
    assert severe_console_errors(d) == []


@browser_test
def test_the_list_and_a_comparison_of_two_runs(browser, stack, made, tmp_path):
    d = browser
    jobs = {role: made.need(role) for role in ("first", "second", "cancelled")}
    with httpx.Client(base_url=stack.base, timeout=30) as api:
        created = {job_id: api.get(f"/jobs/{job_id}").json()["created_at"] for job_id in jobs.values()}
        sweep = [job["name"] for job in reversed(api.get("/jobs", params={"tag": "page-sweep"}).json()["items"])]
    open_page(d, f"{stack.base}/", "loaded")
    ours = lambda d: [job_id for job_id in listed(d) if job_id in created]  # noqa: E731
    assert ours(d) == sorted(created, key=created.get, reverse=True), "newest first"
    row = js(
        d,
        "const r = document.querySelector(`tr[data-job-id='${arguments[0]}']`);"
        "const badge = r.querySelector('.verdict .badge');"
        "return {text: r.innerText, category: r.querySelector('.category').innerText,"
        "        verdict: badge && [badge.dataset.state, badge.className]}",
        jobs["first"],
    )
    assert "succeeded" in row["text"] and "3/3" in row["text"] and "lr 5e-4" in row["text"]
    assert " · " in row["category"]  # id · name
    state, style = row["verdict"]  # the verdict's badge, styled as on the run page
    assert style.split() == ["badge", "verdict", VERDICT_STYLE[state]], row["verdict"]

    Select(d.find_element(By.ID, "filter-status")).select_by_value("cancelled")
    wait(d, lambda d: ours(d) == [jobs["cancelled"]])
    assert all(
        row["status"] == "cancelled"
        for row in js(d, "return [...document.querySelectorAll('#jobs tbody tr[data-job-id]')].map(r => r.dataset)")
    )
    assert "status=cancelled" in d.current_url
    Select(d.find_element(By.ID, "filter-status")).select_by_value("")
    wait(d, lambda d: len(ours(d)) == 3)

    for job in ("first", "second"):
        click(d, f'input.select[value="{jobs[job]}"]')
    wait(d, lambda d: d.find_element(By.ID, "compare-selected").text == "Compare selected (2)")
    screenshot(d, tmp_path, "jobs")
    d.find_element(By.ID, "compare-selected").click()
    wait(d, lambda d: "/compare?ids=" in d.current_url and body_data(d, "ready"))
    names = js(d, "return document.getElementById('loss-chart').data.map(t => t.name)")
    assert names == ["lr 5e-4", "lr 2e-3"]
    assert loss_chart_guide(d) == [0.1]  # single-image runs only: the memorisation check's line, as on a run page
    # The second run is still training or just done: its curve grows here without a reload.
    wait(
        d,
        lambda d: trace_points(d, "loss-chart") == [3, 2] and trace_points(d, "pck-chart") == [3, 2],
        timeout=300,
        message=f"the comparison did not fill up: {trace_points(d, 'loss-chart')}",
    )
    assert "lr=0.0005" in d.find_element(By.ID, "runs").text and "lr=0.002" in d.find_element(By.ID, "runs").text
    screenshot(d, tmp_path, "compare")

    open_page(d, f"{stack.base}/compare?tag=page-sweep", "ready")
    assert js(d, "return document.getElementById('pck-chart').data.map(t => t.name)") == sweep  # oldest first
    assert severe_console_errors(d) == []


def percent(value: float | None) -> str:
    """A fraction as the page writes it (ui.js pct)."""
    return "–" if value is None else f"{100 * value:.1f} %"


def chart_traces(driver, chart: str) -> dict[str, dict]:
    """A chart's traces by name, in their order: x, y, and how many lines Plotly drew in its SVG."""
    traces = js(
        driver,
        "const el = document.getElementById(arguments[0]);"
        "const drawn = el.querySelectorAll('.scatterlayer .trace').length;"
        "return (el.data || []).map(t => [t.name, {x: Array.from(t.x), y: Array.from(t.y), drawn}])",
        chart,
    )
    return dict(traces)


@browser_test
def test_a_faulty_runs_health_card_names_the_cause_and_draws_the_instruments(browser, stack, made, tmp_path):
    """lr 1e-7 on a single image, submitted through the API: the run page's Health card says why it does not memorise
    in the API's words (each finding's title, evidence and advice), once the diagnosis names the learning rate, and
    draws the instruments of every epoch: gradient norm and update ratio per part, clip rate, time per step, memory;
    the GPU's only where the run measured them. The summary shows mPCK beside PCK@0.2."""
    d = browser
    with httpx.Client(base_url=stack.base, timeout=30) as api:
        response = api.post("/jobs", json=made.bodies["faulty"])
        assert response.status_code == 201, response.text
        job_id = response.json()["id"]
    made.record("faulty", job_id)
    open_page(d, f"{stack.base}/runs/{job_id}", "status")
    js(d, "window.__sameDocument = true")  # gone if anything reloads the page
    box = d.find_element(By.ID, "diagnosis")
    wait(
        d,
        lambda d: "learning_rate_too_low" in (box.get_attribute("data-causes") or "").split(),
        timeout=300,
        message=f"the diagnosis never named the learning rate: {box.text}",
    )
    wait(d, lambda d: body_data(d, "live") == "ended", timeout=120)
    assert body_data(d, "status") == "succeeded", d.find_element(By.ID, "error").text
    assert js(d, "return window.__sameDocument === true"), "the page reloaded"
    with httpx.Client(base_url=stack.base, timeout=30) as api:
        diagnosis = api.get(f"/jobs/{job_id}").json()["diagnosis"]
        rows = api.get(f"/jobs/{job_id}/metrics").json()["items"]
    epochs = [r["epoch"] for r in rows]
    assert epochs == list(range(1, FAULTY["epochs"] + 1)) and all(r["health"] for r in rows), rows

    # The diagnosis in words: the latest one, each finding as the API words it (the style sheet alone capitalises a
    # title's first letter), never a JSON dump.
    wait(d, lambda d: box.get_attribute("data-epochs") == str(diagnosis["epochs"]))
    assert box.get_attribute("data-healthy") == "false" and not diagnosis["healthy"]
    shown = js(
        d,
        "return [...document.querySelectorAll('#diagnosis .finding')].map(f => ({cause: f.dataset.cause,"
        " title: f.querySelector('.finding-title').textContent, text: f.textContent}))",
    )
    assert [f["cause"] for f in shown] == [f["cause"] for f in diagnosis["findings"]]
    for on_page, finding in zip(shown, diagnosis["findings"]):
        assert on_page["title"] == finding["title"]
        assert finding["evidence"] in on_page["text"] and finding["advice"] in on_page["text"], on_page
    assert "{" not in box.text and "learning rate is too low" in box.text.lower(), box.text

    # The instruments: one point per epoch, the values the metrics give, every trace drawn in the SVG.
    parts = rows[-1]["health"]["parts"]
    trained = [name for name, part in parts.items() if part["trainable"]]
    update = chart_traces(d, "health-update-chart")
    assert set(update) == {part.replace("_", " ") for part in trained}, update.keys()
    for part in trained:
        trace = update[part.replace("_", " ")]
        assert trace["x"] == epochs
        assert trace["y"] == pytest.approx([r["health"]["parts"][part]["update_ratio"] for r in rows])
    expected = {
        ("grad", "whole model"): "grad_norm",
        ("clip", "clip rate"): "clip_rate",
        ("time", "data"): "data_seconds",
        ("time", "compute"): "compute_seconds",
        ("memory", "RSS"): "rss_peak_mib",
    }
    for (chart, name), field in expected.items():
        assert chart_traces(d, f"health-{chart}-chart")[name]["y"] == pytest.approx(
            [r["health"][field] for r in rows]
        ), (chart, name)
    for chart in ("grad", "clip", "update", "time", "memory"):
        traces = chart_traces(d, f"health-{chart}-chart")
        assert traces and all(t["drawn"] == len(traces) for t in traces.values()), (chart, traces)
    # Absent, not zero: what the run could not measure (CUDA on the CPU) is neither a trace nor a chart.
    cpu = all(r["health"]["cuda_allocated_peak_mib"] is None for r in rows)
    assert ("CUDA allocated" in chart_traces(d, "health-memory-chart")) is not cpu
    gpu_measured = any(r["health"]["gpu_utilisation"] is not None for r in rows)
    assert d.find_element(By.ID, "health-gpu-chart").is_displayed() is gpu_measured
    if cpu:
        assert "CPU run: no GPU figures" in d.find_element(By.ID, "health-absent").text

    # mPCK beside PCK@0.2, from the same rows.
    assert text(d, "#latest-mpck") == percent(rows[-1]["mpck"])
    assert text(d, "#best-mpck") == percent(max((r["mpck"] for r in rows if r["mpck"] is not None), default=None))
    element_screenshot(d.find_element(By.ID, "health"), tmp_path, "health_card_faulty")
    screenshot(d, tmp_path, "run_faulty")
    assert severe_console_errors(d) == []


@browser_test
def test_the_comparison_overlays_any_instrument(browser, stack, made, tmp_path):
    """The first run and the faulty one (lr 1e-7) compared: the instrument picked is overlaid, one trace per run with
    its values, and the choice goes into the URL; an instrument no run has draws nothing and says why; the table
    shows each run's best mPCK."""
    d = browser
    jobs = [made.need("first"), made.need("faulty")]
    with httpx.Client(base_url=stack.base, timeout=30) as api:
        rows = [api.get(f"/jobs/{job_id}/metrics").json()["items"] for job_id in jobs]
    open_page(d, f"{stack.base}/compare?ids={','.join(jobs)}", "ready")
    Select(d.find_element(By.ID, "metric")).select_by_value("update_ratio.decoder")
    wait(d, lambda d: d.find_element(By.ID, "metric-chart").get_attribute("data-metric") == "update_ratio.decoder")
    assert "metric=update_ratio.decoder" in d.current_url
    overlaid = chart_traces(d, "metric-chart")
    assert list(overlaid) == ["lr 5e-4", "lr 1e-7"]
    for trace, run in zip(overlaid.values(), rows):
        assert trace["x"] == [r["epoch"] for r in run] and trace["drawn"] == 2
        assert trace["y"] == pytest.approx([r["health"]["parts"]["decoder"]["update_ratio"] for r in run])
    best = [max((r["mpck"] for r in run if r["mpck"] is not None), default=None) for run in rows]
    assert [text(d, f"#runs tr[data-job-id='{job_id}'] .best-mpck") for job_id in jobs] == list(map(percent, best))
    screenshot(d, tmp_path, "compare_instrument")

    # From the link, the same instrument; one that single-image runs never have (the copy-the-support baseline).
    open_page(d, d.current_url.replace("update_ratio.decoder", "baseline_pck"), "ready")
    assert Select(d.find_element(By.ID, "metric")).first_selected_option.get_attribute("value") == "baseline_pck"
    assert all(r["baseline_pck"] is None for run in rows for r in run)
    empty = chart_traces(d, "metric-chart")
    assert list(empty) == ["lr 5e-4", "lr 1e-7"] and all(set(t["y"]) == {None} for t in empty.values()), empty
    notes = js(d, "return document.getElementById('metric-chart').layout.annotations.map(a => a.text)")
    assert "no values: none in single_image mode" in notes, notes
    assert severe_console_errors(d) == []


def click_at(driver, element, dx: float, dy: float) -> None:
    """A real mouse click at (dx, dy) CSS pixels from the element's centre."""
    ActionChains(driver).move_to_element_with_offset(element, int(dx), int(dy)).click().perform()


def support_points(driver) -> list[list[float]]:
    return json.loads(driver.find_element(By.ID, "support-canvas").get_attribute("data-keypoints"))


def labelled_support(instance: dict) -> tuple[list[list[float]], list[list[int]]]:
    """What the page fills in from a dataset instance: its labelled keypoints, renumbered 0.., and the skeleton's
    edges between them."""
    kept = {i: n for n, i in enumerate(i for i, (_, _, v) in enumerate(instance["keypoints"]) if v > 0)}
    points = [[x, y] for x, y, v in instance["keypoints"] if v > 0]
    edges = [[kept[a], kept[b]] for a, b in instance["skeleton"] if a in kept and b in kept]
    return points, edges


@browser_test
def test_try_it_predicts_with_the_runs_checkpoint_like_the_api_and_downloads_it(
    browser, stack, synthetic_root, category, made, tmp_path
):
    """The first run's "Try it" panel: a dataset instance as support (its keypoints filled in, numbered and coloured
    as the new-job form's preview shows them); an uploaded file with no keypoints (the API's 422 shown), then keypoints
    placed on it by hand, joined and undone; a prediction on a dataset query whose numbers are the API's for the same
    request, the server's PNG of it, and the best checkpoint downloaded through the page (the key header, a blob, the
    server's file name)."""
    d, job_id = browser, made.need("first")
    with httpx.Client(base_url=stack.base, timeout=60) as api:
        listed_files = {c["name"]: c for c in api.get(f"/jobs/{job_id}/checkpoints").json()["items"]}
        counts = {c["id"]: c for c in api.get("/categories", params={"split": 1}).json()["items"]}[category][
            "instances"
        ]
        query_index = 1 if counts["train"] > 1 else 0
        instance = lambda index: api.get(f"/categories/{category}/instances/{index}", params={"subset": "train"})  # noqa: E731
        support, query = instance(0).json(), instance(query_index).json()
    assert {"best", "last"} <= listed_files.keys()

    # The new-job form's preview of the same instance: its keypoints, by the dataset's numbers.
    open_page(d, f"{stack.base}/new", "ready")
    Select(d.find_element(By.ID, "category_id")).select_by_value(str(category))
    wait(d, lambda d: d.find_element(By.ID, "preview").get_attribute("data-instance") == f"{category}/0")
    in_preview = painted(d, "preview")
    element_screenshot(d.find_element(By.ID, "image-section"), tmp_path, "new_job_preview")

    open_page(d, f"{stack.base}/runs/{job_id}", "checkpoints")
    panel = d.find_element(By.ID, "tryit")
    wait(
        d,
        lambda d: (
            panel.is_displayed() and d.find_element(By.ID, "support-category").get_attribute("value") == str(category)
        ),
        message="no Try it panel, or its category is not the job's",
    )
    d.execute_script("arguments[0].scrollIntoView()", panel)

    # The query: another instance of the job's category, from the dataset.
    fill(d, "query-index", str(query_index))
    click(d, "#query-load")
    wait(
        d,
        lambda d: (
            d.find_element(By.ID, "query-canvas").get_attribute("data-image")
            == f"dataset train {category}/{query_index}"
        ),
    )

    # The support from the dataset: its labelled keypoints and its skeleton filled in.
    points, edges = labelled_support(support)
    click(d, "#support-load")
    canvas = d.find_element(By.ID, "support-canvas")
    wait(d, lambda d: canvas.get_attribute("data-image") == f"dataset train {category}/0")
    assert support_points(d) == points and canvas.get_attribute("data-edges") == str(len(edges))
    # One painter, one colour rule: a keypoint has the same number and colour in the preview and on the support.
    labelled = [i for i, (_, _, v) in enumerate(support["keypoints"]) if v > 0]
    assert [n for n, *_ in json.loads(canvas.get_attribute("data-painted"))] == labelled
    on_support = painted(d, "support-canvas")
    both = in_preview.keys() & on_support.keys()
    assert both, f"no keypoint stands clear in both pictures: {sorted(in_preview)} and {sorted(on_support)}"
    for n in both:
        expected = keypoint_colour(n)
        for where, colour in (("preview", in_preview[n]), ("support", on_support[n])):
            assert max(abs(a - b) for a, b in zip(colour, expected)) <= 3, (n, where, colour, expected)

    # The same image as an uploaded file: no keypoints yet, and the API's 422 says so, next to the panel and under it.
    d.find_element(By.ID, "support-file").send_keys(str(synthetic_root / "images" / support["file_name"]))
    wait(d, lambda d: canvas.get_attribute("data-image") == f"file {support['file_name'].rsplit('/', 1)[-1]}")
    assert canvas.get_attribute("data-points") == "0" and canvas.get_attribute("data-edges") == "0"
    click(d, "#predict")
    problem = d.find_element(By.ID, "predict-error")
    wait(d, lambda d: problem.is_displayed() and problem.get_attribute("data-status") == "422", message="no 422 shown")
    assert "support_keypoints must be a non-empty list" in problem.text and "K >= 1" in problem.text, problem.text
    assert "K >= 1" in d.find_element(By.ID, "support-error").text

    # Keypoints by hand: three clicks, each in the image's pixels where it fell; an edge; Undo takes the last
    # keypoint and its edge.
    size = js(d, "const r = arguments[0].getBoundingClientRect(); return [r.width, r.height]", canvas)
    offsets = [(-size[0] / 4, -size[1] / 4), (size[0] / 4, 0), (0, size[1] / 4)]
    for dx, dy in offsets:
        click_at(d, canvas, dx, dy)
    assert not problem.is_displayed(), "the 422 of the request before stayed"
    placed = support_points(d)
    assert len(placed) == 3
    for (x, y), (dx, dy) in zip(placed, offsets):
        expected = ((size[0] / 2 + dx) / size[0] * support["width"], (size[1] / 2 + dy) / size[1] * support["height"])
        tolerance = 1.5 * support["width"] / size[0]  # a CSS pixel of rounding, in image pixels
        assert abs(x - expected[0]) <= tolerance and abs(y - expected[1]) <= tolerance, (x, y, expected)
    click(d, "#tool-edges")
    click_at(d, canvas, *offsets[1])
    click_at(d, canvas, *offsets[2])
    assert canvas.get_attribute("data-edges") == "1"
    click(d, "#tool-points")
    click(d, "#support-undo")
    assert support_points(d) == placed[:2] and canvas.get_attribute("data-edges") == "0"
    screenshot(d, tmp_path, "run_try_it_by_hand")
    click(d, "#support-clear")
    assert support_points(d) == []

    # Back to the dataset's keypoints, and predict on the query.
    click(d, "#support-load")
    wait(d, lambda d: support_points(d) == points)
    query_canvas = d.find_element(By.ID, "query-canvas")
    before = js(d, "return arguments[0].toDataURL()", query_canvas)
    click(d, "#predict")
    result = d.find_element(By.ID, "predict-result")
    wait(
        d,
        lambda d: result.is_displayed() and result.get_attribute("data-k") == str(len(points)),
        timeout=120,
        message=f"no prediction: {problem.text}",
    )
    assert not problem.is_displayed()
    rows = d.find_elements(By.CSS_SELECTOR, "#predict-table tbody tr")
    assert len(rows) == len(points)
    assert [row.find_element(By.TAG_NAME, "td").text.strip() for row in rows] == [str(n) for n in labelled]
    assert query_canvas.get_attribute("data-drawn") == str(len(points))
    assert js(d, "return arguments[0].toDataURL()", query_canvas) != before, "the prediction was not drawn"

    # The same request through the API answers the same numbers.
    with httpx.Client(base_url=stack.base, timeout=120) as api:

        def image(index: int) -> bytes:
            return api.get(f"/categories/{category}/instances/{index}/image", params={"subset": "train"}).content

        response = api.post(
            f"/jobs/{job_id}/predict",
            files={
                "support_image": (support["file_name"].rsplit("/", 1)[-1], image(0)),
                "query_image": (query["file_name"].rsplit("/", 1)[-1], image(query_index)),
            },
            data={
                "support_keypoints": json.dumps(points),
                "skeleton": json.dumps(edges) if edges else "",
                "support_bbox": json.dumps(support["bbox"]),
                "query_bbox": json.dumps(query["bbox"]),
                "checkpoint": "best",
            },
        )
    assert response.status_code == 200, response.text
    answer = response.json()
    shown = [float(row.get_attribute(f"data-{name}")) for row in rows for name in ("x", "y", "confidence")]
    assert shown == pytest.approx(
        [v for (x, y), c in zip(answer["keypoints"], answer["confidence"]) for v in (x, y, c)], abs=1e-4
    )
    assert rows[0].find_elements(By.TAG_NAME, "td")[1].text == f"{answer['keypoints'][0][0]:.1f}"
    used = d.find_element(By.ID, "predict-checkpoint-used").text
    assert used.startswith("best checkpoint") and f"epoch {answer['checkpoint']['epoch']}" in used, used
    assert " ms" in d.find_element(By.ID, "predict-timing").text
    screenshot(d, tmp_path, "run_try_it")
    element_screenshot(panel, tmp_path, "try_it_panel")

    # The server's own drawing of the same request (Accept: image/png), opened in a new tab.
    main, before_tabs = d.current_window_handle, set(d.window_handles)
    click(d, "#predict-png")
    wait(d, lambda d: len(d.window_handles) > len(before_tabs), message="no tab with the server's drawing")
    d.switch_to.window((set(d.window_handles) - before_tabs).pop())
    try:
        wait(
            d,
            lambda d: d.current_url.startswith("blob:") and js(d, "return document.images[0]?.naturalWidth > 0"),
            timeout=60,
            message=f"no PNG in the new tab: {d.current_url}",
        )
    finally:
        d.close()
        d.switch_to.window(main)

    # The best checkpoint through the page's Download: saved under the server's name, the size listed.
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    d.execute_cdp_cmd("Page.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(downloads)})
    click(d, "#download-best")
    saved = downloads / f"cape-{job_id}-best.pt"
    wait(
        d,
        lambda d: saved.is_file() and not list(downloads.glob("*.crdownload")),
        timeout=60,
        message=f"no download: {list(downloads.iterdir())}",
    )
    assert saved.stat().st_size == listed_files["best"]["bytes"]
    link = d.find_element(By.ID, "download-best-link")
    assert link.get_attribute("data-bytes") == str(listed_files["best"]["bytes"])
    assert link.get_attribute("href").startswith("blob:") and link.get_attribute("download") == saved.name
    assert severe_console_errors(d) == []


@browser_test
def test_a_full_mode_run_shows_its_test_table(browser, stack, made, tmp_path):
    """Full mode through the form, as small as it gets: one epoch of two episodes, one validation and one test
    episode per category; the run page shows the test on unseen categories as a table."""
    d = browser
    open_page(d, f"{stack.base}/new", "ready")
    Select(d.find_element(By.ID, "mode")).select_by_value("full")
    assert not d.find_element(By.ID, "category-section").is_displayed()
    for field, value in FULL.items():
        fill(d, field, value)
    d.find_element(By.CSS_SELECTOR, "#hyper-more").find_element(By.XPATH, "..").find_element(
        By.TAG_NAME, "summary"
    ).click()
    for field, value in FULL_MORE.items():
        fill(d, field, value)
    fill(d, "name", "full, tiny")
    d.find_element(By.ID, "submit").click()
    wait(d, lambda d: "/runs/" in d.current_url)
    made.record("full", d.current_url.rsplit("/", 1)[1])
    wait(d, lambda d: body_data(d, "status") in TERMINAL, timeout=300)
    assert body_data(d, "status") == "succeeded", d.find_element(By.ID, "error").text
    assert not d.find_element(By.ID, "verdict").is_displayed()  # verdicts are for single_image runs
    wait(d, lambda d: d.find_element(By.ID, "test-table").is_displayed(), message="no test table")
    rows = d.find_elements(By.CSS_SELECTOR, "#test-table tbody tr")
    assert rows and "baseline" in d.find_element(By.ID, "test-result").text
    assert "null" not in d.find_element(By.ID, "test-result").text
    # The validation curves with the copy-the-support baseline as lines (PCK and mPCK), as the metrics give them.
    metrics = httpx.get(f"{stack.base}/jobs/{made.ids['full']}/metrics", timeout=30).json()["items"]
    curves = js(d, "return document.getElementById('pck-chart').data.map(t => [t.name, Array.from(t.y)])")
    assert dict(curves) == {
        "PCK@0.2": [r["pck"] for r in metrics],
        "mPCK": [r["mpck"] for r in metrics],
        "copy-the-support PCK@0.2": [r["baseline_pck"] for r in metrics],
        "copy-the-support mPCK": [r["baseline_mpck"] for r in metrics],
    }
    assert all(r["baseline_pck"] is not None for r in metrics), metrics
    # The Health card's diagnosis, as the API words it, healthy or not.
    diagnosis = httpx.get(f"{stack.base}/jobs/{made.ids['full']}", timeout=30).json()["diagnosis"]
    box = d.find_element(By.ID, "diagnosis")
    wait(d, lambda d: box.get_attribute("data-epochs") == str(diagnosis["epochs"]))
    if diagnosis["healthy"]:
        assert box.text == f"Healthy: {diagnosis['message']}", box.text
    else:
        assert all(f["evidence"] in box.text for f in diagnosis["findings"]), box.text
    screenshot(d, tmp_path, "run_full")
    assert severe_console_errors(d) == []


@browser_test
def test_evaluate_a_full_run_from_its_page(browser, stack, made, tmp_path):
    """ "Evaluate on unseen categories" on the tiny full run's page: its choices, bounds and defaults are the evaluate
    body's in the API's schema; a 422 next to its field, then an evaluate job whose page shows what it evaluates and
    its test table (no curves, pictures or Clone); the list and the comparison take it too."""
    d, full = browser, made.need("full")
    open_page(d, f"{stack.base}/runs/{full}", "checkpoints")
    form = d.find_element(By.ID, "evaluate-form")
    wait(d, lambda d: form.is_displayed(), message="no evaluate form on a succeeded run")

    schema = job_body(stack.base, "evaluate")
    episodes, shots, checkpoint = schema["episodes_per_category"], schema["shots"], schema["checkpoint"]
    field = d.find_element(By.ID, "eval-episodes")
    assert [float(field.get_attribute(a)) for a in ("min", "max", "value")] == [
        episodes["minimum"],
        episodes["maximum"],
        episodes["default"],
    ]
    assert field.get_attribute("title") == episodes["description"]
    shot_choices = Select(d.find_element(By.ID, "eval-shots"))
    assert [int(o.get_attribute("value")) for o in shot_choices.options] == shots["enum"]
    assert shot_choices.first_selected_option.get_attribute("value") == str(shots["default"])
    checkpoint_choices = Select(d.find_element(By.ID, "eval-checkpoint"))
    assert {o.get_attribute("value") for o in checkpoint_choices.options} <= set(checkpoint["enum"])
    assert checkpoint_choices.first_selected_option.get_attribute("value") == checkpoint["default"]

    fill(d, "eval-episodes", "0")
    click(d, "#evaluate")
    wait(
        d,
        lambda d: "greater than or equal to 1" in error_next_to(d, "episodes_per_category"),
        message="no 422 next to the field",
    )
    fill(d, "eval-episodes", "1")
    Select(d.find_element(By.ID, "eval-checkpoint")).select_by_value("best")
    click(d, "#evaluate")
    wait(d, lambda d: "/runs/" in d.current_url and full not in d.current_url)
    evaluation = d.current_url.rsplit("/", 1)[1]
    wait(d, lambda d: body_data(d, "status") in TERMINAL, timeout=300)
    assert body_data(d, "status") == "succeeded", d.find_element(By.ID, "error").text

    of = d.find_element(By.ID, "evaluation-of")
    assert of.text.startswith("Evaluation of full, tiny (1-shot, best checkpoint, 1 episode per category)"), of.text
    assert of.find_element(By.TAG_NAME, "a").get_attribute("href").endswith(f"/runs/{full}")
    wait(d, lambda d: d.find_element(By.ID, "test-table").is_displayed(), message="no test table")
    assert d.find_elements(By.CSS_SELECTOR, "#test-table tbody tr")
    assert "1-shot with the best checkpoint (epoch 1" in d.find_element(By.ID, "test-checkpoint").text
    for hidden in ("clone", "loss-chart", "prediction-figure", "tryit", "checkpoints-section"):
        assert not d.find_element(By.ID, hidden).is_displayed(), hidden
    wait(d, lambda d: text(d, "#log-state") == "complete")
    screenshot(d, tmp_path, "run_evaluate")

    open_page(d, f"{stack.base}/", "loaded")
    row = js(d, "return document.querySelector(`tr[data-job-id='${arguments[0]}']`)?.innerText", evaluation)
    assert row and "evaluate" in row and "test " in row and "100 %" in row, row
    screenshot(d, tmp_path, "jobs_with_evaluation")
    open_page(d, f"{stack.base}/compare?ids={full},{evaluation}", "ready")
    assert len(d.find_elements(By.CSS_SELECTOR, "#runs tbody tr")) == 2
    assert loss_chart_guide(d) == []  # not single-image runs: no memorisation line
    assert severe_console_errors(d) == []


@browser_test
def test_with_api_keys_the_page_asks_for_a_key_once_and_sends_it_as_a_header(stack, keyed_base, category, tmp_path):
    auth = {"Authorization": f"Bearer {KEY}"}
    with httpx.Client(base_url=keyed_base, headers=auth, timeout=10) as client:
        body = {"mode": "single_image", "category_id": category, "epochs": 1, "episodes_per_epoch": 2, "name": "keyed"}
        response = client.post("/jobs", json=body)
        assert response.status_code == 201, response.text
        job_id = response.json()["id"]
        client.post(f"/jobs/{job_id}/cancel")

    d = chrome(performance_log=True)
    try:
        d.get(f"{keyed_base}/")
        wait(
            d,
            lambda d: js(d, "return document.getElementById('api-key-dialog')?.open === true"),
            message="no key dialog",
        )
        dialog = d.find_element(By.ID, "api-key-dialog")
        d.find_element(By.ID, "api-key-input").send_keys("wrong-key")
        d.find_element(By.ID, "api-key-submit").click()
        wait(
            d, lambda d: d.find_element(By.ID, "api-key-refused").is_displayed(), message="a wrong key was not refused"
        )
        d.find_element(By.ID, "api-key-input").send_keys(KEY)
        d.find_element(By.ID, "api-key-submit").click()
        wait(d, lambda d: body_data(d, "loaded"))
        assert not dialog.is_displayed()
        wait(d, lambda d: job_id in listed(d))

        # the run page, in the same tab: no second question, the stream and the pictures with the header
        click(d, f'a[href="/runs/{job_id}"]')
        wait(d, lambda d: body_data(d, "live") == "ended", timeout=120)
        assert not js(d, "return document.getElementById('api-key-dialog')?.open === true")
        assert body_data(d, "status") == "cancelled"
        assert "API key set" in d.find_element(By.ID, "key-status").text
        screenshot(d, tmp_path, "run_with_key")

        requests = [json.loads(entry["message"])["message"] for entry in d.get_log("performance")]
        sent = [m["params"]["request"] for m in requests if m["method"] == "Network.requestWillBeSent"]
        api = [
            r
            for r in sent
            if r["url"].startswith(keyed_base) and r["url"][len(keyed_base) :].startswith(("/jobs", "/categories"))
        ]
        assert api, "no API request seen"
        assert all(KEY not in r["url"] for r in sent), "the key leaked into a URL"
        keyed = [r for r in api if authorization(r) == f"Bearer {KEY}"]
        without = [r["url"] for r in api if authorization(r) is None]
        assert len(without) <= 1, f"requests without the key (only the first one may, before the question): {without}"
        assert any(r["url"].startswith(f"{keyed_base}/jobs/{job_id}/events") for r in keyed), (
            "the stream lacked the key"
        )
        assert d.get_cookies() == []
        assert severe_console_errors(d) == []
    finally:
        d.quit()
