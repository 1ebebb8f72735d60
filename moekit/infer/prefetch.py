"""Predicting the next MoE layer's experts, and moving weights in the background.

Predictors share one interface: when MoE layer i's router fires, the
offloader hands the predictor that layer's router input `x_TD`; the
predictor returns the experts MoE layer i+1 will probably use, best first
(or None for no prediction). Chosen by name:

- `none`: on-demand; experts are fetched after the gate fires.
- `prefetch-all`: every expert of the next layer (the MoE-Prefetch baseline),
  most-used first, as many as the next layer's slots hold.
- `next-gate`: training-free; layer i+1's own router applied to layer i's
  hidden state. On a pre-gated model (moekit.pregate) this *is* the routing
  layer i+1 will use, so the prediction is exact.
- `pregate`: Pre-gated MoE's learned heads, one per block, trained by
  `moekit pregate` (moekit.pregate) by distillation from the real routers.

Transfers run asynchronously: a single background thread on CPU (a serial
link: one transfer at a time, in the order asked), a copy stream with
events on CUDA. Errors raised by a transfer are kept and re-raised at the
next wait, so a failed read can never be computed with.

Not here: which slot an expert goes to (expert_cache.py), where weights
come from and the bookkeeping of a step (offload.py), training the learned
heads (moekit.pregate).

Shape legend: T tokens, D hidden, E experts of the predicted layer, K top-k.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch

from ..errors import MoekitError

PREDICTORS = ("none", "prefetch-all", "next-gate", "pregate")


class PredictorError(MoekitError, ValueError):
    """An unknown predictor or one that cannot be built for this model."""


# ---------------------------------------------------------------- predictors


class Predictor:
    """Experts of MoE layer i+1, best first, from MoE layer i's router input."""

    name = "base"

    def bind(self, moe_layers: list, usage: list[list[int]]) -> None:
        """Called once by the offloader: the model's MoE layers in order, and per-layer use counts."""
        self.moe_layers = moe_layers
        self.usage = usage

    def predict(self, layer: int, x_TD: torch.Tensor) -> list[int] | None:
        return None


class NoPredictor(Predictor):
    name = "none"


class PrefetchAll(Predictor):
    """Every expert of the next layer, the ones used most so far first."""

    name = "prefetch-all"

    def predict(self, layer, x_TD):
        if layer + 1 >= len(self.moe_layers):
            return None
        counts = self.usage[layer + 1]
        return sorted(range(len(counts)), key=lambda e: (-counts[e], e))


class NextGate(Predictor):
    """Layer i+1's router on layer i's router input (exact on a pre-gated model)."""

    name = "next-gate"

    @torch.no_grad()
    def predict(self, layer, x_TD):
        if layer + 1 >= len(self.moe_layers):
            return None
        router = self.moe_layers[layer + 1].router
        if hasattr(type(router), "select"):  # the routing decision alone, without losses
            idx_TK, weight_TK = type(router).select(router, x_TD)  # the class's: skip pre-gating wrappers
            return rank_assignments(idx_TK.reshape(-1), weight_TK.reshape(-1), router.cfg.num_experts)
        routing = router.forward(x_TD)  # .forward, not __call__: skip the hooks the offloader put on that router
        return rank_assignments(routing.expert_idx_N, routing.weight_N, routing.num_experts)


class LearnedPreGate(Predictor):
    """Pre-gated MoE heads: `heads[i]` maps layer i's router input to logits over layer i+1's experts."""

    name = "pregate"

    def __init__(self, heads: torch.nn.ModuleDict, top_k: list[int]):
        self.heads = heads
        self.top_k = top_k

    @torch.no_grad()
    def predict(self, layer, x_TD):
        head = self.heads[str(layer)] if str(layer) in self.heads else None
        if head is None:
            return None
        logits_TE = head(x_TD.to(head.weight.dtype) if hasattr(head, "weight") else x_TD)
        k = min(self.top_k[layer + 1], logits_TE.shape[-1])
        probs_TE = logits_TE.float().softmax(-1)
        weight_TK, idx_TK = probs_TE.topk(k, dim=-1)
        return rank_assignments(idx_TK.reshape(-1), weight_TK.reshape(-1), logits_TE.shape[-1])


def rank_assignments(expert_idx_N: torch.Tensor, weight_N: torch.Tensor, num_experts: int) -> list[int]:
    """The experts named in the assignments, by total routing weight (then by id)."""
    if expert_idx_N.numel() <= 16:  # decode: a few assignments, cheaper in Python
        totals: dict[int, float] = {}
        for e, w in zip(expert_idx_N.tolist(), weight_N.tolist()):
            totals[e] = totals.get(e, 0.0) + w
        return sorted(totals, key=lambda e: (-totals[e], e))
    total_E = torch.zeros(num_experts, dtype=torch.float32, device=expert_idx_N.device)
    total_E.index_add_(0, expert_idx_N, weight_N.to(torch.float32))
    chosen = torch.zeros(num_experts, dtype=torch.bool, device=expert_idx_N.device)
    chosen[expert_idx_N] = True
    ids = chosen.nonzero().flatten().tolist()
    totals = total_E.tolist()
    return sorted(ids, key=lambda e: (-totals[e], e))


