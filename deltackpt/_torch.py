"""``torch``, imported on first use.

Index-only work (``log``, ``stats``, ``verify``, ``gc``, ``delete``) never touches a
tensor, and importing torch costs 1–1.5 s, most of a short CLI command. Modules take
``torch`` from here: a stand-in whose first attribute read imports the real module
(under a lock, so two threads meeting it first are safe), which every save or load
does at once. ``sys.modules`` is left alone: a user's own ``import torch`` is the
ordinary one.
"""

from __future__ import annotations

import importlib
import threading
from types import ModuleType
from typing import TYPE_CHECKING, Any


class _Torch:
    _module: ModuleType | None = None
    _lock = threading.Lock()

    def __getattr__(self, name: str) -> Any:
        module = _Torch._module
        if module is None:
            with _Torch._lock:
                if _Torch._module is None:
                    _Torch._module = importlib.import_module("torch")
                module = _Torch._module
        value = getattr(module, name)
        if isinstance(value, (type, ModuleType)):
            # classes and submodules never change: later reads are plain attribute hits
            # (the per-node isinstance(x, torch.Tensor) of a state walk stays ~70 ns)
            object.__setattr__(self, name, value)
        return value

    def __repr__(self) -> str:
        return "<torch, imported on first use>" if _Torch._module is None else repr(_Torch._module)


if TYPE_CHECKING:  # type checkers see the real module
    import torch
else:
    torch = _Torch()
