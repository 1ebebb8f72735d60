"""Dataclass configs and the helpers that load, override, validate and save them.

A run is described by a preset or a JSON file plus `key=value` overrides
(command line over file over defaults). Nested configs are addressed with
dots (`moe.num_experts=16`); a key that is unique across the nested configs may
also be given bare (`num_experts=16`). The resolved config is written beside
every checkpoint so a model can be rebuilt from its directory alone.

This file holds the MoE layer's config and the generic machinery; model and
trainer configs live next to the code that uses them and reuse the helpers.
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from .errors import ConfigError
from .fileio import read_json

T = TypeVar("T")

ROUTERS = ("topk", "expert_choice", "group", "sparsemixer", "task")  # task: moe/task_routing.py
SCORE_FUNCS = ("softmax", "sigmoid", "topk_softmax")  # topk_softmax: top-k of the logits, softmax over those k
NOISE_POLICIES = ("none", "jitter", "rsample", "gumbel")  # gumbel: Gumbel-sigmoid selection noise (expert choice, MoMa)
DROP_POLICIES = ("position", "random")
ACTIVATIONS = ("swiglu", "gelu", "clamped_swiglu")  # clamped_swiglu: GPT-OSS experts
BALANCE_LOSSES = ("batch", "sequence", "none")


@dataclass
class MoEConfig:
    """Everything one MoE layer needs: router, capacity, experts, variants."""

    hidden_size: int = 256
    num_experts: int = 8
    top_k: int = 2
    expert_hidden: int = 512  # width of one expert's MLP
    activation: str = "swiglu"
    kernel: str = "auto"  # loop | grouped_mm | bmm | auto
    router: str = "topk"  # topk | expert_choice | group | sparsemixer
    score_func: str = "softmax"
    norm_topk_prob: bool = True  # renormalise the k selected weights to sum to 1
    routed_scaling_factor: float = 1.0
    router_bias: bool = False  # a bias term in the router's linear layer
    noise_policy: str = "none"  # DeepSpeed-MoE's Jitter / RSample
    noise_eps: float = 1e-2  # jitter range: x * U(1 - eps, 1 + eps)
    n_group: int = 1  # group-limited routing (DeepSeek-V3): groups of experts
    topk_group: int = 1  # ... of which each token may use this many
    group_score_experts: int = 2  # a group scores the sum of its best this-many experts (DeepSeek-V3: 2, V2: 1)
    bias_update_rate: float = 0.0  # aux-loss-free balancing; 0 disables it
    selection_bias: bool = False  # a fixed selection bias (DeepSeek-V3's e_score_correction_bias), saved with the model
    num_groups: int = 1  # GroupRouter: experts partitioned by a per-token group id; TaskRouter: the number of task ids
    group_sizes: list[int] = field(default_factory=list)  # experts per group (e.g. [7, 1]); empty: equal groups
    aux_router_hidden: int = 0  # expert choice: causal auxiliary routers (one MLP per expert, this wide); 0: none
    task_router_input: str = "add"  # TaskRouter (JiuZhang 2.0): the task embedding is added to | concatenated with the input
    capacity_factor: float = 0.0  # training; <= 0 means dropless
    eval_capacity_factor: float = 0.0
    min_capacity: int = 0
    drop_policy: str = "position"  # position | random (Random Token Selection)
    balance_loss: str = "batch"  # batch | sequence | none
    num_shared_experts: int = 0
    shared_expert_hidden: int = 0  # 0: same as expert_hidden
    shared_expert_gate: bool = False  # sigmoid gate on the shared expert (Qwen2-MoE, Time-MoE)
    # --- PhiMoE: the sparsemixer router's threshold (router="sparsemixer", top-2 only)
    sparsemixer_eps: float = 0.01
    # --- GPT-OSS: experts with biases and the clamped SwiGLU (activation="clamped_swiglu")
    expert_biases: bool = False  # a bias on each expert's input and output projection
    swiglu_alpha: float = 1.702  # clamped SwiGLU: (up + 1) * gate * sigmoid(alpha * gate)
    swiglu_limit: float = 7.0  # ... with gate <= limit and -limit <= up <= limit

    def __post_init__(self) -> None:
        validate_moe(self)


def validate_moe(c: MoEConfig) -> None:
    _check_int(c, "hidden_size", 1)
    _check_int(c, "num_experts", 1)
    _check_int(c, "expert_hidden", 1)
    _check_int(c, "min_capacity", 0)
    _check_int(c, "num_shared_experts", 0)
    _check_int(c, "shared_expert_hidden", 0)
    _check_choice(c, "activation", ACTIVATIONS)
    _check_choice(c, "router", ROUTERS)
    _check_choice(c, "score_func", SCORE_FUNCS)
    _check_choice(c, "noise_policy", NOISE_POLICIES)
    _check_choice(c, "drop_policy", DROP_POLICIES)
    _check_choice(c, "balance_loss", BALANCE_LOSSES)
    from .moe.experts import KERNELS  # late: experts imports this module

    _check_choice(c, "kernel", KERNELS)
    if c.router != "expert_choice" and not 1 <= c.top_k <= c.num_experts:
        raise ConfigError(f"top_k={c.top_k} is invalid: it must be between 1 and num_experts={c.num_experts}")
    for name in ("capacity_factor", "eval_capacity_factor", "routed_scaling_factor", "noise_eps", "bias_update_rate",
                 "sparsemixer_eps", "swiglu_alpha", "swiglu_limit"):
        _check_finite(c, name)
    if c.router == "expert_choice" and c.capacity_factor <= 0:
        raise ConfigError("capacity_factor must be > 0 for the expert_choice router (each expert takes C = tokens * factor / experts)")
    if c.router == "sparsemixer" and c.top_k != 2:
        raise ConfigError(f"top_k={c.top_k} is invalid for the sparsemixer router: it always picks 2 experts (top_k=2)")
    if c.activation == "clamped_swiglu" and not c.expert_biases:
        raise ConfigError("activation='clamped_swiglu' (GPT-OSS experts) needs expert_biases=true")
    if c.activation == "clamped_swiglu" and c.swiglu_limit <= 0:
        raise ConfigError(f"swiglu_limit={c.swiglu_limit} is invalid: the clamped SwiGLU needs a limit > 0")
    _check_int(c, "n_group", 1)
    _check_int(c, "group_score_experts", 1)
    if c.num_experts % c.n_group:
        raise ConfigError(f"n_group={c.n_group} must divide num_experts={c.num_experts}")
    if not 1 <= c.topk_group <= c.n_group:
        raise ConfigError(f"topk_group={c.topk_group} must be between 1 and n_group={c.n_group}")
    _check_int(c, "num_groups", 1)
    _check_int(c, "aux_router_hidden", 0)
    _check_choice(c, "task_router_input", ("add", "concat"))
    _check_group_sizes(c)
    smallest = min(c.group_sizes) if c.group_sizes else c.num_experts // c.num_groups
    if c.router == "group" and c.top_k > smallest:
        raise ConfigError(
            f"top_k={c.top_k} is invalid for the group router: it must be at most the experts per group "
            f"({smallest})"
        )


def _check_group_sizes(c: MoEConfig) -> None:
    if not c.group_sizes:
        if c.router != "task" and c.num_experts % c.num_groups:  # a task router's tasks share all the experts
            raise ConfigError(f"num_groups={c.num_groups} must divide num_experts={c.num_experts} "
                              f"(or give group_sizes, the experts of each group)")
        return
    sizes = c.group_sizes
    if (len(sizes) != c.num_groups or sum(sizes) != c.num_experts
            or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 1 for n in sizes)):
        raise ConfigError(f"group_sizes={sizes!r} is invalid: it needs num_groups={c.num_groups} integers >= 1 "
                          f"summing to num_experts={c.num_experts}")


def _check_int(c: Any, name: str, lo: int) -> None:
    v = getattr(c, name)
    if not isinstance(v, int) or isinstance(v, bool) or v < lo:
        raise ConfigError(f"{name}={v!r} is invalid: it must be an integer >= {lo}")


def _check_choice(c: Any, name: str, choices: tuple[str, ...]) -> None:
    v = getattr(c, name)
    if v not in choices:
        raise ConfigError(f"{name}={v!r} is unknown: accepted values are {', '.join(choices)}")


def _check_finite(c: Any, name: str) -> None:
    v = getattr(c, name)
    if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
        raise ConfigError(f"{name}={v!r} is invalid: it must be a finite number")


# ---------------------------------------------------------------- generic helpers


def to_dict(cfg: Any) -> dict:
    """A JSON-ready dict of a (nested) dataclass config."""
    return dataclasses.asdict(cfg)


def from_dict(cls: type[T], data: dict, where: str = "config") -> T:
    """Build `cls` from a dict, recursing into nested dataclasses; unknown keys are errors."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where} must be a JSON object, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"unknown key(s) in {where}: {', '.join(unknown)}; accepted keys are {', '.join(sorted(names))}")
    kwargs = {}
    for key, value in data.items():
        tp = hints[key]
        sub = _dataclass_of(tp)
        if sub is not None and isinstance(value, dict):
            kwargs[key] = from_dict(sub, value, f"{where}.{key}")
        else:
            kwargs[key] = _coerce(value, tp, f"{where}.{key}")
    return cls(**kwargs)


