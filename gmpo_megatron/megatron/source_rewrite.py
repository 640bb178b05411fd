"""Checked, in-memory source rewrites of megatron-core functions.

A function is recompiled from its own source with textual replacements, in its module's globals;
every replaced text must be present, so an upgrade of megatron-core fails loudly here instead of
silently running unpatched code. Used by the CPU compatibility layer and the upstream fixes.
"""

from __future__ import annotations

import importlib
import inspect
import sys
import textwrap
from typing import Any

SUPPORTED_MEGATRON_VERSION = "0.16.1"


def _resolve(module_name: str, qualname: str):
    module = importlib.import_module(module_name)
    owner: Any = module
    parts = qualname.split(".")
    for part in parts[:-1]:
        owner = getattr(owner, part)
    return module, owner, parts[-1]


def rewrite_function(module_name: str, qualname: str, replacements: list[tuple[str, str]]) -> None:
    """Recompile ``module_name.qualname`` with textual replacements, in the module's globals.

    Raises RuntimeError when a replaced text is missing: the installed megatron-core is not the
    version this layer was written for, and running the unpatched function would fail on CPU in a
    less clear way.
    """
    module, owner, name = _resolve(module_name, qualname)
    raw = inspect.getattr_static(owner, name)
    func = raw.__func__ if isinstance(raw, (staticmethod, classmethod)) else raw
    source = textwrap.dedent(inspect.getsource(func))
    for old, new in replacements:
        if old not in source:
            raise RuntimeError(
                f"gmpo_megatron CPU compatibility: expected {old!r} in {module_name}.{qualname}; "
                f"this layer supports megatron-core=={SUPPORTED_MEGATRON_VERSION}. Install that "
                "version or run on a CUDA machine."
            )
        source = source.replace(old, new)
    # Compile inside a factory taking `__class__` so that zero-argument super() keeps working.
    factory_src = "def __gmpo_factory(__class__):\n" + textwrap.indent(source, "    ")
    factory_src += f"\n    return {name}\n"
    namespace: dict[str, Any] = {}
    code = compile(factory_src, f"<gmpo cpu_compat: {module_name}.{qualname}>", "exec")
    exec(code, module.__dict__, namespace)  # noqa: S102 - recompiling megatron's own source
    new = namespace["__gmpo_factory"](owner if inspect.isclass(owner) else None)
    if isinstance(raw, staticmethod) and not isinstance(new, staticmethod):
        new = staticmethod(new)
    elif isinstance(raw, classmethod) and not isinstance(new, classmethod):
        new = classmethod(new)
    setattr(owner, name, new)
    if not inspect.isclass(owner):  # rebind `from module import func` copies in other modules
        for other in list(sys.modules.values()):
            if other is not None and getattr(other, "__name__", "").startswith("megatron.core"):
                if other.__dict__.get(name) is raw:
                    setattr(other, name, new)
