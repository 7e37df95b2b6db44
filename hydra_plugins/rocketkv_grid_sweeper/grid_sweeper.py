"""``hydra/sweeper=grid``: a multirun whose ``method`` and ``budget`` sweeps become one grid per job.

``-m hydra/sweeper=grid method=full,snapkv,rocketkv budget=256,512`` launches one job running
``grid.methods=[full,snapkv,rocketkv] grid.budgets=[256,512]`` (one prefill per sample for all its cells) instead of
one job per cell; every other swept key still multiplies the jobs, as with Hydra's basic sweeper.  Each cell writes
the same folder and predictions as its own job would.
"""
# No ``from __future__ import annotations``: Hydra's plugin scan executes this module outside sys.modules, where
# dataclasses cannot resolve string annotations.
from dataclasses import dataclass
from typing import Dict, List, Optional

from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.config_store import ConfigStore
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override

GRID_KEYS = {"method": "grid.methods", "budget": "grid.budgets"}


@dataclass
class GridSweeperConf:
    _target_: str = "hydra_plugins.rocketkv_grid_sweeper.grid_sweeper.GridSweeper"
    max_batch_size: Optional[int] = None
    params: Optional[Dict[str, str]] = None


ConfigStore.instance().store(group="hydra/sweeper", name="grid", node=GridSweeperConf, provider="rocketkv")


def coalesce(overrides: List[Override]) -> List[str]:
    """The overrides as strings, with sweeps over ``method`` and ``budget`` turned into grid lists."""
    out = []
    for override in overrides:
        key = override.get_key_element()
        if key in GRID_KEYS and override.is_sweep_override() and override.is_discrete_sweep():
            out.append(f"{GRID_KEYS[key]}=[{','.join(override.sweep_string_iterator())}]")
        else:
            out.append(override.input_line)
    return out


class GridSweeper(BasicSweeper):
    @staticmethod
    def split_arguments(overrides: List[Override], max_batch_size: Optional[int]) -> List[List[List[str]]]:
        parsed = OverridesParser.create().parse_overrides(coalesce(overrides))
        return BasicSweeper.split_arguments(parsed, max_batch_size)
