"""moekit.infer: the generation engine, its lean MoE decode path and sampling rules."""

import math

import pytest
import torch

from moekit.checkpoints import save_checkpoint
from moekit.config import MoEConfig, to_dict
from moekit.data.text import Tokenizer
from moekit.models.decoder import DecoderLM, ModelConfig
from moekit.errors import ConfigError
from moekit.moe.experts import Experts
from moekit.infer import Engine, SamplingConfig
from moekit.infer.engine import check_settings
from moekit.infer.sequence import SequenceState
from moekit.infer.sampling import _top_p, next_tokens
from moekit.moe.layers import MoELayer


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_model(seed=0, **kw):
    moe = MoEConfig(**{"num_experts": 4, "top_k": 2, "expert_hidden": 24, **kw.pop("moe", {})})
    cfg = dict(vocab_size=257, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, max_seq_len=64, dense_hidden=40)
    torch.manual_seed(seed)
    model = DecoderLM(ModelConfig(moe=moe, **{**cfg, **kw})).eval()
    with torch.no_grad():  # sharper logits than the 0.02 init: fewer near-ties in greedy comparisons
        model.lm_head.weight.mul_(20)
    return model


@pytest.fixture(scope="module")
def engine():
    return Engine(tiny_model(), Tokenizer.byte_level())


# ---------------------------------------------------------------- settings


@pytest.mark.parametrize("bad, message", [
    (dict(temperature=-0.5), "temperature=-0.5 is invalid: it must be a finite number >= 0"),
    (dict(temperature=math.nan), "temperature=nan"),
    (dict(top_p=0.0), r"top_p=0.0 is invalid: it must be in \(0, 1\]"),
    (dict(top_p=1.5), r"top_p=1.5 is invalid"),
    (dict(top_k=-1), "top_k=-1 is invalid"),
    (dict(max_new_tokens=0), "max_new_tokens=0 is invalid"),
    (dict(seed=-3), "seed=-3 is invalid"),
    (dict(stop_strings=[""]), "stop_strings"),
    (dict(stop_token_ids=[-1]), "stop_token_ids"),
])
def test_invalid_sampling_values_get_one_clear_error(bad, message):
    with pytest.raises(ConfigError, match=message):
        SamplingConfig(**bad)


def test_unknown_setting_is_a_config_error():
    with pytest.raises(ConfigError, match="unknown generation setting"):
        check_settings(temprature=1.0)


def test_top_p_and_top_k_follow_transformers_warpers():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    logits = torch.randn(6, 50) * 3
    for p in (0.05, 0.3, 0.9, 0.999):
        ref = transformers.TopPLogitsWarper(p)(None, logits.clone())
        ours = _top_p(logits, p)
        assert torch.equal(torch.isinf(ref), torch.isinf(ours)), p
    assert torch.equal(next_tokens(logits, SamplingConfig(temperature=1.0, top_k=1)), logits.argmax(-1))
    assert torch.equal(next_tokens(logits, SamplingConfig(temperature=5.0, top_p=1e-6)), logits.argmax(-1))
    gen = torch.Generator().manual_seed(0)
    draws = torch.stack([next_tokens(logits, SamplingConfig(temperature=1.0, top_k=3), gen) for _ in range(50)])
    allowed = logits.topk(3, dim=-1).indices
    assert all(int(d) in allowed[b].tolist() for row in draws for b, d in enumerate(row))


# ---------------------------------------------------------------- the lean MoE decode path


MOE_VARIANTS = {
    "topk": {},
    "shared+gate, raw top-k": dict(num_shared_experts=1, shared_expert_hidden=20, shared_expert_gate=True, norm_topk_prob=False),
    "sigmoid, scaled, grouped": dict(num_experts=8, top_k=3, score_func="sigmoid", routed_scaling_factor=2.5, n_group=4, topk_group=2),
    "group router": dict(router="group", num_groups=2),
}


def _hand_moe(layer, x_TD):
    """The MoE output computed by hand: each token's chosen experts, one at a time, weighted and summed."""
    idx_TK, w_TK = type(layer.router).select(layer.router, x_TD)
    w_in, w_out = layer.experts.w_in_EHD, layer.experts.w_out_EDF
    rows = []
    for t in range(x_TD.shape[0]):
        acc = torch.zeros(x_TD.shape[1])
        for e, w in zip(idx_TK[t].tolist(), w_TK[t].tolist()):
            gate, up = (w_in[e] @ x_TD[t]).chunk(2)
            acc += w * (w_out[e] @ (torch.nn.functional.silu(gate) * up))
        rows.append(acc)
    out = torch.stack(rows)
    if layer.cfg.num_shared_experts > 0:
        out = out + layer.shared_output(x_TD)
    return out


