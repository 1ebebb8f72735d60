"""Benchmark: the cost of expert parallelism's all-to-all on this machine, and the byte formula of docs/scaling.md.

Three parts, one run:
1. Single-process compute rate: one MoELayer forward+backward with the
   LocalDispatcher (all experts local), in this process. Its FLOP rate is the
   "measured compute rate" the projection in docs/scaling.md starts from.
2. 2 and 4 gloo processes (this script relaunches itself with RANK,
   WORLD_SIZE, ... set as torchrun would). Every rank holds T tokens and times,
   interleaved, the same layer (a) with the LocalDispatcher and all experts
   (what a data-parallel rank computes, no communication) and (b) after
   `apply_expert_parallel` (EP = world size). It reports the medians, the time
   spent inside all-to-all calls, and checks the bytes of hidden states each
   rank sent against the formula
       bytes_r = 2 * D * b * (n_r + m_r)   per forward+backward,
   n_r = this rank's assignments whose expert lives on another rank, m_r =
   assignments other ranks sent here (counted from the routing, not from the
   dispatcher), summed over ranks: 4 * D * b * sum_r n_r; balanced routing
   gives the expected 4 * T * k * D * b * (P - 1) / P per rank. As an
   independent cross-check, rank 0 reads the loopback interface's byte
   counter around a window of steps (gloo's TCP traffic on one machine).
3. The projection to 8, 64 and 256 GPUs from the formula (see docs/scaling.md).

The machine has 2 cores: 4 processes oversubscribe it, so the 4-rank
overhead includes CPU contention, not only communication.

Writes benchmarks/results/expert_parallel.json and .md. Run from the repository root:
    python benchmarks/expert_parallel.py
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _common import command_line, machine_info, markdown_table, median, target, write_results  # noqa: E402

from moekit.config import MoEConfig  # noqa: E402
from moekit.moe.layers import MoELayer  # noqa: E402

SHAPE = {"tokens_per_rank": 1024, "hidden": 256, "experts": 8, "top_k": 2, "expert_hidden": 512}
WORLDS = (2, 4)

# ---------------------------------------------------------------- the projection's published numbers and assumptions

# Published peak figures (NVIDIA H100 SXM5 datasheet; DGX H100: one ConnectX-7 400 Gb/s NDR port per GPU).
H100_BF16_DENSE_FLOPS = 989e12
NVLINK4_BYTES_PER_S = 450e9  # 900 GB/s bidirectional per GPU = 450 GB/s each way
IB_NDR_BYTES_PER_S = 50e9  # 400 Gb/s per GPU, each way
GPUS_PER_NODE = 8
# Assumptions (not measured here: this session has no GPU): the share of peak reached.
ASSUMED_MFU = 0.40
ASSUMED_LINK_EFFICIENCY = 0.70  # all-to-all and all-reduce bandwidth as a share of the link's peak

MODELS = {
    # name: hidden D, expert width F, experts E, top-k, MoE layers, dense (non-expert) parameters, sequence length
    "Mixtral-8x7B-like": dict(D=4096, F=14336, E=8, k=2, L=32, dense_params=1.6e9, seq=4096),
    "OLMoE-1B-7B-like": dict(D=2048, F=1024, E=64, k=8, L=16, dense_params=0.4e9, seq=4096),
    "fine-grained 256-expert (synthetic)": dict(D=2048, F=512, E=256, k=8, L=24, dense_params=1.0e9, seq=4096),
}
GPU_MEMORY_BYTES = 80e9  # H100 SXM
TRAIN_STATE_BYTES_PER_PARAM = 16  # fp32 weight + gradient + two AdamW moments; activations not counted
LAYOUTS = {8: [8], 64: [8, 64], 256: [8, 64, 256]}  # GPUs -> EP sizes to show (DP = GPUs / EP)
TOKENS_PER_GPU_STEP = 65536  # tokens each GPU processes per optimizer step (e.g. 16 x 4096 with accumulation)


def expert_flops_per_assignment(D: int, F: int, training: bool = True) -> float:
    """SwiGLU expert: 2*D*2F (gate+up) + 2*F*D (down) = 6*D*F forward; backward twice that."""
    return 6 * D * F * (3 if training else 1)


def a2a_bytes_per_token(D: int, k: int, P: int, b: int) -> float:
    """Hidden-state bytes one rank sends per token per MoE layer, forward + backward, balanced routing."""
    return 4 * k * D * b * (P - 1) / P


def projection(rate: float, bytes_per_elem: int = 2, link_efficiency: float = ASSUMED_LINK_EFFICIENCY,
               grad_bytes: int = 4) -> list[dict]:
    """Per-step times and the expected efficiency (no overlap of communication and compute, as moekit does)."""
    rows = []
    for name, m in MODELS.items():
        D, F, E, k, L, S = m["D"], m["F"], m["E"], m["k"], m["L"], m["seq"]
        expert_params = 3 * D * F  # per expert: gate, up, down
        active = m["dense_params"] + L * k * expert_params
        for gpus, eps in LAYOUTS.items():
            for P in eps:
                if P > E or gpus % P:
                    continue
                dp = gpus // P
                T = TOKENS_PER_GPU_STEP
                flops = T * (6 * active + 12 * L * S * D)  # training FLOPs per token, attention included
                t_compute = flops / rate
                # all-to-all: remote rows split into same-node (NVLink) and other-node (InfiniBand) traffic
                sent = T * L * a2a_bytes_per_token(D, k, P, bytes_per_elem)
                inside = min(P, GPUS_PER_NODE)
                share_ib = (P - inside) / (P - 1) if P > 1 else 0.0
                t_a2a = max(sent * share_ib / (IB_NDR_BYTES_PER_S * link_efficiency),
                            sent * (1 - share_ib) / (NVLINK4_BYTES_PER_S * link_efficiency))
                # gradient all-reduce (ring, once per step): dense over all GPUs, experts over their DP group
                bw_world = NVLINK4_BYTES_PER_S if gpus <= GPUS_PER_NODE else IB_NDR_BYTES_PER_S
                local_expert_params = L * (E // P) * expert_params
                t_ar = (2 * (gpus - 1) / gpus * m["dense_params"] * grad_bytes / (bw_world * link_efficiency)
                        + (2 * (dp - 1) / dp * local_expert_params * grad_bytes / (IB_NDR_BYTES_PER_S * link_efficiency)
                           if dp > 1 else 0.0))
                state = (m["dense_params"] + local_expert_params) * TRAIN_STATE_BYTES_PER_PARAM
                rows.append({
                    "model": name, "gpus": gpus, "ep": P, "dp": dp,
                    "train_state_GB_per_gpu": state / 1e9, "fits_80GB": state <= GPU_MEMORY_BYTES,
                    "a2a_GB_per_gpu_step": sent / 1e9,
                    "compute_s": t_compute, "a2a_s": t_a2a, "allreduce_s": t_ar,
                    "efficiency": t_compute / (t_compute + t_a2a + t_ar),
                    "moe_layer_efficiency": 1 / (1 + t_a2a / (T * L * k * expert_flops_per_assignment(D, F) / rate)),
                })
    return rows


# ---------------------------------------------------------------- measurements


def layer_config(kernel: str) -> MoEConfig:
    return MoEConfig(hidden_size=SHAPE["hidden"], num_experts=SHAPE["experts"], top_k=SHAPE["top_k"],
                     expert_hidden=SHAPE["expert_hidden"], kernel=kernel)


def train_step(layer: MoELayer, x: torch.Tensor):
    y, routing = layer(x)
    (y.square().mean() + 0.01 * routing.aux_losses["balance"]).backward()
    layer.zero_grad(set_to_none=True)
    return routing


def single_process_rate(kernel: str, reps: int) -> dict:
    """FLOP rate of one process running the layer (fwd+bwd) with all experts local.

    One thread, like each rank below: on a shared 2-core machine more threads mostly measure contention.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _timed_rate(kernel, reps)
    finally:
        torch.set_num_threads(threads)


