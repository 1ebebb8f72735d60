"""The pre-gated model (Pre-gated MoE, ISCA 2024): MoE layer i+1 routes on MoE layer i's input.

`apply_pregated_routing(model)` is a transform on a built model: hooks swap
each router's input for the previous MoE layer's, so block i+1's experts are
known one block early (no mispredictions). Parameter names are unchanged;
whether a saved model is pre-gated is part of its config (`ModelConfig.pregated`),
so every command that rebuilds it (generate, inspect, convert, resume) sees
the same model. The first MoE layer keeps its own routing.

Not here: training the pre-gated model or pre-gate heads (moekit.train.pregate).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ..errors import MoekitError
from ..moe.layers import MoELayer


class PreGateError(MoekitError):
    """Pre-gate heads or a pre-gated model that cannot be used with this model."""


def moe_layers_of(model: nn.Module) -> list[MoELayer]:
    layers = [m for m in model.modules() if isinstance(m, MoELayer)]
    if not layers:
        raise PreGateError("the model has no MoE layers, so there is nothing to pre-gate")
    return layers


class PreGatedRouting:
    """Makes MoE layer i+1 route on MoE layer i's input (parameter names unchanged).

    Both ways a router is asked are rewired: its forward (a pre-hook swaps
    the input) and its `select` (the generation engine's decode path; an
    instance attribute wraps the class's method).
    """

    def __init__(self, model: nn.Module):
        self.layers = moe_layers_of(model)
        if len(self.layers) < 2:
            raise PreGateError("the model has a single MoE layer: there is no next layer to pre-gate")
        self._inputs: list[torch.Tensor | None] = [None] * len(self.layers)
        self.handles = [m.router.register_forward_pre_hook(self._hook(i), with_kwargs=True) for i, m in enumerate(self.layers)]
        for i, m in enumerate(self.layers):
            if hasattr(type(m.router), "select"):
                m.router.select = self._select(i, m.router)
        model._moekit_pregated = self

    def _swap(self, i: int, x: torch.Tensor) -> torch.Tensor:
        """Remember layer i's own input; return the input layer i routes on."""
        self._inputs[i] = x
        if i == 0:
            return x
        prev = self._inputs[i - 1]
        if prev is None or prev.shape != x.shape:
            raise RuntimeError(f"pre-gated routing: MoE layer {i} ran before layer {i - 1} in this forward pass")
        self._inputs[i - 1] = None
        return prev

    def _hook(self, i):
        def hook(module, args, kwargs):
            if args:
                return (self._swap(i, args[0]), *args[1:]), kwargs
            return args, {**kwargs, "x_TD": self._swap(i, kwargs["x_TD"])}
        return hook

    def _select(self, i, router):
        method = type(router).select

        def select(x_TD, *args, **kwargs):
            return method(router, self._swap(i, x_TD), *args, **kwargs)
        return select

    def remove(self, model: nn.Module | None = None) -> None:
        for h in self.handles:
            h.remove()
        for m in self.layers:
            m.router.__dict__.pop("select", None)
        if model is not None and getattr(model, "_moekit_pregated", None) is self:
            del model._moekit_pregated


def apply_pregated_routing(model: nn.Module) -> PreGatedRouting:
    """Rewire `model` so each MoE layer after the first routes on the previous MoE layer's input."""
    if getattr(model, "_moekit_pregated", None) is not None:
        raise PreGateError("the model already routes with pre-gating")
    return PreGatedRouting(model)


