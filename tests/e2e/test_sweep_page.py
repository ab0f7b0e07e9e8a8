"""Sweeps and the learning-rate range test in a real browser: headless Chromium driven by Selenium, against the real
stack (uvicorn, redis-server, a Celery worker, SQLite), through the pages' own forms and buttons.

One stack for the module, tiny runs: a sweep of three learning rates typed into the new-job form, ranked live on its
page with its members' curves overlaid; a sweep cancelled from its page; a range test's loss against the learning rate
on its run page, whose suggestion opens the form to train with it. Screenshots go to the tests' output folders and to
/tmp/page_shots/. The browser tests skip, saying why, without chromium and chromedriver (.ci/run installs them).
"""

from __future__ import annotations

import httpx
import pytest

from service.models import TERMINAL
from tests.helpers import (
    body_data,
    browser_test,
    error_next_to,
    fill,
    js,
    open_page,
    screenshot,
    severe_console_errors,
    sqlite_stack,
    trace_points,
    wait,
    wait_for,
)

pytest.importorskip("selenium.webdriver", reason="selenium not installed (pip install -e '.[test]')")
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import Select

# What a browser's navigation asks for: the sweeps' URLs answer it with the page, anything else with the API's JSON.
NAVIGATION = {"Accept": "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"}
# A sweep that a 2-core machine trains in seconds per member: what the page shows is the same with more.
TINY = {"epochs": "2", "episodes_per_epoch": "4", "batch_size": "1", "num_queries_per_episode": "1"}
LRS = "1e-4, 1e-3, 1e-2"


@pytest.fixture(scope="module")
def stack(tmp_path_factory, synthetic_root):
    """The API (open), a training worker, Redis and SQLite; yields base URL, environment, folder."""
    with sqlite_stack(
        tmp_path_factory.mktemp("sweep-page"), {"synthetic": synthetic_root}, heartbeat_interval_s="1"
    ) as stack:
        yield stack


@pytest.fixture
def api(stack):
    with httpx.Client(base_url=stack.base, timeout=30) as client:
        yield client


def members(driver) -> list[dict]:
    """The ranking table's rows, top to bottom: job id, rank, status, and whether it is marked best."""
    return js(
        driver,
        "return [...document.querySelectorAll('#members tbody tr[data-job-id]')].map(r => ({id: r.dataset.jobId,"
        " rank: r.dataset.rank, status: r.dataset.status, best: r.classList.contains('best'),"
        " mark: r.querySelector('.best-mark')?.textContent ?? null}))",
    )


def test_the_sweep_pages_have_their_own_urls_beside_the_api(stack, api):
    """/sweep and /sweep/{id} are the pages (as /runs/{id} is a run's, beside the API's /jobs/{id}); /sweeps and
    /sweeps/{id} answer JSON, to a browser too; neither page is in the OpenAPI schema."""
    some_id = "00000000-0000-0000-0000-000000000000"
    for path, script in (("/sweep", "/static/sweeps.js"), (f"/sweep/{some_id}", "/static/sweep.js")):
        page = api.get(path, headers=NAVIGATION)
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html"), path
        assert script in page.text
    listed = api.get("/sweeps", headers=NAVIGATION)
    assert listed.status_code == 200 and set(listed.json()) >= {"items", "total"}
    assert api.get(f"/sweeps/{some_id}", headers=NAVIGATION).status_code == 404  # the API's answer, not a page
    for name in ("sweeps.js", "sweep.js", "lr_range.js"):
        assert api.get(f"/static/{name}").status_code == 200, name
    paths = api.get("/openapi.json").json()["paths"]
    assert set(paths["/sweeps"]) == {"get", "post"} and set(paths["/sweeps/{sweep_id}"]) == {"get"}
    assert "/sweep" not in paths and "/sweep/{sweep_id}" not in paths


