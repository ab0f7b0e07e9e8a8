"""The Datasets page in a real browser: headless Chromium driven by Selenium, against the real stack (uvicorn,
redis-server, a training worker, a predict worker and a datasets worker, SQLite), with two API keys, through the
pages' own forms, links and buttons.

The issue's "Done when", from the page: a zip of four real-photo sources uploaded from /data (its progress bar seen
reaching 100 %), its page followed until the import and check end, the report read (the sources' categories and their
counts, every problem with its place), the 300w faces browsed in the gallery with their 68 keypoints drawn, "Train on
it" on the first face, a single-image job with the guide's recipe that memorises it, and that face's keypoints
predicted on the other 300w photo from the run page's "Try it" (measured against its annotation at PCK@0.2). Then:
another key does not see the upload; its owner deletes it and reads what became of its job. A hostile archive shows
the API's 422 next to the file input and creates nothing; the server's dataset is read-only.
Screenshots go to the tests' output folders and to /tmp/page_shots/.
"""

from __future__ import annotations

import json
import zipfile

import httpx
import numpy as np
import pytest

from tests.helpers import (
    KEY_A,
    KEY_B,
    REAL_PHOTOS,
    auth,
    body_data,
    browser_test,
    error_next_to,
    fill,
    js,
    open_page,
    real_photo_archive,
    screenshot,
    severe_console_errors,
    sqlite_stack,
    wait,
)

pytest.importorskip("selenium.webdriver", reason="selenium not installed (pip install -e '.[test]')")
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import Select

pytestmark = pytest.mark.skipif(REAL_PHOTOS is None, reason="shared/real-photos not found beside the checkout")

SOURCES = ("300w", "cofw", "coco", "horse10")
NAVIGATION = {"Accept": "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"}
# The single-image guide's recipe (benchmarks/common.py single_image_recipe: batch 1, 1 query, 20 episodes per epoch,
# seed 0, small preset) memorises a 300w face in 3-4 epochs; 6 keep the job short.
EPOCHS = "6"


@pytest.fixture(scope="module")
def stack(tmp_path_factory, synthetic_root):
    """The API with two keys, a training, a predict and a datasets worker, Redis and SQLite."""
    with sqlite_stack(
        tmp_path_factory.mktemp("datasets-page"),
        {"synthetic": synthetic_root},
        predict_worker=True,
        datasets_worker=True,
        heartbeat_interval_s="1",
        api_keys=f"{KEY_A}, {KEY_B}",
    ) as stack:
        yield stack


@pytest.fixture(scope="module")
def api(stack):
    with httpx.Client(base_url=stack.base, timeout=60, headers=auth(KEY_A)) as client:
        yield client


# Every status a dataset's page shows, noted in sessionStorage from the page's first moment (added to each new
# document before its own scripts run): what it followed live, the ones before the test could look included.
NOTE_STATUSES = """
if (location.pathname.startsWith("/data/")) {
  sessionStorage.setItem("test.statuses", "[]");
  new MutationObserver(() => {
    const status = document.body?.dataset.status, seen = JSON.parse(sessionStorage.getItem("test.statuses"));
    if (status && seen.at(-1) !== status) sessionStorage.setItem("test.statuses", JSON.stringify([...seen, status]));
  }).observe(document, {subtree: true, attributes: true, attributeFilter: ["data-status"]});
}
"""


def use_key(driver, base: str, key: str) -> None:
    """The key the pages send (api.js keeps it in this tab's sessionStorage), set without the key dialog."""
    driver.get(f"{base}/static/app.css")
    js(driver, "sessionStorage.setItem('cape.apiKey', arguments[0])", key)


def labelled_points(instance: dict) -> np.ndarray:
    """An instance's labelled keypoints, [x, y] each."""
    return np.array([[x, y] for x, y, v in instance["keypoints"] if v > 0])


def listed(driver) -> list[str]:
    return js(driver, "return [...document.querySelectorAll('#datasets tbody tr[data-name]')].map(r => r.dataset.name)")


