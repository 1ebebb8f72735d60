"""Benchmark: expert parallelism's all-to-all measured on the wire, and its step time against one process.

Three parts, one run:
1. Single-process compute rate: one MoELayer forward+backward with the
   LocalDispatcher (all experts local), in this process. Its FLOP rate is the
   "measured compute rate" the projection in docs/scaling.md starts from.
2. 2 and 4 gloo processes (this script relaunches itself with RANK,
   WORLD_SIZE, ... set as torchrun would), EP = world size, each rank holding
   its slice of one global batch.
   - Bytes on the wire. The whole run sits in its own network namespace
     (`unshare --net`, loopback only), so the kernel's `lo` counters in
     /proc/net/dev count this job's traffic and nothing else. Rank 0 reads
     them around each expert-parallel step (between barriers) and the
     result is compared with the payload formula
         bytes = 4 * D * b * sum_r n_r   per forward+backward,
     n_r = rank r's assignments whose expert lives on another rank (from the
     routing record: dispatch and combine, forward and backward). Target:
     formula <= wire <= 1.5 x formula. The wire also carries TCP/IP headers,
     the token-count exchange, the router-statistics all-reduce and the
     barriers; the ratio says how much.
   - Step time against one process on the same global batch: in each round,
     rank 0 alone runs the layer with all experts on the whole global batch
     (the other ranks wait) and all ranks run the expert-parallel step, in
     alternating order; per-round ratios EP / one process, their median and
     quartiles (`paired_ratio`).
3. The projection to 8, 64 and 256 GPUs from the formula (see docs/scaling.md).

Every process runs one torch thread. The machine has 2 cores: 4 processes
oversubscribe it, and other jobs share it.

Writes benchmarks/results/expert_parallel.json and .md. Run from the repository root (as root, for unshare):
    python benchmarks/expert_parallel.py
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _common import command_line, machine_info, markdown_table, median, paired_ratio, target, write_results  # noqa: E402

from moekit.config import MoEConfig  # noqa: E402
from moekit.moe.layers import MoELayer  # noqa: E402

SHAPE = {"tokens_per_rank": 512, "hidden": 256, "experts": 8, "top_k": 2, "expert_hidden": 512}
WORLDS = (2, 4)
WIRE_STEPS = 5
WIRE_MAX_RATIO = 1.5
IN_NETNS = "--in-netns"

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


# ---------------------------------------------------------------- the network namespace and its counters


def loopback_counters() -> dict | None:
    """The kernel's byte counters of `lo` (rx, tx) and the interfaces this namespace has."""
    try:
        return parse_net_dev(Path("/proc/net/dev").read_text())
    except OSError:
        return None


def parse_net_dev(text: str) -> dict | None:
    """{rx_bytes, tx_bytes, interfaces} of `lo` from /proc/net/dev's text; None without lo."""
    names, lo = [], None
    for line in text.splitlines()[2:]:
        name, _, rest = line.partition(":")
        names.append(name.strip())
        if name.strip() == "lo":
            fields = rest.split()
            lo = {"rx_bytes": int(fields[0]), "tx_bytes": int(fields[8])}
    return None if lo is None else {**lo, "interfaces": names}


def reexec_in_netns(argv: list[str]) -> int | None:
    """Run this script again inside a new network namespace with loopback up; None when unshare is not usable."""
    if shutil.which("unshare") is None or shutil.which("ip") is None:
        return None
    probe = subprocess.run(["unshare", "--net", "--", "ip", "link", "set", "lo", "up"], capture_output=True)
    if probe.returncode != 0:
        print(f"unshare --net is not usable here ({probe.stderr.decode().strip()[:200]}): no wire bytes", file=sys.stderr)
        return None
    cmd = ["unshare", "--net", "--", "sh", "-c", 'ip link set lo up && exec "$@"', "sh",
           sys.executable, __file__, *argv, IN_NETNS]
    return subprocess.run(cmd).returncode


# ---------------------------------------------------------------- one rank


def _remote_assignments(parallel, routing, num_local: int) -> int:
    """This rank's assignments whose expert lives on another EP rank, from the routing record."""
    owner_E = torch.arange(routing.num_experts) // num_local
    return int(routing.counts_E[owner_E != parallel.ep_rank].sum())


