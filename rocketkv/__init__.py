"""rocketkv: how much accuracy does KV-cache compression cost, at which budget, at what speed."""
from rocketkv.methods import METHODS, make_method
from rocketkv.session import compress, resolve_budget

__all__ = ["METHODS", "compress", "make_method", "resolve_budget"]
__version__ = "0.1.0"