@browser_test
def test_a_sweep_typed_into_the_form_is_ranked_live_on_its_page(browser, stack, api, category, tmp_path):
    d = browser
    open_page(d, f"{stack.base}/new", "ready")
    Select(d.find_element(By.ID, "category_id")).select_by_value(str(category))
    for field, value in TINY.items():
        fill(d, field, value)
    fill(d, "name", "page sweep")
    fill(d, "tags", "sweep-page")
    assert (
        d.find_element(By.ID, "submit").text == "Submit job"
        and not d.find_element(By.ID, "sweep-section").is_displayed()
    )

    # A learning rate the API refuses, in the grid: its message appears next to the learning rate, nothing is made.
    fill(d, "lr", "1e-4, -1, 1e-3")
    assert d.find_element(By.ID, "submit").text == "Submit sweep (3 jobs)"
    assert d.find_element(By.ID, "sweep-section").is_displayed()
    before = api.get("/sweeps").json()["total"]
    d.find_element(By.ID, "submit").click()
    wait(d, lambda d: "greater than 0" in error_next_to(d, "lr"), message="no 422 message at lr")
    assert "/new" in d.current_url and api.get("/sweeps").json()["total"] == before
    screenshot(d, tmp_path, "new_sweep_with_422")

    fill(d, "lr", LRS)
    Select(d.find_element(By.ID, "metric")).select_by_value("latest_loss")  # every member has one after an epoch
    d.find_element(By.ID, "submit").click()
    wait(d, lambda d: "/sweep/" in d.current_url, message="the form did not open the sweep's page")
    sweep_id = d.current_url.rsplit("/", 1)[1]
    wait(d, lambda d: body_data(d, "ready"))
    sweep = api.get(f"/sweeps/{sweep_id}").json()
    assert sweep["grid"] == {"lr": [1e-4, 1e-3, 1e-2]} and sweep["metric"] == "latest_loss", sweep
    assert {m["job"]["config"]["epochs"] for m in sweep["members"]} == {2}

    # Three members ranked; one curve each, named by its value, in the grid's order.
    rows = members(d)
    assert [r["rank"] for r in rows] == ["1", "2", "3"] and len({r["id"] for r in rows}) == 3
    names = js(d, "return document.getElementById('loss-chart').data.map(t => t.name)")
    assert names == ["lr=0.0001", "lr=0.001", "lr=0.01"]
    js(d, "window.__sameDocument = true")  # gone if anything reloads the page

    # Live: the curves fill up and the page stops polling once every member ended.
    wait(d, lambda d: body_data(d, "live") == "ended", timeout=300, message="the sweep never finished on its page")
    wait(d, lambda d: trace_points(d, "loss-chart") == [2, 2, 2] and trace_points(d, "pck-chart") == [2, 2, 2])
    assert js(d, "return window.__sameDocument === true"), "the page reloaded"
    sweep = api.get(f"/sweeps/{sweep_id}").json()
    assert sweep["status"] == "finished" and sweep["counts"]["succeeded"] == 3, sweep["counts"]
    assert sweep["best"] == sweep["members"][0]["job"]["id"]
    rows = members(d)
    assert [r["id"] for r in rows] == [m["job"]["id"] for m in sweep["members"]]  # the API's ranking
    assert [r["id"] for r in rows if r["best"]] == [sweep["best"]] and rows[0]["mark"] == "best"
    assert body_data(d, "status") == "finished" and not d.find_element(By.ID, "cancel").is_displayed()
    # each row links to its member's run page
    links = js(d, "return [...document.querySelectorAll('#members a.run-link')].map(a => a.getAttribute('href'))")
    assert links == [f"/runs/{r['id']}" for r in rows]
    screenshot(d, tmp_path, "sweep_page")

    # Clone: the form with the sweep's settings and its grid, ready to submit another sweep like it.
    d.find_element(By.ID, "clone").click()
    wait(d, lambda d: "sweep=" in d.current_url and body_data(d, "ready"))
    assert d.find_element(By.ID, "lr").get_attribute("value") == "0.0001, 0.001, 0.01"
    assert d.find_element(By.ID, "metric").get_attribute("value") == "latest_loss"
    assert d.find_element(By.ID, "epochs").get_attribute("value") == "2"
    assert d.find_element(By.ID, "submit").text == "Submit sweep (3 jobs)"

    # The list: this sweep, linked, with its best member; the navigation says where we are.
    open_page(d, f"{stack.base}/sweep", "loaded")
    row = d.find_element(By.CSS_SELECTOR, f'#sweeps tr[data-sweep-id="{sweep_id}"]')
    assert "page sweep" in row.text and "lr: 0.0001, 0.001, 0.01" in row.text and "3 succeeded" in row.text
    assert row.find_element(By.CSS_SELECTOR, "a.sweep-link").get_attribute("href").endswith(f"/sweep/{sweep_id}")
    best = next(m for m in sweep["members"] if m["job"]["id"] == sweep["best"])
    assert row.find_element(By.CSS_SELECTOR, "td.best a").get_attribute("href").endswith(f"/runs/{sweep['best']}")
    assert f"lr={best['values']['lr']}" in row.find_element(By.CSS_SELECTOR, "td.best").text
    assert d.find_element(By.CSS_SELECTOR, "nav.top a.active").text == "Sweeps"
    screenshot(d, tmp_path, "sweeps")

    # A member's run page says which sweep it is of, with its values.
    open_page(d, f"{stack.base}/runs/{sweep['best']}", "status")
    # The summary is drawn after the status is known (it awaits the category's name) and redrawn on every status
    # event: wait for the link, and read it in one go.
    link = "const a = document.getElementById('sweep-link'); return a && [a.href, a.parentNode.innerText]"
    href, term = wait(
        d,
        lambda d: js(d, link),
        message="the member's page never linked its sweep",
    )
    assert href.endswith(f"/sweep/{sweep_id}") and f"lr={best['values']['lr']}" in term, term
    assert severe_console_errors(d) == []


