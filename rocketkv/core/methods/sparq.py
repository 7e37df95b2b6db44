"""SparQ: approximate scores on the top-r channels of |q|, exact attention on the top-k tokens, mean-value
reallocation ``y = α·y_k + (1−α)·mean(V)``, with mean(V) from a running sum of V kept as slots arrive (``index``).
Budget: ``r = max(1, round(d·t/S))``, ``k = t/2``.

As in the paper, K is kept twice: a channel-major copy (``keys_t``, ``[B, Hkv, d, C]``, the method's metadata) makes
the approximate scores read r contiguous rows of each head instead of every slot's whole key."""
from dataclasses import dataclass

import torch

from rocketkv.core import kernels
from rocketkv.core.methods.base import Method, StepCost, register
from rocketkv.core.methods.ops import attend_indices, covers_sequence, seq_len_for_plan, topk_cost, widened


def fold_reference(keys, values, keys_t, value_sum, upto) -> None:
    """Slot ``upto - 1``'s key into that column of the channel-major copy ``keys_t``, its value into ``value_sum``."""
    slot = (upto - 1).view(1)
    value_sum += values.index_select(2, slot).squeeze(2).float()
    keys_t.index_copy_(-1, slot, keys.index_select(2, slot).transpose(2, 3))


@register
@dataclass
class SparQ(Method):
    name = "sparq"

    def plan(self, prompt_len, max_new_tokens, head_dim, model_max_len=None, group_size=1):
        s = seq_len_for_plan(prompt_len, max_new_tokens, model_max_len)
        topk = self.budget // 2
        return {"channels": min(head_dim, max(1, round(head_dim * self.budget / s))), "topk": topk,
                "dense": covers_sequence(topk, prompt_len, max_new_tokens)}

    def index(self, layer, plan, upto=None):
        """The sum of V over the stored slots, kept as they arrive (the reallocation's mean(V) reads d values per
        head instead of all of V), and the channel-major copy of K, one column per arriving slot."""
        meta = layer.meta
        if upto is None or isinstance(upto, int):
            n = layer.stored if upto is None else upto
            meta["value_sum"] = layer.values[:, :, :n].float().sum(2)
            b, hkv, _, d = layer.keys.shape
            meta["keys_t"] = layer.keys.new_zeros(b, hkv, d, layer.capacity)
            meta["keys_t"][..., :n] = layer.keys[:, :, :n].transpose(2, 3)
            return
        meta["keys_t"] = widened(meta["keys_t"], layer.capacity)
        if not kernels.fold_sparq_slot(layer.keys, layer.values, meta["keys_t"], meta["value_sum"], upto,
                                       self.kernels):
            fold_reference(layer.keys, layer.values, meta["keys_t"], meta["value_sum"], upto)

    def metadata_bytes(self, layer, plan):
        """The K copy of the stored slots and the running V sum (the copy has room for more slots)."""
        keys_t = layer.meta.get("keys_t")
        copy = 0 if keys_t is None else keys_t[..., :layer.stored].numel() * keys_t.element_size()
        value_sum = layer.meta.get("value_sum")
        return copy + (0 if value_sum is None else value_sum.numel() * value_sum.element_size())

    def decode(self, layer, q, upto, plan, scaling):
        b, hkv, g, d = q.shape
        k, slots = plan["topk"], layer.capacity
        channels = q.abs().topk(plan["channels"], dim=-1, sorted=False).indices  # [B,Hkv,g,r], per head
        # approximate scores on those channels over SparQ's temperature sqrt(d·‖q_I‖₁/‖q‖₁), fp32 from the cache
        # as stored, -inf from upto on
        logits = kernels.slot_scores(q, layer.meta["keys_t"].mT, upto, channels, backend=self.kernels)
        idx, _, alpha = kernels.select_units(logits.view(b, hkv * g, slots), upto, 1, k, min(k, slots), False,
                                             mass=True, backend=self.kernels, masked=True)
        idx = idx.view(b, hkv, g, -1)  # the approximate softmax's mass of the chosen slots: α (1 if all chosen)
        y_k = attend_indices(layer, q, idx, scaling, self.kernels)
        mean_v = (layer.meta["value_sum"] / upto).unsqueeze(2)  # [B,Hkv,1,d]
        out = torch.lerp(mean_v, y_k.float(), alpha.view(b, hkv, g, 1))
        # read: r channels of K per slot (union over the group's heads), V of the union of the sets, mean(V)
        count = kernels.union_reads(idx, upto, 2 * d, slots, channels, d, backend=self.kernels).sum()
        return out.to(q.dtype), StepCost(topk_cost(k, lambda u, attended: u * 0 + hkv * d), upto, count,
                                         (0.0, 1 / b))

