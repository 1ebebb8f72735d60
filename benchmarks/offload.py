"""Benchmark: expert offloading, caching and pre-gated prefetch (Pre-gated MoE, mixtral-offloading, MoE-Infinity).

Two models with the same shape (6 MoE layers, 16 experts of 1.5 MB each, top-2, hidden 256, fp32):
  - trained: a `moekit train` run on the Python standard library's source (real routing); pass --run-dir to
    reuse one, otherwise the script trains one (the command is recorded);
  - random-hf: a random-weight Mixtral built with transformers and written with `save_pretrained`, loaded
    with moekit.hf (Hugging Face per-expert / fused layout on disk).
For budgets of 12.5%, 25%, 50% and 100% of all experts, every predictor (none, prefetch-all, next-gate,
the learned pre-gate heads of `moekit pregate`, the oracle, and on the trained model the fine-tuned
pre-gated model) x every cache policy (lru, lfu, lfru, belady), generation of one prompt through the engine (seeded sampling
at temperature 0.8: greedy decoding of a small model falls into repeating itself, which flatters caching), on
three slow tiers:
  - disk: the checkpoint's safetensors file, positional reads, page cache dropped (real reads);
  - emulated r=1 and r=10: host memory behind an EMULATED link whose bandwidth is set from a measured
    ratio r = (time to move one layer's activated experts) / (time to compute one decoder layer at decode).
Reported for the decode phase (prefill excluded): miss rate, bytes moved, time stalled waiting for
experts, decode tokens/s (and the ratio to all-resident decode, timed in the same process). Every run
must produce exactly the all-resident tokens (checked). The oracle prefetches the true next experts (from
the routing trace of the same generation, like Belady's eviction) one layer ahead on the same link: it is
the bound for a predictor, and predictors are compared on stall time and bytes moved per token, never on
miss counts (a prefetch still in flight is no miss but still stalls). The targets (trained model, 25%
budget) are timed with interleaved repetitions. The pre-gated model and its control (the original model
fine-tuned with the same recipe) are fine-tuned in this run; its target is the change against the control.

Writes benchmarks/results/offload.{json,md,png}. Run from the repository root, e.g.:
    moekit train --preset small model.num_layers=6 moe.num_experts=16 moe.expert_hidden=512 \\
        model.hidden_size=256 model.num_heads=4 model.num_kv_heads=2 train.steps=400 --out RUN
    python benchmarks/offload.py --run-dir RUN          # about 35 minutes on a busy 2-core machine
    python benchmarks/offload.py --quick --out /tmp/offload   # a smoke test on a tiny model (writes only with --out)
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _common import command_line, machine_info, target, write_results, RESULTS_DIR  # noqa: E402
from _offload_report import BUDGETS, PREDICTORS, TIMED, markdown, notes, plot  # noqa: E402

from moekit.data.text import Tokenizer  # noqa: E402
from moekit.infer.engine import Engine  # noqa: E402
POLICIES = ("lru", "lfu", "lfru", "belady")  # not lookahead: it needs known routes (benchmarks/expert_batching.py)
from moekit.infer.offload import EmulatedLinkTier, MemoryTier, find_moe_layers  # noqa: E402
from moekit.infer.prefetch import OraclePredictor  # noqa: E402
from moekit.infer.sampling import SamplingConfig  # noqa: E402

NAME = "offload"
COUNTERS = ("accesses", "hits", "misses", "prefetches", "prefetch_used", "predicted", "predicted_correct",
            "demanded_predicted", "transfers", "bytes_moved", "stall_s")
TRAIN_OVERRIDES = ["model.num_layers=6", "moe.num_experts=16", "moe.expert_hidden=512", "model.hidden_size=256",
                   "model.num_heads=4", "model.num_kv_heads=2"]
QUICK_OVERRIDES = ["model.num_layers=3", "moe.num_experts=16", "moe.expert_hidden=64", "model.hidden_size=64",
                   "model.num_heads=4", "model.num_kv_heads=2", "train.batch_size=4", "train.seq_len=64",
                   "train.eval_batches=1", "data.max_bytes=300000"]
GOALS = {"pregate_stall_vs_oracle": 1.5, "stall_vs_on_demand": 0.25, "tokens_per_s_vs_resident": 0.8,
         "val_loss_change_vs_control": 0.02}


# ---------------------------------------------------------------- artefacts: models, heads, pre-gated model


def train_run(work: Path, steps: int, quick: bool) -> tuple[Path, str]:
    run = work / "run"
    overrides = (QUICK_OVERRIDES if quick else TRAIN_OVERRIDES) + [f"train.steps={steps}", "train.eval_every=0"]
    cmd = [sys.executable, "-m", "moekit", "train", "--preset", "small", *overrides, "--out", str(run), "--no-sample", "--quiet"]
    if not (run / "latest").is_file():
        print(f"training: {shlex.join(cmd)}", flush=True)
        subprocess.run(cmd, check=True)
    return run, shlex.join(["moekit", *cmd[3:]])


def build_random_hf(work: Path, like: Engine) -> Path:
    """A random Mixtral with the trained model's shape, built and saved by transformers."""
    from transformers import MixtralConfig, MixtralForCausalLM

    path = work / "random-hf"
    if (path / "config.json").is_file():
        return path
    c, m = like.model.cfg, like.model.cfg.moe
    cfg = MixtralConfig(vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=m.expert_hidden,
                        num_hidden_layers=c.num_layers, num_attention_heads=c.num_heads, num_key_value_heads=c.num_kv_heads,
                        num_local_experts=m.num_experts, num_experts_per_tok=m.top_k, max_position_embeddings=c.max_seq_len,
                        rope_theta=c.rope_theta, rms_norm_eps=c.norm_eps, sliding_window=None, tie_word_embeddings=False,
                        eos_token_id=None, bos_token_id=None, pad_token_id=0)
    torch.manual_seed(0)
    MixtralForCausalLM(cfg).save_pretrained(path)
    return path


