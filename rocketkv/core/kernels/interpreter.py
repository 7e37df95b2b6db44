"""Triton's CPU interpreter (``TRITON_INTERPRET=1``) with the numpy that is installed.

Triton <= 3.6's interpreter turns a kernel's scalar argument into a loop bound with ``int(array)`` on a one-element
array, which numpy >= 2.4 refuses ("only 0-dimensional arrays can be converted to Python scalars"): every kernel
with a runtime loop bound then fails.  ``patch_scalar_index`` makes that conversion take the array's one element,
as later Triton releases do; it changes nothing else and is a no-op where the interpreter has no such hook.
"""
from __future__ import annotations


def patch_scalar_index() -> bool:
    """Patch the interpreter's tensor ``__index__``; True when the hook was found (or patched before)."""
    try:
        import triton.runtime.interpreter as interpreter
    except ImportError:
        return False
    original = getattr(interpreter, "_patch_lang_tensor", None)
    if original is None:
        return False
    if getattr(original, "rocketkv_patched", False):
        return True

    def patched(tensor, scope, *args, **kwargs):
        original(tensor, scope, *args, **kwargs)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.item()))

    patched.rocketkv_patched = True
    interpreter._patch_lang_tensor = patched
    return True
