"""Expert parallelism: sharded runs equal one process; layout-free checkpoints; clear failures.

The multi-rank tests start real gloo processes on CPU. This file is also the
worker script: `python tests/test_parallel.py <job> <out_dir>` runs one rank
(RANK, WORLD_SIZE, MASTER_ADDR/PORT in the environment, as torchrun sets
them) and writes what it measured to out_dir; the tests compare in the
parent. Every launch has a hard timeout and kills its processes on expiry.

"Equal" means: the global batch split by rows over all ranks, compared with
one process on the whole batch, at atol 1e-5 (see moekit/parallel/).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from moekit.config import MoEConfig  # noqa: E402
from moekit.errors import ConfigError  # noqa: E402
from moekit.moe.layers import MoELayer  # noqa: E402

ATOL = 1e-5
LAUNCH_TIMEOUT_S = 150


# ---------------------------------------------------------------- shared by workers and tests


LAYER_CASES = {
    "dropless": dict(),
    "capacity": dict(capacity_factor=1.0),
    "random_drop": dict(capacity_factor=1.0, drop_policy="random"),
    "bias_shared": dict(bias_update_rate=0.05, num_shared_experts=1, shared_expert_gate=True),
    "sequence_balance": dict(balance_loss="sequence", capacity_factor=1.5, top_k=1),
    "bmm_kernel": dict(kernel="bmm", capacity_factor=1.25),  # one process pads slots; EP hands experts compact rows
}


def layer_config(**kw) -> MoEConfig:
    base = dict(hidden_size=16, num_experts=4, top_k=2, expert_hidden=12, kernel="loop")
    return MoEConfig(**{**base, **kw})


def layer_inputs(cfg: MoEConfig):
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(4, 6, cfg.hidden_size, generator=gen)  # 4 sequences: splits over 1, 2 or 4 ranks
    g = torch.randn(4, 6, cfg.hidden_size, generator=gen)
    return x, g


def layer_loss(y, g, routing):
    """A mean over tokens (so the mean of the ranks' losses is the global loss) plus the router losses."""
    aux = routing.aux_losses
    return (y * g).sum(-1).mean() + 0.1 * aux.get("balance", 0.0) + 0.01 * aux["z"]


def tiny_lm_config(capacity: float = 1.25):
    from moekit.models.decoder import ModelConfig

    moe = MoEConfig(num_experts=4, top_k=2, expert_hidden=16, kernel="loop", capacity_factor=capacity)
    return ModelConfig(vocab_size=64, hidden_size=16, num_layers=2, num_heads=2, num_kv_heads=1, max_seq_len=16,
                       dense_hidden=32, moe=moe)


def tiny_fit(run_dir, parallel=None, steps: int = 3, resume: bool = False):
    """3 steps of a tiny DecoderLM with accumulation, clipping and capacity limits."""
    from moekit.data.text import batch_at
    from moekit.models.decoder import DecoderLM, lm_loss
    from moekit.train.loop import TrainConfig, fit

    tc = TrainConfig(steps=steps, batch_size=4, seq_len=8, grad_accum=2, lr=1e-2, warmup_steps=1, eval_every=0,
                     save_every=2, keep_last=5, seed=0, balance_loss_weight=0.1, device="cpu")
    torch.manual_seed(0)
    model = DecoderLM(tiny_lm_config())
    if parallel is not None:
        from moekit.parallel import apply_expert_parallel

        apply_expert_parallel(model, parallel)
    tokens = torch.randint(0, 64, (4000,), generator=torch.Generator().manual_seed(1))

    def loss_fn(m, batch):
        x, y = batch
        loss, parts = lm_loss(m(x), y, tc.balance_loss_weight, tc.z_loss_weight)
        return loss, {k: float(v.detach()) for k, v in parts.items()}

    return fit(model, tc, batch_fn=lambda i: batch_at(tokens, i, tc.batch_size, tc.seq_len, tc.seed), loss_fn=loss_fn,
               run_dir=run_dir, config_dict={"model": "tiny"}, progress=False, parallel=parallel, resume=resume)


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return float((a.detach().double() - b.detach().double()).abs().max()) if a.numel() else 0.0


# ---------------------------------------------------------------- worker jobs (one rank each)


def _layer_check(parallel, name: str, cfg: MoEConfig) -> dict:
    """One layer, forward + backward, sharded vs one process on the whole batch."""
    from moekit.parallel import apply_expert_parallel, expert_shards

    x, g = layer_inputs(cfg)
    torch.manual_seed(0)
    ref = MoELayer(cfg)
    x_ref = x.clone().requires_grad_(True)
    y_ref, r_ref = ref(x_ref)
    layer_loss(y_ref, g, r_ref).backward()

    torch.manual_seed(0)
    layer = apply_expert_parallel(MoELayer(cfg), parallel)
    W, rank = parallel.world_size, parallel.rank
    rows = slice(rank * 4 // W, (rank + 1) * 4 // W)
    x_mine = x[rows].clone().requires_grad_(True)
    y, routing = layer(x_mine)
    layer_loss(y, g[rows], routing).backward()
    parallel.reduce_gradients(layer)

    T = x_mine.shape[0] * x_mine.shape[1]
    kept_ref = {(int(t) - rank * T, int(e)) for t, e in zip(r_ref.token_idx_N, r_ref.expert_idx_N) if rank * T <= t < (rank + 1) * T}
    kept = {(int(t), int(e)) for t, e in zip(routing.token_idx_N, routing.expert_idx_N)}
    shards = expert_shards(layer)
    grads = {}
    ref_params = dict(ref.named_parameters())
    for pname, p in layer.named_parameters():
        want = ref_params[pname].grad
        d = shards.get(id(p))
        if d is not None:
            want = want[d.first_local : d.first_local + d.num_local]
        grads[pname] = max_diff(p.grad, want)
    out = {
        "y": max_diff(y, y_ref[rows]),
        "x_grad": max_diff(x_mine.grad / W, x_ref.grad[rows]),  # rank loss = W x its share of the global loss
        "grads": max(grads.values()),
        # the sequence-wise loss is a mean over sequences, so each rank holds its own share (gradients still match)
        "balance": 0.0 if cfg.balance_loss == "sequence" else max_diff(
            routing.aux_losses.get("balance", torch.zeros(())), r_ref.aux_losses.get("balance", torch.zeros(()))),
        "kept_equal": kept == kept_ref,
        "dropped": r_ref.num_dropped,
    }
    if cfg.bias_update_rate > 0:  # the optimizer pre-step hook's update (moe/balance.py), from the global counts
        out["bias_all_reduces"] = _bias_step(ref, layer, parallel)
        out["bias"] = max_diff(layer.router.expert_bias, ref.router.expert_bias)
    full = parallel.full_state_dict(layer)
    out["full_state"] = max(max_diff(full[k], v) for k, v in ref.state_dict().items() if k in full)
    return out


def _bias_step(ref, layer, parallel) -> int:
    """The bias update one process makes on `ref` and the sharded ranks on `layer`; how many all-reduces it took."""
    from moekit.moe.balance import balanced_routers, update_expert_bias

    update_expert_bias(balanced_routers(ref))
    calls, real = [], parallel.all_reduce
    parallel.all_reduce = lambda t, *a, **kw: (calls.append(t.numel()), real(t, *a, **kw))[1]
    try:
        update_expert_bias(balanced_routers(layer), parallel)
    finally:
        del parallel.all_reduce
    return len(calls)


CLI_OVERRIDES = [
    "train.steps=4", "train.save_every=2", "train.eval_every=2", "train.batch_size=4", "train.seq_len=16",
    "model.hidden_size=16", "model.num_layers=2", "model.num_heads=2", "model.num_kv_heads=1", "model.dense_hidden=32",
    "moe.expert_hidden=16", "moe.capacity_factor=1.25", "train.device=cpu",  # compared bitwise: CPU even where CUDA is
]


def write_text_corpus(path: Path) -> Path:
    import random

    rng = random.Random(0)
    words = "the of and to in is was for on that with as by at from his her an which or be are".split()
    path.write_text(" ".join(rng.choice(words) for _ in range(20000)))
    return path


def _equality(out_dir: Path, layouts: list[int]) -> dict:
    """Layer checks and 3 training steps of the tiny DecoderLM for each EP size (DP = world / EP)."""
    from moekit.parallel import init_expert_parallel

    results, contexts = {}, {}
    for ep in layouts:
        parallel = contexts[ep] = init_expert_parallel(ep, timeout_s=60)  # the first one owns the process group
        for name, kw in LAYER_CASES.items():
            results[f"ep{ep}/{name}"] = _layer_check(parallel, name, layer_config(**kw))
        results[f"ep{ep}/fit_step"] = tiny_fit(out_dir / f"run-ep{ep}", parallel).step
    return results, contexts


def job_two(out_dir: Path, corpus: str) -> None:
    """2 ranks: bad input, equality at EP 2 and EP 1 x DP 2, and `moekit train --expert-parallel 2`."""
    from moekit.cli.main import main
    from moekit.parallel import init_expert_parallel

    messages = _bad_input()
    results, contexts = _equality(out_dir, [2])
    results["ep1/capacity"] = _layer_check(init_expert_parallel(1), "capacity", layer_config(capacity_factor=1.0))
    cli = ["train", "--preset", "tiny", "--data", corpus, "--out", str(out_dir / "cli"), "--expert-parallel", "2",
           "--no-sample", "--quiet", *CLI_OVERRIDES]
    results["cli_rc"] = main(cli)
    (out_dir / f"rank{os.environ['RANK']}.json").write_text(json.dumps({"equality": results, "bad_input": messages}))
    _fail_at_step(contexts[2], out_dir, "die")  # last: a dead peer breaks the process group


def job_four(out_dir: Path) -> None:
    """4 ranks: equality at EP 4 and EP 2 x DP 2; the EP-2 checkpoint (step 2) resumed at EP 4."""
    import shutil

    results, contexts = _equality(out_dir, [4, 2])
    parallel = contexts[4]
    if parallel.is_main:
        shutil.copytree(out_dir / "run-ep2", out_dir / "resume-ep4")
        shutil.rmtree(out_dir / "resume-ep4" / "step-00000003")
        (out_dir / "resume-ep4" / "latest").write_text("step-00000002\n")
    parallel.barrier()
    results["resume_step"] = tiny_fit(out_dir / "resume-ep4", parallel, resume=True).step
    (out_dir / f"rank{os.environ['RANK']}.json").write_text(json.dumps({"equality": results}))
    parallel.close()


def _bad_input() -> dict:
    """Each mistake must raise the same clear error on every rank, and leave no rank behind."""
    from moekit.parallel import apply_expert_parallel, init_expert_parallel

    parallel = init_expert_parallel(2, timeout_s=30)
    messages = {}
    config = {"model": {"num_experts": 8 if parallel.rank == 0 else 4}, "train": {"steps": 3}}
    try:
        parallel.check_same(config, "config")
    except ConfigError as e:
        messages["mismatch"] = str(e)
    for key, experts in (("too_few_experts", 1), ("uneven_experts", 3)):
        try:
            apply_expert_parallel(MoELayer(layer_config(num_experts=experts, top_k=1)), parallel)
        except ConfigError as e:
            messages[key] = str(e)
    try:
        parallel.shard_batch(torch.zeros(3, 5))
    except ConfigError as e:
        messages["uneven_batch"] = str(e)
    parallel.barrier()  # still in step: nothing above left a rank behind
    return messages


def job_hang(out_dir: Path) -> None:
    from moekit.parallel import init_expert_parallel

    _fail_at_step(init_expert_parallel(2), out_dir, "hang")  # timeout from MOEKIT_DIST_TIMEOUT


def _fail_at_step(parallel, out_dir: Path, mode: str) -> None:
    """Rank 1 dies (or stops answering) at step 2; rank 0 must stop with a ParallelError, as the CLI prints it."""
    from moekit.parallel import ParallelError, apply_expert_parallel

    cfg = layer_config()
    torch.manual_seed(0)
    layer = apply_expert_parallel(MoELayer(cfg), parallel)
    x, g = layer_inputs(cfg)
    started = time.monotonic()
    try:
        for step in range(4):
            if step == 2 and parallel.rank == 1:
                if mode == "die":
                    os._exit(3)
                time.sleep(parallel.timeout_s + 1)  # past rank 0's timeout, then gone
                os._exit(3)
            y, routing = layer(x[2 * parallel.rank : 2 * parallel.rank + 2])
            layer_loss(y, g[:2], routing).backward()
            parallel.reduce_gradients(layer)
            if parallel.rank == 0:
                started = time.monotonic()
    except ParallelError as e:
        (out_dir / f"{mode}.json").write_text(json.dumps({"error": str(e), "seconds": time.monotonic() - started}))
        print(f"moekit: error: {e}", file=sys.stderr)
        os._exit(2)  # do not wait on the dead peer in the process-group teardown
    os._exit(0)


# ---------------------------------------------------------------- launching ranks


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(world: int, job: list[str], tmp: Path, timeout: float = LAUNCH_TIMEOUT_S, env: dict | None = None):
    """Run `job` on `world` ranks (environment as torchrun sets it); returns [(returncode, stdout, stderr)] per rank.

    One launcher process imports torch and moekit once and forks the ranks
    (CPU only, before any thread pool or process group exists): starting
    each rank from scratch costs seconds of CPU on this 2-core machine. The
    launcher and its ranks form a new session, killed as a whole on timeout.
    """
    base = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "WORLD_SIZE": str(world),
            "LOCAL_WORLD_SIZE": str(world), "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), **(env or {})}
    with open(tmp / "launcher.txt", "w+") as log:
        p = subprocess.Popen([sys.executable, __file__, "--ranks", str(world), str(tmp), *job], cwd=ROOT, env=base,
                             stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)  # the launcher's own session: it and the ranks it forked
            p.wait()
            raise AssertionError(f"ranks still running after {timeout} s: {_rank_logs(tmp, world)}") from None
        log.seek(0)
        codes = json.loads((tmp / "ranks.json").read_text()) if (tmp / "ranks.json").is_file() else None
        assert p.returncode == 0 and codes is not None, f"the launcher failed: {log.read()[-4000:]}"
    return [(codes[str(r)], *_rank_logs(tmp, world)[r]) for r in range(world)]


def _rank_logs(tmp: Path, world: int) -> list[tuple[str, str]]:
    def read(path):
        return path.read_text() if path.is_file() else ""

    return [(read(tmp / f"out{r}.txt"), read(tmp / f"err{r}.txt")) for r in range(world)]


def _fork_ranks(world: int, tmp: Path, job: list[str]) -> None:
    """The launcher: heavy imports once, then one forked child per rank; writes ranks.json (exit codes)."""
    import traceback

    import moekit.parallel  # noqa: F401

    if job[0] != "hang":  # jobs that train: what the first optimizer and the CLI import, seconds per process
        import torch._dynamo  # noqa: F401

        import moekit.cli.main  # noqa: F401
        import moekit.train.lm  # noqa: F401

    sys.stdout.flush(), sys.stderr.flush()
    ranks = {}
    for rank in range(world):
        pid = os.fork()
        if pid == 0:
            os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank))
            for fd, name in ((1, f"out{rank}.txt"), (2, f"err{rank}.txt")):
                os.dup2(os.open(tmp / name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), fd)
            code = 0
            try:
                run_job(job)
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else 1
            except BaseException:
                traceback.print_exc()
                code = 1
            sys.stdout.flush(), sys.stderr.flush()
            os._exit(code)
        ranks[pid] = rank
    codes = {}
    while ranks:
        pid, status = os.wait()
        codes[ranks.pop(pid)] = os.waitstatus_to_exitcode(status)
    (tmp / "ranks.json").write_text(json.dumps(codes))