def save_json(cfg: Any, path: str | Path) -> None:
    Path(path).write_text(json.dumps(to_dict(cfg), indent=2) + "\n")


def load_json(cls: type[T], path: str | Path) -> T:
    p = Path(path)
    data = read_json(p, ConfigError, missing=f"config file {p} does not exist", invalid=f"config file {p} is not valid JSON")
    return from_dict(cls, data, p.name)


def apply_overrides(cfg: T, overrides: list[str] | tuple[str, ...]) -> T:
    """Return a copy of `cfg` with `key=value` overrides applied (dotted or unique bare keys)."""
    data = to_dict(cfg)
    paths = _leaf_paths(type(cfg))
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key=value")
        key, raw = item.split("=", 1)
        path = _resolve_key(key.strip(), paths)
        tp = paths[path]
        node = data
        for part in path[:-1]:
            node = node[part]
        node[path[-1]] = _parse_value(raw.strip(), tp, ".".join(path))
    return from_dict(type(cfg), data)


def _leaf_paths(cls: type, prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
    out: dict[tuple[str, ...], Any] = {}
    for name, tp in typing.get_type_hints(cls).items():
        if name not in {f.name for f in dataclasses.fields(cls)}:
            continue
        sub = _dataclass_of(tp)
        if sub is not None:
            out.update(_leaf_paths(sub, prefix + (name,)))
        else:
            out[prefix + (name,)] = tp
    return out


def _resolve_key(key: str, paths: dict[tuple[str, ...], Any]) -> tuple[str, ...]:
    dotted = tuple(key.split("."))
    if dotted in paths:
        return dotted
    matches = [p for p in paths if p[-len(dotted):] == dotted]
    if len(matches) == 1:
        return matches[0]
    if not matches:
        close = sorted(".".join(p) for p in paths)
        raise ConfigError(f"unknown config key {key!r}; accepted keys are: {', '.join(close)}")
    raise ConfigError(f"config key {key!r} is ambiguous: use one of {', '.join('.'.join(p) for p in matches)}")


def _dataclass_of(tp: Any) -> type | None:
    if dataclasses.is_dataclass(tp):
        return tp
    for arg in typing.get_args(tp):
        if dataclasses.is_dataclass(arg):
            return arg
    return None


def _parse_value(raw: str, tp: Any, name: str) -> Any:
    """Parse a command-line string into the field's type; JSON for lists and None."""
    base = _base_type(tp)
    if base is str:
        return raw
    if base is bool:
        low = raw.lower()
        if low in ("true", "1", "yes", "on"):
            return True
        if low in ("false", "0", "no", "off"):
            return False
        raise ConfigError(f"{name}={raw!r} is invalid: it must be true or false")
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        raise ConfigError(f"{name}={raw!r} is invalid: expected a value of type {_type_name(tp)}") from None
    return _coerce(value, tp, name)


def _base_type(tp: Any) -> Any:
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if typing.get_origin(tp) in (typing.Union, types.UnionType) and len(args) == 1:
        return _base_type(args[0])
    return typing.get_origin(tp) or tp


def _coerce(value: Any, tp: Any, name: str) -> Any:
    """Check a JSON value against a field type, converting int -> float and list -> list."""
    optional = type(None) in typing.get_args(tp)
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{name} must not be null")
    base = _base_type(tp)
    ok = True
    if base is bool:
        ok = isinstance(value, bool)
    elif base is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif base is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif base is str:
        ok = isinstance(value, str)
    elif base in (list, tuple):
        ok = isinstance(value, (list, tuple))
        value = list(value) if ok else value
    if not ok:
        raise ConfigError(f"{name}={value!r} is invalid: expected a value of type {_type_name(tp)}")
    return value


def _type_name(tp: Any) -> str:
    return getattr(_base_type(tp), "__name__", str(tp))


def field_list(default: list) -> Any:
    """A dataclass field with a mutable list default."""
    return field(default_factory=lambda: list(default))
