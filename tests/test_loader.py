"""One loader (moekit.load = moekit.infer.load.load) for every format; the loading flags generate and serve
share; issue 22's read-by-code findings (lazy decision on CUDA, --prefetch oracle, serve --low-bit-fallback,
expert-choice active parameters, task-routed models in generate).

Oracles: transformers' own model (a Hugging Face directory); each format's own reader (load_model,
moekit.gguf.load, moefy.load, quantize_model on the full-precision model); upcycling at step 0 == the dense
model; a full forward without cache given the task ids (generate --task); a hand count of parameters;
the library's own lists of predictors and cache policies.
"""

import argparse

import pytest
import torch

import moekit
from moekit.checkpoints import save_checkpoint
from moekit.cli.main import build_parser, main
from moekit.config import MoEConfig, to_dict
from moekit.data.text import Tokenizer
from moekit.errors import ConfigError
from moekit.infer import Engine
from moekit.infer.load import offload_plan
from moekit.infer.offload import OffloadedExperts
from moekit.infer.sampling import SamplingConfig
from moekit.models.build import load_model
from moekit.models.decoder import DecoderLM, ModelConfig

pytestmark = pytest.mark.usefixtures("one_thread")
IDS = torch.tensor([[3, 100, 7, 250, 42, 9, 9, 18, 77, 5]])
TASKS = ["arithmetic", "word_problems", "linear_equations", "unit_conversion", "comparison"]


def _cfg(**moe) -> ModelConfig:
    return ModelConfig(vocab_size=257, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, max_seq_len=64,
                       dense_hidden=48, moe=MoEConfig(num_experts=4, top_k=2, expert_hidden=32, **moe))


def _save(path, model, data=None):
    config = {"model": to_dict(model.cfg), **({"data": data} if data else {})}
    save_checkpoint(path, 1, config=config, model_state=model.state_dict(), optimizer_state=None, trainer_state={},
                    tokenizer=Tokenizer.byte_level())
    return path


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    torch.manual_seed(0)
    return _save(tmp_path_factory.mktemp("run") / "run", DecoderLM(_cfg(num_shared_experts=1)))


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


def greedy(engine, **kw):
    cfg = SamplingConfig(max_new_tokens=8, temperature=0, stop_token_ids=[])
    return [c.token_ids for c in engine.generate_ids([[1, 2, 3], [40, 41, 42, 43, 44]], cfg, **kw)]


# ---------------------------------------------------------------- every format through one loader


def test_a_hugging_face_directory_gives_transformers_logits(tmp_path):
    pytest.importorskip("transformers")
    from hf_helpers import logit_gap, tiny_hf

    from moekit import hf

    ref = tiny_hf("qwen2_moe", dict(vocab_size=96, hidden_size=32, intermediate_size=40, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64),
                  dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
                       shared_expert_intermediate_size=24), {})
    ref.save_pretrained(tmp_path / "hf")
    loaded = moekit.load(tmp_path / "hf")
    assert loaded.format == "hf" and not loaded.chat_fallback
    assert logit_gap(ref, loaded.model) < 1e-4
    assert greedy(Engine(loaded)) == greedy(Engine(hf.load(tmp_path / "hf")))  # moekit.hf.load as it is


def test_a_moekit_run_and_its_quantized_checkpoint_load_as_their_own_readers_load_them(run, tmp_path):
    from moekit.infer.quantized_checkpoint import quantize_checkpoint
    from moekit.quantize import quantize_model

    loaded = moekit.load(run)
    assert loaded.format == "moekit" and loaded.chat_fallback and loaded.tokenizer is not None and loaded.tasks == ()
    assert torch.equal(logits(loaded.model), logits(load_model(run)[0]))
    twin = quantize_model(load_model(run)[0], bits=8)  # the hand-quantized full-precision model
    quantize_checkpoint(run, tmp_path / "q8", bits=8)
    assert torch.equal(logits(moekit.load(tmp_path / "q8").model), logits(twin))
    assert torch.equal(logits(moekit.load(run, quantize="int8").model), logits(twin))


def test_a_gguf_file_loads_as_moekit_gguf_loads_it(tmp_path):
    pytest.importorskip("gguf")
    import moekit.gguf as G

    torch.manual_seed(0)
    model = DecoderLM(_cfg(norm_topk_prob=True)).eval()  # (a Mixtral-shaped model: no shared expert)
    G.save(model, tmp_path / "m.gguf", Tokenizer.byte_level(), dtype="F32")
    assert torch.equal(logits(moekit.load(tmp_path / "m.gguf").model), logits(model))
    G.save(model, tmp_path / "q.gguf", Tokenizer.byte_level(), dtype="Q8_0")  # its blocks kept
    loaded = moekit.load(tmp_path / "q.gguf")
    assert loaded.format == "gguf" and torch.equal(logits(loaded.model), logits(G.load(tmp_path / "q.gguf")))
    lazy = Engine(moekit.load(tmp_path / "q.gguf", expert_budget="50%"))
    assert greedy(lazy) == greedy(Engine(loaded))
    lazy.offloader.close()


