"""Group ids (modality or task per token) through DecoderLM and the engine to every MoE layer's router."""

import pytest
import torch

from moekit.config import MoEConfig, apply_overrides, from_dict, to_dict
from moekit.errors import ConfigError
from moekit.infer import Engine
from moekit.models.decoder import DecoderLM, ModelConfig

pytestmark = pytest.mark.usefixtures("one_thread")

RANGES = [[0, 100, 0], [100, 200, 1]]  # ids 200.. fall in no range: group 0


def group_model(seed=0, ranges=RANGES, **kw):
    moe = MoEConfig(**{"num_experts": 4, "top_k": 1, "expert_hidden": 24, "router": "group", "num_groups": 2,
                       **kw.pop("moe", {})})
    cfg = dict(vocab_size=257, hidden_size=32, num_layers=3, num_heads=4, num_kv_heads=2, max_seq_len=64,
               dense_hidden=40, dense_layers=[1], group_of_token=ranges)
    torch.manual_seed(seed)
    model = DecoderLM(ModelConfig(moe=moe, **{**cfg, **kw})).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(20)
    return model


def python_groups(ids, ranges=RANGES):
    """The oracle: each id's group by a plain scan of the ranges."""
    def one(t):
        return next((g for lo, hi, g in ranges if lo <= t < hi), 0)
    return [[one(t) for t in row] for row in ids]


def record_router_inputs(model):
    """A forward pre-hook on every MoE layer's router: the group_ids_T each call received, per layer."""
    seen = {}
    for i, layer in enumerate(model.layers):
        if layer.is_moe:
            seen[i] = []
            layer.mlp.router.register_forward_pre_hook(
                lambda mod, args, kwargs, i=i: seen[i].append(kwargs.get("group_ids_T")), with_kwargs=True)
    return seen


def test_group_ids_reach_every_moe_layer_in_forward():
    model = group_model()
    ids = torch.tensor([[5, 150, 7, 250], [120, 130, 3, 199]])
    seen = record_router_inputs(model)
    assert sorted(seen) == [0, 2]  # layer 1 is dense
    given = torch.tensor([[1, 0, 1, 1], [0, 0, 1, 0]])
    model(ids, group_ids_BT=given)
    model(ids)  # no ids given: from the token ranges
    for calls in seen.values():
        assert calls[0].tolist() == [1, 0, 1, 1, 0, 0, 1, 0]
        assert calls[1].tolist() == sum(python_groups(ids.tolist()), [])