def build_predictor(name: str, pregate: str | Path | None = None, model=None) -> Predictor:
    """A predictor by name; `pregate` needs the directory written by `moekit pregate`."""
    if name not in PREDICTORS:
        raise PredictorError(f"unknown predictor {name!r}: accepted predictors are {', '.join(PREDICTORS)}")
    if name == "pregate":
        if pregate is None:
            raise PredictorError("the pregate predictor needs the heads trained by `moekit pregate CKPT --out DIR` (pass that DIR)")
        from ..pregate import load_pregate_predictor

        return load_pregate_predictor(pregate, model)
    return {"none": NoPredictor, "prefetch-all": PrefetchAll, "next-gate": NextGate}[name]()


# ---------------------------------------------------------------- asynchronous transfers


class Transfer:
    """A transfer in flight. `wait()` blocks until it is done and returns the seconds spent blocked."""

    def wait(self) -> float:
        raise NotImplementedError

    def done(self) -> bool:
        raise NotImplementedError


class _DoneTransfer(Transfer):
    def wait(self) -> float:
        return 0.0

    def done(self) -> bool:
        return True


DONE = _DoneTransfer()


class _ThreadTransfer(Transfer):
    def __init__(self, future: Future, queue: "ThreadTransferQueue"):
        self.future = future
        self.queue = queue

    def done(self) -> bool:
        return self.future.done()

    def wait(self) -> float:
        if self.future.done():
            self.future.result()  # re-raises the transfer's error
            return 0.0
        start = time.perf_counter()
        self.future.result()
        return time.perf_counter() - start


class ThreadTransferQueue:
    """CPU: one background thread runs transfers in the order they were submitted (one link, serial)."""

    kind = "thread"

    def __init__(self) -> None:
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="moekit-offload")
        self._error: BaseException | None = None
        self._lock = threading.Lock()

    def submit(self, layer: int, fn: Callable[[], None]) -> Transfer:
        self.check()

        def run():
            try:
                fn()
            except BaseException as e:
                with self._lock:
                    if self._error is None:
                        self._error = e
                raise

        return _ThreadTransfer(self._executor.submit(run), self)

    def check(self) -> None:
        """Re-raise the first error of any transfer (even one nobody waits for)."""
        with self._lock:
            error = self._error
        if error is not None:
            raise error

    def layer_done(self, layer: int) -> None:
        """CPU kernels are synchronous: a slot is free as soon as the layer's forward returns."""

    def drain(self) -> None:
        self._executor.submit(lambda: None).result()

    def close(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)


class _EventTransfer(Transfer):
    """CUDA: the compute stream waits on the copy's event; the host never blocks."""

    def __init__(self, event, queue: "CudaTransferQueue"):
        self.event = event
        self.queue = queue

    def done(self) -> bool:
        return self.event.query()

    def wait(self) -> float:
        stream = torch.cuda.current_stream(self.queue.device)
        if not self.event.query():
            need = torch.cuda.Event(enable_timing=True)
            need.record(stream)
            self.queue.stall_events.append((need, self.event))
        stream.wait_event(self.event)
        return 0.0  # the stall is measured on the device, see CudaTransferQueue.stall_seconds


class CudaTransferQueue:
    """CUDA: copies from pinned host memory run on a dedicated copy stream, ordered by events.

    Before a copy overwrites a slot of layer i, the copy stream waits for the
    event recorded after layer i's last computation (`layer_done`), so a slot
    is never overwritten while a kernel still reads it. The compute stream
    waits on each copy's event before it uses the slot. Stall time is the
    device time between "the compute stream needed the expert" and "the copy
    finished", summed over waits (read once the device is synchronised).
    """

    kind = "cuda-stream"

    def __init__(self, device) -> None:
        self.device = torch.device(device)
        self.stream = torch.cuda.Stream(self.device)
        self.free_events: dict[int, object] = {}
        self.stall_events: list[tuple[object, object]] = []

    def submit(self, layer: int, fn: Callable[[], None]) -> Transfer:
        done = torch.cuda.Event(enable_timing=True)
        with torch.cuda.stream(self.stream):
            if layer in self.free_events:
                self.stream.wait_event(self.free_events[layer])
            fn()
            done.record(self.stream)
        return _EventTransfer(done, self)

    def layer_done(self, layer: int) -> None:
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(self.device))
        self.free_events[layer] = event

    def stall_seconds(self) -> float:
        torch.cuda.synchronize(self.device)
        total = sum(max(0.0, need.elapsed_time(done)) for need, done in self.stall_events) / 1000.0
        self.stall_events.clear()
        return total

    def check(self) -> None:
        pass

    def drain(self) -> None:
        self.stream.synchronize()

    def close(self) -> None:
        self.drain()
