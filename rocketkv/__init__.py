"""rocketkv: how much accuracy does KV-cache compression cost, at which budget, at what speed.

``rocketkv.core`` is the compression library (``compress``, methods, cache, kernels); ``rocketkv.harness`` runs
evaluations with it (CLI, runner, models, results, report); the tasks live in ``evals``.

The names below are imported on first use, so ``import rocketkv.harness.cli`` does not import torch: the CLI
checks its options (a typo costs a second, not torch's import time) before anything heavy is loaded."""
from __future__ import annotations

__all__ = ["METHODS", "Method", "compress", "make_method", "resolve_budget"]
__version__ = "0.1.0"


def __getattr__(name: str):
    if name in __all__:
        from rocketkv import core

        return getattr(core, name)
    raise AttributeError(f"module 'rocketkv' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
