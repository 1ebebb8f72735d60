"""MoMa: expert choice within modality groups, causal auxiliary routers, mixture-of-depths, upcycling."""

import importlib.util
import math

import numpy as np
import pytest
import torch

from moekit.cli.main import main
from moekit.config import MoEConfig
from moekit.data.mixed_modal import DIGIT_NAMES, load_digit_images, mixed_tokenizer, prepare_mixed_modal
from moekit.data.vq import VQTokenizer
from moekit.errors import ConfigError, DataError
from moekit.infer import Engine, SamplingConfig
from moekit.models.decoder import DecoderLM, ModelConfig, lm_loss
from moekit.moe.layers import MoELayer
from moekit.moe.routing import ExpertChoiceRouter
from moekit.moefy.modality import upcycle_modality_experts

pytestmark = pytest.mark.usefixtures("one_thread")

TEXT, VOCAB = 200, 257  # ids < 200: text (group 0), 200..256: image (group 1)


def moma_moe(**kw):
    return MoEConfig(**{"hidden_size": 16, "num_experts": 8, "expert_hidden": 24, "router": "expert_choice",
                        "capacity_factor": 1.0, "num_groups": 2, "group_sizes": [4, 4], "score_func": "sigmoid",
                        "aux_router_hidden": 16, **kw})


def moma_model(seed=0, **kw):
    moe = moma_moe(**kw.pop("moe", {}))
    cfg = dict(vocab_size=VOCAB, hidden_size=16, num_layers=3, num_heads=2, num_kv_heads=1, max_seq_len=64,
               dense_hidden=24, group_of_token=[[0, TEXT, 0], [TEXT, VOCAB, 1]])
    torch.manual_seed(seed)
    model = DecoderLM(ModelConfig(moe=moe, **{**cfg, **kw}))
    with torch.no_grad():
        model.lm_head.weight.mul_(20)
    return model


@pytest.mark.parametrize("sizes,factor", [([4, 4], 1.0), ([7, 1], 1.0), ([3, 5], 2.0), ([7, 1], 0.5)])
def test_expert_choice_per_group_takes_exactly_C_of_its_groups_tokens(sizes, factor):
    torch.manual_seed(1)
    cfg = moma_moe(group_sizes=sizes, capacity_factor=factor, aux_router_hidden=0)
    router = ExpertChoiceRouter(cfg).train()
    T = 37
    group_T = (torch.rand(T) < 0.3).long()  # ~30% image tokens
    x = torch.randn(T, 16)
    r = router(x, group_ids_T=group_T)
    scores = torch.sigmoid(x @ router.gate.weight.detach().t())  # the oracle scores, by hand
    groups_of_expert = [g for g, n in enumerate(sizes) for _ in range(n)]
    for e, g in enumerate(groups_of_expert):
        members = [t for t in range(T) if int(group_T[t]) == g]
        C = min(len(members), math.ceil(len(members) * factor / sizes[g]))
        taken = sorted(r.token_idx_N[r.expert_idx_N == e].tolist())
        best = sorted(sorted(members, key=lambda t: -float(scores[t, e]))[:C])  # Python's own top-C
        assert taken == best, f"expert {e}"
    torch.testing.assert_close(r.weight_N, scores[r.token_idx_N, r.expert_idx_N])


def test_gumbel_noise_changes_the_choice_in_training_only_and_keeps_capacity():
    cfg = moma_moe(aux_router_hidden=0, noise_policy="gumbel")
    router = ExpertChoiceRouter(cfg)
    x, g = torch.randn(40, 16), torch.tensor([0] * 30 + [1] * 10)
    torch.manual_seed(0)
    a = router.train()(x, group_ids_T=g)
    b = router(x, group_ids_T=g)
    clean1, clean2 = router.eval()(x, group_ids_T=g, causal=False), router(x, group_ids_T=g, causal=False)
    assert not torch.equal(a.token_idx_N, b.token_idx_N)  # noisy
    assert torch.equal(clean1.token_idx_N, clean2.token_idx_N)  # no noise in eval
    assert a.counts_E.tolist() == [math.ceil(30 / 4)] * 4 + [math.ceil(10 / 4)] * 4


