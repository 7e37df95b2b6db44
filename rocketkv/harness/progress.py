"""Progress inside one sample, on the run's progress bar: a long sample (LongBench on a CPU takes minutes of
prefill and hundreds of decoded tokens) shows ``prefill 7934 tok in 95s, decoded 37/512`` instead of a bar that
sits at 0/N.  Nothing shows for a sample shorter than ``min_interval``.  The runner calls ``track(bar)`` as each
sample starts; the prefill and decode loops report through ``prefilled``/``decoded``, which do nothing otherwise."""
from __future__ import annotations

import time

MIN_INTERVAL = 5.0  # seconds: the first report comes this long into a sample, later ones at most this often


class SampleProgress:
    def __init__(self, bar, min_interval: float = MIN_INTERVAL):
        self.bar = bar
        self.min_interval = min_interval
        self.start = self.shown = time.monotonic()
        self.parts = {"prefill": "", "decode": ""}

    def note(self, part: str, text: str) -> None:
        self.parts[part] = text
        now = time.monotonic()
        if now - self.shown >= self.min_interval:
            self.shown = now
            self.bar.set_postfix_str(self.text(), refresh=True)

    def text(self) -> str:
        return ", ".join(part for part in self.parts.values() if part)

    def close(self) -> None:
        if self.shown != self.start:  # a report is on the bar: the next sample starts clean
            self.bar.set_postfix_str("", refresh=True)


_current: SampleProgress | None = None


def track(bar, min_interval: float = MIN_INTERVAL) -> SampleProgress | None:
    """Report the sample that starts now on ``bar`` (a tqdm bar); None (or a disabled bar) stops reporting."""
    global _current
    if _current is not None:
        _current.close()
    _current = None if bar is None or getattr(bar, "disable", False) else SampleProgress(bar, min_interval)
    return _current


def prefilled(tokens: int) -> None:
    if _current is not None:
        _current.note("prefill", f"prefill {tokens} tok in {time.monotonic() - _current.start:.0f}s")


def decoded(done: int, total: int) -> None:
    if _current is not None:
        _current.note("decode", f"decoded {done}/{total}")
