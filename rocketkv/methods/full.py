"""Full KV: nothing evicted, dense attention (the reference every method is compared with)."""
from dataclasses import dataclass

from rocketkv.methods.base import Method, register


@register
@dataclass
class FullKV(Method):
    name = "full"
    uses_budget = False
    is_reference = True
