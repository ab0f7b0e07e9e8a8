"""How long ``cape.data.synthetic`` takes to write the whole dataset, and how big it is.

    .venv/bin/python -m benchmarks.synthetic_generation [--runs 3] [--workers N]

Generates into a fresh temporary folder each run (seed 0) and prints the median wall time, images per
second and the dataset's size on disk.
"""

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

from cape.data.synthetic import generate


def _disk_bytes(root: Path) -> tuple[int, int]:
    """(bytes of file content, bytes of allocated blocks) under ``root``."""
    content = allocated = 0
    for path in root.rglob("*"):
        if path.is_file():
            stat = path.stat()
            content += stat.st_size
            allocated += stat.st_blocks * 512
    return content, allocated


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3, help="generations to time (default 3)")
    parser.add_argument("--workers", type=int, default=None, help="render processes (default: all cores)")
    args = parser.parse_args()
    if args.runs < 1:
        parser.error("--runs must be at least 1")

    seconds, summary, sizes = [], None, None
    for run in range(args.runs):
        with tempfile.TemporaryDirectory(prefix="cape-synthetic-") as tmp:
            start = time.perf_counter()
            summary = generate(tmp, seed=0, workers=args.workers)
            seconds.append(time.perf_counter() - start)
            sizes = _disk_bytes(Path(tmp))
        print(f"run {run + 1}: {seconds[-1]:.2f} s")

    median = statistics.median(seconds)
    content, allocated = sizes
    print(
        f"workers={args.workers or os.cpu_count()}  images={summary['images']}  instances={summary['instances']}\n"
        f"median wall time: {median:.2f} s over {args.runs} runs\n"
        f"images/s: {summary['images'] / median:.0f}\n"
        f"size on disk: {allocated / 2**20:.1f} MiB ({content / 2**20:.1f} MiB of file content)"
    )


if __name__ == "__main__":
    main()
