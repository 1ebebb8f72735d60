"""Expert offloading: budgets, slow tiers, exactness of offloaded generation, failed reads, statistics, CLI.

The backbone is equivalence: greedy generation with the experts offloaded
(every tier, several budgets, every policy and predictor, lean decode and the
MoELayer path, batches that need more experts than fit) gives exactly the
tokens of all-resident generation, and a failed or changed slow-tier read
raises instead of giving tokens.
"""

import os
import time

import pytest
import torch

from moekit import hf
from moekit.checkpoints import save_checkpoint, save_tensors
from moekit.cli.main import main
from moekit.config import MoEConfig, to_dict
from moekit.data.text import Tokenizer
from moekit.errors import MoekitError
from moekit.models.decoder import DecoderLM, ModelConfig
from moekit.infer.engine import Engine
from moekit.infer.expert_cache import POLICIES
from moekit.infer.offload import (
    Budget, BudgetError, DiskTier, EmulatedLinkTier, LayerShape, MemoryTier, OffloadError, SlowTier, SlowTierError,
    find_moe_layers, format_stats, offload_model, parse_bandwidth, parse_duration,
)
from moekit.infer.sampling import SamplingConfig
from moekit.train.lm import DataConfig, RunConfig
from moekit.train.loop import TrainConfig

PROMPTS = [[5, 17, 3, 99, 42, 8, 23], [61, 2]]


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_config(**moe) -> ModelConfig:
    moe_cfg = MoEConfig(**{"num_experts": 8, "top_k": 2, "expert_hidden": 32, **moe})
    return ModelConfig(vocab_size=128, hidden_size=32, num_layers=3, num_heads=4, num_kv_heads=2, max_seq_len=128,
                       dense_hidden=64, moe=moe_cfg)