@pytest.mark.parametrize("variant", list(MOE_VARIANTS))
@pytest.mark.parametrize("tokens", [1, 6])
def test_inference_path_equals_a_hand_computed_moe(variant, tokens):
    """Under no_grad the layer skips its losses and visits only the chosen experts: same output as by hand."""
    torch.manual_seed(0)
    kw = {"hidden_size": 32, "num_experts": 4, "top_k": 2, "expert_hidden": 24, **MOE_VARIANTS[variant]}
    layer = MoELayer(MoEConfig(**kw)).eval()
    x = torch.randn(tokens, 1, 32)
    with torch.no_grad():
        got, routing = layer(x)
        expected = _hand_moe(layer, x.view(-1, 32))
        if tokens == 1:  # the chosen experts only: loop, or the compiled kernels' fp32 path where they run
            from moekit.moe import native

            want = "native" if native.isa() not in ("none", "generic") else "loop"
            assert layer.experts.kernel_for(x.view(-1, 32), routing.counts_E) == want
    assert routing.aux_losses == {}  # no losses where nothing can use them
    torch.testing.assert_close(got.view(-1, 32), expected, atol=1e-5, rtol=1e-5)
    with_grad, routing = layer(x)  # gradients on: the training path, losses included
    assert set(routing.aux_losses) >= {"z"}
    torch.testing.assert_close(with_grad, got, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("router", ["expert_choice"])
def test_routers_a_causal_lm_cannot_use_are_refused(router):
    with pytest.raises(ConfigError, match=f"router='{router}' is refused"):
        tiny_model(moe=dict(router=router, capacity_factor=2.0))


def _greedy_without_cache(model, prompt, n):
    """The oracle: a full forward over the whole sequence for every new token, no KV cache, no padding."""
    ids = list(prompt)
    for _ in range(n):
        with torch.no_grad():
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt):]


@pytest.mark.parametrize("kw", [dict(), dict(first_k_dense=1, moe=dict(num_shared_experts=1, shared_expert_gate=True)),
                                dict(ffn="residual_moe", moe=dict(top_k=1))])
def test_cached_batched_decode_gives_the_tokens_of_uncached_forwards(kw):
    model = tiny_model(**kw)
    prompts = [[1, 2, 3, 4, 5], [9, 8], [7, 7, 7, 7]]
    got = Engine(model).generate(prompts, max_new_tokens=12, stop_token_ids=[])
    assert [c.token_ids for c in got] == [_greedy_without_cache(model, p, 12) for p in prompts]


# ---------------------------------------------------------------- batches, cache, budget


def test_batch_of_different_lengths_equals_one_prompt_at_a_time(engine):
    prompts = ["def f(x):", "a", "hello world, this is longer"]
    together = engine.generate(prompts, max_new_tokens=16)
    alone = [engine.generate([p], max_new_tokens=16)[0] for p in prompts]
    assert [c.token_ids for c in together] == [c.token_ids for c in alone]
    assert [c.prompt_tokens for c in together] == [9, 1, 27]


def test_greedy_decode_equals_argmax_of_full_forwards(engine):
    prompt = engine.encode("abc")
    out = engine.generate([prompt], max_new_tokens=10)[0].token_ids
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(10):
            ids.append(int(engine.model(torch.tensor([ids])).logits[0, -1].argmax()))
    assert out == ids[len(prompt):]


def test_budget_is_clamped_to_the_context(engine):
    out = engine.generate([[5] * 60], max_new_tokens=50)[0]
    assert len(out.token_ids) == 4 and out.finish_reason == "length"


def test_seeded_sampling_is_reproducible(engine):
    a = engine.generate(["x", "yz"], max_new_tokens=20, temperature=1.0, top_p=0.9, top_k=50, seed=7)
    b = engine.generate(["x", "yz"], max_new_tokens=20, temperature=1.0, top_p=0.9, top_k=50, seed=7)
    c = engine.generate(["x", "yz"], max_new_tokens=20, temperature=1.0, top_p=0.9, top_k=50, seed=8)
    assert [x.token_ids for x in a] == [x.token_ids for x in b] != [x.token_ids for x in c]


# ---------------------------------------------------------------- stopping and streaming


def test_stop_token_ids(engine):
    free = engine.generate(["stop here"], max_new_tokens=12)[0].token_ids
    stop = free[4]
    out = engine.generate(["stop here"], max_new_tokens=12, stop_token_ids=[stop])[0]
    assert out.token_ids == free[: free.index(stop)] and out.finish_reason == "stop"


def test_stop_strings_cut_the_text(engine):
    free = engine.generate(["abc"], max_new_tokens=24)[0]
    stop = free.text[6:8]
    out = engine.generate(["abc"], max_new_tokens=24, stop_strings=[stop, "\x00never"])[0]
    assert out.text == free.text[: free.text.find(stop)] and out.finish_reason == "stop"
    assert len(out.token_ids) < len(free.token_ids)