def test_a_moefy_output_loads_and_upcycling_keeps_the_dense_logits(tmp_path):
    from moekit import moefy

    torch.manual_seed(0)
    dense = DecoderLM(ModelConfig(vocab_size=257, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                                  max_seq_len=64, dense_hidden=48, ffn="dense")).eval()
    moefy.save(moefy.convert(dense, "upcycle", experts=4, top_k=2), tmp_path / "up")
    loaded = moekit.load(tmp_path / "up")
    assert loaded.format == "moefy"
    torch.testing.assert_close(logits(loaded.model), logits(dense), rtol=1e-5, atol=1e-5)
    assert torch.equal(logits(loaded.model), logits(moefy.load(tmp_path / "up")))


def test_an_expert_budget_offloads_through_the_loader_with_the_resident_tokens(run):
    want = greedy(Engine(moekit.load(run)))
    for options in (dict(), dict(tier="memory"), dict(tier="emulated", link_bandwidth="1GB/s")):
        loaded = moekit.load(run, expert_budget="50%", **options)
        assert all(type(layer.mlp.experts) is OffloadedExperts for layer in loaded.model.layers if layer.is_moe)
        engine = Engine(loaded)
        assert engine.offloader is loaded.offloader and greedy(engine) == want, options
        engine.offloader.close()
    with pytest.raises(ConfigError, match="only apply with an expert budget"):
        moekit.load(run, policy="lfu")


def test_engine_load_is_the_loader_lazily():
    # Engine.load keeps its meaning: with a budget the experts are never read, so the tier is the disk one.
    assert offload_plan("cuda", "25%", lazy=True) == ("disk", True)
    assert offload_plan("cpu", None) == (None, False)


# ---------------------------------------------------------------- generate and serve share their loading flags


def _subparser(name: str) -> argparse.ArgumentParser:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices[name]


def _flag(action) -> tuple:
    return (tuple(action.option_strings), action.dest, action.default, action.help, action.choices, action.metavar,
            action.type, action.nargs, type(action).__name__)


def test_generate_and_serve_expose_identical_loading_flags():
    from moekit.cli.loading_flags import add_loading_flags

    shared = argparse.ArgumentParser()
    add_loading_flags(shared)
    dests = {a.dest for a in shared._actions} - {"help"}
    assert {"dtype", "device", "quantize", "expert_budget", "prefetch", "cache", "slow_tier", "low_bit_fallback"} <= dests
    gen, serve = ({a.dest: _flag(a) for a in _subparser(c)._actions if a.dest in dests} for c in ("generate", "serve"))
    assert gen == serve and set(gen) == dests
    assert "--low-bit-fallback" in gen["low_bit_fallback"][0]  # serve lacked it (issue 22)


def test_the_flags_name_exactly_the_librarys_predictors_and_policies():
    from moekit.cli.loading_flags import POLICIES, PREDICTORS
    from moekit.infer import expert_cache, prefetch

    assert PREDICTORS == tuple(p for p in prefetch.PREDICTORS if p != "oracle")
    assert POLICIES == expert_cache.POLICIES


@pytest.mark.parametrize("command", ["generate", "serve"])
def test_prefetch_oracle_is_refused_naming_the_accepted_predictors(run, command, capsys):
    extra = ["--prompt", "x"] if command == "generate" else []
    assert main([command, str(run), *extra, "--expert-budget", "50%", "--prefetch", "oracle"]) == 2
    err = capsys.readouterr().err
    assert "--prefetch oracle needs a routing trace" in err and "none, prefetch-all, next-gate, pregate, lookahead" in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


class _Stop(ConfigError):
    pass


def test_generate_and_serve_decide_lazy_loading_alike_on_cuda(run, monkeypatch, capsys):
    # Issue 22: generate --device cuda --expert-budget 25% loaded lazily, then refused its own default tier (cuda-host).
    from moekit.cli import serve
    from moekit.infer import load as loader

    seen = []

    def reader(p, dtype, device, options, lazy):
        seen.append((device, lazy))
        raise _Stop("stopped before reading")

    monkeypatch.setitem(loader._READERS, "moekit", reader)
    plan = []
    monkeypatch.setattr(loader, "offload_plan", lambda *a: plan.append(offload_plan(*a)) or plan[-1])
    assert main(["generate", str(run), "--prompt", "x", "--device", "cuda", "--expert-budget", "25%"]) == 2
    assert "stopped before reading" in capsys.readouterr().err
    args = build_parser().parse_args(["serve", str(run), "--device", "cuda", "--expert-budget", "25%"])
    with pytest.raises(_Stop):
        serve._loader(args)()
    assert seen == [("cuda", False), ("cuda", False)] and plan == [("cuda-host", False), ("cuda-host", False)]
    assert offload_plan("cpu", "25%") == ("disk", True) and offload_plan("cuda", "25%", "disk") == ("disk", True)


