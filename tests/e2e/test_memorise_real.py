"""Healthy single-image runs with the guide's recipe (batch 1, 1 query, 20 episodes per epoch, at most 20 epochs): one
photo of each of the 15 real-photo sources, imported from their COCO files, and 4 categories of the synthetic
dataset, spread over its ids and keypoint counts (``make bench`` and ``make bench-lr-range`` memorise 5 each). Each run
must memorise its image (loss < 0.1 and PCK@0.2 = 100 % together) within 20 epochs, and its diagnosis must flag
nothing.

A run stops at its first memorised epoch, which keeps the suite fast; the full 20-epoch figures on every photo are
``python -m benchmarks.memorise_real``'s.
"""

from pathlib import Path

import pytest

from benchmarks.memorise_real import FirstMemorised, Photo, photos, recipe
from cape.data.coco_import import import_coco
from cape.run_files import never_correct
from cape.training.trainer import RunResult, Trainer
from cape.verdict import EXPECTED_EPOCHS
from tests.helpers import REAL_PHOTO_FILES, catalog_of

SOURCES = [f.parent.name for f in REAL_PHOTO_FILES]
SYNTHETIC_CATEGORIES = 4


@pytest.fixture(scope="module")
def real_photos(tmp_path_factory) -> tuple[Path, dict[str, Photo]]:
    """The real photos imported once; per source, its first photo with that photo's best-labelled instance."""
    root = tmp_path_factory.mktemp("real-photos") / "dataset"
    first: dict[str, Photo] = {}
    for photo in photos(import_coco(REAL_PHOTO_FILES, root)):
        first.setdefault(photo.category.source, photo)
    return root, first


def _memorise(root: Path, category_id: int, image_index: int, run: Path) -> tuple[FirstMemorised, RunResult]:
    watch = FirstMemorised(stop=True)
    config = recipe(root, category_id, image_index, EXPECTED_EPOCHS)
    return watch, Trainer(config, run, callbacks=[watch], log=lambda _: None).fit()


def _check_healthy(what: str, watch: FirstMemorised, result: RunResult, run: Path) -> None:
    last = watch.last
    report = (
        f"{what}: memorised at epoch {watch.epoch}; after {result.epochs_completed} epoch(s) loss {last.loss:.4f}, "
        f"PCK@0.2 {last.pck}, mPCK {last.mpck}; keypoints never correct: {never_correct(run)}; pictures in {run}"
    )
    assert watch.epoch is not None, f"not memorised within {EXPECTED_EPOCHS} epochs: {report}"
    assert result.diagnosis.healthy, result.diagnosis.message + f"\n{report}"


@pytest.mark.skipif(not REAL_PHOTO_FILES, reason="shared/real-photos not found beside the checkout")
@pytest.mark.parametrize("source", SOURCES or ["none"])
def test_a_real_photo_of_each_source_is_memorised_and_nothing_is_flagged(real_photos, source, tmp_path):
    root, first = real_photos
    photo = first[source]
    watch, result = _memorise(root, photo.category.id, photo.instance.image_index, tmp_path / "run")
    what = (
        f"{photo.name} (category {photo.category.id} '{photo.category.name}', image_index "
        f"{photo.instance.image_index}, K={photo.category.num_keypoints}, {photo.instance.labelled} labelled)"
    )
    _check_healthy(what, watch, result, tmp_path / "run")


@pytest.mark.parametrize("nth", range(SYNTHETIC_CATEGORIES))
def test_synthetic_categories_are_memorised_and_nothing_is_flagged(synthetic_root, nth, tmp_path):
    train = catalog_of(synthetic_root).category_ids("train")
    category = train[nth * (len(train) // SYNTHETIC_CATEGORIES)]  # spread over the ids, so over K too
    watch, result = _memorise(synthetic_root, category, 0, tmp_path / "run")
    k = catalog_of(synthetic_root).category(category).num_keypoints
    _check_healthy(f"synthetic category {category} (K={k}), image_index 0", watch, result, tmp_path / "run")