def test_auxiliary_routers_learn_the_selection():
    """Trained with BCE on detached inputs, the per-expert classifiers predict expert choice well."""
    torch.manual_seed(0)
    router = ExpertChoiceRouter(moma_moe())
    opt = torch.optim.Adam(router.aux_routers.parameters(), lr=1e-2)
    g = (torch.arange(256) % 4 == 0).long()
    before = None
    for step in range(150):
        x = torch.randn(256, 16)
        r = router.train()(x, group_ids_T=g)
        before = before if before is not None else float(r.aux_losses["aux_router_accuracy"])
        opt.zero_grad()
        r.aux_losses["aux_router"].backward()
        opt.step()
    assert router.gate.weight.grad is None  # detached inputs: the BCE trains the auxiliary routers alone
    x = torch.randn(512, 16)
    g = (torch.arange(512) % 4 == 0).long()
    with torch.no_grad():
        r = router.eval()(x, group_ids_T=g)  # causal: the auxiliary routers decide, scored against expert choice
    assert float(r.aux_losses["aux_router_accuracy"]) > 0.9 > before
    assert (router.gate.weight.shape, r.counts_E.sum() > 0) == ((8, 16), True)


def _outputs(model, ids, causal):
    with torch.no_grad():
        return model(ids, causal_routing=causal).logits


@pytest.mark.parametrize("mod_layers", [[], [1]])
def test_generation_with_auxiliary_routers_is_causal(mod_layers):
    """A token's output does not change when later tokens change (causal), unlike the non-causal choice."""
    model = moma_model(mod_layers=mod_layers, mod_capacity=0.5).eval()
    torch.manual_seed(3)
    ids = torch.randint(0, VOCAB, (2, 24))
    later = ids.clone()
    later[:, 12:] = torch.randint(0, VOCAB, (2, 12))
    a, b = _outputs(model, ids, True), _outputs(model, later, True)
    torch.testing.assert_close(a[:, :12], b[:, :12], atol=1e-6, rtol=0)
    na, nb = _outputs(model, ids, False), _outputs(model, later, False)
    assert (na[:, :12] - nb[:, :12]).abs().max() > 1e-4  # the test can fail: expert choice looks ahead
    # and the engine's cached decode gives the tokens of full causal forwards
    prompts = [ids[0, :6].tolist(), ids[1, :9].tolist()]
    got = Engine(model).generate_ids(prompts, SamplingConfig(max_new_tokens=8, stop_token_ids=[]))
    for p, c in zip(prompts, got):
        seq = p + c.token_ids
        full = _outputs(model, torch.tensor([seq]), True)[0]
        assert c.token_ids == full[len(p) - 1:-1].argmax(-1).tolist()


def test_mixture_of_depths_layers_compute_for_their_capacity_and_report_predictor_accuracy():
    model = moma_model(mod_layers=[0, 2], mod_capacity=0.25).train()
    ids = torch.randint(0, VOCAB, (2, 16))
    out = model(ids)
    assert out.routings[0].num_tokens == 2 * math.ceil(0.25 * 16)  # the MoE of a MoD layer sees its chosen tokens
    assert out.routings[1].num_tokens == 32
    loss, parts = lm_loss(out, ids, 0.0, 0.0)
    assert {"aux_router", "mod_predictor", "aux_router_accuracy", "mod_predictor_accuracy"} <= set(parts)
    loss.backward()
    depth = model.layers[0].depth_router
    assert depth.router.weight.grad.abs().sum() > 0  # the score learns through the block's output weight
    assert depth.predictor[0].weight.grad.abs().sum() > 0


