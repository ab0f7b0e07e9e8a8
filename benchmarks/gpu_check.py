"""The training figures of a CUDA machine, in one command (about 3 minutes on one H100; at most ~6).

    .venv/bin/python -m benchmarks.gpu_check [--dataset_root DIR]

On the synthetic dataset (written first when it is missing), the base preset (ResNet-50, 256 px), each figure a
line, medians:

1. the training step (the trainer's ``train_step``, instruments on) at batch 8 episodes x (1 support + 2 queries)
   = 24 crops, with bf16 autocast and without: milliseconds per step and peak memory allocated (reset between);
2. the input pipeline feeding it: a short ``fit()`` in full mode with the trainer's own DataLoader (automatic worker
   count), query images trained on per second, and the wait for data against the compute per step, from the epochs'
   instruments; the first epoch (workers starting, every photo decoded) apart from the later ones;
3. single-image memorisation, the guide's recipe (batch 1, 1 query, 20 episodes per epoch, at most 20 epochs): the
   epoch and the seconds of ``fit()`` to the first epoch with loss < 0.1 and PCK@0.2 = 100 % together, where it
   stops, on a few categories;
4. the instruments' overhead on that recipe (benchmarks/instruments.py's measurement, on CUDA).

The base preset starts from ImageNet weights: when torchvision's cache lacks them it runs from random
initialisation instead and says so (nothing is downloaded). Crops are cached in a fresh temporary folder.

Each section is guarded: one that fails prints its error, the others still print their figures, and the command
then exits 1. Without a CUDA device it says so (and which torch and CUDA build this is) and exits 0.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from benchmarks import instruments as overhead
from benchmarks.common import dataset_root, single_image_recipe
from benchmarks.single_image import Watch
from cape.backbone_weights import DOWNLOAD_ENV, imagenet_file
from cape.config import IMAGENET, PRESETS, RANDOM_INIT, TrainConfig
from cape.data.catalog import MP100Catalog
from cape.data.instances import CROP_CACHE_ENV
from cape.training.trainer import Trainer
from cape.verdict import EXPECTED_EPOCHS, MEMORISED_LOSS

GIB = 2**30
STEP_BATCH, STEP_QUERIES = 8, 2  # a realistic step: CapeFormer-style training uses 16 episodes on a large GPU
WARMUP_STEPS, TIMED_STEPS = 5, 20
PIPELINE_STEPS, PIPELINE_EPOCHS = 25, 3  # steps per epoch; epoch 1 is cold, the others warm
MEMORISE_CATEGORIES = (2, 20, 57)  # synthetic train categories with K = 8, 27, 28
MEMORISE_BUDGET_S = 150.0  # no further category once the section has taken this long
OVERHEAD_STEPS, OVERHEAD_WARMUP = 100, 10


def quiet(_: str) -> None:
    pass


@dataclass(frozen=True)
class Machine:
    """What every section runs with: the dataset, the device, the preset and what its backbone starts from."""

    root: Path
    device: str = "cuda"
    preset: str = "base"
    weights: str = IMAGENET

    def config(self, **fields) -> TrainConfig:
        base = dict(
            dataset_root=str(self.root),
            preset=self.preset,
            backbone_weights=self.weights,
            device=self.device,
            seed=0,
        )
        return TrainConfig(**(base | fields))

    def step_config(self, use_amp: bool, **fields) -> TrainConfig:
        """Full mode (episodes of every train category), the realistic batch, no test at the end."""
        return self.config(
            mode="full",
            batch_size=STEP_BATCH,
            num_queries_per_episode=STEP_QUERIES,
            use_amp=use_amp,
            test_episodes_per_category=0,
            **fields,
        )


def backbone_weights(preset: str) -> tuple[str, str]:
    """What the preset's backbone can start from here without a download, and why, in words."""
    model = PRESETS[preset]
    if model.backbone_weights != IMAGENET:
        return model.backbone_weights, f"{model.backbone_weights} (the preset's)"
    path = imagenet_file(model.backbone)
    if path.is_file():
        return IMAGENET, f"ImageNet ({path})"
    return RANDOM_INIT, (
        f"random initialisation: the ImageNet weights of {model.backbone} are not in torchvision's cache ({path}) "
        "and nothing is downloaded"
    )


