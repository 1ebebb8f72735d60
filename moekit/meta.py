"""Modules built on the meta device (shapes, no memory) and given real, uninitialised memory later.

Why not plain `torch.device("meta")` and `Module.to_empty`: computing on meta
tensors (a module's weight init, `empty_like` from meta) goes through torch's
reference kernels, which import torch._dynamo and sympy, about 100 MB of RSS
in a process that only wanted to load a model. Here:

- `on_meta()`: while active, every parameter a module registers moves to meta
  as it is registered (its fresh `torch.empty` memory is never touched) and
  nn.init / in-place init ops on meta tensors are skipped; buffers stay real;
- `empty_on(module, device)`: every meta parameter and buffer replaced by
  `torch.empty` memory on `device` (contents undefined, as `to_empty`).

Not here: which models are built this way (models/build.py, hf/reader.py,
the quantized and offloaded expert storages), or reading weights into them.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn
from torch.overrides import TorchFunctionMode


@contextmanager
def on_meta():
    """Parameters registered inside go to the meta device, and their initialisation is skipped."""
    with parameters_on_meta(), _SkipInitOnMeta():
        yield


@contextmanager
def parameters_on_meta():
    """While active, every parameter a module registers is moved to the meta device (buffers stay real)."""
    original = nn.Module.register_parameter

    def register(module, name, param):
        if param is not None and not param.is_meta:
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        original(module, name, param)

    nn.Module.register_parameter = register
    try:
        yield
    finally:
        nn.Module.register_parameter = original


class _SkipInitOnMeta(TorchFunctionMode):
    """nn.init's functions and in-place init ops (normal_, uniform_, zero_, ...) on a meta tensor return it untouched."""

    OPS = {getattr(torch.Tensor, n) for n in ("normal_", "uniform_", "zero_", "fill_", "erfinv_", "mul_", "add_", "clamp_",
                                              "div_", "sub_", "exponential_", "random_", "bernoulli_")}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in self.OPS or getattr(func, "__module__", None) == "torch.nn.init":
            t = args[0] if args else kwargs.get("tensor")
            if isinstance(t, torch.Tensor) and t.is_meta:
                return t
        return func(*args, **kwargs)


def empty_on(module: nn.Module, device, dtype: torch.dtype | None = None) -> nn.Module:
    """`module` with every meta parameter and buffer given `torch.empty` memory on `device` (floats cast to dtype)."""
    made: dict[int, torch.Tensor] = {}  # tied tensors stay tied

    def fresh(t: torch.Tensor) -> torch.Tensor:
        if id(t) not in made:
            dt = dtype if dtype is not None and t.is_floating_point() else t.dtype
            new = torch.empty(t.shape, dtype=dt, device=device)
            made[id(t)] = nn.Parameter(new, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else new
        return made[id(t)]

    for m in module.modules():
        for table in (m._parameters, m._buffers):
            for name, t in list(table.items()):
                if t is not None and t.is_meta:
                    table[name] = fresh(t)
    return module
