"""Full KV: nothing evicted, dense attention (the reference every method is compared with)."""
from dataclasses import dataclass

from rocketkv.core.methods.base import Method, register


@register
@dataclass
class FullKV(Method):
    name = "full"
    uses_budget = False
    is_reference = True

    def plan(self, prompt_len, max_new_tokens, head_dim, model_max_len=None, group_size=1):
        return {"dense": True}
