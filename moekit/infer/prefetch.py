"""Predicting the next MoE layer's experts, and moving weights in the background.

Predictors share one interface: when MoE layer i's router fires, the
offloader hands the predictor that layer's router input `x_TD`; the
predictor returns the experts MoE layer i+1 will probably use, best first
(or None for no prediction). Chosen by name:

- `none`: on-demand; experts are fetched after the gate fires.
- `prefetch-all`: every expert of the next layer (the MoE-Prefetch baseline),
  most-used first, as many as the next layer's slots hold.
- `next-gate`: training-free; layer i+1's own router applied to layer i's
  hidden state. On a pre-gated model (moekit.models.pregated) this *is* the routing
  layer i+1 will use, so the prediction is exact.
- `pregate`: Pre-gated MoE's learned heads, one per block, trained by
  `moekit pregate` (moekit.train.pregate) by distillation from the real routers;
  one more head predicts the first MoE layer of the next token from the
  last MoE layer of this one.
- `oracle`: the true next experts, read from a RoutingTrace recorded on the
  very same generation (expert_cache.RoutingTrace, as the belady cache
  policy uses); the bound of prefetching one layer ahead on the same link.
  Built as `OraclePredictor(trace)` or `build_predictor("oracle", trace=...)`.
- `lookahead`: for a layer-shared router (Read-ME), the routes known ahead
  (the offloader's `RouteWindow`): layer i+1 uses layer i's experts, so
  they are fetched while layer i computes. Exact; it does not wrap to the
  next step (whose tokens are not sampled yet).

Transfers run asynchronously: a single background thread on CPU (a serial
link: one transfer at a time; demand fetches before prefetches, wrong
prefetches cancelled before they start), a copy stream with events on CUDA
(in order). Errors raised by a transfer are kept and re-raised at the next
wait, so a failed read can never be computed with.

Not here: which slot an expert goes to (expert_cache.py), where weights
come from and the bookkeeping of a step (offload/offloader.py), training the learned
heads (moekit.train.pregate).

Shape legend: T tokens, D hidden, E experts of the predicted layer, K top-k.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from collections import deque
from pathlib import Path

import torch

from ..errors import MoekitError
from ..models.pregated import load_pregate_heads, moe_layers_of

PREDICTORS = ("none", "prefetch-all", "next-gate", "pregate", "oracle", "lookahead")


class PredictorError(MoekitError, ValueError):
    """An unknown predictor or one that cannot be built for this model."""


# ---------------------------------------------------------------- predictors


class Predictor:
    """Experts of MoE layer i+1, best first, from MoE layer i's router input.

    A predictor that `wraps` also predicts, from the last MoE layer's input,
    the first MoE layer's experts of the next token (`predict(L-1, x)`).
    """

    name = "base"
    wraps = False

    def bind(self, moe_layers: list, usage: list[list[int]], routes=None) -> None:
        """Called once by the offloader: the model's MoE layers in order, per-layer use counts, known routes."""
        self.moe_layers = moe_layers
        self.usage = usage
        self.routes = routes

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
        self.wraps = "wrap" in heads

    @torch.no_grad()
    def predict(self, layer, x_TD):
        last = layer == len(self.top_k) - 1
        key = "wrap" if last else str(layer)
        if key not in self.heads:
            return None
        head = self.heads[key]
        logits_TE = head(x_TD.to(head.weight.dtype))
        k = min(self.top_k[0 if last else layer + 1], logits_TE.shape[-1])
        probs_TE = logits_TE.float().softmax(-1)
        weight_TK, idx_TK = probs_TE.topk(k, dim=-1)
        return rank_assignments(idx_TK.reshape(-1), weight_TK.reshape(-1), logits_TE.shape[-1])


class OraclePredictor(Predictor):
    """The experts each MoE layer will really use, from a routing trace of this same generation.

    `trace.steps[j][s]` holds the experts MoE layer j used at its step s. When
    layer j's gate fires at step s, the oracle names layer j+1's experts of
    step s, and from the last layer those of layer 0 at step s+1 (it wraps).
    The step is counted per layer, and checked against the offloader's use
    counts (`usage`), so a trace of another generation is refused.
    """

    name = "oracle"
    wraps = True

    def __init__(self, trace) -> None:
        self.trace_steps = [list(map(list, layer)) for layer in trace.steps]
        self.ends = []  # ends[j][s]: experts used by layer j in its steps 0..s together (the running sum of use counts)
        for layer in self.trace_steps:
            total, ends = 0, []
            for experts in layer:
                total += len(experts)
                ends.append(total)
            self.ends.append(ends)

    def bind(self, moe_layers, usage, routes=None):
        super().bind(moe_layers, usage, routes)
        if len(self.trace_steps) != len(moe_layers):
            raise PredictorError(f"the routing trace for the oracle has {len(self.trace_steps)} MoE layers, the model "
                                 f"{len(moe_layers)}: record it on the same model, prompt and settings")
        self.calls = [0] * len(moe_layers)

    def predict(self, layer, x_TD):
        step = self.calls[layer]
        self.calls[layer] += 1
        ends = self.ends[layer]
        if step >= len(ends) or ends[step] != sum(self.usage[layer]):
            raise PredictorError(f"the routing trace for the oracle does not match this generation at MoE layer {layer}, "
                                 f"step {step}: record it on the same prompt and settings")
        nxt, step = (layer + 1, step) if layer + 1 < len(self.trace_steps) else (0, step + 1)
        steps = self.trace_steps[nxt]
        return list(steps[step]) if step < len(steps) else None


