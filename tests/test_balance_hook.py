"""Aux-loss-free balancing in an optimizer pre-step hook (moe/balance.py).

Oracles: the sign rule computed by hand for given counts; selections counted
by hand (one-hot inputs to an identity gate) or by forward hooks on the
routers (independent of the routers' own counters); a fake two-rank
all-reduce whose result is known. (The Mixture-of-Depths block: test_decoder.py.)
"""

import pytest
import torch

from moekit.config import MoEConfig
from moekit.infer import Engine, SamplingConfig
from moekit.models.decoder import DecoderLM, ModelConfig, lm_loss
from moekit.moe.balance import balanced_routers, install_bias_balancing, update_expert_bias
from moekit.moe.routing import TopKRouter

pytestmark = pytest.mark.usefixtures("one_thread")

RATE = 0.25


def tiny_lm(experts_per_layer=(), rate=RATE, **kw) -> DecoderLM:
    moe = MoEConfig(num_experts=4, top_k=2, expert_hidden=8, kernel="loop", score_func="sigmoid", bias_update_rate=rate)
    torch.manual_seed(0)
    return DecoderLM(ModelConfig(vocab_size=32, hidden_size=16, num_layers=len(experts_per_layer) or 2, num_heads=2,
                                 num_kv_heads=1, max_seq_len=32, dense_hidden=24, moe=moe,
                                 experts_per_layer=list(experts_per_layer), **kw))


def sgd(model):
    return torch.optim.SGD(model.parameters(), lr=0.0)  # lr 0: only the hook changes anything


def test_the_hook_applies_the_sign_rule_to_every_layers_counts_and_clears_them():
    model = tiny_lm(experts_per_layer=[4, 3])
    r0, r1 = balanced_routers(model)
    r0.expert_counts.copy_(torch.tensor([5, 1, 3, 3]))  # mean 3: signs -1, +1, 0, 0
    r1.expert_counts.copy_(torch.tensor([2, 0, 0]))  # mean 2/3: signs -1, +1, +1
    opt = sgd(model)
    assert install_bias_balancing(model, opt) is not None
    opt.step()
    assert r0.expert_bias.tolist() == [-RATE, RATE, 0.0, 0.0]
    assert r1.expert_bias.tolist() == [-RATE, RATE, RATE]
    assert r0.expert_counts.tolist() == [0] * 4 and r1.expert_counts.tolist() == [0] * 3
    r0.expert_counts.copy_(torch.tensor([0, 4, 4, 4]))  # mean 3: +1, -1, -1, -1 on top of the first update
    opt.step()
    assert r0.expert_bias.tolist() == [0.0, 0.0, -RATE, -RATE]
    assert r1.expert_bias.tolist() == [-RATE, RATE, RATE]  # no counts: sign(0 - 0) = 0, unchanged


def test_a_training_forward_counts_selections_and_leaves_the_bias_alone():
    cfg = MoEConfig(hidden_size=4, num_experts=4, top_k=1, score_func="sigmoid", bias_update_rate=RATE)
    router = TopKRouter(cfg).train()
    with torch.no_grad():
        router.gate.weight.copy_(torch.eye(4))
    x = torch.eye(4)[[0, 0, 1, 3, 0]] * 3  # one-hot tokens: each picks its own expert
    router(x)
    assert router.expert_counts.tolist() == [3, 1, 0, 1]
    assert router.expert_bias.tolist() == [0.0] * 4
    router.eval()(x)
    assert router.expert_counts.tolist() == [3, 1, 0, 1]  # evaluation counts nothing
    update_expert_bias([router])
    assert router.expert_bias.tolist() == [-RATE, RATE, RATE, RATE]  # mean 5/4: only expert 0 is above it