def _timed_rate(kernel: str, reps: int) -> dict:
    torch.manual_seed(0)
    layer = MoELayer(layer_config(kernel))
    x = torch.randn(SHAPE["tokens_per_rank"], SHAPE["hidden"], requires_grad=True)  # as inside a network
    train_step(layer, x)
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        train_step(layer, x)
        times.append(time.perf_counter() - start)
    flops = SHAPE["tokens_per_rank"] * SHAPE["top_k"] * expert_flops_per_assignment(SHAPE["hidden"], SHAPE["expert_hidden"])
    t = median(times)
    return {"seconds": t, "expert_flops": flops, "flops_per_s": flops / t, "threads": torch.get_num_threads()}


def _loopback_bytes() -> int | None:
    try:
        for line in Path("/proc/net/dev").read_text().splitlines():
            name, _, rest = line.partition(":")
            if name.strip() == "lo":
                return int(rest.split()[8])  # transmitted bytes
    except OSError:
        pass
    return None


def worker(out_dir: Path, kernel: str, reps: int) -> None:
    """One rank: interleaved timing of local vs expert-parallel, and the byte check."""
    from moekit.parallel.core import apply_expert_parallel, init_expert_parallel

    torch.set_num_threads(1)
    parallel = init_expert_parallel(int(os.environ["WORLD_SIZE"]), timeout_s=300)
    P, rank = parallel.ep_size, parallel.rank
    cfg = layer_config(kernel)
    torch.manual_seed(0)
    local = MoELayer(cfg)
    torch.manual_seed(0)
    sharded = apply_expert_parallel(MoELayer(cfg), parallel)
    # requires_grad: inside a network the layer's input needs a gradient, so all four all-to-alls run
    x = torch.randn(SHAPE["tokens_per_rank"], SHAPE["hidden"], generator=torch.Generator().manual_seed(100 + rank),
                    requires_grad=True)
    d = sharded.dispatcher

    # the byte check: one step, counted from the routing on every rank
    d.traffic.reset()
    routing = train_step(sharded, x)
    counts_E = routing.counts_E
    all_counts = torch.stack(parallel.all_gather(counts_E))  # [P, E]
    owner_E = torch.arange(cfg.num_experts) // d.num_local
    n_remote = int(counts_E[owner_E != parallel.ep_rank].sum())
    m_remote = int(sum(all_counts[src, owner_E == parallel.ep_rank].sum() for src in range(P) if src != rank))
    b = x.element_size()
    check = {"bytes_sent": d.traffic.bytes_sent, "formula_bytes": 2 * cfg.hidden_size * b * (n_remote + m_remote),
             "n_remote": n_remote, "m_remote": m_remote, "meta_bytes": d.traffic.meta_bytes_sent,
             "balanced_formula_bytes": a2a_bytes_per_token(cfg.hidden_size, cfg.top_k, P, b) * SHAPE["tokens_per_rank"]}

    # loopback cross-check over a window of steps (all ranks in step; rank 0 reads the counter)
    window = 5
    parallel.barrier()
    lo_before = _loopback_bytes()
    d.traffic.reset()
    for _ in range(window):
        train_step(sharded, x)
    window_bytes = torch.tensor([d.traffic.bytes_sent + d.traffic.meta_bytes_sent], dtype=torch.int64)
    parallel.all_reduce(window_bytes)
    parallel.barrier()
    lo_after = _loopback_bytes()

    # interleaved timing; a barrier before each call so that the ranks start together
    fns = {"local": lambda: train_step(local, x), "expert_parallel": lambda: train_step(sharded, x)}
    names = list(fns)
    times = {n: [] for n in names}
    a2a = []
    for r in range(2 + reps):
        for name in names[r % 2:] + names[: r % 2]:
            parallel.barrier()
            d.traffic.reset()
            start = time.perf_counter()
            fns[name]()
            elapsed = time.perf_counter() - start
            if r >= 2:
                times[name].append(elapsed)
                if name == "expert_parallel":
                    a2a.append(d.traffic.seconds)
    result = {
        "rank": rank, "check": check, "times": times, "a2a_seconds": a2a,
        "window": {"steps": window, "sent_by_all_ranks": int(window_bytes[0]),
                   "loopback_bytes": (lo_after - lo_before) if rank == 0 and lo_before is not None else None},
    }
    (out_dir / f"rank{rank}.json").write_text(json.dumps(result))
    parallel.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(world: int, out_dir: Path, kernel: str, reps: int) -> list[dict]:
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "WORLD_SIZE": str(world),
           "LOCAL_WORLD_SIZE": str(world), "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, __file__, "--worker", str(out_dir), "--kernel", kernel, "--reps", str(reps)],
                              env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}) for r in range(world)]
    for p in procs:
        if p.wait(timeout=1800) != 0:
            raise SystemExit(f"a rank of the {world}-process run failed (exit {p.returncode})")
    return [json.loads((out_dir / f"rank{r}.json").read_text()) for r in range(world)]