def pregate_heads(model_path: Path, out: Path, steps: int, corpus_tokens: torch.Tensor | None, quick: bool) -> dict:
    """Heads for a moekit run (its corpus) or for the HF model (the given byte tokens)."""
    from moekit.data.text import batch_at
    from moekit.train.pregate import REPORT_FILE, distill_pregate, save_pregate_heads, train_pregate

    if (out / REPORT_FILE).is_file():
        return json.loads((out / REPORT_FILE).read_text())
    bs, seq = (4, 64) if quick else (8, 128)
    if corpus_tokens is None:
        return train_pregate(model_path, out, steps=steps, batch_size=bs, seq_len=seq, eval_batches=4, lr=1e-2)
    model = Engine.load(model_path).model
    n = corpus_tokens.numel()
    train, val = corpus_tokens[: int(0.9 * n)], corpus_tokens[int(0.9 * n):]
    heads, report = distill_pregate(model, lambda s: batch_at(train, s, bs, seq, 17)[0],
                                    [batch_at(val, i, bs, seq, 1_000_003)[0] for i in range(4)], steps=steps, lr=1e-2)
    save_pregate_heads(heads, out, report)
    return report


def pregated_model(run: Path, work: Path, steps: int, quick: bool) -> dict:
    """Fine-tune the pre-gated model and its control (the original, same recipe) now, into a fresh directory:
    the target is their difference in this run, never a report read back from an earlier one."""
    import tempfile

    from moekit.train.pregate import finetune_pregated

    out = Path(tempfile.mkdtemp(prefix="pregated-", dir=work))
    bs = 4 if quick else 16
    report = finetune_pregated(run, out, steps=steps, lr=1e-3, batch_size=bs, eval_batches=2 if quick else 8, control=True)
    assert "val_loss_change_vs_control" in report, "finetune_pregated(control=True) reported no change against the control"
    return report


# ---------------------------------------------------------------- runs


def greedy(engine: Engine, prompt: list[int], n: int, on_token=None) -> list[int]:
    """Seeded sampling at temperature 0.8 (greedy decoding of a small model soon repeats itself, and so does its
    routing); offloaded logits are bit-identical, so every run draws exactly the resident tokens."""
    cfg = SamplingConfig(max_new_tokens=n, temperature=0.8, seed=0, stop_token_ids=[])
    return engine.generate_ids([prompt], cfg, on_token=on_token)[0].token_ids


