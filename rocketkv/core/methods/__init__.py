"""KV methods: one module each, registered by name (the contract: ``base``).  Adding a method = a module here +
``conf/method/<name>.yaml``."""
import importlib
import pkgutil

from rocketkv.core.methods.base import METHODS, Method, StepCost, option_names, register

for _mod in pkgutil.iter_modules(__path__):
    if _mod.name not in ("base", "ops", "pages"):
        importlib.import_module(f"{__name__}.{_mod.name}")


def make_method(name: str, budget=None, **options) -> Method:
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; valid methods: {sorted(METHODS)}")
    cls = METHODS[name]
    fields = option_names(cls)
    known = {k: v for k, v in options.items() if k in fields}
    extra = {k: v for k, v in options.items() if k not in fields}
    return cls(budget=budget if cls.uses_budget else None, extra=extra, **known)


__all__ = ["METHODS", "Method", "StepCost", "make_method", "option_names", "register"]

