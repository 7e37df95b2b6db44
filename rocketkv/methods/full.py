"""Full KV: nothing evicted, dense attention (the reference every method is compared with)."""
from dataclasses import dataclass

from rocketkv.methods.base import Method, dense_decode_many, register


@register
@dataclass
class FullKV(Method):
    name = "full"
    uses_budget = False
    is_reference = True

    def plan(self, prompt_len, max_new_tokens, head_dim, model_max_len=None, group_size=1):
        return {"dense": True}

    def decode_many(self, layer, q, first_slot, plan, scaling):
        return dense_decode_many(layer, q, first_slot, scaling)