def resident_speed(engine: Engine, prompt, n) -> float:
    greedy(engine, prompt, n)
    return engine.last_stats["decode_tokens_per_s"]


def offloaded_run(engine: Engine, prompt, n: int, want: list[int]) -> dict:
    """One generation; statistics of the decode phase = totals minus those at the first token (end of prefill)."""
    offloader = engine.offloader
    at_prefill: dict = {}

    def on_token(i, tok, text):
        if not at_prefill:
            at_prefill.update(offloader.stats())

    tokens = greedy(engine, prompt, n, on_token)
    total = engine.last_stats["offload"]
    decode = {k: total[k] - at_prefill[k] for k in COUNTERS}
    steps = n - 1
    return {
        "exact": tokens == want,
        "decode_tokens_per_s": engine.last_stats["decode_tokens_per_s"],
        "miss_rate": decode["misses"] / decode["accesses"] if decode["accesses"] else 0.0,
        "misses": decode["misses"], "accesses": decode["accesses"],
        "bytes_per_token": decode["bytes_moved"] / steps,
        "stall_ms_per_token": 1000 * decode["stall_s"] / steps,
        "prefetch_precision": decode["predicted_correct"] / decode["predicted"] if decode["predicted"] else None,
        "prefetch_recall": decode["predicted_correct"] / decode["demanded_predicted"] if decode["demanded_predicted"] else None,
        "prefetches": decode["prefetches"], "prefetch_used": decode["prefetch_used"],
        "transfers": decode["transfers"],
    }


class Setup:
    """Engines of one model on every tier, its prompt, resident tokens and routing trace."""

    def __init__(self, name: str, path: Path, prompt: list[int], n: int, tiers: dict, pregate: Path | None,
                 predictor_alias: str | None = None):
        self.name, self.path, self.prompt, self.n, self.pregate = name, path, prompt, n, pregate
        self.resident = self._engine()
        self.want = greedy(self.resident, prompt, n)
        self._wants = {n: self.want}
        self.engines = {}
        for tier, spec in tiers.items():
            engine = self._engine()
            if spec in ("disk", "memory"):
                engine.offload("100%", tier=spec)
            else:
                weights = [(m.experts.w_in_EHD.detach(), m.experts.w_out_EDF.detach()) for _, m in find_moe_layers(engine.model)]
                engine.offload("100%", tier=EmulatedLinkTier(MemoryTier(weights), spec, 0.0))
            self.engines[tier] = engine
        self._traces: dict = {}
        self.trace = self.trace_for(n) if self.engines else None  # the future for Belady and the oracle

    def trace_for(self, n: int):
        """The routing trace of this very generation (n new tokens), recorded once with nothing prefetched."""
        if n not in self._traces:
            if n not in self._wants:
                self._wants[n] = greedy(self.resident, self.prompt, n)
            first = next(iter(self.engines.values()))
            first.offloader.configure("100%", "lru", "none")
            assert greedy(first, self.prompt, n) == self._wants[n], f"{self.name}: offloaded tokens differ from resident ones"
            self._traces[n] = first.offloader.trace
        return self._traces[n]

    def _engine(self) -> Engine:
        engine = Engine.load(self.path)
        if engine.tokenizer is None:  # the random HF model: byte ids, decoded only to drive the token callback
            engine.tokenizer = Tokenizer.byte_level()
        return engine

    def run(self, tier: str, budget: str, predictor: str, policy: str, n: int | None = None) -> dict:
        engine = self.engines[tier]
        n = n or self.n
        trace = self.trace_for(n) if policy == "belady" or predictor == "oracle" else None
        pred = OraclePredictor(trace) if predictor == "oracle" else predictor  # the same link, the true next experts
        engine.offloader.configure(budget, policy, pred, trace=trace if policy == "belady" else None, pregate=self.pregate)
        if n not in self._wants:  # the timed targets generate more tokens than the grid
            self._wants[n] = greedy(self.resident, self.prompt, n)
        return offloaded_run(engine, self.prompt, n, self._wants[n])


