"""Before and after a change: prefill, decode and one MoE layer, two checkouts timed round by round.

Issue 22's rule: decode, prefill and `moe_layer` figures must not fall by more than their
run-to-run spread. Both checkouts load the same ~60M-parameter Mixtral-like model (random weights,
saved by transformers: hidden 512, 8 layers, 8 experts top-2) through `Engine.load`, fp32 and
`quantize="int8"`, and measure: prefill tokens/s (128 prompt tokens, a generation of one token),
decode tokens/s (33 tokens minus one, over 32) and one MoE layer's tokens/s on 2048 rows (fp32).
Each round runs both checkouts once, in separate processes, alternating which goes first; a
figure's ratio is the median of the per-round new/old ratios, beside the old checkout's own
spread across rounds ((max - min) / median). The target: no median ratio below 1 - that spread.

    git worktree add /tmp/old <commit> && (cd /tmp/old && python setup.py build_ext --inplace)
    python benchmarks/before_after.py --old /tmp/old --rounds 4

Writes benchmarks/results/before_after.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from _common import command_line, machine_info, markdown_table, target, write_results  # noqa: E402

ONE_ROUND = r"""
import json, sys, time, torch
torch.set_num_threads(2)
from moekit.infer.engine import Engine
from moekit.infer.sampling import SamplingConfig
out, ids = {}, [list(range(1, 129))]
for quant in (None, "int8"):
    eng = Engine.load(sys.argv[1], quantize=quant) if quant else Engine.load(sys.argv[1])
    def run(n):
        t = time.perf_counter(); eng.generate_ids(ids, SamplingConfig(max_new_tokens=n, temperature=0.0))
        return time.perf_counter() - t
    run(4)
    one, full = min(run(1) for _ in range(2)), min(run(33) for _ in range(2))
    out[f"prefill_tok_s_{quant or 'fp32'}"] = 128 / one
    out[f"decode_tok_s_{quant or 'fp32'}"] = 32 / (full - one)
    if quant is None:
        layer = getattr(eng.model.layers[0], "ffn", None) or eng.model.layers[0].mlp
        x = torch.randn(2048, eng.model.cfg.hidden_size)
        with torch.inference_mode():
            layer(x)
            t = time.perf_counter(); [layer(x) for _ in range(3)]
            out["moe_layer_tok_s"] = 3 * 2048 / (time.perf_counter() - t)
print(json.dumps(out))
"""


def make_model(path: Path) -> None:
    import torch
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    cfg = MixtralConfig(vocab_size=8192, hidden_size=512, intermediate_size=896, num_hidden_layers=8,
                        num_attention_heads=8, num_key_value_heads=4, num_local_experts=8, num_experts_per_tok=2,
                        max_position_embeddings=1024)
    MixtralForCausalLM(cfg).save_pretrained(path)


def one_round(tree: Path, model: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": str(tree), "OMP_NUM_THREADS": "2"}
    p = subprocess.run([sys.executable, "-c", ONE_ROUND, str(model)], cwd=tree, env=env, capture_output=True, text=True)
    if p.returncode:
        raise SystemExit(f"{tree}: {p.stderr[-2000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def summarise(old: list[dict], new: list[dict]) -> dict:
    out = {}
    for key in old[0]:
        o = [r[key] for r in old]
        ratios = [n[key] / r[key] for n, r in zip(new, old)]
        out[key] = {"old_median": statistics.median(o), "new_median": statistics.median(r[key] for r in new),
                    "ratios": ratios, "ratio_median": statistics.median(ratios),
                    "old_spread": (max(o) - min(o)) / statistics.median(o)}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--old", type=Path, required=True, help="a checkout of the commit before (C extension built)")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--model", type=Path, default=Path("/tmp/moekit_before_after_mixtral"))
    args = ap.parse_args()
    if not (args.model / "config.json").is_file():
        make_model(args.model)
    old, new = [], []
    for r in range(args.rounds):
        for name in (("old", "new") if r % 2 == 0 else ("new", "old")):
            (old if name == "old" else new).append(one_round(args.old if name == "old" else ROOT, args.model))
            print(name, (old if name == "old" else new)[-1], flush=True)
    summary = summarise(old, new)
    old_commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=args.old, capture_output=True, text=True).stdout.strip()
    targets = [target(f"{k}: median new/old >= 1 - old run-to-run spread ({v['old_spread']:.3f})", v["ratio_median"],
                      round(1 - v["old_spread"], 4), ">=") for k, v in summary.items()]
    result = {"command": command_line(), "machine": machine_info(), "old_commit": old_commit, "rounds": args.rounds,
              "summary": summary, "old": old, "new": new, "targets": targets}
    rows = [[k, f"{v['old_median']:.1f}", f"{v['new_median']:.1f}", f"{v['ratio_median']:.3f}",
             " ".join(f"{x:.2f}" for x in v["ratios"]), f"{v['old_spread']:.3f}"] for k, v in summary.items()]
    md = "\n".join([f"# Before ({old_commit[:7]}) and after: prefill, decode, one MoE layer", "",
                    f"`{result['command']}`, {args.rounds} rounds, 2 threads.", "",
                    markdown_table(["figure", "old median", "new median", "median new/old", "per-round ratios",
                                    "old spread"], rows), "", "## Targets", "",
                    markdown_table(["target", "value", "goal", "met"],
                                   [[t["name"], t["value"], f">= {t['goal']}", "yes" if t["met"] else "**no**"]
                                    for t in targets])])
    write_results("before_after", result, md)


if __name__ == "__main__":
    main()