def test_the_bias_never_changes_in_eval_or_generation():
    model = tiny_lm()
    routers = balanced_routers(model)
    with torch.no_grad():
        for r in routers:
            r.expert_bias.uniform_(-0.5, 0.5)
    before = [r.expert_bias.clone() for r in routers]
    opt = sgd(model)
    install_bias_balancing(model, opt)
    ids = torch.randint(0, 32, (2, 10), generator=torch.Generator().manual_seed(1))
    model.eval()
    model(ids)
    with torch.no_grad():
        model(ids)
    Engine(model).generate_ids([[1, 2, 3], [4, 5]], SamplingConfig(max_new_tokens=4, stop_token_ids=[]))
    opt.step()  # even a step after them: nothing was counted
    for r, b in zip(routers, before):
        assert torch.equal(r.expert_bias, b)
        assert r.expert_counts.sum() == 0


def test_fit_moves_the_bias_once_per_step_from_all_micro_batches(tmp_path):
    from moekit.train.loop import TrainConfig, fit

    model = tiny_lm()
    selected = {id(r): torch.zeros(4, dtype=torch.long) for r in balanced_routers(model)}

    def count(router, args, kwargs, routing):
        selected[id(router)].add_(routing.selected_E)

    for r in balanced_routers(model):  # the oracle's own count, from the Routing records
        r.register_forward_hook(count, with_kwargs=True)
    tokens = torch.randint(0, 32, (400,), generator=torch.Generator().manual_seed(2))
    tc = TrainConfig(steps=1, batch_size=2, seq_len=8, grad_accum=2, lr=1e-3, warmup_steps=0, eval_every=0,
                     save_every=0, device="cpu")

    def batch_fn(i):
        x = tokens[i * 16: i * 16 + 16].view(2, 8)
        return x, x

    def loss_fn(m, batch):
        loss, parts = lm_loss(m(batch[0]), batch[1], 0.0, 0.0)
        return loss, {}

    fit(model, tc, batch_fn=batch_fn, loss_fn=loss_fn, run_dir=tmp_path / "run", config_dict={}, progress=False)
    for r in balanced_routers(model):
        load = selected[id(r)].float()
        assert int(load.sum()) == 2 * 16 * 2  # both micro-batches: 16 tokens x top-2 each
        assert (load != load.mean()).any()  # unbalanced: the bias must move
        torch.testing.assert_close(r.expert_bias, RATE * torch.sign(load.mean() - load), rtol=0, atol=0)
        assert r.expert_counts.sum() == 0


class FakeTwoRanks:
    """A world of 2 whose other rank counted `other` (the stacked counts of every layer)."""

    world_size = 2

    def __init__(self, other):
        self.other, self.calls = other, []

    def all_reduce(self, t, group=None, what="an all-reduce"):
        self.calls.append(t.clone())
        t += self.other
        return t


def test_expert_parallel_sums_all_layers_counts_in_one_all_reduce():
    model = tiny_lm(experts_per_layer=[4, 4, 8])
    r0, r1, r2 = balanced_routers(model)
    r0.expert_counts.copy_(torch.tensor([4, 0, 0, 0]))
    r1.expert_counts.copy_(torch.tensor([1, 1, 1, 1]))
    r2.expert_counts.copy_(torch.tensor([0, 0, 0, 0, 0, 0, 0, 8]))
    other = torch.tensor([0, 4, 4, 4] + [1, 1, 1, 5] + [1] * 8)  # the other rank's counts
    fake = FakeTwoRanks(other)
    opt = sgd(model)
    install_bias_balancing(model, opt, fake)
    opt.step()
    assert len(fake.calls) == 1 and fake.calls[0].tolist() == [4, 0, 0, 0, 1, 1, 1, 1] + [0] * 7 + [8]
    # summed: [4, 4, 4, 4] (balanced), [2, 2, 2, 6] (mean 3), [1] * 7 + [9] (mean 2)
    assert r0.expert_bias.tolist() == [0.0] * 4
    assert r1.expert_bias.tolist() == [RATE, RATE, RATE, -RATE]
    assert r2.expert_bias.tolist() == [RATE] * 7 + [-RATE]


def test_no_hook_without_bias_balancing():
    model = tiny_lm(rate=0.0)
    assert balanced_routers(model) == [] and install_bias_balancing(model, sgd(model)) is None
    assert "expert_counts" not in dict(model.named_buffers()).keys()