def test_unchosen_tokens_pass_a_depth_layer_unchanged():
    model = moma_model(mod_layers=[0], mod_capacity=0.25, num_layers=1).train()
    ids = torch.randint(0, VOCAB, (1, 16))
    layer = model.layers[0]
    seen = {}
    layer.register_forward_hook(lambda mod, args, out: seen.update(x=args[0], y=out[0]))
    model(ids)
    same = (seen["x"] == seen["y"]).all(-1)[0]
    assert int((~same).sum()) == math.ceil(0.25 * 16)


def test_upcycling_one_text_and_one_image_ffn_into_four_and_four_experts():
    src = moma_model(moe=dict(num_experts=2, group_sizes=[1, 1]))
    new = upcycle_modality_experts(src, [4, 4])
    assert new.cfg.moe.group_sizes == [4, 4] and new.cfg.moe.num_experts == 8
    for old_layer, new_layer in zip(src.layers, new.layers):
        w_old, w_new = old_layer.mlp.experts.w_in_EHD, new_layer.mlp.experts.w_in_EHD
        for e in range(8):
            assert torch.equal(w_new[e], w_old[e // 4])
        g_old, g_new = old_layer.mlp.router.gate.weight, new_layer.mlp.router.gate.weight
        assert torch.allclose(g_new[5], g_old[1], atol=0.01) and not torch.equal(g_new[4], g_new[5])
    assert torch.equal(new.embed_tokens.weight, src.embed_tokens.weight)
    ids = torch.randint(0, VOCAB, (1, 10))
    assert new(ids).logits.shape == (1, 10, VOCAB)
    with pytest.raises(ConfigError, match="one expert per group"):
        upcycle_modality_experts(new, [4, 4])


def test_bad_moma_configs_get_one_clear_message():
    with pytest.raises(ConfigError, match="without auxiliary routers.*aux_router_hidden"):
        moma_model(moe=dict(aux_router_hidden=0))
    with pytest.raises(ConfigError, match=r"group_sizes=\[4, 3\] is invalid.*summing to num_experts=8"):
        moma_moe(group_sizes=[4, 3])
    with pytest.raises(ConfigError, match="mod_layers=.* is invalid"):
        moma_model(mod_layers=[5])


def test_a_moe_layer_with_grouped_expert_choice_keeps_tokens_in_their_group():
    layer = MoELayer(moma_moe(group_sizes=[7, 1]))
    g = torch.tensor([0, 1] * 10)
    _, r = layer(torch.randn(1, 20, 16), g)
    assert ((r.expert_idx_N == 7) == (g[r.token_idx_N] == 1)).all()


# ---------------------------------------------------------------- mixed-modal data and the VQ tokenizer

needs_sklearn = pytest.mark.skipif(importlib.util.find_spec("sklearn") is None,
                                   reason="mixed-modal data uses scikit-learn's bundled digits (pip install scikit-learn)")


def test_vq_kmeans_recovers_a_known_codebook_exactly():
    """Images tiled from 5 distinct constant 2x2 tiles: the codebook is those tiles, encode/decode is lossless."""
    rng = np.random.default_rng(0)
    tiles = np.array([0.0, 3.0, 7.0, 11.0, 16.0])
    which = rng.integers(0, 5, size=(200, 4, 4))
    images = np.kron(tiles[which], np.ones((2, 2)))  # [200, 8, 8]
    vq = VQTokenizer.train(images, patch=2, codes=5, offset=257)
    assert sorted(vq.codebook_KP[:, 0].tolist()) == tiles.tolist()
    ids = vq.encode(images)
    assert ids.shape == (200, 16) and ids.min() >= 257 and ids.max() < 262
    np.testing.assert_array_equal(vq.decode(ids), images)


@pytest.fixture(scope="module")
def mixed():
    if importlib.util.find_spec("sklearn") is None:
        pytest.skip("mixed-modal data uses scikit-learn's bundled digits")
    return prepare_mixed_modal(codes=16, text_max_bytes=20_000, repeats=1)


@needs_sklearn
def test_digit_codebook_reconstructs_the_digits(mixed):
    images, _ = load_digit_images()
    rec = mixed.vq.decode(mixed.vq.encode(images))
    assert ((rec - images) ** 2).mean() < 0.15 * images.var()


@needs_sklearn
def test_mixed_stream_interleaves_captioned_images_and_text_with_modality_ranges(mixed):
    V = mixed.tokenizer.vocab_size
    assert V == 257 + 16 and mixed.group_of_token == [[0, 257, 0], [257, V, 1]]
    ids = mixed.val.tolist()
    assert max(ids) < V
    image_share = sum(t >= 257 for t in ids) / len(ids)
    assert 0.1 < image_share < 0.5
    # every image run is followed or preceded by a caption naming a digit, in words
    text = mixed.tokenizer.decode(ids)
    n_captions = sum(text.count(f"a handwritten {n}:") + text.count(f"a {n}.") + text.count(f"an {n}.") for n in DIGIT_NAMES)
    assert n_captions == len(load_digit_images()[0]) // 5  # one caption per validation image
    # modality ids from the token ranges, as the model derives them
    cfg = ModelConfig(vocab_size=V, hidden_size=16, num_layers=1, num_heads=2, num_kv_heads=1, dense_hidden=16,
                      moe=moma_moe(), group_of_token=mixed.group_of_token)
    x = torch.tensor([ids[:50]])
    assert torch.equal(DecoderLM(cfg)._group_ids(x, None), (x[0] >= 257).long())


@needs_sklearn
def test_a_codebook_that_does_not_match_the_vocabulary_gets_one_clear_message(mixed, tmp_path, capsys):
    with pytest.raises(DataError, match=r"VQ codebook \(16 codes at ids \[257, 273\)\) does not match the tokenizer"):
        prepare_mixed_modal(codes=16, text_max_bytes=1000, tokenizer=mixed_tokenizer(32), vq=mixed.vq)
    with pytest.raises(DataError, match="does not match the model's vocabulary"):
        mixed.vq.check_vocab(300)
    shifted = VQTokenizer(mixed.vq.codebook_KP, 2, 8, offset=300)  # made for another text vocabulary
    path = shifted.save(tmp_path / "vq.json")
    out = tmp_path / "run"
    rc = main(["train", "--preset", "moma-small", "--out", str(out), f"data.vq_path={path}", "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "does not match the tokenizer's vocabulary (image ids [257," in err[0]
    assert not out.exists()


@pytest.mark.slow
@needs_sklearn
def test_moekit_train_mixed_modal_preset_end_to_end(tmp_path, capsys):
    """`moekit train --preset moma-small data.kind=mixed_modal`: trains, saves the codebook and the modality ranges."""
    out = tmp_path / "run"
    rc = main(["train", "--preset", "moma-small", "--out", str(out), "--quiet", "--no-sample", "train.steps=2",
               "train.batch_size=2", "train.seq_len=32", "train.eval_batches=1", "model.hidden_size=16", "num_layers=1",
               "num_heads=2", "num_kv_heads=1", "expert_hidden=16", "dense_hidden=16", "aux_router_hidden=8",
               "data.max_bytes=5000", "data.vq_codes=16", "data.kind=mixed_modal", "train.device=cpu"])
    assert rc == 0, capsys.readouterr().err
    vq = VQTokenizer.load(out / "vq.json")
    from moekit.train.lm import load_lm

    model, tok, cfg = load_lm(out)
    assert model.cfg.vocab_size == tok.vocab_size == 257 + vq.codes == 273
    assert model.cfg.group_of_token == [[0, 257, 0], [257, 273, 1]]
    vq.check_vocab(model.cfg.vocab_size, 257)  # the saved codebook fits the saved model


@pytest.mark.slow  # importing scikit-learn takes ~10 s on a loaded machine
@needs_sklearn
def test_digits_read_from_the_bundled_csv_equal_sklearns_loader():
    from sklearn.datasets import load_digits

    images, labels = load_digit_images()
    ref = load_digits()
    np.testing.assert_array_equal(images, ref.images)
    np.testing.assert_array_equal(labels, ref.target)
