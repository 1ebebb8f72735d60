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


# ---------------------------------------------------------------- the registry


def test_recipe_for_names_the_accepted_kinds():
    import moekit.train.lm  # noqa: F401  (registers the built-in recipes)
    from moekit.train.recipes import kinds, recipe_for

    assert set(kinds()) == {"text", "mixed_modal", "math_tasks"} and kinds("train-forecaster") == ["time_series"]
    assert recipe_for("text").sample and not recipe_for("math_tasks").sample
    with pytest.raises(ConfigError, match=r"data.kind='bogus' is unknown .* accepted kinds are .*text.*mixed_modal"):
        recipe_for("bogus")
    with pytest.raises(ConfigError, match="trained by `moekit train-forecaster`"):
        recipe_for("time_series")


def test_moekit_train_refuses_an_unknown_kind_in_one_line(tmp_path, capsys):
    from moekit.cli.main import main

    assert main(["train", "--out", str(tmp_path / "r"), "--preset", "tiny", "data.kind=images"]) == 2
    err = capsys.readouterr().err
    assert "data.kind='images'" in err and "math_tasks" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "r").exists()


# ---------------------------------------------------------------- math tasks: answers through the engine


def _oracle_answer(model, prompt: str, task: int, max_new: int) -> str:
    """The full-forward greedy loop the engine replaced: no cache, one prompt, argmax until a newline."""
    x = torch.tensor([list(("\n" + prompt).encode())])
    new = []
    with torch.no_grad():
        for _ in range(max_new + 1):
            tok = int(model(x, group_ids_BT=torch.full_like(x, task)).logits[0, -1].argmax())
            if tok == 10:
                break
            new.append(tok)
            x = torch.cat([x, torch.tensor([[tok]])], dim=1)
    return bytes([t for t in new if t < 256][:max_new]).decode("utf-8", "replace")


def test_greedy_answers_equal_a_full_forward_greedy_loop():
    from moekit.config import MoEConfig
    from moekit.infer.answers import greedy_answers
    from moekit.models.decoder import DecoderLM, ModelConfig

    torch.manual_seed(6)
    moe = MoEConfig(num_experts=4, top_k=2, expert_hidden=32, router="task", num_groups=5)
    model = DecoderLM(ModelConfig(vocab_size=257, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                                  max_seq_len=64, dense_hidden=64, moe=moe))
    model.train()
    prompts = ["12+34=", "9+1=", "larger of 1.5 and 1.25=", "3 km in m=", "7+8="]  # lengths differ and repeat
    tasks = [0, 0, 4, 3, 2]
    got = greedy_answers(model, prompts, tasks, max_new=5, batch_size=2)
    assert model.training  # the caller's mode is kept
    want = [_oracle_answer(model.eval(), p, t, 5) for p, t in zip(prompts, tasks)]
    assert any(want) and got == want


def test_a_math_tasks_run_scores_exact_match_with_the_answers_it_is_given(tmp_path):
    from moekit.train.lm import resolve_run_config, train_lm
    from moekit.train.multitask import build_suite

    overrides = ["train.steps=1", "train.batch_size=2", "train.eval_batches=1", "train.eval_every=0", "train.save_every=0",
                 "model.hidden_size=32", "model.num_layers=1", "moe.expert_hidden=32", "moe.num_experts=4",
                 "data.math.train_sizes=[20,20,20,20,20]", "data.math.test_size=4", "data.math.eval_problems=4",
                 "train.device=cpu"]
    cfg = resolve_run_config("math_tasks", None, overrides)
    suite = build_suite(cfg.data.math)
    solved = {p.prompt: p.answer for t in suite.tasks for p in suite.test[t]}
    first_task_only = lambda model, prompts, tasks: [solved[p] if t == 0 else "?" for p, t in zip(prompts, tasks)]
    summary = train_lm(cfg, tmp_path / "run", progress=False, answers=first_task_only)
    ev = summary["result"].last_eval
    assert ev["em_" + suite.tasks[0]] == 1.0 and all(ev["em_" + t] == 0.0 for t in suite.tasks[1:])
    assert ev["em_mean"] == pytest.approx(1 / len(suite.tasks))
    assert "em_mean" not in train_lm(cfg, tmp_path / "plain", progress=False)["result"].last_eval  # no answers given
