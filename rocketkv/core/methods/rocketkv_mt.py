"""RocketKV-MT: RocketKV for multi-turn conversations (the official ``rocket_mt``).

Plain ``rocketkv`` evicts for good at the first prefill: a later turn sees only what survived.  RocketKV-MT keeps
the full cache across turns (``layer.track_history()``) beside a filtered working set.  At every turn's prefill the
layer hands the whole history back (``CompressedLayer.begin_turn``), the turn's queries attend to it densely, and
stage 1 (SnapKV, group-wise, max-pool 63) selects the working set from the whole history again, with the turn's
last ``min(window, turn tokens)`` queries as the observation window; decode steps run stage 2 (hybrid sparse
attention) on that working set.  New tokens (the turn's and the generated ones) are appended to both.

Budget split: RocketKV's, for the whole conversation (``S`` = every turn's tokens and new tokens).  On a single
prompt it computes exactly what ``rocketkv`` does.
"""
from dataclasses import dataclass

from rocketkv.core.methods.base import register
from rocketkv.core.methods.rocketkv import RocketKV, stage1


@register
@dataclass
class RocketKVMT(RocketKV):
    name = "rocketkv_mt"

    def compress(self, layer, q_window, prompt_len, plan, scaling):
        layer.track_history()
        window = min(self.window, q_window.shape[-2])  # a later turn may be shorter than the window
        stage1(layer, q_window, prompt_len, plan["prompt_budget"], window, plan["kernel_size"], scaling)
