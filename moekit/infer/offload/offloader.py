"""The Offloader: fast slots, per-layer caches, background transfers, prediction and statistics of an offloaded model.

Not here: building it on a model (transform.py), tiers (tiers.py, disk.py), cache policies
(infer/expert_cache.py), predictors and transfer queues (infer/prefetch.py).
"""

from __future__ import annotations

from dataclasses import asdict
from functools import partial
from pathlib import Path

import torch
import torch.nn as nn

from ...moe.experts import Experts
from ...moe.layers import MoELayer
from ..expert_cache import POLICIES, ExpertCache, RouteWindow, RoutingTrace, build_policy
from ..prefetch import PREDICTORS, CudaTransferQueue, Predictor, ThreadTransferQueue, build_predictor
from .budget import Budget, LayerShape, OffloadError
from .experts import OffloadedExperts, _make_slots, slot_parts
from .fallback import fallback_bytes
from .stats import LayerStats, summarize
from .tiers import EmulatedLinkTier, SlowTier


# ---------------------------------------------------------------- the offloader


class Offloader:
    """Owns the fast slots, caches, transfers, predictor and statistics of an offloaded model.

    Built once per model and slow tier (`offload_model`); `configure` sets (or
    changes) the budget, policy and predictor, starting from empty slots.
    """

    def __init__(self, model: nn.Module, moe_layers: list[tuple[str, MoELayer]], tier: SlowTier, shapes: list[LayerShape],
                 device: torch.device | None = None, fallback: list | None = None):
        self.model = model
        self.fallback = fallback  # per layer, every expert's resident int4 copy (fallback.py), or None
        self._fallen: list[set[int]] = [set() for _ in shapes]  # this step's misses computed from that copy
        self.paths = [name for name, _ in moe_layers]
        self.layers = [m for _, m in moe_layers]
        self.tier = tier
        self.shapes = shapes
        self.device = device or self.layers[0].experts.w_in_EHD.device
        self.queue = CudaTransferQueue(self.device) if self.device.type == "cuda" else ThreadTransferQueue()
        self._hooks = []
        self._inputs: list[torch.Tensor | None] = [None for _ in shapes]
        self._demand: list[list[int] | None] = [None for _ in shapes]
        self._open = [False for _ in shapes]
        self._slots: list[Experts] = []
        self.caches: list[ExpertCache] = []
        self.experts: list[OffloadedExperts] = []
        for j, (layer, shape) in enumerate(zip(self.layers, shapes)):
            old = layer.experts
            layer.experts = OffloadedExperts(self, j, shape, old.activation, old.kernel)
            self.experts.append(layer.experts)
            self._hooks.append(layer.register_forward_pre_hook(partial(self._on_layer_input, j)))
            self._hooks.append(layer.router.register_forward_hook(partial(self._on_route, j)))
        self.configured = False
        model._moekit_offloader = self  # the experts are swapped for good: offload_model refuses a second time

    def configure(self, budget: str | float | Budget, policy: str = "lru", predictor: str | Predictor = "none", *,
                  trace: RoutingTrace | None = None, pregate: str | Path | None = None, lfru_half_life: float = 8.0) -> "Offloader":
        """(Re)start with empty fast slots for `budget`, cache `policy` and `predictor`; statistics reset."""
        if policy not in POLICIES:
            raise OffloadError(f"unknown cache policy {policy!r}: accepted policies are {', '.join(POLICIES)}")
        if isinstance(predictor, str) and predictor not in PREDICTORS:
            raise OffloadError(f"unknown predictor {predictor!r}: accepted predictors are {', '.join(PREDICTORS)}")
        if policy == "belady" and trace is None:
            raise OffloadError("the belady cache policy needs a routing trace of the same generation (record one first)")
        budget = Budget.parse(budget)
        num_slots = budget.slots(self.shapes)
        pred = predictor if isinstance(predictor, Predictor) else build_predictor(predictor, pregate, self.model, trace=trace)
        self.queue.drain()
        self.queue.check()
        options = {"half_life": lfru_half_life} if policy == "lfru" else {}
        self.routes = RouteWindow(min(num_slots))  # routes known ahead (a layer-shared router): the lookahead policy and predictor
        options = {"routes": self.routes} if policy == "lookahead" else options
        self.caches = [
            ExpertCache(s.num_experts, n, build_policy(policy, j, trace, **options), j)
            for j, (s, n) in enumerate(zip(self.shapes, num_slots))
        ]
        self._slots, self._slot_parts = [], []
        for j, (shape, n) in enumerate(zip(self.shapes, num_slots)):
            slots = _make_slots(n, shape, self.experts[j].activation, self.device, self.experts[j].kernel)
            self.experts[j].slots = slots
            self._slots.append(slots)
            self._slot_parts.append(slot_parts(slots, shape))
        self.budget, self.num_slots, self.policy_name, self.predictor = budget, num_slots, policy, pred
        self.transfers: list[dict] = [{} for _ in self.shapes]
        self.prefetched: list[set[int]] = [set() for _ in self.shapes]
        self.predicted: list[list[int] | None] = [None for _ in self.shapes]
        self.usage = [[0] * s.num_experts for s in self.shapes]
        self.trace = RoutingTrace()
        self.layer_stats = [LayerStats() for _ in self.shapes]
        self._open = [False for _ in self.shapes]
        self._demand = [None for _ in self.shapes]
        self.predictor.bind(self.layers, self.usage, self.routes)
        self.configured = True
        return self

    # ------------------------------------------------------------ one step of a layer

    def _on_layer_input(self, j: int, module, args) -> None:
        # The MoE layer's own input (a pre-gated model feeds its router the previous layer's instead).
        self._inputs[j] = args[0] if args else None

    def _on_route(self, j: int, module, args, routing) -> None:
        """Layer j's gate fired (MoELayer.forward): fetch its missing experts, start prefetching layer j+1's."""
        x = self._inputs[j]
        self._inputs[j] = None
        idx_N = routing.expert_idx_N
        demand = sorted(set(idx_N.tolist())) if idx_N.numel() <= 64 else idx_N.unique().tolist()
        self._begin_step(j, demand)
        self._demand[j] = demand
        if x is not None:
            self._predict_next(j, x)

    def _predict_next(self, j: int, x: torch.Tensor) -> None:
        """x: layer j's MoE input, [B, T, D] (or [T, D] for single-position steps)."""
        x = x.detach()
        if j + 1 < len(self.layers):
            self._prefetch(j + 1, self.predictor.predict(j, x.reshape(-1, x.shape[-1])))
        elif self.predictor.wraps:  # the first layer of the next token, from each sequence's last position
            self._prefetch(0, self.predictor.predict(j, x[:, -1] if x.dim() == 3 else x))

    def _begin_step(self, j: int, demand: list[int]) -> None:
        if not self.configured:
            raise OffloadError("the offloaded model has no fast tier yet: call configure(budget, ...)")
        if self._open[j]:  # a step left open (its computation failed): close it first
            self._end_step(j)
        self.queue.check()
        cache, st = self.caches[j], self.layer_stats[j]
        self.routes.begin(cache.time, demand)
        cache.begin_step(demand)
        self._open[j] = True
        self.trace.record(j, demand)
        usage = self.usage[j]
        for e in demand:
            usage[e] += 1
        st.steps += 1
        st.accesses += len(demand)
        predicted = self.predicted[j]
        if predicted is not None:
            st.predicted += len(predicted)
            st.predicted_correct += len(set(predicted).intersection(demand))
            st.demanded_predicted += len(demand)
        st.prefetch_used += len(self.prefetched[j].intersection(demand))
        self._settle_prefetches(j, demand)
        missing = [e for e in demand if e not in cache]
        st.hits += len(demand) - len(missing)
        st.misses += len(missing)
        if self.fallback is not None:  # HOBBIT: misses compute from their int4 copy; full copies come in the background
            self._fallen[j] = set(missing)
            st.fallbacks += len(missing)
            for e in missing:
                self._fetch(j, e, set(demand), demand=False)
            return
        if len(demand) <= cache.num_slots:
            keep = set(demand)
            for e in missing:
                self._fetch(j, e, keep, demand=True)
        # More experts than slots (a large batch): _compute fetches them in waves.

    def _settle_prefetches(self, j: int, demand: list[int]) -> None:
        """The gate fired: prefetches it needs jump the queue; wrong ones not yet started are cancelled."""
        transfers, needed = self.transfers[j], set(demand)
        for e in needed:
            t = transfers.get(e)
            if t is not None and not t.done():
                self.queue.promote(t)
        for e in [e for e in self.prefetched[j] if e not in needed]:
            t = transfers.get(e)
            if t is not None and self.queue.cancel(t):
                transfers.pop(e)
                self.caches[j].drop(e)
                self.prefetched[j].discard(e)
                st = self.layer_stats[j]
                st.transfers -= 1
                st.bytes_moved -= self._moved_bytes(j, e)
                st.prefetches_cancelled += 1

    def _fetch(self, j: int, expert: int, keep: set[int], demand: bool) -> bool:
        cache, st = self.caches[j], self.layer_stats[j]
        placed = cache.place(expert, keep, demand=demand)
        if placed is None:
            if demand:
                raise RuntimeError(f"no slot can be freed for expert {expert} of MoE layer {j}")
            return False
        slot, evicted = placed
        if evicted is not None:
            old = self.transfers[j].pop(evicted, None)
            if old is not None:
                self.queue.retire(old)  # a queued write into this slot must not land after the new one
            self.prefetched[j].discard(evicted)
        dst = tuple(t[slot] for t in self._slot_parts[j])
        if isinstance(self.tier, EmulatedLinkTier) and isinstance(self.queue, ThreadTransferQueue):
            # The queue models the link's time; the copy itself runs as soon as the transfer starts.
            read = partial(self.tier.inner.read, j, expert, *dst)
            cost = self.tier.cost(self.shapes[j].bytes_per_expert)
            self.transfers[j][expert] = self.queue.submit(j, read, urgent=demand, cost=cost)
        else:
            read = partial(self.tier.read, j, expert, *dst)
            self.transfers[j][expert] = self.queue.submit(j, read, urgent=demand)
        st.transfers += 1
        st.bytes_moved += self._moved_bytes(j, expert)
        return True

    def _moved_bytes(self, j: int, expert: int) -> int:
        """What one transfer of `expert` takes from the tier: its stored size there (a GGUF's blocks), else the slot's."""
        n = self.tier.read_bytes(j, expert)
        return self.shapes[j].bytes_per_expert if n is None else n

    def _prefetch(self, j: int, ranked: list[int] | None) -> None:
        cache = self.caches[j]
        if ranked is None:
            self.predicted[j] = None
            return
        top = list(ranked[: cache.num_slots])
        self.predicted[j] = top
        keep = set(top)
        for e in top:
            if e not in cache:
                if not self._fetch(j, e, keep, demand=False):
                    break
                self.prefetched[j].add(e)
                self.layer_stats[j].prefetches += 1
            cache.protect([e])

    def _wait(self, j: int, experts: list[int]) -> None:
        st, transfers = self.layer_stats[j], self.transfers[j]
        for e in experts:
            st.stall_s += transfers[e].wait()
        self.queue.check()

    def _end_step(self, j: int) -> None:
        if not self._open[j]:
            return
        self._open[j] = False
        self._demand[j] = None
        self.queue.layer_done(j)
        self.caches[j].end_step()
        self._fallen[j] = set()
        self.prefetched[j].clear()
        self.predicted[j] = None

    def _compute(self, j: int, x_ND: torch.Tensor, rows_E: torch.Tensor, kernel: str) -> torch.Tensor:
        cache, slots = self.caches[j], self._slots[j]
        rows = rows_E.tolist()
        if not self._open[j]:  # called without the router hook: the rows say who is needed
            self._begin_step(j, [e for e, r in enumerate(rows) if r])
        demand = self._demand[j]
        # Padded layouts give every expert rows; only the experts the router chose need their weights.
        needed = [e for e in (demand if demand is not None else range(len(rows))) if rows[e]]
        fallen = sorted(e for e in needed if e in self._fallen[j])
        if fallen:
            needed = [e for e in needed if e not in self._fallen[j]]
        starts = [0] * len(rows)
        for e in range(1, len(rows)):
            starts[e] = starts[e - 1] + rows[e - 1]
        waves = self._waves(cache, needed) if needed else []
        pad_to = max((rows[e] for e in needed), default=0) if kernel == "bmm" else 0
        out = None
        try:
            if fallen:
                out = self._compute_fallback(j, x_ND, rows, starts, fallen)
            for wave in waves:
                if len(waves) > 1:
                    cache.pinned = set(wave)
                for e in wave:
                    if e not in cache:
                        self._fetch(j, e, set(wave), demand=True)
                self._wait(j, wave)
                out = self._compute_wave(j, slots, x_ND, rows, starts, wave, kernel, out, pad_to)
                self.queue.layer_done(j)
        except BaseException:
            self._forget_failed(j)
            raise
        finally:
            self._end_step(j)
        return out if out is not None else x_ND.new_zeros(x_ND.shape[0], self.shapes[j].D)

    def _compute_fallback(self, j: int, x_ND, rows, starts, experts: list[int]) -> torch.Tensor:
        """The experts' rows computed from their resident int4 copies (the whole output, zero elsewhere)."""
        copy = self.fallback[j]
        counts = [0] * len(rows)
        for e in experts:
            counts[e] = rows[e]
        idx = torch.cat([torch.arange(starts[e], starts[e] + rows[e]) for e in experts]).to(x_ND.device)
        counts_E = torch.tensor(counts, device=x_ND.device)
        x = x_ND[idx]
        y = copy(x, counts_E, kernel=copy.kernel_for(x, counts_E))
        out = y.new_zeros(x_ND.shape[0], y.shape[1])
        out[idx] = y
        return out

    def _waves(self, cache: ExpertCache, active: list[int]) -> list[list[int]]:
        if len(active) <= cache.num_slots:
            return [active]
        # Experts already in the fast tier go first, so none of them is evicted before it is used.
        order = [e for e in active if e in cache] + [e for e in active if e not in cache]
        return [sorted(order[i : i + cache.num_slots]) for i in range(0, len(order), cache.num_slots)]

    def _compute_wave(self, j, slots: Experts, x_ND, counts, starts, wave, kernel, out, pad_to):
        """The wave's experts on their slots: tokens reordered from expert order to slot order and back.

        pad_to (bmm): every expert gets that many rows, the step's largest count, as in the resident
        layer's padded batch, so each expert's matmul has the same shape and gives the same bits.
        """
        cache = self.caches[j]
        counts_S = [0] * cache.num_slots
        by_slot = sorted(wave, key=lambda e: cache.slot_of[e])
        for e in wave:
            counts_S[cache.slot_of[e]] = pad_to or counts[e]
        counts_S = torch.tensor(counts_S, device=x_ND.device)
        rows = torch.cat([torch.arange(starts[e], starts[e] + counts[e]) for e in by_slot]).to(x_ND.device)
        if pad_to:
            at = torch.cat([torch.arange(i * pad_to, i * pad_to + counts[e]) for i, e in enumerate(by_slot)]).to(x_ND.device)
            x_in = x_ND.new_zeros(len(by_slot) * pad_to, x_ND.shape[1]).index_copy_(0, at, x_ND[rows])
            y = slots(x_in, counts_S, kernel=kernel)[at]
        elif out is None and by_slot == wave and rows.numel() == x_ND.shape[0]:
            return slots(x_ND, counts_S, kernel=kernel)  # slot order == expert order: nothing to reorder
        else:
            y = slots(x_ND[rows], counts_S, kernel=kernel)
        if out is None:
            out = y.new_zeros(x_ND.shape[0], y.shape[1])
        out[rows] = y
        return out

    def _forget_failed(self, j: int) -> None:
        """After an error, forget every expert whose transfer did not finish cleanly (its slot may be torn)."""
        for e, t in list(self.transfers[j].items()):
            try:
                ok = t.done() and t.wait() == 0.0
            except BaseException:
                ok = False
            if not ok:
                self.caches[j].drop(e)
                self.transfers[j].pop(e, None)

    # ------------------------------------------------------------ public

    def stats(self) -> dict:
        """Counters since the last reset: hits, misses, prefetch precision/recall, bytes moved, stall time."""
        if isinstance(self.queue, CudaTransferQueue):
            self.layer_stats[-1].stall_s += self.queue.stall_seconds()
        summary = summarize(self.layer_stats)
        summary.update(
            tier=self.tier.label,
            tier_kind=self.tier.kind,
            emulated=self.tier.emulated,
            budget=self.budget.text,
            slots_per_layer=list(self.num_slots),
            experts_per_layer=[s.num_experts for s in self.shapes],
            fast_bytes=sum(n * s.bytes_per_expert for n, s in zip(self.num_slots, self.shapes)),
            total_expert_bytes=sum(s.num_experts * s.bytes_per_expert for s in self.shapes),
            bytes_per_expert=[s.bytes_per_expert for s in self.shapes],
            quantization=self.shapes[0].stored_as,
            low_bit_fallback=self.fallback is not None,
            fallback_bytes=fallback_bytes(self.fallback),
            policy=self.policy_name,
            predictor=self.predictor.name,
            layers=[asdict(s) for s in self.layer_stats],
        )
        return summary

    def reset_stats(self) -> None:
        self.layer_stats = [LayerStats() for _ in self.shapes]

    def drain(self) -> None:
        """Wait for every transfer in flight (e.g. before timing a new phase)."""
        self.queue.drain()
        self.queue.check()

    def close(self) -> None:
        """Stop the transfer thread and close the slow tier (the model can no longer run)."""
        for h in self._hooks:
            h.remove()
        self._hooks = []
        self.queue.close()
        self.tier.close()
        self.configured = False

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