def test_group_router_uses_only_the_tokens_group_and_the_choice_follows_the_group():
    model = group_model()
    ids = torch.randint(0, 257, (2, 9))
    with torch.no_grad():
        for groups in (torch.zeros(2, 9, dtype=torch.long), torch.ones(2, 9, dtype=torch.long)):
            out = model(ids, group_ids_BT=groups)
            for r in out.routings:
                if r is not None:
                    per_group = 4 // 2
                    assert (r.expert_idx_N // per_group == groups.reshape(-1)[r.token_idx_N]).all()


def test_engine_decode_passes_group_ids_and_equals_a_full_forward_with_groups():
    model = group_model()
    prompts = [[5, 150, 7], [120, 3, 199, 160, 2]]
    seen = record_router_inputs(model)
    from moekit.infer.sampling import SamplingConfig

    got = Engine(model).generate_ids(prompts, SamplingConfig(max_new_tokens=10, stop_token_ids=[]))
    for b, (p, c) in enumerate(zip(prompts, got)):
        full = p + c.token_ids
        groups = torch.tensor(python_groups([full]))
        with torch.no_grad():
            logits = model(torch.tensor([full]), group_ids_BT=groups).logits[0]
        assert c.token_ids == logits[len(p) - 1:-1].argmax(-1).tolist()  # cached decode == full forward
    # the decode steps' routers saw the generated tokens' groups (from the ranges)
    decode_calls = [g for g in seen[0] if g is not None and g.numel() == 2]
    assert decode_calls, "no decode step reached the router with group ids"
    last = [c.token_ids[-2] for c in got]
    assert decode_calls[-1].tolist() == [python_groups([[t]])[0][0] for t in last]


def test_cached_decode_logits_equal_full_forward_logits_with_given_groups():
    """Decode step by step through the KV cache with explicit groups; compare with one full forward."""
    model = group_model(ranges=[])
    ids = torch.randint(0, 257, (1, 12))
    groups = torch.tensor([[0, 1, 1, 0, 1, 0, 0, 1, 1, 1, 0, 1]])
    with torch.no_grad():
        full = model(ids, group_ids_BT=groups).logits[0]
        cache = model.new_cache(1, 12)
        steps = [model(ids[:, :4], kv_cache=cache, group_ids_BT=groups[:, :4]).logits[0]]
        for t in range(4, 12):
            steps.append(model(ids[:, t:t + 1], kv_cache=cache, cache_start=t, group_ids_BT=groups[:, t:t + 1]).logits[0])
    torch.testing.assert_close(torch.cat(steps), full, atol=1e-5, rtol=1e-5)
    with torch.no_grad():  # and the groups matter: the other group gives other logits
        other = model(ids, group_ids_BT=1 - groups).logits[0]
    assert not torch.allclose(other, full, atol=1e-3)


def test_engine_fixed_group_per_request_reaches_prefill_and_decode():
    model = group_model(ranges=[])
    seen = record_router_inputs(model)
    from moekit.infer.sampling import SamplingConfig

    Engine(model).generate_ids([[1, 2, 3], [4, 5]], SamplingConfig(max_new_tokens=4, stop_token_ids=[]), group_ids=[1, 0])
    prefill, *decode = seen[2]
    assert prefill.tolist() == [1, 1, 1, 0, 0, 0]  # left padding (group 0) then the fixed groups
    assert decode and all(g.tolist() == [1, 0] for g in decode)
    seen[2].clear()
    Engine(model).generate_ids([[1, 2, 3]], SamplingConfig(max_new_tokens=3, stop_token_ids=[]), group_ids=[[0, 0, 1]])
    assert [g.tolist() for g in seen[2][1:]] == [[1], [1]]  # generated tokens: the last prompt token's group


def test_group_ids_out_of_range_or_missing_get_one_clear_message():
    model = group_model(ranges=[])
    ids = torch.tensor([[1, 2, 3]])
    with pytest.raises(ConfigError, match=r"group ids must be in \[0, 2\).*\[0, 2\]"):
        model(ids, group_ids_BT=torch.tensor([[0, 2, 1]]))
    with pytest.raises(ConfigError, match=r"group ids must be in \[0, 2\)"):
        model(ids, group_ids_BT=torch.tensor([[0, -1, 1]]))
    with pytest.raises(ConfigError, match="one group id per token"):
        model(ids, group_ids_BT=torch.tensor([[0, 1]]))
    with pytest.raises(ConfigError, match="routes by group .* got no group ids"):
        model(ids)
    with pytest.raises(ConfigError, match=r"group ids must be in \[0, 2\)"):
        Engine(model).generate_ids([[1, 2]], group_ids=[[0, 5]])
    with pytest.raises(ConfigError, match="new_token_groups=.* is invalid"):
        Engine(model).generate_ids([[1, 2]], group_ids=0, new_token_groups=[0, 1])


def test_group_ranges_are_checked_and_saved_in_the_config():
    with pytest.raises(ConfigError, match="group_of_token entry .* 0 <= group < moe.num_groups=2"):
        group_model(ranges=[[0, 10, 2]])
    with pytest.raises(ConfigError, match="lo < hi <= vocab_size=257"):
        group_model(ranges=[[0, 300, 1]])
    cfg = group_model().cfg
    back = from_dict(ModelConfig, to_dict(cfg))
    assert back.group_of_token == RANGES
    assert apply_overrides(cfg, ["group_of_token=[[0,5,1]]"]).group_of_token == [[0, 5, 1]]


def test_token_choice_models_ignore_absent_groups():
    model = group_model(ranges=[], moe=dict(router="topk", num_groups=1))
    seen = record_router_inputs(model)
    model(torch.tensor([[1, 2]]))
    assert seen[0] == [None]