def test_serve_low_bit_fallback_reaches_the_offloader(run):
    from moekit.cli import serve

    args = build_parser().parse_args(["serve", str(run), "--expert-budget", "50%", "--low-bit-fallback"])
    engine = serve._loader(args)()
    assert engine.offloader is not None and engine.offloader.fallback is not None
    engine.offloader.close()


# ---------------------------------------------------------------- inspect on expert-choice models


def test_expert_choice_active_parameters_add_up_to_the_printed_total():
    # Issue 22: inspect printed count_parameters' total (capacity_factor experts a token) over a table using top_k.
    from moekit.models.decoder import count_parameters
    from moekit.train.lm import parameter_rows

    torch.manual_seed(0)
    model = DecoderLM(_cfg(router="expert_choice", aux_router_hidden=8, capacity_factor=1.0))  # top_k 2, C 1
    total = sum(p.numel() for p in model.parameters())
    skipped = 0
    for layer in model.layers:  # by hand: a token is taken by capacity_factor = 1 of the 4 experts on average
        per_expert = sum(p.numel() for p in layer.mlp.experts.parameters()) // 4
        skipped += (4 - 1) * per_expert
    rows = parameter_rows(model)
    assert count_parameters(model) == {"total": total, "active": total - skipped}
    assert sum(r["active"] for r in rows) == total - skipped and sum(r["total"] for r in rows) == total


# ---------------------------------------------------------------- task-routed models in generate


@pytest.fixture(scope="module")
def task_run(tmp_path_factory):
    """A data.kind=math_tasks checkpoint as `moekit train --preset math_tasks` writes it (task router, 5 tasks)."""
    torch.manual_seed(0)
    model = DecoderLM(_cfg(router="task", num_groups=len(TASKS)))
    with torch.no_grad():
        for layer in model.layers:
            layer.mlp.router.task_embed.weight.mul_(100)  # tasks that steer the routing visibly,
            for p in layer.mlp.experts.parameters():  # and experts that steer the tokens
                p.mul_(6)
    data = {"kind": "math_tasks", "math": {"tasks": TASKS}}
    return _save(tmp_path_factory.mktemp("tasks") / "run", model, data)


@torch.no_grad()
def _full_forward_greedy(model, ids: list[int], task: int, n: int) -> list[int]:
    """The oracle: the whole sequence every step, no cache, every token given the task id."""
    ids = list(ids)
    for _ in range(n):
        x = torch.tensor([ids])
        ids.append(int(model(x, group_ids_BT=torch.full_like(x, task)).logits[0, -1].argmax()))
    return ids[-n:]


def test_generate_runs_a_task_routed_model_with_task(task_run, monkeypatch, capsys):
    got = []
    generate_ids = Engine.generate_ids

    def record(self, *a, **kw):
        out = generate_ids(self, *a, **kw)
        got.append(out[0].token_ids)
        return out

    monkeypatch.setattr(Engine, "generate_ids", record)
    model = load_model(task_run)[0]
    prompt = Tokenizer.byte_level().backend.encode("12+30=", add_special_tokens=True).ids
    want = {t: _full_forward_greedy(model, prompt, t, 6) for t in (0, 1)}
    assert want[0] != want[1]  # the task matters to this model
    for task, t in (("word_problems", 1), ("0", 0), ("1", 1)):
        code = main(["generate", str(task_run), "--prompt", "12+30=", "--max-new-tokens", "6", "--temperature", "0",
                     "--task", task])
        assert code == 0, capsys.readouterr().err
        assert got[-1] == want[t][: len(got[-1])] and len(got[-1]) >= 1, task
    capsys.readouterr()


@pytest.mark.parametrize("argv,message", [
    ([], "give --task NAME (arithmetic, word_problems, linear_equations, unit_conversion, comparison) or --task ID (0..4)"),
    (["--task", "algebra"], "task 'algebra' is not one this model knows: give a task name (arithmetic, "),
    (["--group-id", "5"], "an id in 0..4"),
])
def test_generate_refuses_a_missing_or_unknown_task_in_one_line(task_run, argv, message, capsys):
    assert main(["generate", str(task_run), "--prompt", "1+1=", "--max-new-tokens", "2", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_a_task_on_a_model_that_routes_by_no_task_is_refused(run, capsys):
    assert main(["generate", str(run), "--prompt", "1+1=", "--task", "0"]) == 2
    assert "does not route by task or group" in capsys.readouterr().err
