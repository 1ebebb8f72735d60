"""Continuous batching: requests join and leave one running batch between decode steps.

`Scheduler` keeps up to `max_batch` sequences in one KV cache and advances
them together, one token per sequence per step, running the model's own
forward (as `Engine` does). Between steps, finished and cancelled sequences
leave and waiting requests join: the prompts waiting at that moment are
prefilled together in one left-padded pass (as `Engine.generate` prefills a
batch; each with its own rotary positions from 0) straight into their cache
rows, so what a request computes does not depend on what else is running
beyond the padding masks.

The cache has one shared time axis: each decode step writes every row's new
token at the same column `cursor`; a per-row key mask (`valid`) says which
columns belong to which row. A joining prompt of L tokens takes the L columns
just before the cursor in its row; when the axis is full (or a prompt does not
fit before the cursor) the rows are compacted: each row's valid columns are
moved, in order, to end at a new cursor (keys carry their rotary positions, so
moving columns changes nothing a query computes). Active rows always occupy
rows 0..n-1 of the cache: a leaving row is replaced by the last one.

Each request has its own `SamplingConfig` and, when sampling, its own seeded
generator, so a seeded request gives the same tokens alone or in a batch.
Stopping (stop ids, stop strings, the token budget) uses the engine's
`SequenceState` bookkeeping; finish reasons are "stop", "length" or "cancelled".

Known routes: when the model routes ahead (it offers `route_ahead`, as a
Read-ME model's decoupled router does: every token's experts follow from
the token ids, the same in every layer), each row is routed one token ahead
with its own router cache, and at most `step_tokens` rows decode per step,
chosen by expert (moekit.infer.expert_batching's rule: rows whose next
token needs no new expert first, then the biggest groups; a row that has
waited `max_wait` steps goes first, so none starves). The experts go to the
forward as group ids (the router is not run twice), and the plan of the
coming steps is handed to an offloader's route window (the lookahead cache
policy and predictor): the rule replayed over the known next tokens, rows
decoded meanwhile coming back with their last experts (a guess: a
request's tokens tend to stay on its experts). A subset decodes into its own rows of the cache at
the step's column; the others' key masks leave that column out, so every
request still computes what it computes alone (a cache whose model counts a
sliding window in columns, `contiguous_rows`, is compacted before a row with
such a gap decodes again). `batching="fifo"` takes the
longest-waiting rows instead (the baseline).

The cache is driven only through its row interface (moekit.cache_rows: a
view of some rows, move a row, compact a row), so every family's cache
(K/V, MLA's latents, Mixture-of-Depths choices, a router cache) moves the
same way. Group ids (a task, a modality): a request may carry one
(`group_id`); its prompt and new tokens route with it, as
`Engine.generate_ids(group_ids=[g])` routes them; without one a token's
group comes from the model's token ranges.

Faults stay with the requests they touch: an exception in a prefill fails
that prefill's requests, in a decode forward the rows it decoded, in one
row's sampling or bookkeeping that row alone. Each gets one "error" event
("internal error: ...", its traceback logged), its row is freed, and every
other request goes on.

Not here: HTTP, request validation and text formatting (moekit.server), the
one-shot batch loop (engine.py), sampling rules (sampling.py), routing
statistics (moekit.moe.stats; gathered here through `ServeStats`).

Shape legend: B rows in the batch, L prompt length, M cache columns, V vocabulary.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque

import torch

from ..errors import MoekitError
from .engine import Completion
from .sequence import SequenceState
from .groups import check_group_id, prompt_groups, token_groups_of
from .expert_batching import Pending, expert_aware_pick, fifo_pick, plan_steps
from .sampling import make_generator, next_tokens
from .serve_requests import EventCallback, QueueFullError, Request, ShuttingDownError, Row
from .serve_stats import ServeStats

PREFILL_TOKENS = 4096  # most padded prompt tokens prefilled in one forward pass
PLAN_STEPS = 32  # known routes: coming steps planned for the lookahead cache
log = logging.getLogger("moekit.scheduler")


class Scheduler:
    """A continuous-batching generation loop over an Engine's model (see the module docstring)."""

    def __init__(self, engine, max_batch: int = 8, max_queue: int = 64, stats: ServeStats | None = None,
                 step_tokens: int | None = None, max_wait: int = 8, batching: str = "expert") -> None:
        if max_batch < 1 or max_queue < 0:
            raise MoekitError(f"max_batch={max_batch} must be >= 1 and max_queue={max_queue} >= 0")
        if step_tokens is not None and step_tokens < 1 or max_wait < 0 or batching not in ("expert", "fifo"):
            raise MoekitError(f"step_tokens={step_tokens} must be >= 1, max_wait={max_wait} >= 0 and batching="
                              f"{batching!r} one of expert, fifo")
        self.engine, self.model = engine, engine.model
        self.max_batch, self.max_queue = max_batch, max_queue
        self.step_tokens, self.max_wait, self.batching = min(step_tokens or max_batch, max_batch), max_wait, batching
        self.route_ahead = getattr(self.model, "route_ahead", None)  # the capability of known routes (module docstring)
        self.now = 0  # decode steps so far
        self.max_len = self.model.cfg.max_seq_len
        self.cache = self.model.new_cache(max_batch, self.max_len)
        self.valid = torch.zeros(max_batch, self.max_len, dtype=torch.bool, device=engine.device)
        self.cursor = 0
        self.rows: list[Row] = []
        self.waiting: deque[Request] = deque()
        self.stats = stats or ServeStats()
        self._cond = threading.Condition()
        self._accepting = True
        self._stop = False
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------ public, thread-safe

    def submit(self, request: Request) -> Request:
        """Queue a request (its prompt and group id are checked here); raises QueueFullError when the queue is full."""
        self.engine.check_prompts([request.prompt_ids])
        check_group_id(self.model.cfg, request.group_id)
        with self._cond:
            if not self._accepting:
                raise ShuttingDownError("the server is shutting down: not accepting new requests")
            if len(self.waiting) >= self.max_queue + max(0, self.max_batch - len(self.rows)):
                raise QueueFullError(f"the request queue is full ({self.max_queue} waiting): try again later")
            self.waiting.append(request)
            self._cond.notify()
        return request

    @property
    def busy(self) -> bool:
        return bool(self.rows or self.waiting)

    def start(self) -> None:
        """Run the loop in a background thread."""
        self._thread = threading.Thread(target=self._loop, name="moekit-scheduler", daemon=True)
        self._thread.start()

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stop accepting; let running requests finish for up to `timeout` s, then cancel the rest."""
        with self._cond:
            self._accepting = False
        deadline = time.monotonic() + timeout
        while self.busy and time.monotonic() < deadline and self._thread is not None and self._thread.is_alive():
            time.sleep(0.02)
        with self._cond:
            for r in list(self.waiting) + [row.request for row in self.rows]:
                r.cancel()
            self._stop = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(timeout=5.0)
        if self._thread is None:  # never started: finish what is queued as cancelled
            self.step()

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self.busy and not self._stop:
                    self._cond.wait()
                if self._stop and not self.busy:
                    return
            try:
                self.step()
            except Exception as e:  # noqa: BLE001 - a failed step outside a forward must not kill the server
                self._fail_all(e)
            if self._stop:
                self.step()  # deliver the cancellations
                return

    def run_until_idle(self, max_steps: int = 100_000) -> None:
        """Step in this thread until nothing is running or waiting (tests, benchmarks)."""
        for _ in range(max_steps):
            if not self.busy:
                return
            self.step()

    # ------------------------------------------------------------ one iteration

    @torch.no_grad()
    def step(self) -> None:
        """Drop cancelled rows, admit waiting requests, then decode one token for every running row."""
        for i in reversed(range(len(self.rows))):
            if self.rows[i].request.cancelled:
                self._finish(i, "cancelled")
        self._admit()
        if self.rows:
            self._decode()
        self.stats.set_load(len(self.rows), len(self.waiting))

    def _admit(self) -> None:
        """Take waiting requests into free rows, prefilling those that arrived together in one pass."""
        group: list[Request] = []
        with self._cond:
            while self.waiting and len(self.rows) + len(group) < self.max_batch:
                longest = max([len(self.waiting[0].prompt_ids), *(len(r.prompt_ids) for r in group)])
                if group and longest * (len(group) + 1) > PREFILL_TOKENS:
                    break
                group.append(self.waiting.popleft())
        for request in [r for r in group if r.cancelled]:
            self._emit_done(request, SequenceState(0, len(request.prompt_ids), self.engine.tokenizer, []), "cancelled")
        group = [r for r in group if not r.cancelled]
        if group:
            self._prefill(group)

    def _prefill(self, group: list[Request]) -> None:
        """Left-padded prefill of the group into rows n.., each prompt ending just before the cursor.

        If the group's forward fails, each request is prefilled alone, so only those that fail alone fail."""
        n, k = len(self.rows), len(group)
        try:
            logits_BV, caches = self._prefill_forward(group)
        except Exception as e:  # noqa: BLE001 - the failing requests fail, the others go on
            self.valid[n : n + k] = False
            if k == 1:
                self._internal_error([group[0]], e, "a prefill")
            else:
                for r in group:
                    self._prefill([r])
            return
        dev = self.engine.device
        for b, r in enumerate(group):
            cfg, L = r.cfg, len(r.prompt_ids)
            generator = None if cfg.greedy else make_generator(cfg.seed, dev)
            row = Row(r, SequenceState(0, L, self.engine.tokenizer, cfg.stop_strings), generator,
                      min(cfg.max_new_tokens, self.max_len - L))
            row.router_cache, row.arrival, row.ready_at = caches[b], self.now, self.now
            self.rows.append(row)
        for b in reversed(range(k)):  # reversed: a finished row is replaced by the last one
            self._sample_row(n + b, logits_BV[b : b + 1], None)

    def _prefill_forward(self, group: list[Request]):
        """The group's one forward pass into rows n..: (last logits [k, V], each request's router cache or None)."""
        lens = [len(r.prompt_ids) for r in group]
        P, n, k, dev = max(lens), len(self.rows), len(group), self.engine.device
        if self.cursor < P or self.cursor >= self.max_len:
            self._compact(min_cursor=P)
        start = self.cursor - P
        ids_BP = torch.zeros(k, P, dtype=torch.long)
        keep_BP = torch.zeros(k, P, dtype=torch.bool)
        for b, r in enumerate(group):
            ids_BP[b, P - lens[b]:] = torch.tensor(r.prompt_ids, dtype=torch.long)
            keep_BP[b, P - lens[b]:] = True
        ids_BP, keep_BP = ids_BP.to(dev), keep_BP.to(dev)
        self.valid[n : n + k] = False
        self.valid[n : n + k, start : self.cursor] = keep_BP
        positions = (keep_BP.long().cumsum(-1) - 1).clamp_min(0)
        mask = keep_BP if min(lens) < P else None
        if self.route_ahead is not None:
            caches, group_ids = self._route_prompts(group, P)
            self._publish([group_ids.unique().tolist()])
        else:
            caches, group_ids = [None] * k, prompt_groups(self.model.cfg, group, P, dev)
        out = self.model(ids_BP, attention_mask_BK=mask, positions_BT=positions, kv_cache=self.cache.rows(slice(n, n + k), start),
                         cache_start=0, group_ids_BT=group_ids, last_only=True)
        self.stats.add_routings(out.routings, sum(lens), keep_BP.flatten())
        return out.logits[:, -1], caches

    def _decode(self) -> None:
        """One token for the chosen rows; if their forward fails, each is run alone, and only those failing alone fail."""
        if self.cursor >= self.max_len:
            self._compact()
        chosen = self._choose()
        if self.cache.contiguous_rows and not bool(self.valid[chosen, self.cursor - 1].all()):
            self._compact()  # a row that sat out a step has a gap, and a sliding window counts columns
        c = self.cursor
        try:
            outcomes = [(chosen, self._decode_forward(chosen, c), None)]
        except Exception as e:  # noqa: BLE001 - the failing rows fail, the others go on
            outcomes = [(chosen, None, e)] if len(chosen) == 1 else [self._decode_alone(i, c) for i in chosen]
        self.cursor, self.now = c + 1, self.now + 1
        self.stats.decode_step(len(chosen))
        sampled, failed = [], []
        for indices, result, error in outcomes:
            for b, i in enumerate(indices):
                row = self.rows[i]
                row.position, row.ready_at = row.position + 1, self.now
                if error is not None:
                    failed.append((row, error))
                else:
                    logits_BV, greedy = result
                    sampled.append((row, logits_BV[b : b + 1], greedy[b : b + 1] if greedy is not None else None))
        for row, error in failed:  # rows are found by identity: removing one moves the last row into its place
            self._fail_rows([self.rows.index(row)], error, "a decode step")
        for row, logits_1V, greedy_1 in sampled:
            self._sample_row(self.rows.index(row), logits_1V, greedy_1)

    def _decode_alone(self, i: int, c: int):
        try:
            return [i], self._decode_forward([i], c), None
        except Exception as e:  # noqa: BLE001
            return [i], None, e

    def _decode_forward(self, chosen: list[int], c: int):
        """One token for each chosen row at column c: (logits [b, V], their argmax or None)."""
        dev = self.engine.device
        rows = [self.rows[i] for i in chosen]
        everyone = len(chosen) == len(self.rows)
        idx = torch.tensor(chosen, dtype=torch.long, device=dev)
        ids_B1 = torch.tensor([[r.next_token] for r in rows], dtype=torch.long, device=dev)
        pos_B1 = torch.tensor([[r.position] for r in rows], dtype=torch.long, device=dev)
        if self.route_ahead is not None:
            group_ids = torch.tensor([[r.experts] for r in rows], device=dev)
        else:
            group_ids = token_groups_of(self.model.cfg, [r.request.group_id for r in rows], [[r.next_token] for r in rows], dev)
        self.valid[idx, c] = True
        mask = self.valid[: len(rows), : c + 1] if everyone else self.valid[idx, : c + 1]
        out = self.model(ids_B1, attention_mask_BK=mask, positions_BT=pos_B1, cache_start=c, group_ids_BT=group_ids,
                         kv_cache=self.cache if everyone else self.cache.rows(idx), last_only=True)
        self.stats.add_routings(out.routings, len(rows))
        logits_BV = out.logits[:, -1]
        return logits_BV, (logits_BV.argmax(-1) if any(r.request.cfg.greedy for r in rows) else None)

    def _sample_row(self, i: int, logits_1V: torch.Tensor, greedy_1) -> None:
        """Row i's next token from its logits (its own settings); a failure here fails row i alone."""
        row = self.rows[i]
        try:
            cfg = row.request.cfg
            tok = (greedy_1 if greedy_1 is not None and cfg.greedy and row.penalties is None
                   else next_tokens(logits_1V, cfg, row.generator, row.penalties))
            self._take(i, tok)
        except Exception as e:  # noqa: BLE001
            if i < len(self.rows) and self.rows[i] is row:
                self._fail_rows([i], e, "a row's sampling")

    # ------------------------------------------------------------ known routes

    def _choose(self) -> list[int]:
        """Rows decoding this step, ascending: all of them, or `step_tokens` by expert (or longest waiting)."""
        n = len(self.rows)
        if n <= self.step_tokens:
            chosen = list(range(n))
        else:
            chosen = sorted(self._pick(self._pending(range(n))))
        if self.route_ahead is not None and self.engine.offloader is not None:  # the lookahead cache's window
            rest = [i for i in range(n) if i not in set(chosen)]
            now = sorted({e for i in chosen for e in self.rows[i].experts})
            again = [Pending(0, self.rows[i].arrival, self.rows[i].experts) for i in chosen]
            self._publish([now] + plan_steps(self._pending(rest, wait=1) + again, self._pick, PLAN_STEPS, served_again=True))
        return chosen

    def _publish(self, steps: list[list[int]]) -> None:
        """The expert sets of the coming forward passes, for an offloader's lookahead policy and predictor."""
        offloader = self.engine.offloader
        if offloader is not None and offloader.configured:
            offloader.routes.plan(steps)

    def _pending(self, rows, wait: int = 0) -> list[Pending]:
        return [Pending(self.now - self.rows[i].ready_at + wait, self.rows[i].arrival, self.rows[i].experts) for i in rows]

    def _pick(self, pending: list[Pending]) -> list[int]:
        if self.batching == "expert" and self.route_ahead is not None:
            return expert_aware_pick(pending, self.step_tokens, self.max_wait)
        return fifo_pick(pending, self.step_tokens)

    def _route_prompts(self, group: list[Request], P: int):
        """(each request's own router cache, [k, P, K] experts of the left-padded prompts) (pads: the first token's)."""
        caches, rows = [], []
        for r in group:
            cache = self.model.new_router_cache(1, self.max_len)
            ids_1L = torch.tensor([r.prompt_ids], dtype=torch.long, device=self.engine.device)
            experts_LK = self.route_ahead(ids_1L, cache, 0)[0]
            caches.append(cache)
            rows.append(torch.cat([experts_LK[:1].expand(P - len(r.prompt_ids), -1), experts_LK]))
        return caches, torch.stack(rows)

    def _route_next(self, row: Row) -> None:
        """Route the row's next token ahead (its experts, from its own router cache)."""
        ids_11 = torch.tensor([[row.next_token]], dtype=torch.long, device=self.engine.device)
        row.experts = tuple(self.route_ahead(ids_11, row.router_cache, row.position)[0, 0].tolist())

    def _take(self, i: int, tok_1: torch.Tensor) -> None:
        """Row i sampled `tok_1`: record it, emit its text, and finish the row if it stopped."""
        row = self.rows[i]
        stop_ids = set(self.engine.stop_token_ids if row.request.cfg.stop_token_ids is None
                       else row.request.cfg.stop_token_ids)
        tok = int(tok_1.item())
        needs_text = self.engine.tokenizer is not None
        request = row.request
        row.seq.add(tok, stop_ids, needs_text, None)
        if not row.seq.done:
            request.on_event("token", (tok, self._new_text(row) if needs_text else ""))
        self.stats.token(request)
        if row.seq.done:
            self._finish(i, row.seq.finish_reason)
        elif len(row.seq.ids) >= row.budget:
            self._finish(i, "length")
        else:
            row.next_token = tok
            if self.route_ahead is not None:
                self._route_next(row)

    @staticmethod
    def _new_text(row: Row) -> str:
        """Text not sent yet, holding back what could still become the start of a stop string."""
        stops = row.request.cfg.stop_strings
        end = len(row.seq.text) - (max(map(len, stops)) - 1 if stops else 0)
        new = row.seq.text[row.emitted:end] if end > row.emitted else ""
        row.emitted += len(new)
        return new

    # ------------------------------------------------------------ rows and the cache axis

    def _finish(self, i: int, reason: str) -> None:
        row = self._remove(i)
        self._emit_done(row.request, row.seq, reason, row.emitted)

    def _remove(self, i: int) -> Row:
        """Take row i out: the last row moves into its place (cache rows included, through the row interface)."""
        row = self.rows[i]
        last = len(self.rows) - 1
        if i != last:
            self.cache.move_row(last, i, self.cursor)
            self.valid[i] = self.valid[last]
            self.rows[i] = self.rows[last]
        self.valid[last] = False
        self.rows.pop()
        if not self.rows:
            self.cursor = 0
        return row

    def _emit_done(self, request: Request, seq: SequenceState, reason: str, emitted: int = 0) -> None:
        if reason != "cancelled" and seq.tokenizer is not None:
            seq.flush(None)
        request.finish_reason = reason
        done = seq.result()
        if reason != "cancelled" and len(done.text) > emitted:
            request.on_event("token", (None, done.text[emitted:]))
        self.stats.finished(request, reason)
        request.on_event("done", Completion(done.text, done.token_ids, reason, done.prompt_tokens))

    def _compact(self, min_cursor: int = 0) -> None:
        """Move each row's valid columns, in order, to end at a new cursor (>= min_cursor)."""
        n = len(self.rows)
        counts = self.valid[:n].sum(-1).tolist()
        new_cursor = max([min_cursor, *counts])
        for r in range(n):
            cols = self.valid[r].nonzero().flatten()
            dst = slice(new_cursor - len(cols), new_cursor)
            self.cache.compact(r, cols, new_cursor)
            self.valid[r] = False
            self.valid[r, dst] = True
        self.cursor = new_cursor

    # ------------------------------------------------------------ faults

    def _fail_rows(self, indices: list[int], error: BaseException, where: str) -> None:
        """Rows `indices` fail with one internal error each (their rows freed); the others go on."""
        removed = [self._remove(i) for i in sorted(indices, reverse=True)]
        self._internal_error([row.request for row in removed], error, where)

    def _internal_error(self, requests: list[Request], error: BaseException, where: str) -> None:
        """Log the traceback once, then send each request one "error" event."""
        log.error("%s failed for %d request(s)", where, len(requests), exc_info=error)
        message = f"internal error: {type(error).__name__}: {error}"
        for request in requests:
            request.finish_reason = "error"
            try:
                self.stats.finished(request, "error")
                request.on_event("error", message)
            except Exception:  # noqa: BLE001 - a broken listener must not stop the others' errors
                log.exception("delivering an error event failed")

    def _fail_all(self, error: BaseException) -> None:
        """A failure outside any forward (the step's own bookkeeping): every request fails, the cache starts over."""
        with self._cond:
            requests = [row.request for row in self.rows] + list(self.waiting)
            self.waiting.clear()
        self.rows.clear()
        self.valid.zero_()
        self.cursor = 0
        self.cache.reset()
        self._internal_error(requests, error, "a scheduler step")


__all__ = ["Scheduler", "Request", "QueueFullError", "ShuttingDownError", "EventCallback", "check_group_id"]
