"""The compression core: ``compress`` and its attention/mask functions, the cache layer, the methods, the
decode kernels and their statistics.  It imports nothing from the harness (``rocketkv.harness``) or the tasks."""
from rocketkv.core.methods import METHODS, Method, StepCost, make_method
from rocketkv.core.session import AttentionShape, CompressionSession, check_model, compress, resolve_budget

__all__ = ["METHODS", "AttentionShape", "CompressionSession", "Method", "StepCost", "check_model", "compress",
           "make_method", "resolve_budget"]