def wire_phase(parallel, sharded, x_TD: torch.Tensor, steps: int) -> dict:
    """Rank 0 reads the loopback counters around each step; every rank counts its remote assignments."""
    per_step, n_remote = [], []
    for _ in range(steps):
        parallel.barrier()
        before = loopback_counters() if parallel.is_main else None
        routing = train_step(sharded, x_TD)
        parallel.barrier()
        after = loopback_counters() if parallel.is_main else None
        n_remote.append(_remote_assignments(parallel, routing, sharded.dispatcher.num_local))
        if before and after:
            per_step.append({k: after[k] - before[k] for k in ("rx_bytes", "tx_bytes")})
    # after the window: the per-rank counts travel outside the counted steps
    all_n = torch.stack(parallel.all_gather(torch.tensor(n_remote, dtype=torch.int64)))  # [W, steps]
    b, D = x_TD.element_size(), x_TD.shape[-1]
    formula = [4 * D * b * int(all_n[:, s].sum()) for s in range(steps)]
    return {"per_step": per_step, "formula_bytes": formula, "n_remote_per_rank": all_n.tolist(),
            "interfaces": (loopback_counters() or {}).get("interfaces")}


def timing_phase(parallel, local, sharded, x_global: torch.Tensor, x_TD: torch.Tensor, reps: int) -> dict:
    """Alternating rounds: one process (rank 0, all experts, global batch) and the expert-parallel step."""
    def single():
        if parallel.is_main:
            train_step(local, x_global)

    fns = {"one_process": single, "expert_parallel": lambda: train_step(sharded, x_TD)}
    names = list(fns)
    times = {n: [] for n in names}
    a2a, cpu_waiting = [], []
    for r in range(1 + reps):
        for name in names[r % 2:] + names[: r % 2]:
            parallel.barrier()
            sharded.dispatcher.traffic.reset()
            start, cpu = time.perf_counter(), time.process_time()
            fns[name]()
            parallel.barrier()  # the step ends when the slowest rank is done
            if r >= 1:
                times[name].append(time.perf_counter() - start)
                if name == "expert_parallel":
                    a2a.append(sharded.dispatcher.traffic.seconds)
                else:  # on the other ranks: the CPU a rank burns while it waits for rank 0
                    cpu_waiting.append(time.process_time() - cpu)
    return {"times": times, "a2a_seconds": a2a, "cpu_while_waiting_s": cpu_waiting}


def worker(out_dir: Path, kernel: str, reps: int) -> None:
    """One rank: the wire window, then the interleaved timing against one process."""
    from moekit.parallel import apply_expert_parallel, init_expert_parallel

    torch.set_num_threads(1)
    parallel = init_expert_parallel(int(os.environ["WORLD_SIZE"]), timeout_s=300)
    W, rank, T = parallel.world_size, parallel.rank, SHAPE["tokens_per_rank"]
    cfg = layer_config(kernel)
    torch.manual_seed(0)
    local = MoELayer(cfg)
    torch.manual_seed(0)
    sharded = apply_expert_parallel(MoELayer(cfg), parallel)
    # requires_grad: inside a network the layer's input needs a gradient, so all four all-to-alls run
    x_global = torch.randn(W * T, SHAPE["hidden"], generator=torch.Generator().manual_seed(100), requires_grad=True)
    x_TD = x_global.detach()[rank * T : (rank + 1) * T].clone().requires_grad_(True)
    train_step(sharded, x_TD)  # warm-up
    result = {"rank": rank, "wire": wire_phase(parallel, sharded, x_TD, WIRE_STEPS),
              **timing_phase(parallel, local, sharded, x_global, x_TD, reps)}
    (out_dir / f"rank{rank}.json").write_text(json.dumps(result))
    parallel.close()


# ---------------------------------------------------------------- the parent


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
        if p.wait(timeout=900) != 0:
            raise SystemExit(f"a rank of the {world}-process run failed (exit {p.returncode})")
    return [json.loads((out_dir / f"rank{r}.json").read_text()) for r in range(world)]


def _quartiles(values: list[float]) -> list[float]:
    q = statistics.quantiles(values, n=4, method="inclusive") if len(values) > 1 else [values[0]] * 3
    return [q[0], q[2]]


def summarize(world: int, ranks: list[dict], isolated: bool) -> dict:
    main = ranks[0]
    one, ep = main["times"]["one_process"], main["times"]["expert_parallel"]
    ratios = [a / b for a, b in zip(ep, one)]
    wire = main["wire"]
    formula = sum(wire["formula_bytes"])
    tx = sum(s["tx_bytes"] for s in wire["per_step"]) if isolated and wire["per_step"] else None
    rx = sum(s["rx_bytes"] for s in wire["per_step"]) if tx is not None else None
    a2a = median(main["a2a_seconds"])
    return {
        "world": world, "ep": world, "rounds": len(ratios),
        "one_process_ms": median(one) * 1e3, "expert_parallel_ms": median(ep) * 1e3,
        "ratio_median": paired_ratio(ep, one), "ratio_quartiles": _quartiles(ratios),
        "ratio_min_max": [min(ratios), max(ratios)], "per_round_ratios": ratios,
        "all_to_all_ms": a2a * 1e3, "all_to_all_share": a2a / median(ep),
        "waiting_rank_cpu_share": median([c / t for r in ranks[1:] for c, t in zip(r["cpu_while_waiting_s"], one)]),
        "wire_steps": len(wire["formula_bytes"]), "formula_bytes": formula,
        "wire_tx_bytes": tx, "wire_rx_bytes": rx, "wire_over_formula": tx / formula if tx is not None else None,
        "per_step_tx_bytes": [s["tx_bytes"] for s in wire["per_step"]] if tx is not None else None,
        "per_step_formula_bytes": wire["formula_bytes"],
        "balanced_formula_bytes": len(wire["formula_bytes"]) * world * SHAPE["tokens_per_rank"]
        * a2a_bytes_per_token(SHAPE["hidden"], SHAPE["top_k"], world, 4),
    }


