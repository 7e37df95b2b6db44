"""DuoAttention (Xiao et al. 2025): per (layer, KV head), a retrieval head attends every token, a streaming head a
sink and a recent window (sliding during decode, as StreamingLLM's).

The heads' scores come from a pattern file in the format DuoAttention releases: ``full_attention_heads.tsv``, a
tab-separated matrix with one row per layer and one column per KV head (``method.pattern_file=`` names the file,
or a folder holding it).  The highest-scoring heads are the retrieval heads (ties: lower layer, then lower head).

Budget ``t`` (the RocketKV paper's mapping; ``S`` = prompt + new tokens, H = layers x KV heads)::

    t > sink + recent (128 + 512):  streaming heads keep 128 + 512; round down(H * (t - 640) / (S - 640)) retrieval
                                     heads, so the mean traffic per KV head is at most t
    t <= 640:                        every head streams: sink 128 when t > 256, else 20% of t; recent = t - sink

A layer with a retrieval head stores every prompt token (K/V once per KV head) and its streaming heads see their
sink and window only (``visible``); a layer of streaming heads alone evicts to the sink and the window.
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from rocketkv.core.methods.base import Method, StepCost, register
from rocketkv.core.methods.ops import covers_sequence, no_static_cost, seq_len_for_plan
from rocketkv.core.methods.streamingllm import keep_sink_and_recent, sliding_attention, sliding_mask

PATTERN_NAME = "full_attention_heads.tsv"
SHAPE_HINT = "a tab-separated matrix of numbers, one row per layer and one column per KV head"


def pattern_path(path) -> Path:
    p = Path(str(path)).expanduser()
    return p / PATTERN_NAME if p.is_dir() else p


def load_pattern(path) -> tuple[torch.Tensor, str]:
    """The ``[layers, KV heads]`` float64 scores of a pattern file and its sha256; a clear error if it is not one."""
    file = pattern_path(path)
    if not file.is_file():
        raise ValueError(f"method 'duoattention': pattern_file={str(path)!r} does not exist; give DuoAttention's "
                         f"{PATTERN_NAME} ({SHAPE_HINT}) or the folder holding it")
    raw = file.read_bytes()
    rows = [line.split("\t") for line in raw.decode("utf-8", "replace").splitlines() if line.strip()]
    try:
        values = [[float(x) for x in row] for row in rows]
    except ValueError as err:
        raise ValueError(f"method 'duoattention': pattern_file {file}: {err}; expected {SHAPE_HINT}") from None
    widths = sorted({len(row) for row in values})
    if not values or len(widths) != 1 or any(math.isnan(x) for row in values for x in row):
        raise ValueError(f"method 'duoattention': pattern_file {file} is not a matrix ({len(values)} rows of "
                         f"{widths} values); expected {SHAPE_HINT}")
    return torch.tensor(values, dtype=torch.float64), hashlib.sha256(raw).hexdigest()


def retrieval_rank(scores: torch.Tensor) -> torch.Tensor:
    """``[layers, KV heads]`` rank of each head by score, highest first (ties: lower layer, then lower head)."""
    flat = scores.flatten()
    order = sorted(range(flat.numel()), key=lambda i: (-float(flat[i]), i))
    rank = torch.empty(flat.numel(), dtype=torch.long)
    rank[order] = torch.arange(flat.numel())
    return rank.view(scores.shape)


@register
@dataclass
class DuoAttention(Method):
    name = "duoattention"
    pattern_file: str | None = None
    sink: int = 128  # streaming heads' sink and recent window when some heads retrieve (t > sink + recent)
    recent: int = 512

    def __post_init__(self):
        super().__post_init__()
        self._check_int_option("sink", 1)
        self._check_int_option("recent", 1)
        if self.pattern_file is None:
            raise ValueError(f"method {self.name!r} needs method.pattern_file=<DuoAttention's {PATTERN_NAME}, "
                             f"{SHAPE_HINT}, or the folder holding it>")
        self._scores, self._sha = load_pattern(self.pattern_file)
        self._rank = retrieval_rank(self._scores)

    def check_shape(self, num_layers: int, num_kv_heads: int) -> None:
        if tuple(self._scores.shape) != (num_layers, num_kv_heads):
            rows, cols = self._scores.shape
            raise ValueError(f"method 'duoattention': pattern_file {pattern_path(self.pattern_file)} has {rows} "
                             f"layers x {cols} KV heads; this model needs {num_layers} layers x {num_kv_heads} KV heads")

    def plan(self, prompt_len, max_new_tokens, head_dim, model_max_len=None, group_size=1):
        t, heads = self.budget, self._scores.numel()
        streaming = self.sink + self.recent
        if t > streaming:
            s = seq_len_for_plan(prompt_len, max_new_tokens, model_max_len)
            n_retrieval = heads if s <= t else math.floor(heads * (t - streaming) / (s - streaming))
            sink, recent = self.sink, self.recent
        else:
            n_retrieval = 0
            sink = 128 if t > 256 else max(1, round(0.2 * t))
            recent = t - sink
        dense = n_retrieval >= heads or covers_sequence(sink + recent, prompt_len, max_new_tokens)
        return {"sink": sink, "recent": recent, "retrieval_heads": n_retrieval, "heads": heads,
                "retrieval_share": n_retrieval / heads, "pattern_sha256": self._sha, "dense": dense}

    def _retrieval(self, layer, plan) -> torch.Tensor:
        """``[Hkv]`` bool: this layer's retrieval heads."""
        self.check_shape(len(layer.state.layers), layer.keys.shape[1])
        return self._rank[layer.layer_idx] < plan["retrieval_heads"]

    def compress(self, layer, q_window, prompt_len, plan, scaling):
        retrieval = self._retrieval(layer, plan)
        sink, recent = plan["sink"], plan["recent"]
        if not retrieval.any():
            keep_sink_and_recent(layer, prompt_len, sink, recent)
            return
        if retrieval.all() or prompt_len <= sink + recent:
            return
        b, hkv, g = q_window.shape[:3]
        slot = torch.arange(layer.stored, device=layer.keys.device)
        window = (slot < sink) | (slot >= prompt_len - recent)
        visible = retrieval.to(slot.device)[:, None] | window  # [Hkv, S]
        layer.keep(slot.expand(b, hkv, -1), visible=visible[None, :, None].expand(b, hkv, g, -1))

    def index(self, layer, plan, upto=None):
        if isinstance(upto, int):
            layer.meta["retrieval"] = self._retrieval(layer, plan).to(layer.keys.device)

    def metadata_bytes(self, layer, plan):
        return 0  # one flag per KV head, fixed by the pattern file

    def decode(self, layer, q, upto, plan, scaling):
        streaming = sliding_mask(layer, upto, plan["sink"], plan["recent"])
        mask = layer.meta["retrieval"][:, None, None] | streaming  # [Hkv,1,C]
        mask = mask & (layer.slot_index < upto)
        if layer.visible is not None:
            mask = mask & layer.visible
        b, hkv, g, d = q.shape
        # the g heads of a KV head share its mask: the slots it reads are what each of its heads attends
        read = mask.expand(b, hkv, -1, -1)[:, :, :1].sum().double()
        cost = StepCost(no_static_cost, upto, read, (1 / (b * hkv), 2 * d / b))
        return sliding_attention(layer, q, mask, scaling), cost
