"""rocketkv: how much accuracy does KV-cache compression cost, at which budget, at what speed.

``rocketkv.core`` is the compression library (``compress``, methods, cache, kernels); ``rocketkv.harness`` runs
evaluations with it (CLI, runner, models, results, report); the tasks live in ``evals``."""
from rocketkv.core import METHODS, Method, compress, make_method, resolve_budget

__all__ = ["METHODS", "Method", "compress", "make_method", "resolve_budget"]
__version__ = "0.1.0"
