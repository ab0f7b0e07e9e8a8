"""Training samples per second of the input pipeline alone, per DataLoader worker count, on MP-100-sized photos.

    .venv/bin/python -m benchmarks.input_pipeline [--dataset_root DIR] [--workers 0,1,2] [--presets small,base]
        [--episodes N] [--batch_size 16] [--step_time 0.1] [--json FILE]

What runs is the trainer's own data path, without a model: the run's DataLoader (``RunData.batches``: persistent
workers, pinned memory on CUDA, augmentation seeded per episode) building episodes and collating them into batches.
The episodes are the split's training instances, each used once, grouped by category into episodes of
``shots + queries``: a first epoch that touches every photo. A sample is one crop (a support or a query).

For each preset's input size (small: 128 px, base: 256 px) and worker count (0 = the main process does the work):

- cold: empty crop cache, so every photo is decoded once (the JPEG files are in the OS page cache: this measures
  decoding, not the disk);
- warm (disk): the same episodes in new workers, memory empty: a later run, crops read from the disk cache;
- warm (memory): the same episodes again in the same workers: a later epoch of the same run.

Each cell is samples/s, then samples per CPU-second of the main process and its workers together (from /proc):
the rate per core, which unlike samples/s / workers does not depend on what else the machine runs. Target: 150
samples per CPU-second, warm, at the small preset's input size. For the base preset it prints the samples/s that a
GPU needs at a given step time (``batch_size`` episodes x (shots + queries) per step) and the workers that takes at
the measured rate per core.

The dataset defaults to data/synthetic-mp100, written on first use by
``python -m cape.data.synthetic --out data/synthetic-mp100 --image_size mp100`` (2,191 photos of the real photos'
sizes, 300 MB: about 4 minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from cape.config import PRESETS, TrainConfig
from cape.data.batch import EpisodeRequest
from cape.data.catalog import MP100Catalog
from cape.data.episodes import Episode
from cape.data.instances import CROP_CACHE_ENV
from cape.data.run_data import RunData, usable_cpus
from cape.data.synthetic import generate

DEFAULT_ROOT = Path(__file__).resolve().parents[1] / "data" / "synthetic-mp100"
TARGET_PER_CORE = 150.0  # samples/s per core, warm, small preset


def _dataset(root: Path) -> Path:
    if not (root / "annotations").is_dir():
        print(f"writing the MP-100-sized synthetic dataset to {root} (once)", flush=True)
        summary = generate(root, image_size="mp100")
        print(f"  {summary['images']} photos in {summary['seconds']:.0f} s", flush=True)
    return root


def _first_epoch(catalog: MP100Catalog, per_episode: int, shots: int, limit: int | None) -> list[Episode]:
    """Every training instance once, in episodes of ``per_episode`` instances of one category."""
    episodes = []
    for cid in catalog.category_ids("train"):
        pool = catalog.instances(cid, "train")
        for i in range(0, len(pool) - per_episode + 1, per_episode):
            chosen = pool[i : i + per_episode]
            episodes.append(Episode(category_id=cid, supports=chosen[:shots], queries=chosen[shots:]))
    rng = np.random.default_rng(0)  # mixed categories per batch, as in training
    episodes = [episodes[i] for i in rng.permutation(len(episodes))]
    return episodes[:limit] if limit else episodes


def _cpu_seconds() -> float:
    """CPU time of this process and of its live children (the DataLoader workers)."""
    total = sum(os.times()[:2])
    for child in multiprocessing.active_children():
        fields = Path(f"/proc/{child.pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime
    return total


def _pass(data: RunData, requests: list[EpisodeRequest], batch_size: int) -> tuple[float, float, int]:
    """(wall seconds, CPU seconds, samples) of one pass over ``requests``."""
    started, cpu = time.perf_counter(), _cpu_seconds()
    samples = 0
    for batch in data.batches(requests, batch_size):
        samples += batch.support_images.shape[0] * (batch.support_images.shape[1] + batch.query_images.shape[1])
    return time.perf_counter() - started, _cpu_seconds() - cpu, samples


def _run_data(config: TrainConfig, catalog: MP100Catalog, cache: Path) -> RunData:
    os.environ[CROP_CACHE_ENV] = str(cache)  # read when the run's InstanceLoader is made
    data = RunData(config, catalog)
    list(data.batches([], 1))  # start the workers: their start-up is not part of the rates
    return data


def measure(catalog, preset: str, workers: int, episodes: list[Episode], args) -> dict:
    config = TrainConfig(
        mode="full",
        dataset_root=str(catalog.root),
        preset=preset,
        num_workers=workers,
        batch_size=args.batch_size,
        num_shots=args.shots,
        num_queries_per_episode=args.queries,
        test_episodes_per_category=0,
    )
    requests = [EpisodeRequest(e, seed) for seed, e in enumerate(episodes)]  # augmented, as in training
    with tempfile.TemporaryDirectory(prefix="crops-") as cache:
        first = _run_data(config, catalog, Path(cache))
        passes = {"cold": _pass(first, requests, args.batch_size)}
        first.close()
        second = _run_data(config, catalog, Path(cache))
        passes["warm_disk"] = _pass(second, requests, args.batch_size)
        passes["warm_memory"] = _pass(second, requests, args.batch_size)
        second.close()
    row = {"preset": preset, "input_size": PRESETS[preset].input_size, "workers": workers}
    for name, (wall, cpu, samples) in passes.items():
        row[name] = samples / wall
        row[f"{name}_per_core"] = samples / cpu
        row[f"{name}_per_worker"] = samples / wall / max(1, workers)
    return row


def _worker_counts(text: str | None) -> list[int]:
    if text:
        return [int(w) for w in text.split(",")]
    cores = usable_cpus()
    counts = [0] + [2**i for i in range(int(math.log2(cores)) + 1)]
    return sorted(set(counts + [cores]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.input_pipeline", description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset_root", type=Path, default=DEFAULT_ROOT)
    parser.add_argument("--workers", help="comma-separated worker counts (default: 0, 1, 2, 4, ... up to the cores)")
    parser.add_argument("--presets", default="small,base", help="comma-separated presets (input sizes)")
    parser.add_argument("--episodes", type=int, default=None, help="at most this many episodes per pass (default: all)")
    parser.add_argument("--batch_size", type=int, default=16, help="episodes per batch (default 16)")
    parser.add_argument("--shots", type=int, default=1)
    parser.add_argument("--queries", type=int, default=2)
    parser.add_argument("--step_time", type=float, default=0.1, help="GPU seconds per base-preset step to feed")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)

    root = _dataset(args.dataset_root)
    catalog = MP100Catalog(root)
    per_episode = args.shots + args.queries
    episodes = _first_epoch(catalog, per_episode, args.shots, args.episodes)
    photos = {x.file_name: (x.image_width, x.image_height) for e in episodes for x in (*e.supports, *e.queries)}
    sizes = np.array(list(photos.values()))
    print(
        f"{root}: {len(episodes)} episodes of {args.shots} + {args.queries} = {len(episodes) * per_episode} samples "
        f"per pass, from {len(photos)} photos (mean {np.prod(sizes, 1).mean() / 1e6:.2f} Mpx, median long side "
        f"{np.median(sizes.max(1)):.0f} px, largest {sizes.max()} px); batches of {args.batch_size} episodes; "
        f"{usable_cpus()} cores"
    )
    rows = []
    for preset in args.presets.split(","):
        print(f"\npreset {preset} ({PRESETS[preset].input_size} px): samples/s (samples per CPU-second)")
        print(f"{'workers':>7}  {'cold':>16}  {'warm, disk':>16}  {'warm, memory':>16}")
        for workers in _worker_counts(args.workers):
            row = measure(catalog, preset, workers, episodes, args)
            rows.append(row)
            cells = [f"{row[k]:8.0f} ({row[k + '_per_core']:5.0f})" for k in ("cold", "warm_disk", "warm_memory")]
            print(f"{workers:>7}  " + "  ".join(cells), flush=True)

    print()
    small = [r for r in rows if r["preset"] == "small"]
    if small:
        best = max(r["warm_disk_per_core"] for r in small)
        worst = min(r["warm_disk_per_core"] for r in small)
        verdict = "met" if worst >= TARGET_PER_CORE else "NOT met"
        print(
            f"target {TARGET_PER_CORE:.0f} samples per CPU-second warm at 128 px: {verdict} "
            f"(warm from disk: {worst:.0f} to {best:.0f} over the worker counts)"
        )
    base = [r for r in rows if r["preset"] == "base"]
    per_step = args.batch_size * per_episode
    if base:
        rate = max(base, key=lambda r: r["workers"])
        per_core = rate["warm_disk_per_core"]
        for step in sorted({0.05, 0.1, 0.2, args.step_time}):
            needed = per_step / step
            print(
                f"base preset at {step:g} s per step ({args.batch_size} x {per_episode} = {per_step} samples): needs "
                f"{needed:.0f} samples/s = {math.ceil(needed / per_core)} workers at the {per_core:.0f} samples per "
                f"CPU-second measured warm with {rate['workers']} workers (cold: "
                f"{math.ceil(needed / rate['cold_per_core'])})"
            )
    if args.json:
        args.json.write_text(json.dumps({"cores": usable_cpus(), "samples_per_step": per_step, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
