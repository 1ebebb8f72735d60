"""Time-MoE: published parameter counts, reference equivalence, cached inference, loss, checkpoints."""

from __future__ import annotations

import json

import numpy as np

import pytest
import torch

from moekit.errors import CheckpointError, DataError
from moekit.hf.timemoe import load_forecaster, load_hf, save_hf
from moekit.models.timemoe import (
    PRESETS,
    ForecasterConfig,
    TimeMoE,
    active_parameters,
    build,
    count_parameters,
    dense_equivalent,
    preset,
    time_moe_balance_loss,
)

SMALL = ForecasterConfig(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4)


def small_model(seed: int = 0, **kw) -> TimeMoE:
    torch.manual_seed(seed)
    cfg = ForecasterConfig(**{**SMALL.__dict__, **kw})
    model = TimeMoE(cfg).eval()
    with torch.no_grad():  # larger than the 0.02 init, so differences would show
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def test_presets_have_the_published_parameter_counts():
    assert count_parameters(build(PRESETS["base"], "meta")) == 113_352_192  # TimeMoE-50M
    assert count_parameters(build(PRESETS["large"], "meta")) == 453_196_800  # TimeMoE-200M


def test_dense_equivalent_has_the_active_parameters_of_the_moe():
    moe = build(PRESETS["tiny"], "meta")
    dense = build(dense_equivalent(PRESETS["tiny"]), "meta")
    gap = active_parameters(moe) - count_parameters(dense)
    # only the router and the shared-expert gate (9 x hidden per layer) differ
    assert gap == PRESETS["tiny"].num_layers * 9 * PRESETS["tiny"].hidden_size
    assert active_parameters(moe) < count_parameters(moe)


def test_preset_overrides_and_errors():
    assert preset("tiny", ["hidden_size=32", "num_heads=2"]).hidden_size == 32
    with pytest.raises(Exception, match="unknown"):
        preset("huge")


def test_head_choice_is_time_moe_rule():
    m = small_model()
    pick = [m.cfg.horizon_lengths[m.head_for(r)] for r in (1, 5, 8, 31, 32, 63, 64, 100, 720)]
    assert pick == [1, 1, 8, 8, 32, 32, 64, 64, 64]


def _naive_generate(model: TimeMoE, x: torch.Tensor, horizon: int) -> torch.Tensor:
    """Full recomputation each step, no cache: the reference's use_cache=False path."""
    seq = x.clone()
    while seq.shape[1] < x.shape[1] + horizon:
        remaining = x.shape[1] + horizon - seq.shape[1]
        idx = model.head_for(remaining)
        hidden, _ = model(seq)
        step = model.heads[idx](hidden[:, -1])[:, : min(remaining, model.cfg.horizon_lengths[idx])]
        seq = torch.cat([seq, step], dim=1)
    return seq[:, x.shape[1]:]


def test_kv_cached_generation_equals_full_recomputation():
    m = small_model()
    x = torch.randn(3, 40)
    with torch.no_grad():
        for h in (1, 9, 75):
            torch.testing.assert_close(m.generate(x, h), _naive_generate(m, x, h), atol=1e-5, rtol=1e-5)


def test_generate_many_shares_one_prefill():
    m = small_model()
    x = torch.randn(5, 30)
    many = m.generate_many(x, {8: 5, 40: 3, 100: 1})
    for h, n in ((8, 5), (40, 3), (100, 1)):
        torch.testing.assert_close(many[h], m.generate(x[:n], h), atol=1e-5, rtol=1e-5)
    with pytest.raises(DataError, match="horizon"):
        m.generate(x, 0)


def test_predict_is_scale_and_shift_equivariant():
    m = small_model()
    x = torch.randn(2, 50)
    base = m.predict(x, 20)
    torch.testing.assert_close(m.predict(x * 7 + 100, 20), base * 7 + 100, atol=2e-3, rtol=1e-4)


def test_loss_matches_its_definition_and_trains():
    m = small_model()
    x = torch.randn(4, 41)
    loss, metrics = m.loss(x)
    hidden, logits = m(x[:, :-1])
    assert len(logits) == m.cfg.num_layers and logits[0].shape == (4 * 40, 8)
    # head 0 (horizon 1) alone is a plain Huber on the next value
    h1 = torch.nn.functional.huber_loss(m.heads[0](hidden).squeeze(-1), x[:, 1:], delta=2.0)
    bal = time_moe_balance_loss(logits, 2, 8)
    assert metrics["balance"] == pytest.approx(float(bal.detach()), rel=1e-5)
    assert float(loss.detach()) == pytest.approx(metrics["huber"] + 0.02 * float(bal.detach()), rel=1e-5)
    assert metrics["huber"] != pytest.approx(float(h1.detach()))  # the other heads count too
    torch.manual_seed(0)
    m = TimeMoE(SMALL).train()
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
    t = torch.arange(65, dtype=torch.float32)
    wave = torch.stack([torch.sin(t / 4 + p) for p in torch.linspace(0, 3, 8)])
    losses = []
    for _ in range(30):
        loss, _ = m.loss(wave)
        losses.append(float(loss.detach()))
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert losses[-1] < 0.3 * losses[0]


