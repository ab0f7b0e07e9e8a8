"""Does the learning-rate range test's suggestion train? Its suggestion, used for the single-image guide's recipe.

    .venv/bin/python -m benchmarks.lr_range [--dataset_root DIR] [--categories 5] [--steps 100] [--default]
        [--real] [--photos DIR]

For each of ``--categories`` synthetic categories (spread over the ids, as benchmarks/single_image.py picks them):
the range test on the recipe's run (single_image, batch 1, 1 query, 20 episodes per epoch, seed 0, small preset,
CPU), then the recipe for 20 epochs with the suggested lr, stopped at its first memorised epoch (loss < 0.1 and
PCK@0.2 = 100 % together). One line per category: the test's steps and seconds, where it stopped, the suggestion, and
the epoch at which the run memorised. ``--default`` also runs the recipe at the default lr beside it. ``--real`` runs
on the real photos instead (shared/real-photos, imported with cape.data.coco_import): one photo of each source, its
best-labelled instance.
Target: memorised within 20 epochs for at least 4 of 5 categories.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from benchmarks.common import dataset_root, single_image_recipe
from benchmarks.memorise_real import DEFAULT_PHOTOS, FirstMemorised, photos
from cape.config import TrainConfig
from cape.data.catalog import MP100Catalog
from cape.data.coco_import import import_coco
from cape.lr_range import LRRangeConfig
from cape.training.range_test import range_test
from cape.training.trainer import Trainer
from cape.verdict import EXPECTED_EPOCHS


def memorised_epoch(config: TrainConfig, catalog: MP100Catalog) -> tuple[int | None, float]:
    """The first memorised epoch of ``config``'s run (None: not within its epochs), and the run's seconds."""
    watch = FirstMemorised(stop=True)
    started = time.perf_counter()
    Trainer(config, callbacks=[watch], log=lambda _: None, catalog=catalog, instruments=False).fit()
    return watch.epoch, time.perf_counter() - started


@dataclass(frozen=True)
class Case:
    name: str
    root: Path
    catalog: MP100Catalog
    category_id: int
    image_index: int

    @property
    def k(self) -> int:
        return self.catalog.category(self.category_id).num_keypoints


def synthetic_cases(root: Path, count: int) -> list[Case]:
    catalog = MP100Catalog(root)
    train = catalog.category_ids("train")
    return [
        Case(f"synthetic category {cid}", root, catalog, cid, 0)
        for cid in train[:: max(1, len(train) // count)][:count]  # spread over the ids, so over K too
    ]


def real_cases(folder: Path) -> list[Case]:
    """One photo of each source, imported into a temporary MP-100-layout dataset."""
    root = Path(tempfile.mkdtemp(prefix="lr-range-real-")) / "dataset"
    first: dict = {}
    for photo in photos(import_coco(sorted(folder.glob("*/*.json")), root)):
        first.setdefault(photo.category.source, photo)
    catalog = MP100Catalog(root)
    return [Case(photo.name, root, catalog, photo.category.id, photo.instance.image_index) for photo in first.values()]


def main() -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.lr_range", description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset_root")
    p.add_argument("--categories", type=int, default=5)
    p.add_argument("--steps", type=int, default=LRRangeConfig.model_fields["steps"].default)
    p.add_argument("--default", action="store_true", help="also run the recipe at the default lr")
    p.add_argument("--real", action="store_true", help="one real photo of each source instead of synthetic categories")
    p.add_argument("--photos", type=Path, default=DEFAULT_PHOTOS, help="the real-photos folder (with --real)")
    args = p.parse_args()
    cases = real_cases(args.photos) if args.real else synthetic_cases(dataset_root(args.dataset_root), args.categories)
    settings = LRRangeConfig(steps=args.steps)
    default_lr = TrainConfig.model_fields["lr"].default
    print(
        f"range test: {settings.steps} steps, lr {settings.start_lr:g} to {settings.end_lr:g}; then the single-image "
        f"recipe (batch 1, 1 query, 20 episodes per epoch, seed 0, small preset, CPU) for {EXPECTED_EPOCHS} epochs "
        "with the suggested lr"
    )
    header = f"{'case':<40} {'K':>3} {'steps':>5} {'test s':>7} {'stopped':>9} {'suggested':>9} {'memorised':>9}"
    print(header + (f" {'at ' + format(default_lr, 'g'):>9}" if args.default else ""))
    memorised, seconds = 0, []
    for case in cases:
        config = single_image_recipe(case.root, case.category_id, case.image_index)
        started = time.perf_counter()
        result = range_test(config, settings, log=lambda _: None, catalog=case.catalog)
        seconds.append(time.perf_counter() - started)
        epoch = None
        if result.suggestion is not None:
            epoch, _ = memorised_epoch(config.model_copy(update={"lr": result.suggestion}), case.catalog)
        memorised += epoch is not None
        suggestion = "none" if result.suggestion is None else f"{result.suggestion:.2g}"
        line = (
            f"{case.name[:40]:<40} {case.k:>3} {len(result.points):>5} {seconds[-1]:>7.1f} "
            f"{result.stopped:>9} {suggestion:>9} {epoch if epoch else 'no':>9}"
        )
        if args.default:
            at_default, _ = memorised_epoch(config, case.catalog)
            line += f" {at_default if at_default else 'no':>9}"
        print(line, flush=True)
    print(
        f"memorised within {EXPECTED_EPOCHS} epochs with the suggestion: {memorised} of {len(cases)} "
        f"(target: at least 4 of 5); range test median {statistics.median(seconds):.1f} s"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