class LookaheadPredictor(Predictor):
    """Known routes (expert_cache.RouteWindow): layer i's experts of this step are layer i+1's.

    It does not wrap: the next step's tokens are sampled after the last layer, so which rows decode
    next (and their experts) is a guess from the plan; measured on the Read-ME tests, such guesses
    were wrong for a third of the prefetches and raised the loads above on-demand fetching.
    """

    name = "lookahead"

    def predict(self, layer, x_TD):
        routes = self.routes
        if routes is None or routes.now is None or layer + 1 >= len(self.moe_layers):
            return None
        experts = routes.experts_at(routes.now)
        if experts is None or (routes.slots is not None and len(experts) > routes.slots):
            return None  # more than the slots hold: the layer computes in waves, resident experts first
        return experts


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


def build_predictor(name: str, pregate: str | Path | None = None, model=None, trace=None) -> Predictor:
    """A predictor by name; `pregate` needs the directory written by `moekit pregate`, `oracle` a RoutingTrace."""
    if name not in PREDICTORS:
        raise PredictorError(f"unknown predictor {name!r}: accepted predictors are {', '.join(PREDICTORS)}")
    if name == "pregate":
        if pregate is None:
            raise PredictorError("the pregate predictor needs the heads trained by `moekit pregate CKPT --out DIR` (pass that DIR)")
        return load_pregate_predictor(pregate, model)
    if name == "oracle":
        if trace is None:
            raise PredictorError("the oracle predictor needs a routing trace recorded on the same generation "
                                 "(OraclePredictor(trace), or pass trace=)")
        return OraclePredictor(trace)
    return {"none": NoPredictor, "prefetch-all": PrefetchAll, "next-gate": NextGate, "lookahead": LookaheadPredictor}[name]()


def load_pregate_predictor(directory: str | Path, model):
    """The `pregate` predictor of moekit.infer.prefetch, from a directory written by `moekit pregate`."""
    if model is None:
        raise PredictorError("the pregate predictor needs the model to check the heads against")
    heads = load_pregate_heads(directory, model)
    return LearnedPreGate(heads.heads, [m.cfg.top_k for m in moe_layers_of(model)])


# ---------------------------------------------------------------- asynchronous transfers


class Transfer:
    """A transfer in flight. `wait()` blocks until it is done and returns the seconds spent blocked."""

    def wait(self) -> float:
        raise NotImplementedError

    def done(self) -> bool:
        raise NotImplementedError


def _sleep_until(deadline: float) -> None:
    remaining = deadline - time.perf_counter()
    if remaining > 2e-4:
        time.sleep(remaining - 1e-4)
    while time.perf_counter() < deadline:  # the last ~100 us spin: sleep overshoots by about that much
        pass


class _DoneTransfer(Transfer):
    def wait(self) -> float:
        return 0.0

    def done(self) -> bool:
        return True


DONE = _DoneTransfer()


class _ThreadTransfer(Transfer):
    """A job of the transfer thread: queued, running, done or cancelled."""

    __slots__ = ("fn", "event", "error", "state", "urgent", "cost", "submitted", "deadline")

    def __init__(self, fn: Callable[[], None], urgent: bool, cost: float | None):
        self.fn, self.urgent, self.cost = fn, urgent, cost
        self.event = threading.Event()
        self.error: BaseException | None = None
        self.state = "queued"
        self.submitted = time.perf_counter()
        self.deadline = 0.0  # emulated link: when the modelled transfer ends

    def done(self) -> bool:
        return self.event.is_set() and time.perf_counter() >= self.deadline

    def wait(self) -> float:
        start = time.perf_counter()
        ready = self.event.is_set() and start >= self.deadline
        if not self.event.is_set():
            self.event.wait()
        if self.state == "cancelled":
            raise RuntimeError("waited for a cancelled expert transfer")
        if self.error is not None:
            raise self.error
        if ready:
            return 0.0
        _sleep_until(self.deadline)
        return time.perf_counter() - start


