"""Training recipes by data.kind (moekit.train.recipes) and the one-process stand-in for expert parallelism.

Oracles: a hand-written AdamW + clipping step in plain torch (the stand-in's
loop step), `ExpertParallel`'s own method names (the stand-in's interface).
"""

from __future__ import annotations

import inspect

import pytest
import torch

from moekit.errors import ConfigError
from moekit.parallel import ExpertParallel, SingleProcess
from moekit.train.loop import TrainConfig, fit


def test_single_process_offers_every_call_the_loop_makes_on_expert_parallel():
    used = ["rank", "world_size", "is_main", "device", "sharded", "shard_batch", "mean_metrics", "mean_over_ranks",
            "any_rank", "check_same", "sum_load", "reduce_gradients", "clip_grad_norm_", "full_state_dict",
            "full_optimizer_state", "load_model_state", "load_optimizer_state"]
    for name in used:
        assert hasattr(ExpertParallel, name) and hasattr(SingleProcess, name), name
        theirs, ours = getattr(ExpertParallel, name), getattr(SingleProcess, name)
        if inspect.isfunction(theirs):  # same parameters, so a call written for one works on the other
            assert list(inspect.signature(theirs).parameters) == list(inspect.signature(ours).parameters), name
    p = SingleProcess()
    assert (p.rank, p.world_size, p.is_main, p.sharded) == (0, 1, True, False)
    batch = (torch.arange(6).view(3, 2), {"g": torch.ones(3)})
    assert p.shard_batch(batch) is batch and p.any_rank(True) and not p.any_rank(False)
    assert p.mean_metrics({"loss": 2.0}) == {"loss": 2.0} and p.mean_over_ranks([1.0, 3.0]) == [1.0, 3.0]


def test_fit_on_one_process_takes_the_plain_torch_step(tmp_path):
    """One fit step equals AdamW + clip_grad_norm_ written out here (no parallel object)."""
    torch.manual_seed(0)
    x, y = torch.randn(8, 4), torch.randn(8, 3)
    tc = TrainConfig(steps=1, warmup_steps=0, lr=0.05, grad_clip=0.1, weight_decay=0.1, eval_every=0, save_every=0,
                     device="cpu")

    def loss_fn(m, batch):
        return ((m(batch[0]) - batch[1]) ** 2).mean(), {}

    model = torch.nn.Linear(4, 3)
    want = torch.nn.Linear(4, 3)
    want.load_state_dict(model.state_dict())
    result = fit(model, tc, batch_fn=lambda i: (x, y), loss_fn=loss_fn, run_dir=tmp_path / "run", config_dict={},
                 progress=False)
    opt = torch.optim.AdamW([{"params": [want.weight], "weight_decay": 0.1}, {"params": [want.bias], "weight_decay": 0.0}],
                            lr=0.05, betas=(0.9, 0.95), foreach=False)
    loss_fn(want, (x, y))[0].backward()
    norm = torch.nn.utils.clip_grad_norm_(want.parameters(), 0.1)
    opt.step()
    assert result.last_metrics["grad_norm"] == pytest.approx(float(norm))
    torch.testing.assert_close(model.weight, want.weight)
    torch.testing.assert_close(model.bias, want.bias)