def make_targets(runs: dict[int, dict], isolated: bool) -> list[dict]:
    out = []
    for w, r in runs.items():
        if isolated:
            out.append(target(f"wire bytes / payload formula, {w} ranks (>= 1: the payload crossed)",
                              r["wire_over_formula"], 1.0, ">="))
            out.append(target(f"wire bytes / payload formula, {w} ranks (framing overhead bounded)",
                              r["wire_over_formula"], WIRE_MAX_RATIO, "<="))
        out.append(target(f"expert-parallel step / one process on the same global batch, {w} ranks (median of "
                          "per-round ratios)", r["ratio_median"], 1.0, "<="))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--kernel", default="auto")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument(IN_NETNS, action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(Path(args.worker), args.kernel, args.reps)
        return
    if not args.in_netns:
        rc = reexec_in_netns(sys.argv[1:])
        if rc is not None:
            raise SystemExit(rc)
    import tempfile

    counters = loopback_counters() if args.in_netns else None
    isolated = bool(counters) and counters["interfaces"] == ["lo"]
    rate = single_process_rate(args.kernel, args.reps)
    runs = {}
    for world in WORLDS:
        with tempfile.TemporaryDirectory() as tmp:
            runs[world] = summarize(world, run_ranks(world, Path(tmp), args.kernel, args.reps), isolated)
    result = _result(args, rate, runs, isolated)
    write_results("expert_parallel", result, _markdown(result))
    print(_markdown(result))


def _result(args, rate: dict, runs: dict[int, dict], isolated: bool) -> dict:
    gpu_rate = H100_BF16_DENSE_FLOPS * ASSUMED_MFU
    return {
        "benchmark": "expert_parallel",
        "shape": {**SHAPE, "dtype": "float32", "kernel": args.kernel},
        "network_namespace": {"isolated": isolated, "how": "unshare --net; ip link set lo up; counters of lo in "
                              "/proc/net/dev read by rank 0 between barriers around each step"},
        "single_process": rate,
        "runs": {str(w): r for w, r in runs.items()},
        "projection": {
            "assumptions": {
                "h100_bf16_dense_flops": H100_BF16_DENSE_FLOPS, "assumed_mfu": ASSUMED_MFU,
                "nvlink4_bytes_per_s_each_way": NVLINK4_BYTES_PER_S, "ib_ndr_bytes_per_s_each_way": IB_NDR_BYTES_PER_S,
                "assumed_link_efficiency": ASSUMED_LINK_EFFICIENCY, "gpus_per_node": GPUS_PER_NODE,
                "tokens_per_gpu_step": TOKENS_PER_GPU_STEP, "models": MODELS,
            },
            "gpu_rate_bf16": projection(gpu_rate, bytes_per_elem=2),
            "gpu_rate_fp32_tokens": projection(gpu_rate, bytes_per_elem=4),
            "measured_cpu_rate": projection(rate["flops_per_s"], bytes_per_elem=4),
        },
        "targets": make_targets(runs, isolated),
        "machine": machine_info("cpu"),
        "command": command_line().replace(" " + IN_NETNS, ""),
    }


