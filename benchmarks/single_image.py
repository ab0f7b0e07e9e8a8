"""Single-image memorisation, the users' recipe, on the CPU and the synthetic dataset.

    .venv/bin/python -m benchmarks.single_image [--dataset_root DIR] [--categories 5] [--preset small]

Runs ``--debug_single_image CAT --epochs 50 --batch_size 1 --num_queries_per_episode 1 --episodes_per_epoch 20``
for several categories and prints, per category, the epoch and wall time at which loss < 0.1 and Val PCK@0.2 = 100 %
were first reached (both), then steps per second, parameters, FLOPs per training step and the achieved fraction of
this machine's float32 matmul rate. Target (small preset, 2 cores): both by epoch 20 and within 60 s, for at least
4 of 5 categories. A category's run stops once both are reached unless --full is given.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.common import dataset_root, matmul_flops_per_second
from cape.config import TrainConfig
from cape.data.batch import collate_episodes
from cape.data.catalog import MP100Catalog
from cape.training.trainer import Callback, Trainer

LOSS_TARGET, EPOCH_TARGET, SECONDS_TARGET = 0.1, 20, 60.0


class Watch(Callback):
    def __init__(self, started: float, stop_when_reached: bool):
        self.started, self.stop_when_reached = started, stop_when_reached
        self.loss_epoch = self.pck_epoch = self.both_epoch = None
        self.both_seconds = None
        self.steps = 0

    def on_epoch_end(self, m):
        if self.loss_epoch is None and m.loss < LOSS_TARGET:
            self.loss_epoch = m.epoch
        if self.pck_epoch is None and m.pck == 1.0:
            self.pck_epoch = m.epoch
        if self.both_epoch is None and m.loss < LOSS_TARGET and m.pck == 1.0:
            self.both_epoch, self.both_seconds = m.epoch, time.perf_counter() - self.started

    def should_stop(self) -> bool:
        self.steps += 1
        return self.stop_when_reached and self.both_epoch is not None


def flops_per_step(trainer: Trainer) -> int:
    batch = collate_episodes([trainer.data.train_dataset(1, 0)[0]])
    with FlopCounterMode(display=False) as counter:
        trainer.train_step(batch)
    return counter.get_total_flops()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset_root")
    p.add_argument("--categories", type=int, default=5)
    p.add_argument("--preset", default="small")
    p.add_argument("--full", action="store_true", help="run all 50 epochs even after the targets are reached")
    args = p.parse_args()
    root = dataset_root(args.dataset_root)
    torch.set_num_threads(torch.get_num_threads())
    catalog = MP100Catalog(root)
    train = catalog.category_ids("train")
    step = max(1, len(train) // args.categories)
    categories = train[::step][: args.categories]  # spread over the ids, so over K too

    rows, rates = [], []
    for cid in categories:
        config = TrainConfig(
            mode="single_image",
            category_id=cid,
            dataset_root=str(root),
            preset=args.preset,
            epochs=50,
            batch_size=1,
            num_queries_per_episode=1,
            episodes_per_epoch=20,
            device="cpu",
            seed=0,
        )
        started = time.perf_counter()
        watch = Watch(started, stop_when_reached=not args.full)
        trainer = Trainer(config, callbacks=[watch], log=lambda _: None)
        fit_started = time.perf_counter()
        result = trainer.fit()
        elapsed = time.perf_counter() - fit_started
        rates.append(trainer.scheduler.last_epoch / elapsed)  # validation included: the user's wall time
        ok = watch.both_epoch is not None and watch.both_epoch <= EPOCH_TARGET and watch.both_seconds <= SECONDS_TARGET
        rows.append((cid, catalog.category(cid).num_keypoints, watch, result.history[-1], ok))
        print(
            f"category {cid:>3} (K={catalog.category(cid).num_keypoints:>2}): loss<{LOSS_TARGET} at epoch "
            f"{watch.loss_epoch}, "
            f"PCK@0.2=100% at epoch {watch.pck_epoch}, both at epoch {watch.both_epoch} after "
            f"{watch.both_seconds if watch.both_seconds is None else round(watch.both_seconds, 1)} s "
            f"[{'ok' if ok else 'MISSED'}]",
            flush=True,
        )

    params = sum(p.numel() for p in trainer.model.parameters())
    flops = flops_per_step(trainer)
    peak = matmul_flops_per_second()
    steps_per_second = statistics.median(rates)
    print(
        f"\npreset {args.preset}: {params / 1e6:.2f} M parameters, {flops / 1e9:.2f} GFLOP per training step (batch 1)"
    )
    print(f"steps/s (median over categories, validation included): {steps_per_second:.1f}")
    print(
        f"machine float32 matmul: {peak / 1e9:.0f} GFLOP/s; achieved {flops * steps_per_second / 1e9:.1f} GFLOP/s "
        f"= {100 * flops * steps_per_second / peak:.1f}% of it"
    )
    met = sum(r[-1] for r in rows)
    print(f"target (both by epoch {EPOCH_TARGET} and within {SECONDS_TARGET:.0f} s): {met} of {len(rows)} categories")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
