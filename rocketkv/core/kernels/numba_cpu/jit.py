"""numba's compile options for the CPU kernels."""
JIT = {"cache": True, "nogil": True, "boundscheck": False}
# float sums in any order (vectorised dot products); infinities and NaNs keep their meaning
REASSOCIATE = {**JIT, "fastmath": {"reassoc", "contract", "nsz", "arcp"}}
