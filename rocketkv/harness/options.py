"""The run's own options (``conf/config.yaml`` outside the model, method and task groups), checked before anything
is loaded: each bad value fails with its name, the value and what would be valid."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from omegaconf import DictConfig


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def positive_int_or_none(name: str, value: Any) -> int | None:
    if value is None:
        return None
    if not _is_int(value) or value < 1:
        raise ValueError(f"{name}={value!r} is not valid; give a positive integer, or null for no limit")
    return value


def auto_threads(cores: int, load: float) -> int:
    """CPU threads for a job: the cores the machine's load leaves free (at least one).  Threads beyond the free
    cores get descheduled while the others wait for them: every step then runs many times slower."""
    return max(1, int(cores - load + 0.5))


def threads_option(value: Any) -> int | None:
    """``threads``: a positive integer, ``auto`` (the cores not busy when the run starts; torch's default when
    ``OMP_NUM_THREADS`` is set) or null (torch's default: every core)."""
    if value == "auto":
        if os.environ.get("OMP_NUM_THREADS"):
            return None
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        return auto_threads(cores, os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0)
    if value is not None and (not _is_int(value) or value < 1):
        raise ValueError(f"threads={value!r} is not valid; give a positive integer, auto (the cores not busy when "
                         "the run starts) or null (torch's default: every core)")
    return value


def boolean(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{name}={value!r} is not valid; give true or false")
    return value


def parse_shard(shard: Any) -> tuple[int, int] | None:
    """``"i/n"`` (0-based) -> ``(i, n)``; None or empty -> None."""
    if shard in (None, "", "null"):
        return None
    try:
        index, count = (int(x) for x in str(shard).split("/"))
    except ValueError:
        index, count = -1, 0
    if not 0 <= index < count:
        raise ValueError(f"shard={shard!r} is not valid; use i/n with 0 <= i < n, e.g. shard=0/4")
    return index, count


@dataclass(frozen=True)
class RunOptions:
    """The checked values of ``limit``, ``shard``, ``threads``, ``seed``, ``progress``, ``update_leaderboard`` and
    ``grid.skip_invalid``."""

    limit: int | None
    shard: tuple[int, int] | None
    threads: int | None
    seed: int
    progress: bool
    update_leaderboard: bool
    skip_invalid: bool

    @classmethod
    def from_cfg(cls, cfg: DictConfig) -> "RunOptions":
        seed = cfg.get("seed", 0)
        if not _is_int(seed):
            raise ValueError(f"seed={seed!r} is not valid; give an integer")
        output_dir = cfg.get("output_dir")
        if not isinstance(output_dir, str) or not output_dir:
            raise ValueError(f"output_dir={output_dir!r} is not valid; give a folder path")
        grid = cfg.get("grid") or {}
        for key in ("methods", "budgets"):
            value = grid.get(key)
            if value is not None and (isinstance(value, str) or not hasattr(value, "__len__")):
                raise ValueError(f"grid.{key}={value!r} is not valid; give a list, e.g. grid.{key}=[...]")
        return cls(limit=positive_int_or_none("limit", cfg.get("limit")), shard=parse_shard(cfg.get("shard")),
                   threads=threads_option(cfg.get("threads")), seed=seed,
                   progress=boolean("progress", cfg.get("progress", True)),
                   update_leaderboard=boolean("update_leaderboard", cfg.get("update_leaderboard", True)),
                   skip_invalid=boolean("grid.skip_invalid", grid.get("skip_invalid", False)))