def refusals(driver) -> dict[str, str]:
    """The messages the upload form shows, by the field they are next to ("" for the form's own)."""
    return js(
        driver,
        "return Object.fromEntries([...document.querySelectorAll('#upload-form [data-error-for]')]"
        ".filter(e => e.textContent).map(e => [e.dataset.errorFor, e.textContent]))",
    )


def click(driver, css: str) -> None:
    """Clicks the element, finding it again if the page redrew it meanwhile."""
    wait(driver, lambda d: d.find_element(By.CSS_SELECTOR, css).click() or True)


def source_categories() -> dict[str, int]:
    """Each source category's imported name and its annotations, from the COCO files as the user zips them."""
    out = {}
    for source in SOURCES:
        (path,) = (REAL_PHOTOS / source).glob("*.json")
        coco = json.loads(path.read_text())
        for category in coco["categories"]:
            count = sum(a["category_id"] == category["id"] for a in coco["annotations"])
            if count:
                out[f"{source}: {category['name']}"] = count
    return out


def upload(driver, archive, name: str) -> None:
    """Chooses the archive and the name on /data and clicks Upload; every percentage the progress bar shows is kept in
    sessionStorage, which outlives the page the upload leaves."""
    driver.find_element(By.ID, "file").send_keys(str(archive))
    fill(driver, "name", name)
    js(
        driver,
        "sessionStorage.removeItem('test.progress');"
        "const box = document.getElementById('upload-progress');"
        "new MutationObserver(() => {"
        "  const seen = JSON.parse(sessionStorage.getItem('test.progress') || '[]');"
        "  const shown = box.querySelector('span').textContent;"
        "  if (!box.hidden && shown && seen.at(-1) !== shown) seen.push(shown);"
        "  sessionStorage.setItem('test.progress', JSON.stringify(seen));"
        "}).observe(box, {attributes: true, childList: true, subtree: true, characterData: true});",
    )
    driver.find_element(By.ID, "upload").click()


def test_the_dataset_pages_are_served_beside_the_api(stack):
    """/data and /data/{name} are pages (no key needed, like every page); /datasets answers JSON, to a browser too;
    neither page is in the OpenAPI schema."""
    with httpx.Client(base_url=stack.base, timeout=30) as client:
        for path, script in (("/data", "/static/data.js"), ("/data/anything", "/static/dataset.js")):
            page = client.get(path, headers=NAVIGATION)
            assert page.status_code == 200 and page.headers["content-type"].startswith("text/html"), path
            assert script in page.text
        for name in ("data.js", "dataset.js", "datasets.js", "gallery.js", "instance.js"):
            assert client.get(f"/static/{name}").status_code == 200, name
        assert client.get("/datasets", headers=NAVIGATION).status_code == 401  # the API's answer, not a page
        paths = client.get("/openapi.json").json()["paths"]
    assert "/datasets" in paths and "/data" not in paths and "/data/{name}" not in paths