def _assert_ok(results):
    for rank, (rc, out, err) in enumerate(results):
        assert rc == 0, f"rank {rank} exited with {rc}:\n{out}\n{err[-4000:]}"


# ---------------------------------------------------------------- tests: bad input without processes


def _clear_torchrun_env(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)


def test_missing_torchrun_environment(monkeypatch):
    from moekit.parallel import init_expert_parallel

    _clear_torchrun_env(monkeypatch)
    with pytest.raises(ConfigError, match=r"needs the torchrun environment.*RANK.*torchrun --nproc-per-node 2"):
        init_expert_parallel(2)


def test_world_not_divisible_by_ep(monkeypatch):
    from moekit.parallel import init_expert_parallel

    monkeypatch.setenv("RANK", "0"), monkeypatch.setenv("WORLD_SIZE", "3"), monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1"), monkeypatch.setenv("MASTER_PORT", "1")  # never contacted
    with pytest.raises(ConfigError, match="world size 3 .* not divisible by the expert-parallel size 2"):
        init_expert_parallel(2)
    with pytest.raises(ConfigError, match="must be an integer >= 1"):
        init_expert_parallel(0)


def test_cli_bad_layout_is_one_line(monkeypatch, capsys, tmp_path):
    from moekit.cli.main import main

    _clear_torchrun_env(monkeypatch)
    rc = main(["train", "--preset", "tiny", "--out", str(tmp_path / "run"), "--expert-parallel", "2", "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2 and "needs the torchrun environment" in err and "Traceback" not in err


def test_layout_groups():
    from moekit.parallel import Layout, check_experts

    lay = Layout(world_size=8, ep_size=4, rank=6)
    assert (lay.dp_size, lay.ep_rank, lay.dp_rank) == (2, 2, 1)
    assert lay.ep_group_ranks(1) == [4, 5, 6, 7] and lay.expert_dp_ranks(2) == [2, 6]
    with pytest.raises(ConfigError, match="at least 4 experts"):
        check_experts(2, 4)
    with pytest.raises(ConfigError, match="6 experts, which do not split evenly over 4"):
        check_experts(6, 4)


# ---------------------------------------------------------------- tests: 2 and 4 gloo processes


def _check_equality(results: dict) -> None:
    for key, r in results.items():
        if not isinstance(r, dict):
            continue
        for what in ("y", "x_grad", "grads", "balance", "full_state", "bias"):
            if what in r:
                assert r[what] <= ATOL, f"{key}: {what} differs by {r[what]:.3g}"
        assert r["kept_equal"], f"{key}: the kept assignments differ from one process"
        assert r.get("bias_all_reduces", 1) == 1, f"{key}: the bias update took {r['bias_all_reduces']} all-reduces"
    assert all(v == 3 for k, v in results.items() if k.endswith("fit_step"))
    dropped = [r["dropped"] for k, r in results.items() if k.endswith("/capacity")]
    assert dropped and all(d > 0 for d in dropped), "the capacity case must actually drop tokens"


def _check_run_equal(ep_run: Path, ref_run: Path, steps=("step-00000002", "step-00000003"),
                     keys=("loss", "ce", "balance", "z", "grad_norm", "lr")) -> None:
    """Same checkpoints (model and optimizer state) and the same logged metrics as one process."""
    from moekit.checkpoints import load_checkpoint

    for step in steps:
        ref, got = load_checkpoint(ref_run / step), load_checkpoint(ep_run / step)
        assert got.model_state.keys() == ref.model_state.keys()
        for k, v in ref.model_state.items():
            assert max_diff(got.model_state[k], v) <= ATOL, f"{step} {k}"
        for idx, entry in ref.optimizer_state["state"].items():
            for k, v in entry.items():
                assert max_diff(torch.as_tensor(got.optimizer_state["state"][idx][k]), torch.as_tensor(v)) <= ATOL, (step, idx, k)
        assert got.trainer_state["step"] == ref.trainer_state["step"] and got.config == ref.config
    ref_log = [json.loads(line) for line in (ref_run / "metrics.jsonl").read_text().splitlines()]
    got_log = [json.loads(line) for line in (ep_run / "metrics.jsonl").read_text().splitlines()]
    assert len(got_log) == len(ref_log)
    for a, b in zip(got_log, ref_log):
        assert a.keys() == b.keys()
        for k in keys:
            if k in b:
                assert abs(a[k] - b[k]) <= ATOL, (k, a[k], b[k])


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("single") / "run"
    tiny_fit(run)
    return run


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """One launch of 2 gloo ranks, shared by the tests below (each process start costs seconds here)."""
    out = tmp_path_factory.mktemp("two")
    corpus = write_text_corpus(out / "corpus.txt")
    results = launch(2, ["two", str(out), str(corpus)], out)
    # the job ends with rank 1 dying on purpose (see test_failed_rank_stops_the_others)
    assert [rc for rc, _, _ in results] == [2, 3], results
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    return out, corpus, ranks


def test_two_ranks_equal_single_process(two_ranks, reference_run):
    """MoE layer forward/backward (5 router/capacity cases) and 3 DecoderLM steps at EP 2; the layer at EP 1 x DP 2."""
    out, _, ranks = two_ranks
    for r in ranks:
        _check_equality(r["equality"])
    _check_run_equal(out / "run-ep2", reference_run)


def test_four_ranks_equal_single_process(tmp_path, reference_run):
    """The same at EP 4 and EP 2 x DP 2, and an EP-2 checkpoint resumed at EP 4."""
    _assert_ok(launch(4, ["four", str(tmp_path)], tmp_path))
    for r in range(4):
        results = json.loads((tmp_path / f"rank{r}.json").read_text())["equality"]
        _check_equality(results)
        assert results["resume_step"] == 3
    for run in ("run-ep4", "run-ep2", "resume-ep4"):
        _check_run_equal(tmp_path / run, reference_run)


def test_ep2_checkpoint_resumes_at_ep1(two_ranks, reference_run, tmp_path):
    """A checkpoint written at EP 2 (step 2) continues in one process to the single-process result."""
    import shutil

    out, _, _ = two_ranks
    run = tmp_path / "resume"
    shutil.copytree(out / "run-ep2", run)
    shutil.rmtree(run / "step-00000003")
    (run / "latest").write_text("step-00000002\n")
    assert tiny_fit(run, resume=True).step == 3
    _check_run_equal(run, reference_run)


def test_cli_expert_parallel_equals_single_process(two_ranks, tmp_path):
    """`moekit train --expert-parallel 2` on 2 ranks: the progress metrics, evals and checkpoints of one process."""
    from moekit.train.lm import resolve_run_config, train_lm

    out, corpus, ranks = two_ranks
    assert [r["equality"]["cli_rc"] for r in ranks] == [0, 0]
    cfg = resolve_run_config("tiny", None, CLI_OVERRIDES, str(corpus))
    summary = train_lm(cfg, tmp_path / "single", progress=False)
    assert summary["is_main"]
    _check_run_equal(out / "cli", tmp_path / "single", steps=("step-00000002", "step-00000004"),
                     keys=("loss", "ce", "balance", "z", "grad_norm", "lr", "max_over_mean_load", "val_loss",
                           "val_max_over_mean_load"))
    assert (out / "cli" / "expert_load.png").is_file()


def test_bad_input_raises_on_every_rank(two_ranks):
    _, _, ranks = two_ranks
    msgs = [r["bad_input"] for r in ranks]
    assert msgs[0] == msgs[1], "every rank must report the same mistake"
    m = msgs[0]
    assert "rank 1 differs from rank 0 in model.num_experts" in m["mismatch"]
    assert "needs at least 2 experts per MoE layer" in m["too_few_experts"]
    assert "3 experts, which do not split evenly over 2" in m["uneven_experts"]
    assert "3 rows cannot be split evenly over 2 ranks" in m["uneven_batch"]


@pytest.mark.slow
def test_torchrun_launch(tmp_path):
    """The real launcher: torchrun --nproc-per-node 2 -m moekit train --expert-parallel 2."""
    corpus = write_text_corpus(tmp_path / "corpus.txt")
    cmd = [str(Path(sys.executable).with_name("torchrun")), "--nproc-per-node", "2", "--master-port", str(free_port()),
           "-m", "moekit", "train", "--preset", "tiny", "--data", str(corpus), "--out", str(tmp_path / "run"),
           "--expert-parallel", "2", "--no-sample", "--quiet", *CLI_OVERRIDES]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT_S,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr[-4000:]
    assert "checkpoint:" in done.stdout and (tmp_path / "run" / "step-00000004" / "model.safetensors").is_file()


def _check_failure_report(report: dict, limit_s: float) -> None:
    assert "rank 0 of 2" in report["error"] and "another rank exited, crashed or did not respond" in report["error"]
    assert "MOEKIT_DIST_TIMEOUT" in report["error"]
    # from rank 0's last good step to its error
    assert report["seconds"] < limit_s, report


def test_dead_rank_stops_the_others(two_ranks):
    """Rank 1 exits mid-training: rank 0 raises ParallelError at once instead of waiting."""
    out, _, _ = two_ranks
    _check_failure_report(json.loads((out / "die.json").read_text()), limit_s=10)


def test_silent_rank_times_out(tmp_path):
    """Rank 1 stops answering: rank 0 raises ParallelError after MOEKIT_DIST_TIMEOUT instead of hanging."""
    timeout = 2
    results = launch(2, ["hang", str(tmp_path)], tmp_path, timeout=60, env={"MOEKIT_DIST_TIMEOUT": str(timeout)})
    assert results[0][0] == 2, f"rank 0 exited with {results[0][0]}: {results[0][2][-3000:]}"
    _check_failure_report(json.loads((tmp_path / "hang.json").read_text()), limit_s=timeout + 10)


def run_job(job: list[str]) -> None:
    name, out = job[0], Path(job[1])
    {"two": lambda: job_two(out, job[2]), "four": lambda: job_four(out), "hang": lambda: job_hang(out)}[name]()


if __name__ == "__main__":
    torch.set_num_threads(1)
    if sys.argv[1] == "--ranks":
        _fork_ranks(int(sys.argv[2]), Path(sys.argv[3]), sys.argv[4:])
    else:  # one rank, started by torchrun or by hand: python tests/test_parallel.py two OUT CORPUS
        run_job(sys.argv[1:])
