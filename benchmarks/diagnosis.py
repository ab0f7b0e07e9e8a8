"""The figures the diagnosis's thresholds (cape/diagnosis.py) sit between: healthy runs and runs with each fault.

    .venv/bin/python -m benchmarks.diagnosis [--dataset_root DIR] [--epochs 5] [--category 2] [--other 20]
        [--device auto]

The single-image guide's recipe (small preset, batch 1, 1 query, 20 episodes per epoch, seed 0) on one synthetic
category: healthy, then with each fault the diagnosis names (lr 1e-7; --clip_max_norm 1e-4; the backbone frozen;
``CAPE_INJECT_FAULTS=permute_validation_keypoints``, set for that run alone); a healthy run on another train
category; and a category-mode run (batch 4, 2 queries, 40 episodes per epoch, augmented).

Per run and epoch: the mean loss; ``kept``, that loss as a fraction of the run's first step's (STALLED, FELL); the
largest update ratio ||delta theta|| / ||theta|| over the trained parts (TINY_UPDATE); the mean gradient norm before
clipping and its multiple of --clip_max_norm (CLIP_FAR) with the share of steps clipped (CLIP_RATE); the smallest
part's largest gradient norm (NO_GRADIENT); PCK@0.2 (PCK_LOW), mPCK and the copy-the-support baseline's mPCK
(COPY_MARGIN); the share of labelled query keypoints pushed out of the crop (PUSHED_OUT) and the labelled keypoints
per query against K (MIN_LABELLED). The run's header line has its first loss and the chance level; its diagnosis
follows the table. A last table says whether each run got the cause it should have (and nothing else).
"""

from __future__ import annotations

import argparse
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from benchmarks.common import dataset_root, single_image_recipe
from benchmarks.instruments import parsed_device
from cape.config import TrainConfig
from cape.data.catalog import MP100Catalog
from cape.epoch_record import EpochRecord
from cape.training import faults
from cape.training.trainer import RunResult, Trainer


@dataclass(frozen=True)
class Run:
    name: str
    config: TrainConfig
    expected: tuple[str, ...] = ()  # the causes the diagnosis should name
    faults: tuple[str, ...] = ()  # CAPE_INJECT_FAULTS for this run alone


def runs(root: Path, category: int, other: int, epochs: int, device: str) -> list[Run]:
    def single(cid: int = category, **overrides) -> TrainConfig:
        return single_image_recipe(root, cid, epochs=epochs, device=device, **overrides)

    return [
        Run("healthy", single()),
        Run("lr 1e-7", single(lr=1e-7), ("learning_rate_too_low",)),
        Run("clip 1e-4", single(clip_max_norm=1e-4), ("clipping_too_aggressive",)),
        Run("freeze backbone", single(freeze=["backbone"]), ("no_gradient",)),
        Run(
            "permuted validation",
            single(),
            ("loss_fell_pck_did_not",),
            faults=("permute_validation_keypoints",),
        ),
        Run(f"healthy, category {other}", single(other)),
        Run(
            "category mode",
            TrainConfig(
                mode="category",
                category_id=category,
                dataset_root=str(root),
                preset="small",
                epochs=epochs,
                batch_size=4,
                num_queries_per_episode=2,
                episodes_per_epoch=40,
                device=device,
                seed=0,
            ),
        ),
    ]


@contextmanager
def injected(names: tuple[str, ...]):
    """CAPE_INJECT_FAULTS set to ``names`` while the block runs, then as it was."""
    before = os.environ.get(faults.ENV)
    if names:
        os.environ[faults.ENV] = ",".join(names)
    else:
        os.environ.pop(faults.ENV, None)
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(faults.ENV, None)
        else:
            os.environ[faults.ENV] = before