@browser_test
def test_upload_read_the_report_browse_train_on_a_face_and_predict_the_other(browser, stack, api, tmp_path):
    d, name = browser, "real-photos-4"
    archive = real_photo_archive(tmp_path / "my-photos.zip", SOURCES)
    expected = source_categories()

    # /data: the server's dataset listed, read-only; the upload form.
    use_key(d, stack.base, KEY_A)
    open_page(d, f"{stack.base}/data", "loaded")
    assert d.find_element(By.CSS_SELECTOR, "nav.top a.active").text == "Datasets"
    assert listed(d) == ["synthetic"]

    # The upload: its bytes go out with the progress bar (throttled, so that it has something to show), then its page,
    # whose every status is noted from its first.
    d.set_network_conditions(latency=5, download_throughput=10 * 1024**2, upload_throughput=512 * 1024)
    noting = d.execute_cdp_cmd("Page.addScriptToEvaluateOnNewDocument", {"source": NOTE_STATUSES})["identifier"]
    try:
        upload(d, archive, name)
        opened = lambda d: d.current_url.endswith(f"/data/{name}")  # noqa: E731
        wait(d, lambda d: opened(d) or refusals(d), timeout=60, message="the upload neither opened its page nor failed")
    finally:
        d.delete_network_conditions()
    assert opened(d), f"the upload was refused: {refusals(d)}"
    progress = json.loads(js(d, "return sessionStorage.getItem('test.progress')") or "[]")
    percentages = [int(p.rstrip(" %")) for p in progress]
    print(f"upload of {archive.stat().st_size} bytes: the progress bar showed {progress}")
    assert percentages and percentages[-1] == 100 and percentages == sorted(percentages), progress

    # Followed live, without a reload, until the worker has imported and checked it.
    wait(d, lambda d: body_data(d, "ready"))
    js(d, "window.__sameDocument = true")
    wait(d, lambda d: body_data(d, "status") == "ready", timeout=180, message="the dataset never got ready on its page")
    assert js(d, "return window.__sameDocument === true"), "the page reloaded"
    d.execute_cdp_cmd("Page.removeScriptToEvaluateOnNewDocument", {"identifier": noting})
    statuses = json.loads(js(d, "return sessionStorage.getItem('test.statuses')"))
    print(f"the dataset's page showed {statuses}")
    assert statuses[-1] == "ready" and statuses == sorted(statuses, key=["queued", "checking", "ready"].index)
    dataset = api.get(f"/datasets/{name}").json()
    report = dataset["report"]
    assert dataset["status"] == "ready" and report["usable"], dataset

    # The report: the verdict, each problem with its place, the import's categories with their sources and counts.
    verdict = d.find_element(By.ID, "verdict")
    assert verdict.get_attribute("data-usable") == "true" and verdict.text.startswith("Usable:"), verdict.text
    assert f"{report['errors']} error" in verdict.text and f"{report['warnings']} warning" in verdict.text
    shown = js(
        d,
        "return [...document.querySelectorAll('#problems li[data-code]')].map(li => [li.dataset.code,"
        " li.dataset.severity, li.innerText])",
    )
    by_severity = [p for severity in ("error", "warning") for p in report["problems"] if p["severity"] == severity]
    assert [[c, s] for c, s, _ in shown] == [[p["code"], p["severity"]] for p in by_severity]
    for problem, (_, _, text) in zip(by_severity, shown):
        assert problem["message"] in text
        places = [str(problem[k]) for k in ("file", "split", "subset", "category_id", "annotation_id", "field")]
        assert all(place in text for place in places if place != "None"), (problem, text)
    imported = js(
        d,
        "return [...document.querySelectorAll('#imported tbody tr')].map(tr => [...tr.cells].map(td => td.innerText))",
    )
    names = {row[1]: int(row[3]) for row in imported}
    skipped = sum(len(s["ids"]) for s in report["import"]["skipped"] if s["kind"] == "annotation")
    assert set(names) == set(expected), names
    assert sum(names.values()) == sum(expected.values()) - skipped == dataset["summary"]["instances"]
    for row in imported:
        assert row[4].startswith(row[1].split(":")[0]), row  # from the source it names
    counts = js(
        d,
        "return [...document.querySelectorAll('#counts tbody tr')].map(tr => [tr.dataset.split, tr.dataset.subset,"
        " Number(tr.cells[3].innerText)])",
    )
    assert counts == [[s, sub, c["instances"]] for s, subsets in report["counts"].items() for sub, c in subsets.items()]
    screenshot(d, tmp_path, "datasets_report")

    # The categories of split 1, and the gallery of the 300w faces: each with its 68 keypoints drawn on its crop.
    face = next(c for c in dataset["categories"] if c["name"] == "300w: face")
    assert face["subset"] == "train" and face["instances"]["train"] == expected["300w: face"]
    rows = js(
        d, "return [...document.querySelectorAll('#categories tbody tr[data-id]')].map(tr => tr.cells[1].innerText)"
    )
    assert rows == [c["name"] for c in dataset["categories"]]
    click(d, f'#categories tr[data-id="{face["id"]}"] button.browse')
    wait(d, lambda d: body_data(d, "gallery") == f"{face['id']}:0", message="the gallery never showed the faces")
    cards = js(
        d,
        "return [...document.querySelectorAll('#gallery canvas')].map(c => ({index: c.dataset.index, k: c.dataset.k,"
        " drawn: c.dataset.drawn, painted: JSON.parse(c.dataset.painted || '[]').length}))",
    )
    faces = api.get(
        f"/categories/{face['id']}/instances", params={"dataset": name, "subset": "train", "limit": 24}
    ).json()["items"]
    assert [c["index"] for c in cards] == [str(f["index"]) for f in faces] and len(cards) == 2
    for card, instance in zip(cards, faces):
        labelled = sum(v > 0 for _, _, v in instance["keypoints"])
        assert card["k"] == "68" and card["drawn"] == "true" and card["painted"] == labelled == 68, card
    assert "?" in d.current_url and f"category={face['id']}" in d.current_url  # a reload comes back here
    # The images came with the key in a header, as blobs: the key is in no URL the page asked for.
    asked = js(d, "return performance.getEntriesByType('resource').map(e => e.name)")
    assert any("/image?" in url for url in asked) and not [url for url in asked if KEY_A in url]
    screenshot(d, tmp_path, "datasets_gallery")

    # A category with more instances than a page: next and previous; its skeleton drawn too.
    person = next(c for c in dataset["categories"] if c["name"] == "coco: person")
    click(d, f'#categories tr[data-id="{person["id"]}"] button.browse')
    wait(d, lambda d: body_data(d, "gallery") == f"{person['id']}:0")
    total, page = person["instances"]["train"], len(d.find_elements(By.CSS_SELECTOR, "#gallery canvas"))
    assert page < total and d.find_element(By.ID, "gallery-count").text == f"1–{page} of {total}"
    click(d, "#gallery-next")
    wait(d, lambda d: body_data(d, "gallery") == f"{person['id']}:{page}")
    assert len(d.find_elements(By.CSS_SELECTOR, "#gallery canvas")) == total - page
    assert d.find_element(By.ID, "gallery-count").text == f"{page + 1}–{total} of {total}"
    params = {"dataset": name, "subset": "train", "offset": page, "limit": 1}
    (shown_person,) = api.get(f"/categories/{person['id']}/instances", params=params).json()["items"]
    assert shown_person["skeleton"], "coco's people have a skeleton"  # drawn between their keypoints
    caption = d.find_element(By.CSS_SELECTOR, "#gallery figcaption").text
    assert f"#{page} " in caption and f"{len(shown_person['skeleton'])} edges" in caption, caption
    click(d, "#gallery-prev")
    wait(d, lambda d: body_data(d, "gallery") == f"{person['id']}:0")

    # "Train on it" on the first face: the new-job form with the dataset, its category and the image chosen.
    click(d, f'#categories tr[data-id="{face["id"]}"] button.browse')
    wait(d, lambda d: body_data(d, "gallery") == f"{face['id']}:0")
    click(d, '#gallery figure[data-index="0"] a.train-link')
    wait(d, lambda d: "/new?" in d.current_url and body_data(d, "ready"))
    form = {
        f: d.find_element(By.ID, f).get_attribute("value") for f in ("dataset", "mode", "category_id", "image_index")
    }
    assert form == {"dataset": name, "mode": "single_image", "category_id": str(face["id"]), "image_index": "0"}
    wait(d, lambda d: d.find_element(By.ID, "preview").get_attribute("data-instance") == f"{face['id']}/0")
    d.find_element(By.ID, "guide-values").click()
    fill(d, "epochs", EPOCHS)
    Select(d.find_element(By.ID, "preset")).select_by_value("small")
    fill(d, "seed", "0")
    fill(d, "name", "300w face 0")
    d.find_element(By.ID, "submit").click()
    wait(d, lambda d: "/runs/" in d.current_url, message="the form did not open the run")
    job_id = d.current_url.rsplit("/", 1)[1]
    job = api.get(f"/jobs/{job_id}").json()
    assert job["dataset"] == name and job["category_id"] == face["id"] and job["config"]["episodes_per_epoch"] == 20
    wait(d, lambda d: body_data(d, "status") == "succeeded", timeout=300, message="the run never succeeded")
    job = api.get(f"/jobs/{job_id}").json()
    assert job["latest_pck"] == 1.0 and job["verdict"]["state"] == "memorised", job["verdict"]
    summary = d.find_element(By.ID, "summary").text
    assert "Latest PCK@0.2\n100.0 %" in summary, summary

    # Try it: the face as support, the other 300w photo as query, both from the dataset; predicted with the run.
    panel = d.find_element(By.ID, "tryit")
    wait(d, lambda d: panel.is_displayed() and d.find_element(By.ID, "predict-checkpoint").get_attribute("value"))
    d.execute_script("arguments[0].scrollIntoView()", panel)
    fill(d, "query-index", "1")
    click(d, "#query-load")
    wait(
        d,
        lambda d: d.find_element(By.ID, "query-canvas").get_attribute("data-image") == f"dataset train {face['id']}/1",
    )
    click(d, "#support-load")
    wait(d, lambda d: d.find_element(By.ID, "support-canvas").get_attribute("data-points") == "68")
    click(d, "#predict")
    result = d.find_element(By.ID, "predict-result")
    wait(d, lambda d: result.get_attribute("data-k") == "68", timeout=120, message="no prediction")
    predicted = np.array(
        js(d, "return [...document.querySelectorAll('#predict-table tbody tr')].map(r => [+r.dataset.x, +r.dataset.y])")
    )
    support, other = faces
    truth, side = labelled_points(other), max(other["bbox"][2:])  # PCK's yardstick: the face's box's longer side
    # Copying the support's keypoints box to box: the answer to read the model's beside (a face is a face).
    box, other_box = np.array(support["bbox"]), np.array(other["bbox"])
    copied = (labelled_points(support) - box[:2]) / box[2:] * other_box[2:] + other_box[:2]
    errors = {"model": np.linalg.norm(predicted - truth, axis=1), "copy": np.linalg.norm(copied - truth, axis=1)}
    pck = {(who, t): float((e <= t * side).mean()) for who, e in errors.items() for t in (0.2, 0.1)}
    for who, what in (("model", "the model's prediction"), ("copy", "copying the support box to box")):
        print(
            f"face 0 -> the other 300w photo ({other['file_name']}, box side {side:.0f} px), {what}: PCK@0.2 "
            f"{pck[who, 0.2]:.1%}, PCK@0.1 {pck[who, 0.1]:.1%}, median error {np.median(errors[who]):.1f} px"
        )
    assert pck["model", 0.2] >= 0.9, f"PCK@0.2 {pck['model', 0.2]:.1%} on the other face"
    screenshot(d, tmp_path, "datasets_trained_prediction")

    # Another key's list and page know nothing of it.
    use_key(d, stack.base, KEY_B)
    open_page(d, f"{stack.base}/data", "loaded")
    assert name not in listed(d) and "synthetic" in listed(d)
    open_page(d, f"{stack.base}/data/{name}", "status")
    assert body_data(d, "status") == "missing"
    assert api.get(f"/datasets/{name}", headers=auth(KEY_B)).status_code == 404

    # Its owner's list; then its page deletes it (two clicks) and says what becomes of the job trained on it.
    use_key(d, stack.base, KEY_A)
    open_page(d, f"{stack.base}/data", "loaded")
    row = d.find_element(By.CSS_SELECTOR, f'#datasets tr[data-name="{name}"]')
    assert row.get_attribute("data-status") == "ready" and "my-photos.zip" in row.text
    assert str(dataset["summary"]["instances"]) in row.text
    screenshot(d, tmp_path, "datasets_list")
    open_page(d, f"{stack.base}/data/{name}", "ready")
    delete = d.find_element(By.ID, "delete")
    delete.click()
    assert delete.text == "Really delete?"
    delete.click()
    wait(d, lambda d: body_data(d, "status") == "deleted", message="the page never said it was deleted")
    assert "1 job(s) trained on it keep their metrics" in d.find_element(By.ID, "deleted").text
    assert api.get(f"/datasets/{name}").status_code == 404
    assert severe_console_errors(d) == []


