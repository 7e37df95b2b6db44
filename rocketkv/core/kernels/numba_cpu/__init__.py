"""CPU decode kernels compiled by numba: a step's page fold, HSA's page probabilities, SparQ's channel scores and
metadata fold, its exact selection, its attention over the selected slots and its read counts, one call each instead
of 10-30 small torch ops (on CPU each op costs ~5-8 µs inside a decode step, which is most of a sparse method's step at
8k tokens).  Same results as ``reference``: selections exactly (ties included), floats to rounding.  fp32 tensors on
the CPU only; ``kernels/__init__.py`` routes everything else to torch.  Importing this package imports numba (~3 s);
each kernel compiles at its first call and is cached on disk (``__pycache__``, or numba's user cache)."""
from rocketkv.core.kernels.numba_cpu.attend import attend
from rocketkv.core.kernels.numba_cpu.pages import fold_page_bounds, hsa_page_probs
from rocketkv.core.kernels.numba_cpu.sparq import channel_scores, fold_slot as fold_sparq_slot
from rocketkv.core.kernels.numba_cpu.select import select, union_reads

__all__ = ["attend", "channel_scores", "fold_page_bounds", "fold_sparq_slot", "hsa_page_probs", "select",
           "union_reads"]
