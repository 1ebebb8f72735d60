"""Benchmark: moekit's MoELayer against transformers' MoE blocks and a dense MLP of equal FLOPs.

Two shapes, fp32, 4096 tokens, forward and forward+backward:
  (a) fine-grained, OLMoE-like: hidden 512, 64 experts, top-8, expert width 256;
  (b) coarse, Mixtral-like:     hidden 512, 8 experts,  top-2, expert width 1792.
Peers, in the same process and timed interleaved with moekit: transformers'
`OlmoeSparseMoeBlock` / `MixtralSparseMoeBlock` with every experts
implementation it registers (those that cannot run here are listed with the
reason), and a dense SwiGLU MLP of width top_k * expert width (the same
active FLOPs). All MoE blocks share one set of weights, so they route alike;
the script checks that moekit's output equals transformers'.

Writes benchmarks/results/moe_layer.json and .md. Run from the repository root:
    python benchmarks/moe_layer.py
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _common import (  # noqa: E402
    command_line, interleaved_times, load_average, machine_info, markdown_table, median, paired_ratio, target,
    write_results,
)

from moekit.config import MoEConfig  # noqa: E402
from moekit.moe.layers import MoELayer  # noqa: E402
from moekit.modules import SwiGLU  # noqa: E402

SHAPES = {
    "a": {"label": "fine-grained, OLMoE-like", "family": "olmoe", "hidden": 512, "experts": 64, "top_k": 8, "width": 256},
    "b": {"label": "coarse, Mixtral-like", "family": "mixtral", "hidden": 512, "experts": 8, "top_k": 2, "width": 1792},
}
# forward+backward goals: moekit / best transformers implementation, moekit / dense MLP
GOALS = {"a": (1.3, 0.9), "b": (1.0, 0.9)}
MEMORY_LIMIT_BYTES = 4 * 2**30  # peers that would need more than this are reported, not run
SLOW_FACTOR = 1.5  # transformers implementations this much slower than its fastest get 2 fwd / 1 fwd+bwd calls


def hf_block(shape: dict, implementation: str) -> torch.nn.Module:
    if shape["family"] == "olmoe":
        from transformers import OlmoeConfig
        from transformers.models.olmoe.modeling_olmoe import OlmoeSparseMoeBlock as Block

        cfg = OlmoeConfig(hidden_size=shape["hidden"], intermediate_size=shape["width"], num_experts=shape["experts"],
                          num_experts_per_tok=shape["top_k"], norm_topk_prob=False)
    else:
        from transformers import MixtralConfig
        from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock as Block

        cfg = MixtralConfig(hidden_size=shape["hidden"], intermediate_size=shape["width"],
                            num_local_experts=shape["experts"], num_experts_per_tok=shape["top_k"])
    cfg._experts_implementation = implementation
    return Block(cfg)


def hf_implementations() -> list[str]:
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    return ["eager", *ALL_EXPERTS_FUNCTIONS.keys()]


def moekit_layer(shape: dict) -> MoELayer:
    cfg = MoEConfig(hidden_size=shape["hidden"], num_experts=shape["experts"], top_k=shape["top_k"],
                    expert_hidden=shape["width"], norm_topk_prob=shape["family"] == "mixtral", kernel="auto")
    return MoELayer(cfg)


def share_weights(layer: MoELayer, block: torch.nn.Module) -> None:
    with torch.no_grad():
        block.gate.weight.copy_(layer.router.gate.weight)
        block.experts.gate_up_proj.copy_(layer.experts.w_in_EHD)
        block.experts.down_proj.copy_(layer.experts.w_out_EDF)


def skip_reason(name: str, shape: dict, tokens: int, block: torch.nn.Module, x: torch.Tensor) -> str | None:
    """Why a transformers experts implementation is not timed here, or None if it runs."""
    if name == "batched_mm":
        # It gathers a full copy of both expert matrices for every (token, expert) assignment.
        per_assignment = 3 * shape["width"] * shape["hidden"] * x.element_size()
        need = tokens * shape["top_k"] * per_assignment
        if need > MEMORY_LIMIT_BYTES:
            return f"needs {need / 2**30:.0f} GiB for per-assignment weight copies (limit {MEMORY_LIMIT_BYTES / 2**30:.0f} GiB); meant for decoding"
    try:
        with torch.no_grad():
            block(x[:, :16])
    except Exception as e:  # CUDA-only kernels, missing packages
        first_line = str(e).splitlines()[0][:160] if str(e) else ""
        return f"fails on this machine ({type(e).__name__}: {first_line})"
    return None


def _seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def forward_fn(model, x):
    def run():
        with torch.no_grad():
            model(x)

    return run


def train_fn(model, x, grad_y):
    params = list(model.parameters())

    def run():
        for p in params:
            p.grad = None
        xi = x.detach().requires_grad_(True)
        y = model(xi)
        y = y[0] if isinstance(y, tuple) else y
        y.backward(grad_y)

    return run


def bench_shape(key: str, tokens: int, reps: int, warmup: int, deadline: float) -> dict:
    """Time one shape; `deadline` (perf_counter) bounds the timed rounds, at least 3 per phase."""
    shape = SHAPES[key]
    D, K, F = shape["hidden"], shape["top_k"], shape["width"]
    torch.manual_seed(0)
    layer = moekit_layer(shape)
    with torch.no_grad():  # router weights like a trained model's, not all but equal
        layer.router.gate.weight.normal_(0, 0.02)
    x = torch.randn(1, tokens, D)
    grad_y = torch.randn(1, tokens, D)
    models: dict[str, torch.nn.Module] = {"moekit": layer, "dense MLP": SwiGLU(D, K * F)}
    skipped: dict[str, str] = {}
    max_diff: dict[str, float] = {}
    with torch.no_grad():
        ref, routing = layer(x)
        probe = {"moekit": min(_seconds(lambda: layer(x)) for _ in range(2))}
    counts_E = routing.counts_E
    for name in hf_implementations():
        block = hf_block(shape, name)
        share_weights(layer, block)
        reason = skip_reason(name, shape, tokens, block, x)
        if reason:
            skipped[f"transformers {name}"] = reason
            continue
        with torch.no_grad():
            max_diff[name] = float((block(x) - ref).abs().max())
            probe[f"transformers {name}"] = _seconds(lambda: block(x))
        models[f"transformers {name}"] = block
    for m in models.values():
        m.train()
    # transformers implementations far slower than its best one (eager loops) get few calls: the targets
    # compare with the best, and the run must fit its time limit.
    hf_probe = {n: t for n, t in probe.items() if n.startswith("transformers")}
    fastest_hf = min(hf_probe.values())
    slow = [n for n, t in hf_probe.items() if t > SLOW_FACTOR * fastest_hf]
    start = time.perf_counter()
    fwd = interleaved_times({n: forward_fn(m, x) for n, m in models.items()}, reps, warmup,
                            deadline=start + (deadline - start) / 4,  # forward is ~1/4 of the work
                            limits={n: (0, 2) for n in slow})
    bwd = interleaved_times({n: train_fn(m, x, grad_y) for n, m in models.items()}, reps, warmup, deadline=deadline,
                            limits={n: (0, 1) for n in slow})
    rows = {}
    for name in models:
        f, b = median(fwd[name]), median(bwd[name])
        rows[name] = {"forward_s": f, "forward_backward_s": b, "forward_tokens_per_s": tokens / f,
                      "forward_backward_tokens_per_s": tokens / b,
                      # moekit speed-up over this implementation: per-round ratios, then their median
                      "moekit_speedup_forward": paired_ratio(fwd[name], fwd["moekit"]),
                      "moekit_speedup_forward_backward": paired_ratio(bwd[name], bwd["moekit"]),
                      "forward_samples_s": fwd[name], "forward_backward_samples_s": bwd[name]}
    hf_names = [n for n in rows if n.startswith("transformers")]
    # the strongest transformers implementation: the one moekit beats by the least
    best_fwd = min(hf_names, key=lambda n: rows[n]["moekit_speedup_forward"])
    best_bwd = min(hf_names, key=lambda n: rows[n]["moekit_speedup_forward_backward"])
    ratios = {
        "forward_vs_best_transformers": rows[best_fwd]["moekit_speedup_forward"],
        "forward_backward_vs_best_transformers": rows[best_bwd]["moekit_speedup_forward_backward"],
        "forward_vs_dense": rows["dense MLP"]["moekit_speedup_forward"],
        "forward_backward_vs_dense": rows["dense MLP"]["moekit_speedup_forward_backward"],
        "best_transformers_forward_backward_vs_dense": paired_ratio(bwd["dense MLP"], bwd[best_bwd]),
    }
    return {
        "shape": shape | {"tokens": tokens, "dtype": "float32"},
        "moekit_kernel": layer.experts.kernel_for(x, counts_E),
        "expert_load": {"min": int(counts_E.min()), "max": int(counts_E.max()),
                        "padding_for_bmm": round(float(counts_E.max() * len(counts_E) / counts_E.sum() - 1), 4)},
        "results": rows,
        "best_transformers": {"forward": best_fwd, "forward_backward": best_bwd},
        "ratios": ratios,
        "skipped": skipped,
        "probe_forward_s": probe,  # one untimed forward each, to give far slower peers fewer calls
        "max_abs_diff_vs_moekit": max_diff,
    }


def render_markdown(result: dict) -> str:
    out = ["# MoE layer: moekit vs transformers vs dense MLP", "",
           f"fp32, {result['tokens']} tokens. All implementations run interleaved round by round in one process; "
           "tokens/s is the median over the timed calls (last column). \"moekit speed-up\" is the median over rounds "
           "of that implementation's time / moekit's time in the same round (> 1: moekit is faster); pairing within "
           "a round cancels the load drifts of this shared machine. Forward runs under `torch.no_grad()`; "
           "forward+backward includes the input gradient and all parameter gradients.", "",
           f"Machine: {result['machine']['cpu']}, {result['machine']['cores']} cores, torch {result['machine']['torch']}, "
           f"transformers {result['machine'].get('transformers', '-')}, device {result['machine']['device']}; "
           f"1-minute load average {result['machine']['load_average_1m']} at the start and "
           f"{result['machine']['load_average_1m_at_end']} at the end (the machine is shared).", "",
           f"Command: `{result['command']}`", ""]
    for key, shape_result in result["shapes"].items():
        s = shape_result["shape"]
        out += [f"## ({key}) {s['label']}: hidden {s['hidden']}, {s['experts']} experts, top-{s['top_k']}, width {s['width']}",
                "", f"moekit kernel chosen by `auto`: `{shape_result['moekit_kernel']}`; expert loads "
                f"{shape_result['expert_load']['min']}..{shape_result['expert_load']['max']} rows, so padding to the largest "
                f"adds {100 * shape_result['expert_load']['padding_for_bmm']:.1f}% rows.", ""]
        rows = []
        for name, r in shape_result["results"].items():
            rows.append([name, f"{r['forward_tokens_per_s']:,.0f}", f"{r['moekit_speedup_forward']:.2f}",
                         f"{r['forward_backward_tokens_per_s']:,.0f}", f"{r['moekit_speedup_forward_backward']:.2f}",
                         f"{len(r['forward_samples_s'])} / {len(r['forward_backward_samples_s'])}"])
        for name, why in shape_result["skipped"].items():
            rows.append([name, "not run", "-", "not run", "-", "-"])
        out += [markdown_table(["implementation", "fwd tokens/s", "moekit speed-up (fwd)", "fwd+bwd tokens/s",
                                "moekit speed-up (fwd+bwd)", "timed calls"], rows), ""]
        for name, why in shape_result["skipped"].items():
            out.append(f"- {name} not run: {why}")
        diffs = ", ".join(f"{n} {d:.1e}" for n, d in shape_result["max_abs_diff_vs_moekit"].items())
        out += [f"- max |moekit - transformers| over the output: {diffs}", ""]
    out += ["## Targets", "", markdown_table(["target", "value", "goal", "met"], [
        [t["name"], f"{t['value']:.2f}", f"{t['direction']} {t['goal']}", "yes" if t["met"] else "**no**"]
        for t in result["targets"]]), ""]
    if result.get("notes"):
        out += ["## Notes", "", *result["notes"], ""]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--reps", type=int, default=9, help="at most this many timed rounds (at least 3; the time budget decides)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--budget-s", type=float, default=120,
                   help="stop timing rounds early (after at least 3) so the run ends in about this many seconds")
    p.add_argument("--shapes", default="a,b", help="comma-separated subset of: " + ",".join(SHAPES))
    p.add_argument("--no-write", action="store_true", help="print the table, write nothing")
    args = p.parse_args(argv)
    keys = [k.strip() for k in args.shapes.split(",") if k.strip()]
    unknown = [k for k in keys if k not in SHAPES]
    if unknown:
        p.error(f"unknown shape(s) {', '.join(unknown)}; accepted: {', '.join(SHAPES)}")
    result = {"benchmark": "moe_layer", "command": command_line(), "machine": machine_info("cpu"),
              "tokens": args.tokens, "reps": args.reps, "shapes": {}}
    targets = []
    end = time.perf_counter() + args.budget_s
    for i, key in enumerate(keys):
        now = time.perf_counter()
        r = bench_shape(key, args.tokens, args.reps, args.warmup, now + (end - now) / (len(keys) - i))
        result["shapes"][key] = r
        vs_hf, vs_dense = GOALS[key]
        targets.append(target(f"({key}) fwd+bwd moekit / best transformers ({r['best_transformers']['forward_backward']})",
                              r["ratios"]["forward_backward_vs_best_transformers"], vs_hf))
        targets.append(target(f"({key}) fwd+bwd moekit / dense equal-FLOPs MLP",
                              r["ratios"]["forward_backward_vs_dense"], vs_dense))
        print(f"({key}) " + ", ".join(f"{n}={v:.3f}" for n, v in r["ratios"].items()), flush=True)
    result["targets"] = targets
    result["machine"]["load_average_1m_at_end"] = load_average()
    result["notes"] = notes(result)
    md = render_markdown(result)
    print(md)
    if not args.no_write:
        for path in write_results("moe_layer", result, md):
            print("wrote", path)
    return result


def notes(result: dict) -> list[str]:
    """What the numbers mean and, for a missed target, what bounds it (measured while building the kernels)."""
    out = [
        "- moekit path: router -> tokens gathered straight into a buffer padded to the busiest expert -> one "
        "autograd Function for the whole expert MLP (batched matmuls, hand-written SwiGLU backward, saves only x, "
        "the pre-activation, silu(gate) and the activation) -> weighted gather-and-sum back to token order "
        "(embedding_bag; its per-sample-weight gradient gives the router-weight gradient in one pass). "
        "No torch.compile.",
        f"- transformers implementations more than {SLOW_FACTOR:g}x slower than its fastest one get 2 forward and 1 "
        "forward+backward calls (see 'timed calls'), so the run fits in its time budget; targets use the fastest.",
    ]
    for key, r in result["shapes"].items():
        ratio = r["ratios"]["forward_backward_vs_dense"]
        if ratio >= GOALS[key][1]:
            continue
        pad = 100 * r["expert_load"]["padding_for_bmm"]
        s = r["shape"]
        out.append(
            f"- ({key}) misses the dense-MLP target ({ratio:.2f} < {GOALS[key][1]}). The expert matmuls are "
            f"{pad:.1f}% larger than the dense MLP's (padding to the busiest expert, so all experts run as one "
            "batched matmul); per-expert matmuls (transformers grouped_mm, moekit kernel=grouped_mm) avoid the "
            "padding but measured as slow or slower here: every per-expert matmul is split across both threads, "
            "and on a busy 2-core machine each split waits for the other core. On top of that: the router (matmul, softmax, top-k, z- and balance losses) and "
            f"moving each token to its {s['top_k']} experts and back, forward and backward "
            f"({s['top_k']}x the dense MLP's input/output bytes)."
        )
        if key == "a":
            out.append(
                "- (a) also pays for small GEMMs: 64 experts of width 256 give ~580x512 @ 512x256 blocks, on "
                "which MKL runs slower than on the dense 4096x512 @ 512x2048 ones. Single-thread measurements "
                "during development: the six expert bmm calls took 1.5-1.7x the time of the dense MLP's nine mm "
                "calls for 1.14x the FLOPs (the down projection, inner size 256: about 2x). Routing and token movement "
                "added another ~0.3-0.4x the dense MLP's time. Reaching 0.9x would take a variable-size "
                "grouped GEMM that runs whole experts per thread without padding (not available in PyTorch on "
                "CPU)."
            )
    out.append(
        "- The machine is shared with other jobs (see the load average above): absolute tokens/s vary by 2-3x between "
        "runs and the ratios move too. Seven full runs on the development machine (load average 2-5) gave, "
        "fwd+bwd: moekit / dense 0.55-0.86 on (a) and 0.64-0.96 on (b); moekit / best transformers 1.6-2.5 on (a) "
        "and 0.82-1.35 on (b). Targets near their goal, (b) in particular, can flip between runs."
    )
    return out

if __name__ == "__main__":
    main()
