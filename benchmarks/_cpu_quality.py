"""Quality side of benchmarks/cpu_decode.py: a tiny model trained on real text, and logits against llama.cpp.

- `run_quality`: quant_quality.py's validation losses (experts scope) plus greedy-token agreement with fp32
  per width (scope all), and llama.cpp's greedy tokens on moekit's GGUF exports of the same model.
- `logit_agreement`: per prompt position, whether moekit's and llama.cpp's logits agree on the top token,
  and their cosine (the Q4_K_M cell: both read the same file).

No timing here.
"""

from __future__ import annotations

import multiprocessing as mp
from pathlib import Path

import numpy as np
import torch

from _cpu_bench import WIDTHS

def quality(steps: int, batches: int, out: Path, prompt_len: int = 32, new_tokens: int = 32, n_prompts: int = 4) -> dict:
    """quant_quality.py's val losses (experts scope) plus greedy-token agreement with fp32 per width (scope all)."""
    from dataclasses import replace

    from quant_quality import measure, train

    from moekit.infer import Engine, SamplingConfig
    from moekit.models.build import load_model
    from moekit.quantize import quantize_model
    from moekit.train.lm import prepare_data, run_config_from

    torch.set_num_threads(1)
    run = train("tiny", steps, out)
    losses = measure(run, batches)
    _, tokenizer, config = load_model(run)
    cfg = run_config_from(config, run)
    val = prepare_data(replace(cfg.data, max_bytes=min(cfg.data.max_bytes, 2_000_000)), cfg.train.seq_len, tokenizer).val
    starts = torch.linspace(0, val.numel() - prompt_len - 1, n_prompts).long().tolist()
    ps = [val[s : s + prompt_len].tolist() for s in starts]
    sampling = SamplingConfig(max_new_tokens=new_tokens, stop_token_ids=[])
    tokens = {}
    for width, (_, options) in WIDTHS.items():
        if options == "gguf":  # (a GGUF file of llama.cpp's quantizer: not made from this run)
            continue
        model, _, _ = load_model(run)
        with torch.no_grad():
            tokens[width] = [c.token_ids for c in Engine(quantize_model(model, **options) if options else model).generate_ids(ps, sampling)]
    agreement = {w: _agreement(t, tokens["fp32"]) for w, t in tokens.items()}
    try:
        llama = {g: _agreement(t, tokens["fp32"]) for g, t in llama_tokens(run, ps, new_tokens).items()}
    except Exception as e:  # e.g. llama-cpp-python absent, or a preset no GGUF architecture fits: reported
        llama = {"not run": f"{type(e).__name__}: {e}"}
    return {"run": str(run), "steps": steps, "eval_batches": batches, "losses": losses, "greedy_agreement_with_fp32": agreement,
            "llama_cpp_greedy_agreement_with_moekit_fp32": llama, "prompts": n_prompts, "new_tokens": new_tokens}


def _agreement(tokens: list[list[int]], ref: list[list[int]]) -> float:
    """Fraction of generated positions where the tokens equal the reference's (all prompts together)."""
    pairs = [(a, b) for x, y in zip(tokens, ref) for a, b in zip(x, y)]
    return sum(a == b for a, b in pairs) / len(pairs)


def llama_tokens(run: Path, ps: list[list[int]], new_tokens: int) -> dict[str, list[list[int]]]:
    """llama.cpp's greedy tokens on the trained model, exported by moekit's GGUF writer at each type."""
    import tempfile

    import llama_cpp

    import moekit.gguf as G
    from moekit.models.build import load_model

    model, tokenizer, _ = load_model(run)
    out = {}
    with tempfile.TemporaryDirectory() as d:
        for gguf_type, options in WIDTHS.values():
            if options == "gguf":
                continue
            llm = llama_cpp.Llama(str(G.save(model, Path(d) / f"{gguf_type}.gguf", tokenizer, dtype=gguf_type)),
                                  n_ctx=256, n_threads=1, verbose=False)
            out[gguf_type] = []
            for p in ps:
                llm.reset()
                toks = []
                for tok in llm.generate(p, top_k=1, temp=0.0, reset=True):
                    toks.append(int(tok))
                    if len(toks) == new_tokens:
                        break
                out[gguf_type].append(toks)
            del llm
    return out


def _quality_child(conn, *args) -> None:
    conn.send(quality(*args))


def run_quality(*args) -> dict:
    """quality() in a spawned child (single-threaded; its training memory is returned to the OS afterwards)."""
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    p = ctx.Process(target=_quality_child, args=(child, *args))
    p.start()
    result = parent.recv()
    p.join()
    return result




def logit_agreement(moekit_logits: list, llama_logits: list) -> dict:
    """Top-1 agreement and cosine of two sides' logits [positions, vocab] per prompt (prompts together)."""
    top, cos = [], []
    for a, b in zip(moekit_logits, llama_logits):
        a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
        top += (a.argmax(-1) == b.argmax(-1)).tolist()
        cos += ((a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))).tolist()
    per_position = np.asarray(top, dtype=np.float64).reshape(len(moekit_logits), -1).mean(0)
    return {"top1_agreement": float(np.mean(top)), "min_top1_agreement_at_a_position": float(per_position.min()),
            "mean_cosine": float(np.mean(cos)), "min_cosine": float(np.min(cos)), "positions": len(top)}
