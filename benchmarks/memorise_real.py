"""Single-image memorisation on every real photo: the users' recipe on photos annotated by other people.

    .venv/bin/python -m benchmarks.memorise_real [--photos ../shared/real-photos] [--epochs 20] [--only SOURCE]
        [--stop-when-memorised] [--out DIR]

Imports every COCO file of the photos folder (``cape.data.coco_import``), then for every photo (for a photo with
several annotated instances, the one with the most labelled keypoints; the first by annotation id on a tie) runs
the guide's recipe: single_image mode, batch 1, 1 query, 20 episodes per epoch, seed 0, small preset, CPU. One line
per photo: source, file, K, labelled keypoints, the first epoch with loss < 0.1 and PCK@0.2 = 100 % together, the
final epoch's loss, PCK@0.2 and mPCK, the seconds of the run and what the run's diagnosis flagged (the causes, then
its message), and for a photo never memorised the keypoints no epoch got right. Each run's folder (inputs.png,
epochs/N/predictions.png) is under --out.
Target: every photo memorised within 20 epochs.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from benchmarks.common import single_image_recipe as recipe
from cape.data.coco_import import ImportedCategory, ImportedInstance, ImportSummary, import_coco
from cape.epoch_record import EpochRecord
from cape.run_files import CHECKPOINT_FILES, never_correct
from cape.training.trainer import Callback, Trainer
from cape.verdict import EXPECTED_EPOCHS, is_memorised

DEFAULT_PHOTOS = Path(__file__).resolve().parents[2] / "shared" / "real-photos"


@dataclass(frozen=True)
class Photo:
    category: ImportedCategory
    instance: ImportedInstance  # its best-labelled instance

    @property
    def name(self) -> str:
        return f"{self.category.source}/{self.instance.source_file_name}"


def photos(summary: ImportSummary) -> list[Photo]:
    """Every imported photo once, with its instance that has the most labelled keypoints."""
    best: dict[tuple[int, str], ImportedInstance] = {}
    for category in summary.categories:
        for instance in category.instances:  # by image_index: the first wins a tie
            key = (category.id, instance.file_name)
            if key not in best or instance.labelled > best[key].labelled:
                best[key] = instance
    by_id = {c.id: c for c in summary.categories}
    return [Photo(by_id[cid], instance) for (cid, _), instance in best.items()]


class FirstMemorised(Callback):
    """Notes the first epoch with loss < 0.1 and PCK@0.2 = 100 %; with ``stop``, ends the run there."""

    def __init__(self, stop: bool):
        self.stop = stop
        self.epoch: int | None = None
        self.last: EpochRecord | None = None

    def on_epoch_end(self, record: EpochRecord) -> None:
        self.last = record
        if self.epoch is None and is_memorised(record.loss, record.pck):
            self.epoch = record.epoch

    def should_stop(self) -> bool:
        return self.stop and self.epoch is not None


def percent(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}"


def main() -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.memorise_real", description=__doc__.split("\n\n")[0])
    p.add_argument("--photos", type=Path, default=DEFAULT_PHOTOS, help="folder of COCO files, one folder per source")
    p.add_argument("--epochs", type=int, default=EXPECTED_EPOCHS)
    p.add_argument("--only", metavar="SOURCE", action="append", help="only this source (repeatable), e.g. 300w")
    p.add_argument("--stop-when-memorised", action="store_true", help="end each run at its first memorised epoch")
    p.add_argument("--out", type=Path, help="the imported dataset and the run folders (default: a new temp folder)")
    args = p.parse_args()
    files = sorted(args.photos.glob("*/*.json"))
    if not files:
        p.error(f"no COCO file in {args.photos}/*/: give --photos the real-photos folder")
    if args.only:
        sources = sorted(f.parent.name for f in files)
        unknown = sorted(set(args.only) - set(sources))
        if unknown:
            p.error(f"--only {', '.join(unknown)}: no such source; valid sources: {', '.join(sources)}")
    out = args.out or Path(tempfile.mkdtemp(prefix="memorise-real-"))
    summary = import_coco(files, out / "dataset")
    for line in [*summary.notes, *(s.line() for s in summary.skipped)]:
        print(f"import: {line}")
    chosen = [ph for ph in photos(summary) if not args.only or ph.category.source in args.only]
    print(
        f"{len(chosen)} photos of {len({ph.category.source for ph in chosen})} sources; recipe: single_image, batch 1, "
        f"1 query, 20 episodes/epoch, {args.epochs} epochs, seed 0, small preset, CPU"
        f"{', each run stopped at its first memorised epoch' if args.stop_when_memorised else ''}; runs in {out}"
    )
    print(
        f"{'source':<11} {'file':<46} {'K':>3} {'lab':>3} {'memorised':>9} {'loss':>7} {'PCK':>5} {'mPCK':>5} "
        f"{'s':>6}  flagged"
    )
    memorised, epochs_to, started = 0, [], time.perf_counter()
    for photo in chosen:
        run = out / "runs" / photo.category.source / Path(photo.instance.source_file_name).stem
        watch = FirstMemorised(args.stop_when_memorised)
        t = time.perf_counter()
        config = recipe(out / "dataset", photo.category.id, photo.instance.image_index, args.epochs)
        result = Trainer(config, run, callbacks=[watch], log=lambda _: None).fit()
        seconds = time.perf_counter() - t
        for name in CHECKPOINT_FILES.values():  # 25 MB each, and the figures need none: 2 GB less for all photos
            (run / name).unlink(missing_ok=True)
        last = watch.last
        line = (
            f"{photo.category.source:<11} {photo.instance.source_file_name[:46]:<46} "
            f"{photo.category.num_keypoints:>3} {photo.instance.labelled:>3} "
            f"{'epoch ' + str(watch.epoch) if watch.epoch else 'NO':>9} {last.loss:>7.4f} {percent(last.pck):>5} "
            f"{percent(last.mpck):>5} {seconds:>6.1f}  "
            + (", ".join(f.cause for f in result.diagnosis.findings) or "-")
        )
        if watch.epoch is None:
            line += f"  never correct: {never_correct(run)}"
        if not result.diagnosis.healthy:
            line += f"  diagnosis: {result.diagnosis.message}"
        if watch.epoch is not None:
            memorised += 1
            epochs_to.append(watch.epoch)
        print(line, flush=True)
    median = f", median epoch {statistics.median(epochs_to):g}" if epochs_to else ""
    print(
        f"memorised within {args.epochs} epochs: {memorised} of {len(chosen)} photos{median}; "
        f"{time.perf_counter() - started:.0f} s in all"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
