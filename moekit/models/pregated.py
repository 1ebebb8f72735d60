"""The pre-gated model (Pre-gated MoE, ISCA 2024): MoE layer i+1 routes on MoE layer i's input.

`apply_pregated_routing(model)` is a transform on a built model: hooks swap
each router's input for the previous MoE layer's, so block i+1's experts are
known one block early (no mispredictions). Parameter names are unchanged;
whether a saved model is pre-gated is part of its config (`ModelConfig.pregated`),
so every command that rebuilds it (generate, inspect, convert, resume) sees
the same model. The first MoE layer keeps its own routing.

`PreGateHeads` (one small head per MoE layer i predicting layer i+1's experts)
and `load_pregate_heads` are the weights of the learned pre-gate predictor
(moekit.infer.prefetch uses them). Not here: training the pre-gated model or
the heads (moekit.train.pregate).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn as nn

from ..checkpoints import load_tensors
from ..errors import MoekitError
from ..moe.layers import MoELayer


HEADS_FILE = "pregate.safetensors"
REPORT_FILE = "pregate.json"


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


# ---------------------------------------------------------------- pre-gate heads (a predictor's weights)


class PreGateHeads(nn.Module):
    """heads[str(i)]: Linear(D, E_{i+1}) from MoE layer i's input to MoE layer i+1's expert logits.

    heads["wrap"] (optional) looks one token ahead: from the last MoE layer's
    input at token t to the first MoE layer's experts at token t+1, whose
    input is not known until t+1 is sampled (the first layer has no earlier
    layer of its own step to be predicted from).
    """

    def __init__(self, hidden_sizes: list[int], num_experts: list[int], bias: bool = False, wrap: bool = True):
        super().__init__()
        heads = {str(i): nn.Linear(hidden_sizes[i], num_experts[i + 1], bias=bias) for i in range(len(num_experts) - 1)}
        if wrap:
            heads["wrap"] = nn.Linear(hidden_sizes[-1], num_experts[0], bias=bias)
        self.heads = nn.ModuleDict(heads)

    @classmethod
    def from_model(cls, model: nn.Module) -> "PreGateHeads":
        """Heads initialised from the next layer's router: at step 0 they are the next-gate predictor."""
        layers = moe_layers_of(model)
        if len(layers) < 2:
            raise PreGateError("the model has a single MoE layer: there is no next layer to pre-gate")
        if any(m.cfg.router == "expert_choice" for m in layers):
            raise PreGateError("pre-gate heads predict token-choice routing; this model uses the expert_choice router")
        gates = [m.router.gate for m in layers]
        heads = cls([m.cfg.hidden_size for m in layers], [m.cfg.num_experts for m in layers], bias=gates[0].bias is not None)
        with torch.no_grad():
            for i, head in heads.heads.items():
                nxt = gates[0] if i == "wrap" else gates[int(i) + 1]
                head.weight.copy_(nxt.weight)
                if head.bias is not None:
                    head.bias.copy_(nxt.bias)
        return heads.to(gates[0].weight.device)

    def forward(self, layer: int | str, x_TD: torch.Tensor) -> torch.Tensor:
        return self.heads[str(layer)](x_TD)


def load_pregate_heads(directory: str | Path, model: nn.Module) -> PreGateHeads:
    """Heads written by `train_pregate`, checked against `model`'s MoE layers."""
    d = Path(directory)
    if not (d / HEADS_FILE).is_file() or not (d / REPORT_FILE).is_file():
        raise PreGateError(f"{d} holds no pre-gate heads ({HEADS_FILE} + {REPORT_FILE}); train them with `moekit pregate CKPT --out {d}`")
    try:
        report = json.loads((d / REPORT_FILE).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise PreGateError(f"{d / REPORT_FILE} cannot be read: {e}") from None
    layers = moe_layers_of(model)
    want = ([m.cfg.hidden_size for m in layers], [m.cfg.num_experts for m in layers])
    have = (report.get("hidden_size"), report.get("num_experts"))
    if list(have) != list(want):
        raise PreGateError(
            f"the pre-gate heads in {d} were trained for MoE layers with hidden sizes {have[0]} and experts {have[1]}, "
            f"but this model has {want[0]} and {want[1]}"
        )
    state, _ = load_tensors(d / HEADS_FILE)
    first = layers[0].router.gate
    heads = PreGateHeads(want[0], want[1], bias=any(k.endswith(".bias") for k in state),
                         wrap=any(k.startswith("heads.wrap.") for k in state))
    try:
        heads.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise PreGateError(f"{d / HEADS_FILE} does not match this model: {e}") from None
    return heads.to(device=first.weight.device, dtype=first.weight.dtype).eval().requires_grad_(False)