class ThreadTransferQueue:
    """CPU: one background thread moves the experts, one at a time (one link), urgent ones first.

    Behind an emulated link each transfer also has a modelled cost: the link
    is busy from max(link free, submission) for `cost` seconds, and a waiter
    sleeps until that modelled end on its own clock. The copy itself runs
    right away, so the timing does not depend on how fast the busy machine
    wakes this thread up (reproducible experiments).

    A demand fetch (the gate has fired, the computation waits) is urgent and
    goes before queued prefetches; a prefetch the step turned out to need is
    promoted; one that turned out wrong, or whose expert was evicted, is
    cancelled before it starts. A running transfer is never interrupted.
    """

    kind = "thread"

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._urgent: deque[_ThreadTransfer] = deque()
        self._normal: deque[_ThreadTransfer] = deque()
        self._error: BaseException | None = None
        self._closed = False
        self._link_free = 0.0
        self._thread = threading.Thread(target=self._run, name="moekit-offload", daemon=True)
        self._thread.start()

    def submit(self, layer: int, fn: Callable[[], None], urgent: bool = False, cost: float | None = None) -> Transfer:
        """Queue `fn` (the copy); `cost`: seconds it occupies an emulated link (None: as long as fn takes)."""
        self.check()
        job = _ThreadTransfer(fn, urgent, cost)
        with self._cond:
            if self._closed:
                raise RuntimeError("the transfer queue is closed")
            (self._urgent if urgent else self._normal).append(job)
            self._cond.notify()
        return job

    def _run(self) -> None:
        while True:
            with self._cond:
                while not (self._urgent or self._normal or self._closed):
                    self._cond.wait()
                if not (self._urgent or self._normal):
                    return
                job = (self._urgent or self._normal).popleft()
                job.state = "running"
                if job.cost is not None:  # an emulated link: the transfer occupies it in modelled time
                    job.deadline = max(self._link_free, job.submitted) + job.cost
                    self._link_free = job.deadline
            try:
                job.fn()
            except BaseException as e:  # kept for the job's waiter and for every later check
                job.error = e
                with self._cond:
                    if self._error is None:
                        self._error = e
            job.state = "done"
            job.event.set()
            if job.cost is not None:
                # The next transfer starts when the link is free; until then urgent ones may still jump the queue.
                # (A plain sleep, no spinning: the deadlines are modelled, this thread's wake-up need not be exact.)
                remaining = self._link_free - time.perf_counter()
                if remaining > 0:
                    time.sleep(remaining)

    def promote(self, transfer: Transfer) -> None:
        """A queued prefetch the computation now waits for goes to the front."""
        with self._cond:
            if isinstance(transfer, _ThreadTransfer) and transfer.state == "queued" and not transfer.urgent:
                self._normal.remove(transfer)
                transfer.urgent = True
                self._urgent.append(transfer)

    def cancel(self, transfer: Transfer) -> bool:
        """Drop a transfer that has not started; False if it is running or done."""
        with self._cond:
            if not isinstance(transfer, _ThreadTransfer) or transfer.state != "queued":
                return False
            (self._urgent if transfer.urgent else self._normal).remove(transfer)
            transfer.state = "cancelled"
        transfer.event.set()
        return True

    def retire(self, transfer: Transfer) -> None:
        """The transfer's slot is being reused: make sure it will not write there later."""
        if not self.cancel(transfer) and not transfer.done():
            transfer.event.wait()

    def check(self) -> None:
        """Re-raise the first error of any transfer (even one nobody waits for)."""
        with self._cond:
            error = self._error
        if error is not None:
            raise error

    def layer_done(self, layer: int) -> None:
        """CPU kernels are synchronous: a slot is free as soon as the layer's forward returns."""

    def drain(self) -> None:
        self.submit(-1, lambda: None).event.wait()

    def close(self) -> None:
        with self._cond:
            for job in list(self._urgent) + list(self._normal):
                job.state = "cancelled"
                job.event.set()
            self._urgent.clear()
            self._normal.clear()
            self._closed = True
            self._cond.notify()
        self._thread.join()


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

    def submit(self, layer: int, fn: Callable[[], None], urgent: bool = False) -> Transfer:
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

    def promote(self, transfer: Transfer) -> None:
        """Copies are already on the stream in order; nothing to reorder."""

    def cancel(self, transfer: Transfer) -> bool:
        return False

    def retire(self, transfer: Transfer) -> None:
        """Stream order already puts a later copy into the same slot after this one."""

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