@browser_test
def test_a_hostile_archive_is_refused_next_to_the_file_input_and_creates_nothing(browser, stack, api, tmp_path):
    hostile = tmp_path / "escape.zip"
    with zipfile.ZipFile(hostile, "w") as archive:
        archive.writestr("faces/faces.json", "{}")
        archive.writestr("../escaped.txt", "outside the dataset's folder")
    with hostile.open("rb") as file:
        refused = api.post("/datasets", files={"file": ("escape.zip", file)}, data={"name": "by-the-api"})
    assert refused.status_code == 422, refused.text
    (expected,) = [e["msg"] for e in refused.json()["detail"] if e["loc"] == ["body", "file"]]
    before = api.get("/datasets").json()["items"]

    d = browser
    use_key(d, stack.base, KEY_A)
    open_page(d, f"{stack.base}/data", "loaded")
    upload(d, hostile, "escape")
    wait(d, lambda d: refusals(d), message="the page showed no refusal")
    assert refusals(d) == {"file": expected}
    assert error_next_to(d, "file") == expected and "/data" in d.current_url and not d.current_url.endswith("escape")
    assert "invalid" in d.find_element(By.CSS_SELECTOR, '[data-field="file"]').get_attribute("class").split()
    assert api.get("/datasets").json()["items"] == before
    assert not list(stack.tmp.parent.rglob("escaped.txt")), "an entry was written outside"
    screenshot(d, tmp_path, "datasets_hostile_upload")

    # The server's dataset: its report, no delete button (read-only).
    open_page(d, f"{stack.base}/data/synthetic", "ready")
    wait(d, lambda d: body_data(d, "status") == "ready", timeout=120)
    assert not d.find_element(By.ID, "delete").is_displayed()
    assert "read-only" in d.find_element(By.ID, "kind").text
    assert severe_console_errors(d) == []