def tiny_model(seed: int = 0, **moe) -> DecoderLM:
    torch.manual_seed(seed)
    model = DecoderLM(tiny_config(**moe)).eval()
    with torch.no_grad():  # sharper, input-dependent routing than the 0.02-std init gives
        for layer in model.layers:
            layer.mlp.router.gate.weight.normal_(0, 1.0)
    return model


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny moekit checkpoint on disk (config, weights, tokenizer)."""
    d = tmp_path_factory.mktemp("offload") / "run"
    model = tiny_model()
    cfg = RunConfig(model=model.cfg, train=TrainConfig(), data=DataConfig())
    save_checkpoint(d, 0, config=to_dict(cfg), model_state=model.state_dict(), optimizer_state=None,
                    trainer_state={}, tokenizer=Tokenizer.byte_level())
    return d


def generate(engine: Engine, prompts=PROMPTS, n: int = 12) -> list[list[int]]:
    cfg = SamplingConfig(max_new_tokens=n, temperature=0, stop_token_ids=[])
    return [c.token_ids for c in engine.generate_ids([list(p) for p in prompts], cfg)]


@pytest.fixture(scope="module")
def reference(model_dir):
    engine = Engine.load(model_dir)
    return {"lean": generate(engine), "single": generate(engine, PROMPTS[:1]),
            "layer": generate(Engine(engine.model, engine.tokenizer))}


# ---------------------------------------------------------------- budgets and sizes


def test_budget_parsing_and_slots():
    shapes = [LayerShape(8, 64, 32, 32, torch.float32, 2), LayerShape(16, 64, 32, 32, torch.float32, 2)]
    per = shapes[0].bytes_per_expert
    assert Budget.parse("25%").slots(shapes) == [2, 4]
    assert Budget.parse("100%").slots(shapes) == [8, 16]
    assert Budget.parse(str(12 * per)).slots(shapes) == [4, 8]  # bytes: the same fraction of every layer
    assert Budget.parse("1.5MiB").bytes == 1.5 * 2**20
    assert Budget.parse("0.25").slots(shapes) == [2, 4] and Budget.parse("0.25").fraction == 0.25  # a bare fraction
    assert Budget.parse(0.5).fraction == 0.5 and Budget.parse(1.0).fraction == 1.0
    with pytest.raises(BudgetError, match=r"fraction below 1 \(0.25\), a percentage \(25%\), or a size in bytes"):
        Budget.parse("2.5")
    with pytest.raises(BudgetError, match=r"too small: it holds 1 expert\(s\) of MoE layer 0, which routes each token to 2; "
                                          r"the minimum is 25% of experts \(\d+ bytes"):
        Budget.parse("12.5%").slots(shapes)
    for bad in ("abc", "0%", "150%", "-3MB", "12 parsecs"):
        with pytest.raises(BudgetError, match="invalid"):
            Budget.parse(bad)
    assert parse_bandwidth("2GB/s") == 2e9 and parse_duration("50us") == pytest.approx(5e-5)
    with pytest.raises(BudgetError):
        parse_duration("soon")


def test_the_minimum_in_the_error_is_enough(model_dir):
    model = Engine.load(model_dir).model
    with pytest.raises(BudgetError) as info:
        offload_model(model, "10%", tier="memory")
    minimum = int(str(info.value).split("of experts (")[1].split(" bytes")[0])
    offload_model(model, str(minimum), tier="memory").close()


# ---------------------------------------------------------------- exactness


@pytest.mark.parametrize("tier", ["disk", "emulated", "memory"])
def test_offloaded_generation_gives_the_resident_tokens(model_dir, reference, tier):
    engine = Engine.load(model_dir)
    offloader = engine.offload("25%", tier=tier, link_bandwidth="1GB/s", link_latency="20us")
    trace = None
    for budget in ("25%", "50%", "100%"):
        for policy in POLICIES:
            for predictor in ("none", "prefetch-all", "next-gate"):
                if policy == "belady":
                    offloader.configure(budget, "lru", predictor)
                    generate(engine)
                    trace = offloader.trace
                offloader.configure(budget, policy, predictor, trace=trace)
                assert generate(engine) == reference["lean"], (tier, budget, policy, predictor)
                stats = offloader.stats()
                assert stats["hits"] + stats["misses"] == stats["accesses"] > 0
                assert stats["bytes_moved"] == stats["transfers"] * layer_bytes(offloader)
    offloader.close()


def layer_bytes(offloader) -> int:
    sizes = {s.bytes_per_expert for s in offloader.shapes}
    assert len(sizes) == 1
    return sizes.pop()


def test_moe_layer_path_and_waves_give_the_resident_tokens(model_dir, reference):
    """25% of 8 experts = 2 slots, so a batch needs several waves."""
    engine = Engine.load(model_dir)
    offloader = engine.offload("25%", tier="disk", predictor="next-gate")
    assert generate(engine) == reference["layer"]
    assert offloader.stats()["misses"] > 0
    offloader.close()


def test_offloaded_forward_is_bit_identical():
    """Prefill-sized inputs (padded bmm or grouped layouts chosen as the resident layer would) and waves."""
    model = tiny_model(1)
    x = torch.randint(0, 128, (3, 40))
    with torch.no_grad():
        want = model(x).logits
        offloader = offload_model(model, "25%", tier="memory", predictor="next-gate")
        got = model(x).logits
        offloader.configure("100%", "lfu", "prefetch-all")
        again = model(x).logits
    assert torch.equal(got, want) and torch.equal(again, want)
    offloader.close()


def test_hf_layout_checkpoint_reads_per_expert_tensors(tmp_path):
    model = tiny_model(2)
    for arch in ("mixtral", "qwen3_moe"):
        if arch == "qwen3_moe":
            cfg = tiny_config()
            cfg.qk_norm = "head"
            model = DecoderLM(cfg).eval()
        d = hf.save(model, tmp_path / arch, arch=arch, max_shard_bytes=40_000)  # several shards + an index
        assert (d / "model.safetensors.index.json").is_file()
        resident = Engine.load(d)
        want = generate(resident, PROMPTS[:1], 8)
        engine = Engine.load(d)
        offloader = engine.offload("50%", tier="disk", predictor="next-gate")
        assert isinstance(offloader.tier, DiskTier)
        assert generate(engine, PROMPTS[:1], 8) == want
        offloader.close()


def test_disk_tier_reads_other_dtypes_by_converting(tmp_path):
    model = tiny_model(3)
    state = {k: (v.to(torch.bfloat16) if "experts" in k else v) for k, v in model.state_dict().items()}
    save_tensors(tmp_path / "model.safetensors", state)
    with torch.no_grad():
        for layer in model.layers:  # the model holds what the bf16 file holds, in float32
            layer.mlp.experts.w_in_EHD.copy_(layer.mlp.experts.w_in_EHD.bfloat16().float())
            layer.mlp.experts.w_out_EDF.copy_(layer.mlp.experts.w_out_EDF.bfloat16().float())
        x = torch.randint(0, 128, (1, 9))
        want = model(x).logits
        offloader = offload_model(model, "50%", checkpoint=tmp_path)
        assert torch.equal(model(x).logits, want)
    offloader.close()


# ---------------------------------------------------------------- failures never give tokens


def _rewrite_during_generation(engine, path, action):
    calls = []

    def on_token(i, tok, text):
        calls.append(tok)
        if len(calls) == 3:
            action(path)

    cfg = SamplingConfig(max_new_tokens=30, temperature=0, stop_token_ids=[])
    return engine.generate_ids([PROMPTS[0]], cfg, on_token=on_token)


@pytest.mark.parametrize("action, message", [
    (lambda p: p.write_bytes(p.read_bytes()), "changed during generation"),
    (lambda p: os.utime(p, ns=(1, 1)), "changed during generation"),
    (lambda p: p.unlink(), "disappeared during generation"),
    (lambda p: os.truncate(p, 1000), "changed during generation|ended after"),
])
def test_a_slow_tier_file_that_changes_or_disappears_stops_generation(model_dir, tmp_path, action, message):
    import shutil

    d = tmp_path / "copy"
    shutil.copytree(model_dir, d)
    engine = Engine.load(d)
    offloader = engine.offload("25%", tier="disk")  # 2 slots of 8: misses all along
    path = offloader.tier.files[0]
    with pytest.raises(SlowTierError, match=message):
        _rewrite_during_generation(engine, path, action)
    with pytest.raises(SlowTierError):  # and it stays stopped
        generate(engine, PROMPTS[:1], 2)


class FailingTier(SlowTier):
    """Reads from memory, then fails from the n-th read on."""

    kind, label = "failing", "failing test tier"

    def __init__(self, inner: SlowTier, fail_at: int):
        self.inner, self.fail_at, self.reads = inner, fail_at, 0

    def read(self, layer, expert, dst_in, dst_out):
        self.reads += 1
        if self.reads >= self.fail_at:
            dst_in.fill_(float("nan"))  # a torn slot: must never be computed with
            raise OSError("the device went away")
        return self.inner.read(layer, expert, dst_in, dst_out)


@pytest.mark.parametrize("predictor", ["none", "prefetch-all"])
def test_a_failed_transfer_raises_even_when_nobody_waits_for_it(predictor):
    model = tiny_model(4)
    weights = [(m.experts.w_in_EHD.detach().clone(), m.experts.w_out_EDF.detach().clone()) for _, m in find_moe_layers(model)]
    tier = FailingTier(MemoryTier(weights), fail_at=7)
    offload_model(model, "50%", tier=tier, predictor=predictor)
    engine = Engine(model)
    with pytest.raises(OSError, match="went away"):
        generate(engine, PROMPTS[:1], 20)


# ---------------------------------------------------------------- bad input


def test_bad_input_gets_one_clear_message(model_dir, tmp_path):
    model = Engine.load(model_dir).model
    with pytest.raises(OffloadError, match="unknown cache policy 'fifo': accepted policies are lru, lfu, lfru, belady"):
        offload_model(model, "50%", tier="memory", policy="fifo")
    with pytest.raises(OffloadError, match="unknown predictor 'psychic': accepted predictors are none, prefetch-all, next-gate, pregate, oracle"):
        offload_model(model, "50%", tier="memory", predictor="psychic")
    with pytest.raises(MoekitError, match="the oracle predictor needs a routing trace recorded on the same generation"):
        offload_model(model, "50%", tier="memory", predictor="oracle")
    with pytest.raises(OffloadError, match="unknown slow tier 'tape'"):
        offload_model(model, "50%", tier="tape")
    with pytest.raises(OffloadError, match="needs a routing trace"):
        offload_model(model, "50%", tier="memory", policy="belady")
    with pytest.raises(OffloadError, match="needs a model on a CUDA device"):
        offload_model(model, "50%", tier="cuda-host")
    with pytest.raises(OffloadError, match="needs a link bandwidth"):
        offload_model(model, "50%", tier="emulated")
    dense = DecoderLM(ModelConfig(vocab_size=32, hidden_size=16, num_layers=1, num_heads=2, num_kv_heads=1, ffn="dense"))
    with pytest.raises(OffloadError, match="has no MoE layers"):
        offload_model(dense, "50%", tier="memory")
    other = tiny_model(9)  # a checkpoint of another model must not be computed with
    save_tensors(tmp_path / "model.safetensors", other.state_dict())
    with pytest.raises(OffloadError, match="differ from the model's"):
        offload_model(model, "50%", checkpoint=tmp_path)
    assert all(type(m.experts).__name__ == "Experts" for _, m in find_moe_layers(model))  # nothing changed
    offloader = offload_model(model, "50%", tier="memory")
    with pytest.raises(OffloadError, match="already offloaded"):
        offload_model(model, "50%", tier="memory")
    offloader.close()


def test_cli_generate_offloaded(model_dir, capsys, reference):
    argv = ["generate", str(model_dir), "--prompt", "ab", "--max-new-tokens", "6", "--temperature", "0"]
    assert main(argv) == 0
    plain = capsys.readouterr().out
    assert main(argv + ["--expert-budget", "50%", "--prefetch", "next-gate", "--cache", "belady", "--stats"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(plain.rstrip("\n")) and "cache belady, prefetch next-gate" in out and "misses" in out
    assert main(argv + ["--expert-budget", "25%", "--slow-tier", "emulated", "--link-bandwidth", "1GB/s", "--stats"]) == 0
    assert "EMULATED" in capsys.readouterr().out
    for extra, message in [
        (["--expert-budget", "10%"], "the minimum is 25% of experts"),
        (["--expert-budget", "50%", "--cache", "fifo"], "accepted policies are lru, lfu, lfru, belady"),
        (["--expert-budget", "50%", "--prefetch", "magic"], "accepted predictors are none, prefetch-all, next-gate, pregate"),
        (["--expert-budget", "50%", "--prefetch", "pregate"], "moekit pregate"),
        (["--prefetch", "next-gate"], "need --expert-budget"),
    ]:
        assert main(argv + extra) == 2, extra
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, (extra, err)


# ---------------------------------------------------------------- tiers and statistics


def test_emulated_link_takes_its_time_and_says_it_is_emulated():
    w = [(torch.randn(4, 64, 32), torch.randn(4, 32, 32))]
    tier = EmulatedLinkTier(MemoryTier(w), "10MB/s", "1ms")
    assert "emulated" in tier.label and tier.emulated
    dst_in, dst_out = torch.empty(64, 32), torch.empty(32, 32)
    start = time.perf_counter()
    nbytes = tier.read(0, 2, dst_in, dst_out)
    assert time.perf_counter() - start >= 1e-3 + nbytes / 10e6
    assert torch.equal(dst_in, w[0][0][2]) and torch.equal(dst_out, w[0][1][2])


def test_full_budget_hits_after_warm_up_and_stats_format(model_dir):
    engine = Engine.load(model_dir)
    offloader = engine.offload("100%", tier="disk")
    generate(engine)
    generate(engine)  # the same prompts again: every expert they use is resident
    stats = engine.last_stats["offload"]
    assert stats["misses"] == 0 and stats["hits"] == stats["accesses"] > 0 and stats["stall_s"] == 0
    text = format_stats(stats, engine.last_stats)
    assert "miss rate 0.0%" in text and "decode" in text and "EMULATED" not in text
    offloader.close()