def closed(trainer: Trainer) -> None:
    trainer.data.close()
    if trainer.instruments:
        trainer.instruments.close()


def step_time(machine: Machine, use_amp: bool, warmup: int, steps: int) -> tuple[float, float | None]:
    """Median seconds of a training step and the peak memory allocated during the timed steps (GiB; None off CUDA)."""
    trainer = Trainer(machine.step_config(use_amp), log=quiet)
    cuda = trainer.device.type == "cuda"
    try:
        sync = overhead.synchroniser(trainer.device)
        batches = overhead.training_batches(trainer, 4)
        for i in range(warmup):
            trainer.train_step(batches[i % len(batches)])
        if cuda:
            sync()
            torch.cuda.reset_peak_memory_stats(trainer.device)
        times = [overhead.timed(sync, trainer.train_step, batches[i % len(batches)]) for i in range(steps)]
        peak = torch.cuda.max_memory_allocated(trainer.device) / GIB if cuda else None
        return statistics.median(times), peak
    finally:
        closed(trainer)
        del trainer
        if cuda:
            torch.cuda.empty_cache()


def check_steps(machine: Machine, warmup: int = WARMUP_STEPS, steps: int = TIMED_STEPS) -> None:
    crops = STEP_BATCH * (1 + STEP_QUERIES)
    size = PRESETS[machine.preset].input_size
    measured = {}
    for use_amp in (True, False):
        seconds, peak = step_time(machine, use_amp, warmup, steps)
        measured[use_amp] = seconds, peak
        memory = f", peak memory allocated {peak:.2f} GiB" if peak is not None else ""
        print(
            f"training step, batch {STEP_BATCH} x (1 support + {STEP_QUERIES} queries) = {crops} crops of {size} px, "
            f"bf16 autocast {'on' if use_amp else 'off'}, instruments on: {1e3 * seconds:.1f} ms (median of {steps})"
            f"{memory}",
            flush=True,
        )
    (amp_s, amp_peak), (fp32_s, fp32_peak) = measured[True], measured[False]
    memory = f", {amp_peak / fp32_peak:.2f}x the memory" if amp_peak and fp32_peak else ""
    print(f"bf16 autocast against fp32: {fp32_s / amp_s:.2f}x the steps per second{memory}")


def check_pipeline(machine: Machine, steps: int = PIPELINE_STEPS, epochs: int = PIPELINE_EPOCHS) -> None:
    config = machine.step_config(
        use_amp=True,
        epochs=epochs,
        episodes_per_epoch=STEP_BATCH * steps,
        val_episodes_per_category=1,
        val_queries_per_episode=1,
    )
    trainer = Trainer(config, log=quiet)
    workers = trainer.data.num_workers
    history = trainer.fit().history
    health = [r.health for r in history if r.health is not None]
    if not health:
        raise RuntimeError("the epochs carry no instruments (EpochHealth)")

    def line(what: str, rows: list) -> str:
        rate = statistics.median(h.samples_per_second for h in rows)
        data = statistics.median(h.data_seconds for h in rows)
        compute = statistics.median(h.compute_seconds for h in rows)
        utilisation = [h.gpu_utilisation for h in rows if h.gpu_utilisation is not None]
        gpu = f", GPU utilisation {statistics.median(utilisation):.0f} %" if utilisation else ""
        return (
            f"input pipeline feeding the step ({workers} DataLoader workers, automatic; batch {STEP_BATCH} x "
            f"{STEP_QUERIES} queries, bf16), {what}: {rate:.0f} query images/s; per step {1e3 * data:.1f} ms "
            f"waiting for data, {1e3 * compute:.1f} ms computing ({100 * data / (data + compute):.0f} % waiting){gpu}"
        )

    print(line(f"epoch 1 of {steps} steps (workers starting, photos decoded)", health[:1]), flush=True)
    if len(health) > 1:
        later = "epoch 2" if len(health) == 2 else f"epochs 2-{len(health)}, median"
        print(line(f"{later} (warm)", health[1:]), flush=True)


