"""GPU utilisation and memory sampled every few seconds while a run trains on CUDA, as W&B and MLflow do.

NVML (the nvidia-ml-py package, read through torch.cuda.utilization and torch.cuda.device_memory_used, which map
torch's device index to NVML's under CUDA_VISIBLE_DEVICES) on a daemon thread: the training loop never waits for it.
Where NVML cannot be read (no driver library, a GPU it does not know), the figures are absent: the run goes on, and
says so once in its log.
"""

from __future__ import annotations

import logging
import statistics
import threading
from dataclasses import dataclass

import torch

log = logging.getLogger(__name__)
SAMPLE_EVERY_S = 2.0
MIB = 2**20


@dataclass(frozen=True)
class GpuWindow:
    utilisation: float  # mean of the samples, %
    utilisation_max: float
    memory_used_mib: float  # the most device memory in use (every process on the GPU)


class GpuMonitor:
    def __init__(self, device: torch.device, every_s: float = SAMPLE_EVERY_S):
        self.device, self.every_s = device, every_s
        self._samples: list[tuple[float, float]] = []  # (utilisation %, memory used MiB) since the window started
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.available = self._sample()
        if not self.available:
            return
        self._thread = threading.Thread(target=self._run, name="gpu-monitor", daemon=True)
        self._thread.start()

    def _sample(self) -> bool:
        try:
            sample = (float(torch.cuda.utilization(self.device)), torch.cuda.device_memory_used(self.device) / MIB)
        except Exception as exc:  # NVML missing or refusing: the figures are absent, the run is not affected
            log.warning("GPU utilisation is not measured: NVML cannot be read (%s: %s)", type(exc).__name__, exc)
            return False
        with self._lock:
            self._samples.append(sample)
        return True

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            if not self._sample():
                return

    def start_window(self) -> None:
        with self._lock:
            self._samples = []
        if self.available:
            self._sample()  # a window always has one sample, however short the epoch

    def window(self) -> GpuWindow | None:
        """The samples since start_window; None when NVML cannot be read."""
        if not self.available:
            return None
        self._sample()
        with self._lock:
            samples = list(self._samples)
        utilisation = [u for u, _ in samples]
        return GpuWindow(statistics.fmean(utilisation), max(utilisation), max(m for _, m in samples))

    def close(self) -> None:
        self._stop.set()