def _markdown(result: dict) -> str:
    s, rate, m = result["shape"], result["single_process"], result["machine"]
    lines = [
        "# Expert parallelism: bytes on the wire and step time against one process (gloo, this machine)",
        "",
        f"Layer: {s['tokens_per_rank']} tokens per rank, hidden {s['hidden']}, {s['experts']} experts, top-{s['top_k']}, "
        f"expert width {s['expert_hidden']}, {s['dtype']}, kernel {s['kernel']}; forward+backward; EP = ranks; one torch "
        f"thread per process. Machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']}. The machine was shared with "
        f"other jobs while this ran (1-minute load average {m['load_average_1m']} at the end), and 4 ranks "
        "oversubscribe its 2 cores.",
        "",
        f"Single-process compute rate (all experts local, {rate['threads']} thread, {s['tokens_per_rank']} tokens): "
        f"{rate['flops_per_s'] / 1e9:.1f} GFLOP/s of expert FLOPs ({rate['seconds'] * 1e3:.1f} ms per forward+backward).",
        "",
        "## Bytes on the wire",
        "",
    ]
    lines += _wire_lines(result)
    lines += ["", "## Step time against one process on the same global batch", ""]
    rows = [[w, r["rounds"], f"{r['one_process_ms']:.1f}", f"{r['expert_parallel_ms']:.1f}", f"{r['ratio_median']:.2f}x",
             f"{r['ratio_quartiles'][0]:.2f}-{r['ratio_quartiles'][1]:.2f}",
             f"{r['ratio_min_max'][0]:.2f}-{r['ratio_min_max'][1]:.2f}",
             f"{r['all_to_all_ms']:.1f} ({r['all_to_all_share']:.0%})"] for w, r in result["runs"].items()]
    lines.append(markdown_table(["ranks", "rounds", "one process ms (global batch)", "expert parallel ms",
                                 "EP / one process (median of rounds)", "quartiles", "min-max", "in all-to-all ms (share)"],
                                rows))
    lines += ["", "One process: rank 0 alone, all experts, the whole global batch (ranks x tokens per rank), one "
              "thread; expert parallel: every rank its slice, timed from a barrier to the barrier after the step "
              "(the slowest rank). Rounds alternate the order; the ratio is taken per round. While rank 0 runs alone the other "
              "ranks wait in a gloo barrier; their CPU time over that wall time (median): "
              + ", ".join(f"{w} ranks {r['waiting_rank_cpu_share']:.0%}" for w, r in result["runs"].items())
              + " (0% would mean they leave the cores to rank 0).", "", "## Targets", ""]
    lines.append(markdown_table(["target", "value", "goal", "met"],
                                [[t["name"], t["value"], f"{t['direction']} {t['goal']}", t["met"]] for t in result["targets"]]))
    lines += ["", "## Projection", "", "See docs/scaling.md; GPU compute rate = H100 bf16 peak x assumed 40% MFU, "
              "links at an assumed 70% of published peak; bf16 tokens.", ""]
    rows = [[p["model"], p["gpus"], f"{p['ep']} x {p['dp']}", f"{p['a2a_GB_per_gpu_step']:.1f}", f"{p['compute_s']:.2f}",
             f"{p['a2a_s']:.2f}", f"{p['allreduce_s']:.2f}", f"{p['moe_layer_efficiency']:.0%}", f"{p['efficiency']:.0%}",
             f"{p['train_state_GB_per_gpu']:.0f}" + ("" if p["fits_80GB"] else " (over 80)")]
            for p in result["projection"]["gpu_rate_bf16"]]
    lines.append(markdown_table(["model", "GPUs", "EP x DP", "all-to-all GB / GPU / step", "compute s", "all-to-all s",
                                 "grad all-reduce s", "MoE-layer efficiency", "step efficiency", "train state GB / GPU"], rows))
    lines += ["", f"Command: `{result['command']}`"]
    return "\n".join(lines)


def _wire_lines(result: dict) -> list[str]:
    if not result["network_namespace"]["isolated"]:
        return ["Not measured: `unshare --net` was not usable on this machine, so the loopback counters would count "
                "other jobs' traffic too. (Counting bytes in a wrapper around the socket layer would restate what the "
                "code sends, not what crossed; it is not done.) Step times below are still measured."]
    rows = [[w, r["wire_steps"], f"{r['formula_bytes']:,}", f"{r['wire_tx_bytes']:,}", f"{r['wire_rx_bytes']:,}",
             f"{r['wire_over_formula']:.4f}", f"{r['balanced_formula_bytes']:,.0f}"]
            for w, r in result["runs"].items()]
    return [
        "The run sat in its own network namespace (`unshare --net`, loopback only), so the kernel's `lo` counters "
        "count this job alone. Rank 0 read /proc/net/dev between barriers around each expert-parallel step; the "
        "formula is 4 x D x 4 bytes x sum over ranks of the assignments routed to another rank's experts (dispatch "
        "and combine, forward and backward), counted from each step's routing record.",
        "",
        markdown_table(["ranks", "steps", "payload formula bytes (all steps)", "lo tx bytes", "lo rx bytes",
                        "wire / formula", "formula if routing were balanced"], rows),
        "",
        "Wire bytes above the formula: TCP/IP headers and ACKs, gloo's framing, the per-expert token counts, the "
        "router-statistics all-reduce and the two barriers around each step.",
    ]


if __name__ == "__main__":
    main()