def run_block(setup: Setup, tier: str, budget: str, preds) -> list[dict]:
    """Every predictor x policy for one tier and budget, each run's speed relative to all-resident runs of the
    same model right before and after the block (the busy machine's speed drifts over minutes)."""
    before = [resident_speed(setup.resident, setup.prompt, setup.n) for _ in range(2)]
    rows = []
    for pred in preds:
        for policy in POLICIES:
            rows.append({"tier": tier, "budget": budget, "predictor": pred, "policy": policy,
                         **setup.run(tier, budget, pred, policy)})
    after = [resident_speed(setup.resident, setup.prompt, setup.n) for _ in range(2)]
    resident = statistics.median(before + after)
    for row in rows:
        row["resident_tokens_per_s"] = resident
        row["relative_speed"] = row["decode_tokens_per_s"] / resident
    return rows


def layer_time(setup: Setup, reps: int) -> float:
    """Seconds to compute one decoder layer at decode: resident decode time per token / layers."""
    speeds = [resident_speed(setup.resident, setup.prompt, setup.n) for _ in range(reps)]
    return 1.0 / statistics.median(speeds) / setup.resident.model.cfg.num_layers


def disk_ratio(setup: Setup, t_layer: float) -> float:
    """r of the disk tier: time of a cold read of one layer's top-k experts / time of one layer."""
    offloader = setup.engines["disk"].offloader
    tier, shape = offloader.tier, offloader.shapes[0]
    k = shape.min_slots
    w_in, w_out = torch.empty(shape.H, shape.D, dtype=shape.dtype), torch.empty(shape.D, shape.F, dtype=shape.dtype)
    times = []
    for rep in range(7):
        start = time.perf_counter()
        for e in range(k):
            tier.read(rep % len(offloader.shapes), (rep * k + e) % shape.num_experts, w_in, w_out)
        times.append(time.perf_counter() - start)
    return statistics.median(times) / t_layer


# ---------------------------------------------------------------- the targets, timed with repetitions


def timed_targets(trained: Setup, pregated: Setup | None, reps: int, n: int) -> dict:
    """Interleaved rounds at 25%, r=1, LRU: resident, every predictor on the same link (the pre-gated model too), and
    on-demand from host memory with no link time ('copies-only')."""
    configs = {"resident": None, **{p: (p, trained) for p in TIMED if p != "pregated-model"},
               "copies-only": ("none", trained, "memory")}
    if pregated is not None:
        configs["pregated-model"] = ("next-gate", pregated)
        configs["pregated-resident"] = ("resident", pregated)
    samples = {name: [] for name in configs}
    names = list(configs)
    for r in range(reps + 1):
        order = names[r % len(names):] + names[: r % len(names)]
        for name in order:
            cfg = configs[name]
            if cfg is None:
                samples[name].append({"decode_tokens_per_s": resident_speed(trained.resident, trained.prompt, n)})
            elif cfg[0] == "resident":
                samples[name].append({"decode_tokens_per_s": resident_speed(cfg[1].resident, cfg[1].prompt, n)})
            else:
                result = cfg[1].run(cfg[2] if len(cfg) > 2 else "r=1", "25%", cfg[0], "lru", n)
                assert result["exact"], f"{name}: tokens differ from the resident run"
                samples[name].append(result)
    out = {}
    for name, runs in samples.items():
        runs = runs[1:]  # the first round warms up
        out[name] = {"decode_tokens_per_s": statistics.median(r["decode_tokens_per_s"] for r in runs)}
        if "stall_ms_per_token" in runs[0]:
            stalls = [r["stall_ms_per_token"] for r in runs]
            out[name].update(stall_ms_per_token=statistics.median(stalls), stall_ms_per_token_min=min(stalls),
                             stall_ms_per_token_max=max(stalls),
                             bytes_per_token=statistics.median(r["bytes_per_token"] for r in runs),
                             misses=runs[0]["misses"], rounds=len(runs))
    return out


