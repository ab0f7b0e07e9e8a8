"""``import_dataset(dataset_id)``: an uploaded archive becomes a dataset, on a worker of the ``datasets`` queue (never
in the API process): extracted within bounds (service/archives.py), its COCO keypoint files imported with the
uploader's choices (cape/data/coco_import.py, every image decoded), the result checked (cape/data/check.py). A
usable result goes into the artifact store under its content's digest (service/dataset_files.py) and the dataset is
ready; anything else rejects it, and the report says why. Either way the report is kept, and the archive removed.

No torch here: a CPU worker of the datasets queue runs this.
"""

from __future__ import annotations

import functools
import json
import logging
import shutil
import uuid
from pathlib import Path

from cape.data.catalog import MP100Catalog
from cape.data.check import check_dataset
from cape.data.coco_import import ImportRefused, Skipped, SplitChoice, import_coco
from cape.errors import CapeError
from service import dataset_state
from service.archives import ArchiveRefused, extract_archive
from service.artifacts import get_store
from service.dataset_files import archive_limits, folder_digest, publish, upload_key
from service.datasets import summary_of
from service.dispatch import IMPORT_DATASET_TASK
from service.models import Dataset, DatasetStatus
from service.settings import get_settings
from worker.celery_app import app
from worker.tasks import _db

log = logging.getLogger(__name__)
COCO_KEYS = ("images", "annotations", "categories")


class Rejected(Exception):
    """The upload cannot be a dataset: ``report`` says why."""

    def __init__(self, report: dict):
        errors = [p["message"] for p in report.get("problems", []) if p["severity"] == "error"]
        more = f" (and {len(errors) - 1} more error(s): see the report)" if len(errors) > 1 else ""
        super().__init__((errors[0] if errors else "rejected") + more)
        self.report = report


@app.task(name=IMPORT_DATASET_TASK)
def import_dataset(dataset_id: str) -> str:
    key = uuid.UUID(dataset_id)
    worker = import_dataset.request.hostname or "worker"
    row = _db(f"claiming dataset {key}", lambda session: dataset_state.claim(session, key, worker))
    if row is None:
        log.info("dataset %s not claimed: nothing to do", key)
        return "not claimed"
    scratch = get_settings().work_dir.resolve() / "imports" / str(key)
    shutil.rmtree(scratch, ignore_errors=True)  # an earlier try of this worker's, cut short
    try:
        status, fields = DatasetStatus.ready, _import(row, scratch)
    except Rejected as exc:
        status, fields = DatasetStatus.rejected, {"report": exc.report, "error": str(exc)}
    except Exception as exc:
        # A bug or an outage: the dataset says so rather than staying "checking" for ever; the task fails loudly.
        failed = {"error": f"the import failed: {type(exc).__name__}: {exc}"}
        _db(f"ending dataset {key}", lambda session: dataset_state.end(session, key, DatasetStatus.rejected, failed))
        raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    _db(f"ending dataset {key}", lambda session: dataset_state.end(session, key, status, fields))
    get_store().remove(upload_key(key))
    log.info("dataset %s (%s): %s", row.name, key, status)
    return str(status)


def _import(row: Dataset, scratch: Path) -> dict:
    """The dataset's fields once ready; Rejected with the report otherwise."""
    options = row.options
    archive = scratch / f"archive.{options['format']}"
    store, patience = get_store(), get_settings().store_retry_s
    fetch = functools.partial(store.get_file, upload_key(row.id), archive.name, archive)
    if store.patiently(f"fetching the archive of dataset {row.name}", fetch, patience) is None:
        raise Rejected(
            _refusal("archive_missing", "the uploaded archive is not in the artifact store: upload it again")
        )
    files_dir, out = scratch / "files", scratch / "dataset"
    try:
        extract_archive(archive, files_dir, archive_limits())
    except ArchiveRefused as exc:
        raise Rejected(_refusal("archive_refused", str(exc))) from None
    archive.unlink()
    files = coco_files(files_dir)
    if not files:
        found = sorted(p.relative_to(files_dir).as_posix() for p in files_dir.rglob("*.json"))
        raise Rejected(
            _refusal(
                "no_coco_file",
                "the archive holds no COCO keypoint file (a JSON object with images, annotations and categories); "
                f"its JSON files: {', '.join(found[:20]) or 'none'}",
            )
        )
    try:
        choice = SplitChoice.parse(
            num_splits=options["num_splits"],
            proportions=options["proportions"],
            seed=options["seed"],
            category_split=options["category_split"],
        )
        summary = import_coco(
            files,
            out,
            split=choice,
            zero_based_skeleton=options["zero_based_skeleton"],
            skip_invalid=options["skip_invalid"],
        )
    except ImportRefused as exc:
        report = _refusal("import_refused", str(exc))
        report["problems"] = [_problem(p, files_dir) for p in exc.problems]
        report["errors"] = len(report["problems"])
        raise Rejected(_without(report, files_dir)) from None
    except CapeError as exc:
        raise Rejected(_without(_refusal("import_refused", str(exc)), files_dir)) from None
    # The import decoded every photo it kept (a truncated one is refused or left out): the check reads their headers
    # rather than decoding them all a second time.
    report = check_dataset(out, images="header")
    data = _without({**report.to_json(), "root": row.name, "import": summary.to_json(relative_to=files_dir)}, out)
    data = _without(data, files_dir)
    if not report.usable:
        raise Rejected(data)
    digest = folder_digest(out)
    store.patiently(f"storing dataset {row.name}", functools.partial(publish, out, digest, store), patience)
    by_split = {str(split): MP100Catalog(out, split).summary for split in report.splits}
    return {
        "report": data,
        "digest": digest,
        "summary": {"splits": report.splits, **summary_of(data), "by_split": by_split},
        "error": None,
    }


def coco_files(folder: Path) -> list[Path]:
    """The archive's COCO keypoint files: JSON objects with images, annotations and categories lists."""
    found = []
    for path in sorted(folder.rglob("*.json")):
        try:
            data = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            continue  # another JSON file (or not JSON at all): not an annotation file, and the report lists them
        if isinstance(data, dict) and all(isinstance(data.get(key), list) for key in COCO_KEYS):
            found.append(path)
    return found


def _problem(skipped: Skipped, files_dir: Path) -> dict:
    """One problem the import refused, in the check's terms (cape.data.check.Problem's fields): its place apart."""
    found = skipped.to_json(relative_to=files_dir)
    ids = {f"{skipped.kind}_id": skipped.ids[0]} if len(skipped.ids) == 1 else {}
    return {
        "code": "import_refused",
        "severity": "error",
        "message": skipped.problem(),
        "file": found["file"],
        "field": skipped.field,
        "count": len(skipped.ids),
        **ids,
    }


def _refusal(code: str, message: str) -> dict:
    problem = {"code": code, "severity": "error", "message": message}
    return {"usable": False, "errors": 1, "warnings": 0, "splits": [], "problems": [problem], "counts": {}}


def _without(report: dict, folder: Path) -> dict:
    """The report with this worker's scratch folder taken out of its paths: they name files as the archive has them."""
    text = json.dumps(report).replace(str(folder) + "/", "").replace(str(folder), ".")
    return json.loads(text)