def check_memorisation(
    machine: Machine, categories: tuple[int, ...] = MEMORISE_CATEGORIES, budget_s: float = MEMORISE_BUDGET_S
) -> None:
    catalog = MP100Catalog(machine.root)
    started, epochs, seconds = time.perf_counter(), [], []
    for cid in categories:
        if time.perf_counter() - started > budget_s:
            print(
                f"single-image memorisation: categories from {cid} on skipped (the section took over {budget_s:.0f} s)"
            )
            break
        config = single_image_recipe(
            machine.root, cid, preset=machine.preset, device=machine.device, backbone_weights=machine.weights
        )
        watch = Watch(0.0, stop_when_reached=True)
        trainer = Trainer(config, callbacks=[watch], log=quiet)
        watch.started = time.perf_counter()
        result = trainer.fit()
        last = result.history[-1]
        k = catalog.category(cid).num_keypoints
        if watch.both_epoch is None:
            print(
                f"single-image memorisation, category {cid} (K={k}): NOT within {EXPECTED_EPOCHS} epochs (last: loss "
                f"{last.loss:.4f}, PCK@0.2 {last.pck}); {time.perf_counter() - watch.started:.1f} s",
                flush=True,
            )
            continue
        epochs.append(watch.both_epoch)
        seconds.append(watch.both_seconds)
        print(
            f"single-image memorisation, category {cid} (K={k}): loss < {MEMORISED_LOSS} and PCK@0.2 = 100 % at "
            f"epoch {watch.both_epoch}, {watch.both_seconds:.1f} s of fit()",
            flush=True,
        )
    if epochs:
        print(
            f"single-image memorisation (guide's recipe, preset {machine.preset}): median epoch "
            f"{statistics.median(epochs):g}, median {statistics.median(seconds):.1f} s ({len(epochs)} memorised)"
        )


def check_overhead(machine: Machine, steps: int = OVERHEAD_STEPS, warmup: int = OVERHEAD_WARMUP) -> None:
    config = single_image_recipe(
        machine.root,
        MEMORISE_CATEGORIES[0],
        preset=machine.preset,
        device=machine.device,
        backbone_weights=machine.weights,
    )
    print(f"instruments' overhead, single-image recipe, preset {machine.preset}, {steps} steps each:")
    for line in overhead.measure(config, steps, warmup).lines():
        print(f"  {line}", flush=True)


def guarded(name: str, check: Callable[[], None], failures: list[str]) -> None:
    """Runs one section; a failure is printed (and its traceback on stderr) and the next section runs."""
    started = time.perf_counter()
    try:
        check()
    except Exception as exc:  # every section reports, whatever one of them hits
        failures.append(name)
        print(f"{name}: FAILED: {type(exc).__name__}: {exc}", flush=True)
        traceback.print_exc()
    finally:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    print(f"  ({name}: {time.perf_counter() - started:.0f} s)", flush=True)


def build() -> str:
    cuda = f"CUDA {torch.version.cuda} build" if torch.version.cuda else "CPU-only build"
    return f"torch {torch.__version__} ({cuda})"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check", description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset_root")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print(f"no CUDA device: {build()}, {torch.cuda.device_count()} CUDA device(s) visible; nothing measured")
        return 0
    os.environ[DOWNLOAD_ENV] = "false"  # this check never downloads: weights come from the cache or not at all
    crops = tempfile.mkdtemp(prefix="gpu-check-crops-")
    os.environ[CROP_CACHE_ENV] = crops
    started = time.perf_counter()
    try:
        root = dataset_root(args.dataset_root)  # written first when missing (a fresh machine)
        weights, why = backbone_weights("base")
        device = torch.cuda.get_device_properties(0)
        print(
            f"{device.name} ({device.total_memory / GIB:.0f} GiB, compute capability {device.major}.{device.minor}), "
            f"{build()}, cuDNN {torch.backends.cudnn.version()}, {os.cpu_count()} cores; dataset {root}; "
            f"base preset backbone: {why}",
            flush=True,
        )
        machine = Machine(root, weights=weights)
        failures: list[str] = []
        guarded("training step", lambda: check_steps(machine), failures)
        guarded("input pipeline", lambda: check_pipeline(machine), failures)
        guarded("single-image memorisation", lambda: check_memorisation(machine), failures)
        guarded("instruments' overhead", lambda: check_overhead(machine), failures)
    finally:
        shutil.rmtree(crops, ignore_errors=True)
    total = time.perf_counter() - started
    if failures:
        print(f"FAILED: {', '.join(failures)} ({total:.0f} s)")
        return 1
    print(f"all sections done in {total:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