def test_dense_variant_runs_and_has_no_balance_loss():
    m = small_model(use_dense=True, intermediate_size=128)
    loss, metrics = m.loss(torch.randn(2, 20))
    assert "balance" not in metrics and torch.isfinite(loss)
    assert m.generate(torch.randn(2, 10), 12).shape == (2, 12)


@pytest.mark.parametrize("dense", [False, True])
def test_hf_format_round_trip(tmp_path, dense):
    m = small_model(use_dense=dense)
    save_hf(m, tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["model_type"] == "time_moe" and cfg["horizon_lengths"] == [1, 8, 32, 64]
    loaded = load_forecaster(tmp_path)
    x = torch.randn(2, 33)
    torch.testing.assert_close(loaded.generate(x, 70), m.generate(x, 70))


def test_loading_errors_are_clear(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_forecaster(tmp_path / "nope")
    other = tmp_path / "mixtral"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "mixtral"}))
    with pytest.raises(CheckpointError, match="'mixtral' checkpoint, not a forecaster"):
        load_forecaster(other)
    from moekit.checkpoints import save_checkpoint

    lm = tmp_path / "lm"
    save_checkpoint(lm, 1, config={"model": {"hidden_size": 8}}, model_state={"w": torch.zeros(2)},
                    optimizer_state=None, trainer_state={})
    with pytest.raises(CheckpointError, match="not a forecaster checkpoint.*language model"):
        load_forecaster(lm)
    hf = tmp_path / "hf"
    save_hf(small_model(), hf)
    (hf / "model.safetensors").unlink()
    (hf / "pytorch_model.bin").write_bytes(b"x")
    with pytest.raises(CheckpointError, match="pickled weights are refused"):
        load_hf(hf)


def _reference_module():
    """sktime's vendored Time-MoE, patched to run under transformers 5 (see the issue's notes)."""
    pytest.importorskip("transformers")
    pytest.importorskip("sktime")
    tm = pytest.importorskip("sktime.libs.timemoe.timemoe")

    def causal_mask(attention_mask, input_shape, inputs_embeds, past_len, sliding_window=None):
        # transformers 5 dropped _prepare_4d_causal_attention_mask; the reference only needs a causal mask
        b, t = input_shape
        m = torch.full((t, past_len + t), torch.finfo(inputs_embeds.dtype).min, dtype=inputs_embeds.dtype)
        return torch.triu(m, diagonal=past_len + 1)[None, None].expand(b, 1, t, past_len + t)

    tm._prepare_4d_causal_attention_mask = causal_mask
    return tm


def _reference_forecast(ref, x: torch.Tensor, horizon: int) -> torch.Tensor:
    """The reference's own generation rule, driven step by step with use_cache=False."""
    seq = x.clone()
    end = x.shape[1] + horizon
    while seq.shape[1] < end:
        out = ref(input_ids=seq.clone().unsqueeze(-1), use_cache=False, return_dict=True,
                  max_horizon_length=end - seq.shape[1])
        seq = torch.cat([seq, out.logits[:, -1, :].reshape(x.shape[0], -1)], dim=1)
    return seq[:, x.shape[1]:end]


def test_matches_the_reference_implementation(tmp_path):
    tm = _reference_module()
    torch.manual_seed(0)
    cfg = tm.TimeMoeConfig(input_size=1, hidden_size=32, intermediate_size=64, horizon_lengths=[1, 8, 32, 64],
                           num_hidden_layers=2, num_attention_heads=4, num_experts=8, num_experts_per_tok=2,
                           max_position_embeddings=512)
    ref = tm.TimeMoeForPrediction(cfg).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    ref.save_pretrained(tmp_path / "ref")
    ours = load_forecaster(tmp_path / "ref")
    x = torch.randn(3, 48)
    with torch.no_grad():
        for horizon in (1, 7, 8, 40, 97, 200):  # 97 = 64 + 32 + 1, 200 = 3 x 64 + 8
            diff = (ours.generate(x, horizon) - _reference_forecast(ref, x, horizon)).abs().max()
            assert diff <= 1e-5, f"horizon {horizon}: max abs diff {diff}"
        # the training objective too: Huber over heads with loss masks + 0.02 x all-layer balance loss
        type(ref).loss_function = property(lambda s: torch.nn.HuberLoss(reduction="none", delta=2.0))
        w = torch.randn(3, 41)
        ref_loss = ref(input_ids=w[:, :-1].clone().unsqueeze(-1), labels=w[:, 1:].clone(),
                       loss_masks=torch.ones(3, 40), use_cache=False, return_dict=True).loss
        assert float(ours.loss(w)[0]) == pytest.approx(float(ref_loss), rel=1e-5)
    # and the other direction: moekit's export loads, strictly, into the reference model
    # (built directly: transformers 5's from_pretrained leaves the reference's RoPE buffers uninitialised)
    from safetensors.torch import load_file

    save_hf(ours, tmp_path / "ours")
    exported = json.loads((tmp_path / "ours" / "config.json").read_text())
    back = tm.TimeMoeForPrediction(tm.TimeMoeConfig(**exported)).eval()
    back.load_state_dict(load_file(tmp_path / "ours" / "model.safetensors"), strict=True)
    with torch.no_grad():
        assert (ours.generate(x, 72) - _reference_forecast(back, x, 72)).abs().max() <= 1e-5