def make_targets(timed: dict, pregated_report: dict) -> list[dict]:
    """The targets, from the interleaved rounds at 25%, r=1, LRU, and the fine-tune of this run."""
    t = timed
    return [
        target("stall with learned pre-gate / stall with the oracle's prefetch (25%, emulated r=1, lru, same link; "
               "medians over rounds)", t["pregate"]["stall_ms_per_token"] / max(t["oracle"]["stall_ms_per_token"], 1e-9),
               GOALS["pregate_stall_vs_oracle"], "<="),
        target("stall with learned pre-gate / on-demand stall (25%, emulated r=1, lru)",
               t["pregate"]["stall_ms_per_token"] / max(t["none"]["stall_ms_per_token"], 1e-9),
               GOALS["stall_vs_on_demand"], "<="),
        target("decode tokens/s with learned pre-gate / all-resident (25%, emulated r=1, lru)",
               t["pregate"]["decode_tokens_per_s"] / t["resident"]["decode_tokens_per_s"],
               GOALS["tokens_per_s_vs_resident"], ">="),
        target("pre-gated model validation loss change vs the original fine-tuned with the same recipe (control, this run)",
               pregated_report["val_loss_change_vs_control"], GOALS["val_loss_change_vs_control"], "<="),
    ]


def bench_models(specs, prompt, n: int, top_k: int, bytes_per_expert: int, quick: bool, started: float):
    """Every tier x budget x predictor x policy of each model: (models' results, their Setups)."""
    models, setups = {}, {}
    for name, path, model_heads_dir, heads, description in specs:
        print(f"{name}: calibrating ...", flush=True)
        calib = Setup(name, path, prompt, n, {}, model_heads_dir)
        t_layer = layer_time(calib, 3 if quick else 5)
        bandwidth = {f"r={r}": top_k * bytes_per_expert / (r * t_layer) for r in (1, 10)}
        tiers = {"disk": "disk", **bandwidth, **({"memory": "memory"} if name == "trained" else {})}
        setup = Setup(name, path, prompt, n, tiers, model_heads_dir)
        setups[name] = setup
        grid = []
        preds = [p for p in PREDICTORS if p != "pregated-model"]
        for tier in [t for t in setup.engines if t != "memory"]:
            for budget in BUDGETS:
                grid += run_block(setup, tier, budget, preds)
            print(f"  {name} {tier}: {len(grid)} runs, {(time.perf_counter() - started) / 60:.1f} min", flush=True)
        models[name] = {
            "description": description, "path": str(path), "layer_s": t_layer, "bandwidth": bandwidth,
            "bytes_per_expert": bytes_per_expert, "disk_r": disk_ratio(setup, t_layer),
            "resident_tokens_per_s": 1.0 / (t_layer * setup.resident.model.cfg.num_layers),
            "prompt_tokens": len(prompt), "new_tokens": n, "pregate": heads, "grid": grid,
        }

    return models, setups


# ---------------------------------------------------------------- main


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run-dir", help="a `moekit train` run to reuse (default: train one into --work-dir)")
    p.add_argument("--work-dir", default="/tmp/moekit-offload-bench", help="where trained or built artefacts go")
    p.add_argument("--pregate-dir", help="pre-gate heads of the trained model to reuse (default: train them)")
    p.add_argument("--train-command", help="the command that trained --run-dir (recorded in the results)")
    p.add_argument("--train-steps", type=int, default=200)
    p.add_argument("--pregate-steps", type=int, default=300)
    p.add_argument("--finetune-steps", type=int, default=80)
    p.add_argument("--prompt-tokens", type=int, default=48)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--reps", type=int, default=7, help="interleaved repetitions of the timed target runs")
    p.add_argument("--timed-tokens", type=int, default=64, help="new tokens per timed target run")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--quick", action="store_true", help="tiny model and few runs; writes nothing unless --out is given")
    p.add_argument("--out", help=f"directory for {NAME}.json, .md and .png (default {RESULTS_DIR})")
    return p.parse_args()