def summarize(world: int, ranks: list[dict]) -> dict:
    local = median([median(r["times"]["local"]) for r in ranks])
    ep = median([median(r["times"]["expert_parallel"]) for r in ranks])
    a2a = median([median(r["a2a_seconds"]) for r in ranks])
    sent = sum(r["check"]["bytes_sent"] for r in ranks)
    formula = sum(r["check"]["formula_bytes"] for r in ranks)
    total_formula = 4 * SHAPE["hidden"] * 4 * sum(r["check"]["n_remote"] for r in ranks)  # 4 exchanges x D x fp32
    window = ranks[0]["window"]
    return {
        "world": world, "ep": world,
        "local_ms": local * 1e3, "expert_parallel_ms": ep * 1e3, "overhead_ratio": ep / local,
        "all_to_all_ms": a2a * 1e3, "all_to_all_share": a2a / ep,
        "bytes_sent_per_step": sent, "formula_bytes_per_step": formula, "total_formula_bytes_per_step": total_formula,
        "max_rank_byte_error": max(abs(r["check"]["bytes_sent"] - r["check"]["formula_bytes"]) for r in ranks),
        "balanced_formula_bytes_per_step": sum(r["check"]["balanced_formula_bytes"] for r in ranks),
        "meta_bytes_per_step": sum(r["check"]["meta_bytes"] for r in ranks),
        "loopback_bytes_window": window["loopback_bytes"], "sent_bytes_window": window["sent_by_all_ranks"],
        "loopback_over_sent": (window["loopback_bytes"] / window["sent_by_all_ranks"]) if window["loopback_bytes"] else None,
        "achieved_GB_per_s_per_rank": sent / world / a2a / 1e9 if a2a else None,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--kernel", default="auto")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(Path(args.worker), args.kernel, args.reps)
        return
    import tempfile

    rate = single_process_rate(args.kernel, args.reps)
    runs = {}
    for world in WORLDS:
        with tempfile.TemporaryDirectory() as tmp:
            runs[world] = summarize(world, run_ranks(world, Path(tmp), args.kernel, args.reps))
    measured = projection(rate["flops_per_s"], bytes_per_elem=4)
    gpu_rate = H100_BF16_DENSE_FLOPS * ASSUMED_MFU
    gpu = projection(gpu_rate, bytes_per_elem=2)
    gpu_fp32 = projection(gpu_rate, bytes_per_elem=4)
    targets = [target(f"hidden-state bytes sent == formula, {w} ranks (max abs error per rank, bytes)",
                      runs[w]["max_rank_byte_error"], 0, "<=") for w in WORLDS]
    targets += [target(f"sum over ranks of bytes sent == 4*D*b*sum(n_remote), {w} ranks (abs error, bytes)",
                       abs(runs[w]["bytes_sent_per_step"] - runs[w]["total_formula_bytes_per_step"]), 0, "<=") for w in WORLDS]
    result = {
        "benchmark": "expert_parallel",
        "shape": {**SHAPE, "dtype": "float32", "kernel": args.kernel},
        "single_process": rate,
        "runs": {str(w): r for w, r in runs.items()},
        "projection": {
            "assumptions": {
                "h100_bf16_dense_flops": H100_BF16_DENSE_FLOPS, "assumed_mfu": ASSUMED_MFU,
                "nvlink4_bytes_per_s_each_way": NVLINK4_BYTES_PER_S, "ib_ndr_bytes_per_s_each_way": IB_NDR_BYTES_PER_S,
                "assumed_link_efficiency": ASSUMED_LINK_EFFICIENCY, "gpus_per_node": GPUS_PER_NODE,
                "tokens_per_gpu_step": TOKENS_PER_GPU_STEP, "models": MODELS,
            },
            "gpu_rate_bf16": gpu, "gpu_rate_fp32_tokens": gpu_fp32, "measured_cpu_rate": measured,
        },
        "targets": targets,
        "machine": machine_info("cpu"),
        "command": command_line(),
    }
    write_results("expert_parallel", result, _markdown(result))
    print(_markdown(result))


def _markdown(result: dict) -> str:
    s, rate = result["shape"], result["single_process"]
    lines = [
        "# Expert parallelism: all-to-all overhead and byte counts (gloo, this machine)",
        "",
        f"Layer: {s['tokens_per_rank']} tokens per rank, hidden {s['hidden']}, {s['experts']} experts, top-{s['top_k']}, "
        f"expert width {s['expert_hidden']}, {s['dtype']}, kernel {s['kernel']}; forward+backward, median of "
        "interleaved repetitions. `local`: every rank runs all experts on its own tokens (no communication); "
        "`expert parallel`: EP = ranks. The machine has "
        f"{result['machine']['cores']} cores, so 4 ranks oversubscribe it.",
        "",
        f"Single-process compute rate (all experts local, {rate['threads']} thread): "
        f"{rate['flops_per_s'] / 1e9:.1f} GFLOP/s of expert FLOPs ({rate['seconds'] * 1e3:.1f} ms per forward+backward).",
        "",
    ]
    rows = []
    for w, r in result["runs"].items():
        lo = f"{r['loopback_over_sent']:.3f}" if r["loopback_over_sent"] else "n/a"
        rows.append([w, f"{r['local_ms']:.1f}", f"{r['expert_parallel_ms']:.1f}", f"{r['overhead_ratio']:.2f}x",
                     f"{r['all_to_all_ms']:.1f} ({r['all_to_all_share']:.0%})", f"{r['bytes_sent_per_step']:,}",
                     f"{r['formula_bytes_per_step']:,}", f"{r['balanced_formula_bytes_per_step']:,.0f}", lo])
    lines.append(markdown_table(
        ["ranks", "local ms", "expert parallel ms", "EP / local", "in all-to-all ms (share)", "bytes sent (all ranks)",
         "formula bytes", "balanced-routing formula", "loopback bytes / sent"], rows))
    lines += ["", "Targets:", ""]
    lines.append(markdown_table(["target", "value", "goal", "met"],
                                [[t["name"], t["value"], f"{t['direction']} {t['goal']}", t["met"]] for t in result["targets"]]))
    lines += ["", "Projection (see docs/scaling.md; GPU compute rate = H100 bf16 peak x assumed 40% MFU, "
              "links at an assumed 70% of published peak; bf16 tokens):", ""]
    rows = [[p["model"], p["gpus"], f"{p['ep']} x {p['dp']}", f"{p['a2a_GB_per_gpu_step']:.1f}", f"{p['compute_s']:.2f}",
             f"{p['a2a_s']:.2f}", f"{p['allreduce_s']:.2f}", f"{p['moe_layer_efficiency']:.0%}", f"{p['efficiency']:.0%}",
             f"{p['train_state_GB_per_gpu']:.0f}" + ("" if p["fits_80GB"] else " (over 80)")]
            for p in result["projection"]["gpu_rate_bf16"]]
    lines.append(markdown_table(["model", "GPUs", "EP x DP", "all-to-all GB / GPU / step", "compute s", "all-to-all s",
                                 "grad all-reduce s", "MoE-layer efficiency", "step efficiency", "train state GB / GPU"], rows))
    lines += ["", f"Command: `{result['command']}`"]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