@browser_test
def test_a_rejected_upload_says_why_on_its_page(browser, stack, api, tmp_path):
    """An archive whose import is refused (a skeleton naming a keypoint beyond K): its page follows it to rejected
    and shows the worker's message, the verdict "not usable"; its owner can delete it."""
    coco = json.loads((REAL_PHOTOS / "300w" / "test_300w.json").read_text())
    k = len(coco["annotations"][0]["keypoints"]) // 3
    coco["categories"][0]["skeleton"] = [[1, 2], [2, k + 1]]
    damaged = tmp_path / "damaged.zip"
    with zipfile.ZipFile(damaged, "w") as archive:
        archive.writestr("faces/faces.json", json.dumps(coco))
        for image in coco["images"]:
            archive.write(REAL_PHOTOS / "300w" / image["file_name"], f"faces/{image['file_name']}")
    with damaged.open("rb") as file:
        response = api.post("/datasets", files={"file": ("damaged.zip", file)}, data={"name": "damaged"})
    assert response.status_code == 201, response.text

    d = browser
    use_key(d, stack.base, KEY_A)
    open_page(d, f"{stack.base}/data/damaged", "ready")
    wait(d, lambda d: body_data(d, "status") == "rejected", timeout=120, message="never rejected on its page")
    dataset = api.get("/datasets/damaged").json()
    print(f"rejected: {dataset['error']}")
    assert dataset["error"] and d.find_element(By.ID, "error").text == dataset["error"]
    verdict = d.find_element(By.ID, "verdict")
    assert "bad" in verdict.get_attribute("class").split() and verdict.text.startswith("Not usable")
    assert not d.find_element(By.ID, "train").is_displayed()
    codes = js(d, "return [...document.querySelectorAll('#problems li[data-code]')].map(li => li.dataset.code)")
    assert codes == [p["code"] for p in dataset["report"]["problems"]] and codes, codes
    screenshot(d, tmp_path, "datasets_rejected")
    delete = d.find_element(By.ID, "delete")
    delete.click()
    delete.click()
    wait(d, lambda d: body_data(d, "status") == "deleted")
    assert api.get("/datasets/damaged").status_code == 404
    assert severe_console_errors(d) == []