def percent(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


HEADER = (
    f"{'ep':>3} {'loss':>8} {'kept':>7} {'upd max':>8} {'(part)':<16} {'|g|':>8} {'|g|/clip':>9} {'clip%':>5} "
    f"{'min |g|max':>10} {'(part)':<16} {'PCK':>5} {'mPCK':>5} {'base':>5} {'out%':>5} {'lab/K':>9}"
)


def epoch_line(record: EpochRecord, first_loss: float | None) -> str:
    h = record.health
    if h is None:
        return f"{record.epoch:>3} {record.loss:>8.4f}  (no instruments)"
    trained = {name: p for name, p in h.parts.items() if p.trainable}
    upd_part, upd = max(((n, p.update_ratio) for n, p in trained.items()), key=lambda x: x[1], default=("-", 0.0))
    low_part, low = min(((n, p.grad_norm_max) for n, p in h.parts.items()), key=lambda x: x[1], default=("-", 0.0))
    clip = f"{h.grad_norm / h.clip_max_norm:>9.3g}" if h.clip_max_norm > 0 else f"{'off':>9}"
    kept = f"{record.loss / first_loss:>7.4f}" if first_loss else f"{'-':>7}"
    pushed = 1 - h.query_visible / h.query_labelled if h.query_labelled else None
    labelled = f"{h.query_labelled * h.keypoints_per_query:.1f}/{h.keypoints_per_query:.0f}"
    return (
        f"{record.epoch:>3} {record.loss:>8.4f} {kept} {upd:>8.2g} {upd_part:<16} {h.grad_norm:>8.3g} {clip} "
        f"{100 * h.clip_rate:>5.0f} {low:>10.3g} {low_part:<16} {percent(record.pck):>5} {percent(record.mpck):>5} "
        f"{percent(record.baseline_mpck):>5} {percent(pushed):>5} {labelled:>9}"
    )


def describe(run: Run, catalog: MP100Catalog) -> str:
    c = run.config
    cat = catalog.category(c.category_id)
    what = (
        f"{c.mode}, category {cat.id} (K={cat.num_keypoints}), batch {c.batch_size} x {c.num_queries_per_episode} "
        f"queries, {c.episodes_per_epoch} episodes/epoch, lr {c.lr:g}, clip {c.clip_max_norm:g}"
    )
    if c.freeze:
        what += f", frozen: {', '.join(c.freeze)}"
    if run.faults:
        what += f", {faults.ENV}={','.join(run.faults)}"
    return what


def train(run: Run) -> tuple[RunResult, float]:
    started = time.perf_counter()
    with injected(run.faults):
        result = Trainer(run.config, log=lambda _: None).fit()
    return result, time.perf_counter() - started


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.diagnosis", description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset_root")
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--category", type=int, default=2, help="the synthetic train category of the runs (default 2)")
    p.add_argument("--other", type=int, default=20, help="the other train category of a healthy run (default 20, K=27)")
    p.add_argument("--device", default="auto", help="auto (CUDA when there is one), cpu, cuda, cuda:N")
    args = p.parse_args(argv)
    root = dataset_root(args.dataset_root)
    catalog = MP100Catalog(root)
    train_ids = catalog.category_ids("train")
    for flag, cid in (("--category", args.category), ("--other", args.other)):
        if cid not in train_ids:
            p.error(f"{flag} {cid} is not a train category; choose from {', '.join(map(str, train_ids))}")
    if args.epochs < 1:
        p.error("--epochs must be at least 1")
    parsed_device(p, args.device)

    verdicts = []
    for run in runs(root, args.category, args.other, args.epochs, args.device):
        result, seconds = train(run)
        first = result.history[0].health
        first_loss = first.first_loss if first else None
        chance = first.chance_loss if first else None
        print(
            f"\n== {run.name}: {describe(run, catalog)}; first loss "
            f"{'-' if first_loss is None else f'{first_loss:.4g}'}, chance loss "
            f"{'-' if chance is None else f'{chance:.4g}'}; {seconds:.0f} s"
        )
        print(HEADER)
        for record in result.history:
            print(epoch_line(record, first_loss))
        diagnosis = result.diagnosis
        got = tuple(f.cause for f in diagnosis.findings)
        print(f"causes: {', '.join(got) or 'none'}")
        print(f"message: {diagnosis.message}", flush=True)
        verdicts.append((run, got))

    print(f"\n{'run':<24} {'expected':<26} {'diagnosed':<40} ok")
    for run, got in verdicts:
        ok = set(got) == set(run.expected)
        print(f"{run.name:<24} {', '.join(run.expected) or 'none':<26} {', '.join(got) or 'none':<40} {ok}")
    matched = sum(set(got) == set(run.expected) for run, got in verdicts)
    print(f"as expected: {matched} of {len(verdicts)} runs")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