def test_load_hf_names_a_missing_or_broken_config(tmp_path):
    with pytest.raises(CheckpointError, match="has no config.json: a Time-MoE Hugging Face directory"):
        load_hf(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"config.json is not valid JSON: Expecting property name"):
        load_hf(tmp_path)


# ---------------------------------------------------------------- train-forecaster on a user's CSV (issue 24)

TINY_RUN = ["model.hidden_size=16", "model.intermediate_size=32", "model.num_layers=1", "model.num_heads=2",
            "train.steps=2", "train.seq_len=48", "train.batch_size=4", "train.eval_every=1", "train.save_every=2",
            "train.eval_batches=1", "train.warmup_steps=1", "train.device=cpu"]


def hourly_csv(path, rows: int = 600, inf_at: int | None = None):
    import numpy as np

    t = np.arange(rows)
    start = np.datetime64("2021-03-01T00:00:00")
    lines = ["date,load,temp"]
    for i in t:
        load = "inf" if i == inf_at else f"{10 + 3 * np.sin(2 * np.pi * i / 24):.4f}"
        lines.append(f"{str(start + np.timedelta64(int(i), 'h')).replace('T', ' ')},{load},{20 + 0.01 * i:.4f}")
    path.write_text("\n".join(lines) + "\n")
    return path


def metrics_of(run):
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def test_train_forecaster_is_reproducible(tmp_path):
    from moekit.train.forecaster import train_forecaster

    data = hourly_csv(tmp_path / "s.csv")
    runs = []
    for name in ("a", "b"):
        torch.manual_seed(1000 + len(runs))  # whatever the global RNG holds, the run's seed decides
        out = train_forecaster([data], tmp_path / name, overrides=TINY_RUN, progress=False)
        runs.append(out)
    first = [[m for m in metrics_of(tmp_path / n) if m.get("step") == 1 and "loss" in m][0]["loss"] for n in "ab"]
    assert first[0] == first[1]
    for (k, a), b in zip(runs[0]["model"].state_dict().items(), runs[1]["model"].state_dict().values()):
        assert torch.equal(a, b), k


def test_an_inf_cell_never_reaches_the_weights(tmp_path):
    from moekit.data.timeseries import DataWarning
    from moekit.train.forecaster import train_forecaster

    data = hourly_csv(tmp_path / "s.csv", inf_at=100)
    with pytest.warns(DataWarning, match=r"column 'load': 1 infinite value\(s\) read as missing"):
        out = train_forecaster([data], tmp_path / "run", overrides=TINY_RUN, progress=False)
    assert all(torch.isfinite(p).all() for p in out["model"].state_dict().values())
    assert all(np.isfinite(m["val_huber"]) for m in metrics_of(tmp_path / "run") if "val_huber" in m)


def test_a_loss_that_is_not_finite_stops_training(tmp_path, monkeypatch):
    from moekit.train.forecaster import TrainingDiverged, train_forecaster

    data = hourly_csv(tmp_path / "s.csv")
    real_loss = TimeMoE.loss

    def nan_in_eval(self, batch):
        loss, metrics = real_loss(self, batch)
        return (loss, metrics) if self.training else (loss, {**metrics, "huber": float("nan")})

    monkeypatch.setattr(TimeMoE, "loss", nan_in_eval)
    with pytest.raises(TrainingDiverged, match=r"validation Huber loss is nan at step 1: training stopped"):
        train_forecaster([data], tmp_path / "run", overrides=TINY_RUN, progress=False)
    monkeypatch.setattr(TimeMoE, "loss", lambda self, batch: (real_loss(self, batch)[0] * float("nan"), {}))
    with pytest.raises(TrainingDiverged, match=r"the training loss is nan: training stopped"):
        train_forecaster([data], tmp_path / "run2", overrides=TINY_RUN, progress=False)
    assert not list((tmp_path / "run2").glob("step-*"))  # no NaN checkpoint


def test_a_short_validation_split_shrinks_the_window_and_says_so(tmp_path):
    from moekit.data.timeseries import DataWarning
    from moekit.train.forecaster import train_forecaster

    data = hourly_csv(tmp_path / "s.csv", rows=300)  # 70/10/20: 30 validation rows < seq_len + 1 = 49
    with pytest.warns(DataWarning, match=r"validation uses windows of 30 points, not seq_len \+ 1 = 49: the "
                                         r"validation split of s \(30 rows\) is shorter"):
        train_forecaster([data], tmp_path / "run", overrides=TINY_RUN, progress=False)
    assert [m["step"] for m in metrics_of(tmp_path / "run") if "val_huber" in m] == [1, 2]