def test_streaming_callback_sees_every_token_and_the_whole_text(engine):
    seen: dict[int, list] = {0: [], 1: []}
    texts = {0: "", 1: ""}

    def on_token(i, tok, text):
        if tok is not None:
            seen[i].append(tok)
        texts[i] += text

    out = engine.generate(["one", "two!"], max_new_tokens=15, temperature=0.7, on_token=on_token)
    for i, c in enumerate(out):
        assert seen[i] == c.token_ids and texts[i] == c.text


def test_incomplete_characters_are_held_back_until_complete():
    tok = Tokenizer.byte_level()
    events = []
    seq = SequenceState(0, 1, tok, [])
    for b in "é!".encode():
        seq.add(b, set(), True, lambda i, t, text: events.append(text))
    assert events == ["", "é", "!"] and seq.result().text == "é!"
    seq = SequenceState(0, 1, tok, [])
    seq.add("é".encode()[0], set(), True, lambda i, t, text: events.append(text))
    events.clear()
    seq.flush(lambda i, t, text: events.append((t, text)))
    assert events == [(None, "\ufffd")]


# ---------------------------------------------------------------- bad input and loading


def test_bad_prompts_get_one_clear_error(engine):
    with pytest.raises(ConfigError, match="the prompt has 70 tokens but the model's context is 64 tokens"):
        engine.generate([[1] * 70])
    with pytest.raises(ConfigError, match="prompt 1 has 64 tokens"):
        engine.generate([[1], [1] * 64])
    with pytest.raises(ConfigError, match="is empty"):
        engine.generate([[]])
    with pytest.raises(ConfigError, match="token id 300 outside the model's vocabulary"):
        engine.generate([[1, 300]])
    with pytest.raises(ConfigError, match="no chat template"):
        engine.generate(["hi"], chat=True)
    with pytest.raises(ConfigError, match="no prompts"):
        engine.generate([])
    with pytest.raises(ConfigError, match="no tokenizer"):
        Engine(engine.model).generate(["text"])


def test_engine_loads_a_moekit_checkpoint(tmp_path, engine):
    from moekit.train.lm import RunConfig

    model = engine.model
    save_checkpoint(tmp_path / "run", 3, config=to_dict(RunConfig(model=model.cfg)), model_state=model.state_dict(),
                    optimizer_state=None, trainer_state={}, tokenizer=engine.tokenizer)
    loaded = Engine.load(tmp_path / "run")
    assert loaded.stop_token_ids == [256]
    a = loaded.generate(["hello"], max_new_tokens=8)[0]
    assert a.token_ids == engine.generate(["hello"], max_new_tokens=8)[0].token_ids
    half = Engine.load(tmp_path / "run", dtype="bfloat16")
    assert half.model.embed_tokens.weight.dtype == torch.bfloat16 and half.model.rotary.inv_freq.dtype == torch.float32
    assert len(half.generate(["hello"], max_new_tokens=4)[0].token_ids) == 4
    with pytest.raises(ConfigError, match="does not exist"):
        Engine.load(tmp_path / "missing")
    with pytest.raises(ConfigError, match="CUDA is not available|device"):
        if torch.cuda.is_available():
            raise ConfigError("device")
        Engine.load(tmp_path / "run", device="cuda")


def test_engine_takes_the_loaders_record_as_engine_load_does(tmp_path, engine):
    # Issue 22: Engine(loaded); oracle: the engine on the same model and tokenizer given by hand.
    from moekit import load

    model = engine.model
    save_checkpoint(tmp_path / "run", 1, config={"model": to_dict(model.cfg)}, model_state=model.state_dict(),
                    optimizer_state=None, trainer_state={}, tokenizer=engine.tokenizer)
    loaded = load(tmp_path / "run")
    by_record = Engine(loaded)
    assert by_record.model is loaded.model and by_record.path == tmp_path / "run" and by_record.chat_fallback
    want = engine.generate(["hello"], max_new_tokens=8)[0].token_ids
    assert by_record.generate(["hello"], max_new_tokens=8)[0].token_ids == want
    assert Engine.load(tmp_path / "run").generate(["hello"], max_new_tokens=8)[0].token_ids == want
    with pytest.raises(ConfigError, match="takes the loaded record as it is"):
        Engine(loaded, Tokenizer.byte_level())


def test_task_group_takes_a_name_or_an_id_and_names_what_is_accepted():
    from moekit.infer.load import Loaded

    task_engine = Engine(Loaded(tiny_model(moe=dict(router="task", num_groups=3)), tasks=("add", "sub", "mul")))
    assert [task_engine.task_group(t) for t in ("sub", "2", 0)] == [1, 2, 0] and task_engine.needs_groups
    for bad in ("div", 3, "-1", True):
        with pytest.raises(ConfigError, match=r"give a task name \(add, sub, mul\) or an id in 0..2"):
            task_engine.task_group(bad)
    plain = Engine(tiny_model(), Tokenizer.byte_level())
    assert not plain.needs_groups
    with pytest.raises(ConfigError, match="does not route by task or group"):
        plain.task_group(0)
