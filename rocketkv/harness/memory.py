"""Peak memory of one phase of a run: CUDA allocated memory, or the process's peak resident set on CPU."""
from __future__ import annotations

import resource

import torch


class PeakMemory:
    """Peak memory of one phase (``reset`` ... ``read``).

    CUDA: ``torch.cuda.max_memory_allocated`` (tensors only). CPU on Linux: the process's peak resident set
    (``VmHWM``, reset through ``/proc/self/clear_refs``), which also counts the weights, the Python heap and memory
    the allocator keeps after a free. Elsewhere ``read`` returns None (``source`` says which one applies).
    """

    def __init__(self, device: torch.device):
        self.device = device
        if device.type == "cuda":
            self.source = "cuda_max_allocated"
        elif _reset_rss_peak():
            self.source = "process_peak_rss"
        else:
            self.source = None

    def reset(self) -> None:
        if self.source == "cuda_max_allocated":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        elif self.source == "process_peak_rss":
            _reset_rss_peak()

    def read(self) -> int | None:
        if self.source == "cuda_max_allocated":
            torch.cuda.synchronize(self.device)
            return int(torch.cuda.max_memory_allocated(self.device))
        if self.source == "process_peak_rss":
            return _rss_peak()
        return None


def _reset_rss_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current resident set (Linux >= 4.0)
        return _rss_peak() is not None
    except OSError:
        return False


def _rss_peak() -> int | None:
    return proc_kib_field("/proc/self/status", "VmHWM")


def proc_kib_field(path: str, field: str) -> int | None:
    """Bytes of a ``field:  <n> kB`` line of a /proc file (``/proc/meminfo``, ``/proc/self/status``); None where the
    file or the line is missing (not Linux)."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def process_peak_rss() -> int:
    """Peak resident set of the process over its whole life."""
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024
