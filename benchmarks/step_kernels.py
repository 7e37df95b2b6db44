"""Kernels per decode step of each method, on the CUDA code path, counted on CPU.

    TRITON_INTERPRET=1 PYTHONPATH=$PWD python benchmarks/step_kernels.py [--prompt 3000] [--budget 256] [--layers 4]

One decode step of a small random Llama (GQA group 4, head dim 64) runs with ``kernels="triton"`` under the
Triton interpreter (set here when unset) inside a ``TorchDispatchMode`` that counts every aten op that would
launch a kernel on a GPU (views, metadata ops and bare allocations launch none) plus one per Triton kernel
launch: what a CUDA graph of the step would replay.  The step counted is the second one (caches built at the
first).  Prints per method the kernels per step, per layer, and the excess per layer over full KV.
"""
from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

METHODS = (("full", {}), ("topk", {}), ("snapkv", {"selection": "group"}), ("quest", {}), ("sparq", {}),
           ("hsa", {}), ("rocketkv", {}), ("rocketkv_mt", {}), ("streamingllm", {}), ("pyramidkv", {}),
           ("adakv", {}), ("duoattention", {}))

# ops that launch no kernel: views, metadata, bare allocations, host-side scalars
NO_KERNEL = {"view", "_unsafe_view", "reshape", "expand", "t", "transpose", "permute", "as_strided", "unsqueeze",
             "squeeze", "slice", "select", "detach", "alias", "lift_fresh", "empty", "empty_strided", "empty_like",
             "unbind", "split", "split_with_sizes", "chunk", "narrow", "diagonal", "unfold", "view_as", "flatten",
             "unflatten", "movedim", "expand_as", "sym_size", "sym_stride", "sym_numel", "sym_storage_offset",
             "is_same_size", "_reshape_alias", "resize_", "set_", "clone_metadata", "_local_scalar_dense",
             "is_nonzero", "item", "size", "stride", "dim", "numel", "contiguous"}


def _is_view(func) -> bool:
    name = func.overloadpacket.__name__.rstrip("_") if func.overloadpacket.__name__ != "resize_" else "resize_"
    if func.overloadpacket.__name__ in NO_KERNEL or name in NO_KERNEL:
        return True
    rets = func._schema.returns
    return bool(rets) and all(r.alias_info is not None and not r.alias_info.is_write for r in rets)


class KernelCounter(TorchDispatchMode):
    """Counts the aten ops that launch a kernel and the Triton launches while it is active.

    ``ops`` maps an op's name to its count (``triton:<kernel>`` for launches); ``total`` sums them.  Ops that the
    Triton interpreter runs to move a launch's arguments are not counted."""

    def __init__(self):
        super().__init__()
        self.ops: dict[str, int] = {}
        self._in_launch = 0
        self._patched = []

    @property
    def total(self) -> int:
        return sum(self.ops.values())

    def _add(self, name: str) -> None:
        self.ops[name] = self.ops.get(name, 0) + 1

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not self._in_launch and not _is_view(func):
            self._add(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))

    def __enter__(self):
        self._patch_launches()
        return super().__enter__()

    def __exit__(self, *exc):
        for cls, original in self._patched:
            cls.run = original
        self._patched = []
        return super().__exit__(*exc)

    def _patch_launches(self) -> None:
        try:
            from triton.runtime import interpreter, jit
        except ImportError:
            return
        counter = self
        for cls in (interpreter.InterpretedFunction, jit.JITFunction):
            original = cls.run

            def run(fn_self, *args, _original=original, **kwargs):
                if not kwargs.get("warmup", False):
                    counter._add("triton:" + getattr(fn_self.fn, "__name__", "kernel"))
                counter._in_launch += 1
                try:
                    return _original(fn_self, *args, **kwargs)
                finally:
                    counter._in_launch -= 1

            cls.run = run
            self._patched.append((cls, original))


def small_llama(layers: int, head_dim: int, max_len: int):
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(vocab_size=1024, hidden_size=512, intermediate_size=1024, num_hidden_layers=layers,
                      num_attention_heads=8, num_key_value_heads=2, head_dim=head_dim, max_position_embeddings=max_len,
                      bos_token_id=0, eos_token_id=1, pad_token_id=2)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()


def count_step(model, name, opts, prompt_len, budget, max_new=8):
    from rocketkv.core import compress
    from rocketkv.core.graphs import DecodeStep
    from rocketkv.core.methods.full import FullKV
    from rocketkv.core.session import cache_kwarg
    from rocketkv.harness.generation import prefill

    row = torch.randint(3, 1000, (1, prompt_len), generator=torch.Generator().manual_seed(1)).tolist()
    with compress(model, name, None if name == "full" else budget, max_new_tokens=max_new, kernels="triton",
                  **opts) as session:
        cache = session.new_cache(max_new, prompt_len=prompt_len)
        state = cache.layers[0].state
        state.dense = FullKV(kernels="triton")  # full KV and dense layers on the CUDA path too
        logits, _ = prefill(model, row, cache, split_last=True)
        plan = state.plan
        step = DecodeStep(model, cache, cache_kwarg(model))
        token = step(logits.argmax(-1)).clone()  # the first fed step builds what later steps reuse
        with KernelCounter() as counter, torch.inference_mode():
            step(token)
    return counter, plan


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompt", type=int, default=3000)
    parser.add_argument("--budget", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--methods", nargs="*", default=[m for m, _ in METHODS])
    parser.add_argument("--ops", action="store_true", help="also print each method's op counts")
    args = parser.parse_args(argv)
    model = small_llama(args.layers, args.head_dim, args.prompt + 64)
    print(f"small llama: {args.layers} layers, 8 q / 2 kv heads, d={args.head_dim}; prompt {args.prompt}, "
          f"budget {args.budget}; kernels=triton, TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET')}")
    print(f"{'method':<12} {'kernels/step':>12} {'per layer':>10} {'excess/layer':>13}  plan")
    full = None
    pattern = Path(tempfile.mkdtemp()) / "full_attention_heads.tsv"  # DuoAttention's head scores: half retrieve
    pattern.write_text("".join("1.0\t0.0\n" for _ in range(args.layers)))
    for name in args.methods:
        opts = dict(METHODS).get(name, {})
        if name == "duoattention":
            opts = {**opts, "pattern_file": str(pattern)}
        counter, plan = count_step(model, name, opts, args.prompt, args.budget)
        per_layer = counter.total / args.layers
        full = per_layer if name == "full" else full
        excess = "" if full is None else f"{per_layer - full:+.1f}"
        shown = {k: v for k, v in plan.items() if k in ("page_size", "channels", "topk", "capacity", "dense")}
        print(f"{name:<12} {counter.total:>12} {per_layer:>10.1f} {excess:>13}  {shown}")
        if args.ops:
            print("    " + ", ".join(f"{k}={v}" for k, v in sorted(counter.ops.items(), key=lambda kv: -kv[1])))


if __name__ == "__main__":
    main()
