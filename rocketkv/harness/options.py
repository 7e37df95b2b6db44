"""The run's own options (``conf/config.yaml`` outside the model, method and task groups), checked before anything
is loaded: each bad value fails with its name, the value and what would be valid."""
from __future__ import annotations

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
                   threads=positive_int_or_none("threads", cfg.get("threads")), seed=seed,
                   progress=boolean("progress", cfg.get("progress", True)),
                   update_leaderboard=boolean("update_leaderboard", cfg.get("update_leaderboard", True)),
                   skip_invalid=boolean("grid.skip_invalid", grid.get("skip_invalid", False)))