@browser_test
def test_cancel_a_sweep_from_its_page(browser, stack, api, category):
    body = {
        "mode": "single_image",
        "category_id": category,
        "image_index": 0,
        **{name: int(value) for name, value in TINY.items()},
        "epochs": 200,
        "grid": {"lr": [1e-4, 1e-3]},
        "name": "to cancel",
    }
    response = api.post("/sweeps", json=body)
    assert response.status_code == 201, response.text
    sweep_id = response.json()["id"]
    d = browser
    open_page(d, f"{stack.base}/sweep/{sweep_id}", "ready")
    cancel = d.find_element(By.ID, "cancel")
    assert cancel.is_displayed()
    cancel.click()
    assert cancel.text == "Really cancel?"  # a stray click does not stop a sweep
    cancel.click()
    wait(
        d,
        lambda d: (
            {m["job"]["status"] for m in api.get(f"/sweeps/{sweep_id}").json()["members"]}
            <= {"cancelling", "cancelled"}
        ),
        timeout=15,
        message="the click did not cancel every member",
    )
    # The running member stops at its next step; the page follows until every member ended.
    wait(d, lambda d: body_data(d, "status") == "finished", timeout=120, message="the page never saw the sweep end")
    sweep = api.get(f"/sweeps/{sweep_id}").json()
    assert [m["job"]["status"] for m in sweep["members"]] == ["cancelled", "cancelled"], sweep["counts"]
    assert {r["status"] for r in members(d)} == {"cancelled"}
    assert not cancel.is_displayed()
    assert severe_console_errors(d) == []


@browser_test
def test_a_range_test_plots_its_loss_against_the_learning_rate_and_trains_with_its_suggestion(
    browser, stack, api, category, tmp_path
):
    body = {
        "mode": "lr_range_test",
        "run_mode": "single_image",
        "category_id": category,
        "image_index": 0,
        "batch_size": 1,
        "num_queries_per_episode": 1,
        "lr_range": {"steps": 30},
    }
    response = api.post("/jobs", json=body)
    assert response.status_code == 201, response.text
    job_id = response.json()["id"]
    d = browser
    open_page(d, f"{stack.base}/runs/{job_id}", "status")
    assert d.find_element(By.ID, "lr-range").is_displayed()  # what it does, while it runs
    job = wait_for(api, job_id, TERMINAL, timeout=300)
    assert job["status"] == "succeeded", job["error"]
    result = job["lr_range"]
    assert result["suggestion"] is not None, result["message"]

    # The loss and the smoothed loss against the learning rate, on a log axis, every point; the suggestion marked.
    wait(d, lambda d: js(d, "return document.getElementById('lr-range-chart').layout?.xaxis?.type") == "log")
    plot = js(
        d,
        "const el = document.getElementById('lr-range-chart');"
        "return {traces: el.data.map(t => ({name: t.name, x: Array.from(t.x)})),"
        " shapes: (el.layout.shapes || []).map(s => [s.x0, s.x1, s.yref])}",
    )
    lrs = [p["lr"] for p in result["points"]]
    assert [t["name"] for t in plot["traces"][:2]] == ["loss", "smoothed loss"]
    assert all(t["x"] == pytest.approx(lrs) for t in plot["traces"][:2])
    assert plot["traces"][2]["x"] == pytest.approx([result["suggestion"]])
    assert plot["shapes"] == [[pytest.approx(result["suggestion"]), pytest.approx(result["suggestion"]), "paper"]]
    assert result["message"] in d.find_element(By.ID, "lr-range-message").text
    # Epochs make no sense here: no epoch charts, pictures or health card, rather than empty ones.
    for hidden in ("loss-chart", "pck-chart", "health", "prediction-figure", "checkpoints-section"):
        assert not d.find_element(By.ID, hidden).is_displayed(), hidden
    assert d.find_element(By.CSS_SELECTOR, "#progress .progress span").text == "100 %"
    screenshot(d, tmp_path, "lr_range_plot")

    # "Train with lr = X": the form, filled with the run's settings (its mode the training one) and the suggestion.
    use = d.find_element(By.ID, "use-suggestion")
    assert use.text.startswith("Train with lr = ")
    use.click()
    wait(d, lambda d: "clone=" in d.current_url and body_data(d, "ready"))
    assert float(d.find_element(By.ID, "lr").get_attribute("value")) == pytest.approx(result["suggestion"], rel=1e-12)
    assert d.find_element(By.ID, "mode").get_attribute("value") == "single_image"
    assert d.find_element(By.ID, "category_id").get_attribute("value") == str(category)
    assert d.find_element(By.ID, "batch_size").get_attribute("value") == "1"
    assert d.find_element(By.ID, "submit").text == "Submit job"

    # "Find a learning rate" on these settings: another range test, of the same run (the form's lr is not sent).
    d.find_element(By.ID, "find-lr").click()
    wait(d, lambda d: "/runs/" in d.current_url and job_id not in d.current_url, message="no range test started")
    again = api.get(f"/jobs/{d.current_url.rsplit('/', 1)[1]}").json()
    assert api.post(f"/jobs/{again['id']}/cancel").status_code == 200  # what it finds is known: leave the worker
    assert again["mode"] == "lr_range_test" and again["category_id"] == category, again
    assert {k: again["config"][k] for k in ("mode", "batch_size", "lr")} == {
        "mode": "single_image",
        "batch_size": 1,
        "lr": job["config"]["lr"],  # the default: a range test's lr is never the form's
    }
    assert severe_console_errors(d) == []
