"""Live serving statistics: request and token counters, latencies, batch size, MoE expert load.

`ServeStats` is what the continuous-batching scheduler reports to while it
runs: tokens (time to first token, inter-token latency), finished requests,
decode batch sizes, and the per-layer expert load of every forward pass, both
since start and over the last `window` tokens (a ring of per-step counts).
`moe_report` turns that, plus the offloader's counters when experts are
offloaded, into the plain dict `GET /v1/moe/stats` returns. The hooks
(`on_ttft`, `on_itl`, `on_batch`, `on_finished`) do nothing here; the server's
Prometheus metrics override them.

Not here: Prometheus itself (moekit.server.metrics), the load summary rules
(moekit.moe.stats.LoadTracker: dead and overloaded experts).

Shape legend: E experts.
"""

from __future__ import annotations

import threading
import time
from collections import deque

import torch

from ..moe.stats import LoadTracker


class ServeStats:
    """Counters the scheduler updates from its thread; readers take a consistent copy under a lock."""

    def __init__(self, window: int = 1024) -> None:
        self.window = window
        self.started = time.time()
        self.total = LoadTracker()
        self._recent: deque[tuple[int, dict[int, torch.Tensor]]] = deque()
        self._recent_tokens = 0
        self._lock = threading.Lock()
        self.requests: dict[str, int] = {}
        self.generated_tokens = 0
        self.prompt_tokens = 0
        self.running = 0
        self.waiting = 0

    # ------------------------------------------------------------ from the scheduler

    def add_routings(self, routings, num_tokens: int, keep_T: torch.Tensor | None = None) -> None:
        """Expert load of one forward pass; `keep_T` marks the real tokens (padding is not counted)."""
        counts = {i: _counts(r, keep_T) for i, r in enumerate(routings) if r is not None}
        if not counts:
            return
        with self._lock:
            for layer, c_E in counts.items():
                self.total.counts[layer] = self.total.counts.get(layer, torch.zeros_like(c_E)) + c_E
            self._recent.append((num_tokens, counts))
            self._recent_tokens += num_tokens
            while len(self._recent) > 1 and self._recent_tokens - self._recent[0][0] >= self.window:
                self._recent_tokens -= self._recent.popleft()[0]

    def token(self, request) -> None:
        now = time.perf_counter()
        if request.last_token_at is None:
            self.on_ttft(now - request.submitted_at)
        else:
            self.on_itl(now - request.last_token_at)
        request.last_token_at = now
        request.tokens += 1
        self.generated_tokens += 1

    def decode_step(self, batch_size: int) -> None:
        self.on_batch(batch_size)

    def finished(self, request, reason: str) -> None:
        self.requests[reason] = self.requests.get(reason, 0) + 1
        self.prompt_tokens += len(request.prompt_ids)
        self.on_finished(request, reason)

    def set_load(self, running: int, waiting: int) -> None:
        self.running, self.waiting = running, waiting

    # hooks (the server's Prometheus metrics override these)
    def on_ttft(self, seconds: float) -> None: ...
    def on_itl(self, seconds: float) -> None: ...
    def on_batch(self, batch_size: int) -> None: ...
    def on_finished(self, request, reason: str) -> None: ...

    # ------------------------------------------------------------ for readers

    def moe_report(self, offloader=None) -> dict:
        """Per-layer expert load since start and over the last `window` tokens; offloading counters."""
        with self._lock:
            recent = LoadTracker()
            for _, counts in self._recent:
                for layer, c_E in counts.items():
                    recent.counts[layer] = recent.counts.get(layer, torch.zeros_like(c_E)) + c_E
            since_start = _rows(self.total)
            last = _rows(recent)
            recent_tokens = self._recent_tokens
        report = {
            "uptime_s": time.time() - self.started,
            "since_start": {"layers": since_start},
            "recent": {"window_tokens": self.window, "tokens": recent_tokens, "layers": last},
            "offload": None,
        }
        if offloader is not None:
            s = offloader.stats()
            report["offload"] = {
                "tier": s.get("tier"), "budget": s.get("budget"), "policy": s.get("policy"),
                "predictor": s.get("predictor"), "accesses": s["accesses"], "hits": s["hits"],
                "misses": s["misses"], "cache_hit_rate": s["hit_rate"],
                "prefetch_precision": s["prefetch_precision"], "prefetch_recall": s["prefetch_recall"],
                "bytes_moved": s["bytes_moved"], "transfers": s["transfers"], "stall_s": s["stall_s"],
                "fallbacks": s.get("fallbacks", 0), "quantization": s.get("quantization"),
                "emulated": s.get("emulated"),
            }
        return report


def _counts(r, keep_T: torch.Tensor | None) -> torch.Tensor:
    if keep_T is None:
        return r.counts_E.detach().cpu().long()
    expert_N = r.expert_idx_N[keep_T[r.token_idx_N]]
    return torch.bincount(expert_N, minlength=r.num_experts).cpu().long()


def _rows(tracker: LoadTracker) -> list[dict]:
    rows = tracker.summary_rows()
    for row in rows:
        row["load"] = tracker.counts[row["layer"]].tolist()
    return rows


__all__ = ["ServeStats"]