def main() -> None:
    args = parse_args()
    started = time.perf_counter()
    torch.set_num_threads(args.threads)
    work = Path(args.work_dir) / ("quick" if args.quick else "")
    work.mkdir(parents=True, exist_ok=True)
    train_cmd = None
    if args.run_dir:
        run = Path(args.run_dir)
    else:
        run, train_cmd = train_run(work, 20 if args.quick else args.train_steps, args.quick)

    from moekit.train.lm import load_lm, prepare_data

    _, tokenizer, cfg = load_lm(run)
    data = prepare_data(cfg.data, cfg.train.seq_len, tokenizer)
    prompt = data.val[1000 : 1000 + args.prompt_tokens].tolist()
    n = 8 if args.quick else args.new_tokens
    steps = (10, 4) if args.quick else (args.pregate_steps, args.finetune_steps)

    print("pre-gate heads and pre-gated model ...", flush=True)
    heads_dir = Path(args.pregate_dir) if args.pregate_dir else work / "pregate-trained"
    heads_report = pregate_heads(run, heads_dir, steps[0], None, args.quick)
    pregated_report = pregated_model(run, work, steps[1], args.quick)
    pregated_dir = Path(pregated_report["model_dir"])

    probe = Engine.load(run)
    hf_dir = build_random_hf(work, probe)
    hf_heads = pregate_heads(hf_dir, work / "pregate-random-hf", steps[0] // 2, data.train[:2_000_000], args.quick)
    shape = probe.model.layers[0].mlp.experts
    bytes_per_expert = (shape.w_in_EHD[0].numel() + shape.w_out_EDF[0].numel()) * shape.w_in_EHD.element_size()
    top_k = probe.model.cfg.moe.top_k
    del probe

    models, setups = bench_models((
        ("trained", run, heads_dir, heads_report,
         f"`moekit train` run ({run}), validation loss {pregated_report['val_loss_original']:.3f}"),
        ("random-hf", hf_dir, work / "pregate-random-hf", hf_heads,
         "random-weight Mixtral written by transformers save_pretrained, loaded by moekit.hf"),
    ), prompt, n, top_k, bytes_per_expert, args.quick, started)

    # The fine-tuned pre-gated model: next-gate on it is its exact routing (the "pregated-model" predictor).
    print("pre-gated model ...", flush=True)
    pg = Setup("pregated", pregated_dir, prompt, n, {"disk": "disk", **models["trained"]["bandwidth"]}, None)
    for tier in pg.engines:
        for budget in BUDGETS:
            for row in run_block(pg, tier, budget, ["next-gate"]):
                models["trained"]["grid"].append({**row, "predictor": "pregated-model"})

    print("timed targets ...", flush=True)
    timed = timed_targets(setups["trained"], pg, 2 if args.quick else args.reps, n if args.quick else args.timed_tokens)
    for m in models.values():
        m["runs"] = len(m["grid"])
        m["all_exact"] = all(g["exact"] for g in m["grid"])
    targets = make_targets(timed, pregated_report)
    results = {
        "name": NAME, "command": command_line(), "machine": machine_info("cpu"),
        "train_command": train_cmd or args.train_command or f"(reused run {run})",
        "pregate_heads": {"dir": str(heads_dir), "report": heads_report},
        "seconds": time.perf_counter() - started,
        "targets": targets, "timed_targets": timed, "reps": 2 if args.quick else args.reps,
        "pregated_model": pregated_report, "notes": notes(timed, pregated_report, models["trained"], models.get("random-hf")),
        "emulated": "r=1 and r=10 tiers are an emulated link, not a measured device", "models": models,
    }
    results["seconds"] = time.perf_counter() - started
    if args.quick and not args.out:
        print(json.dumps(targets, indent=1))
        print(markdown(results)[:3000])
        return
    out = Path(args.out) if args.out else RESULTS_DIR
    out.mkdir(parents=True, exist_ok=True)
    plot(results, out / f"{NAME}.png")
    paths = write_results(NAME, results, markdown(results), out)
    print(f"wrote {paths[0]}, {paths[1]} and {NAME}.png in {(time.perf_counter() - started) / 60:.1f} min")
    for t in targets:
        print(f"  {t['name']}: {t['value']} (goal {t['direction']} {t['goal']}): {'met' if t['met'] else 'NOT met'}")


if __name__ == "__main__":
    main()
