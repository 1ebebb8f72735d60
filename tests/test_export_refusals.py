"""Exports refuse what their format cannot carry: one MoekitError naming the field and what is accepted, nothing on disk.

Covers moekit.hf.save, moekit.gguf.save and `moekit convert --to hf|gguf` for the features the writers would
otherwise drop: Mixture-of-Depths layers (mod_layers), an expert-selection bias on a family without one, and a
per-layer expert count (pyramid) that differs from the one count a config.json states. Oracles: the refusal text
and the directory listing; for the uniform pyramid GGUF now writes, the file's own reload (F32: equal logits).
"""

import pytest
import torch

from moekit import hf
from moekit.checkpoints import save_checkpoint
from moekit.cli.main import main
from moekit.config import MoEConfig, to_dict
from moekit.data.text import Tokenizer
from moekit.errors import MoekitError
from moekit.models.decoder import DecoderLM, ModelConfig

pytestmark = pytest.mark.usefixtures("one_thread")
BASE = dict(vocab_size=257, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, max_seq_len=64)
MOD = "mod_layers=[1] (Mixture-of-Depths layers compute for only some tokens; "


def tiny(moe=None, **over) -> DecoderLM:
    torch.manual_seed(0)
    moe = MoEConfig(**{"num_experts": 4, "top_k": 2, "expert_hidden": 16, **(moe or {})})
    return DecoderLM(ModelConfig(**{**BASE, **over}, moe=moe)).eval()


def run_dir(model, root):
    from moekit.train.lm import RunConfig

    return save_checkpoint(root / "run", 1, config=to_dict(RunConfig(model=model.cfg)), model_state=model.state_dict(),
                           optimizer_state=None, trainer_state={}, tokenizer=Tokenizer.byte_level()).parent


def test_mixture_of_depths_is_refused_by_every_export(tmp_path):
    G = pytest.importorskip("moekit.gguf")
    model = tiny(mod_layers=[1])
    for arch in ("auto", "mixtral", "deepseek_v3", "granitemoe"):
        with pytest.raises(hf.UnsupportedModelError) as e:
            hf.save(model, tmp_path / "hf", arch=arch)
        assert str(e.value) == ("the model cannot be written as a Hugging Face checkpoint: " + MOD
                                + "no Hugging Face family or llama.cpp graph does; accepted: mod_layers=[])")
    for arch in ("auto", "qwen3_moe"):
        with pytest.raises(G.UnsupportedGGUFError, match=r"^the model cannot be written as GGUF: mod_layers=\[1\] .*"
                                                         r"accepted: mod_layers=\[\]\)$"):
            G.save(model, tmp_path / "m.gguf", arch=arch)
    assert any(MOD in p for p in hf.fit_problems(model, "mixtral"))
    assert list(tmp_path.iterdir()) == []  # nothing half-written, no temporary sibling left


def test_cli_convert_refuses_mixture_of_depths_in_one_line(tmp_path, capsys):
    pytest.importorskip("gguf")
    run = run_dir(tiny(mod_layers=[1]), tmp_path)
    capsys.readouterr()
    for to, out in (("hf", tmp_path / "out"), ("gguf", tmp_path / "out.gguf")):
        assert main(["convert", "--to", to, str(run), str(out)]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and err.startswith("moekit convert: error: the model cannot be written")
        assert "mod_layers=[1]" in err and "accepted: mod_layers=[]" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_selection_bias_is_refused_where_the_family_has_none(tmp_path):
    from moekit.models.mla import MLAConfig

    granite = tiny(qkv_bias=True, o_bias=True, moe=dict(score_func="topk_softmax", norm_topk_prob=False,
                                                        selection_bias=True))
    with pytest.raises(hf.UnsupportedModelError, match=r"selection_bias=true \(.*only deepseek_v3 has one\)"):
        hf.save(granite, tmp_path / "a", arch="granitemoe")
    mla = MLAConfig(q_lora_rank=0, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8)
    v2 = tiny(attention="mla", mla=mla, num_kv_heads=4, moe=dict(norm_topk_prob=False, selection_bias=True))
    assert hf.fit_problems(v2, "deepseek_v2") == [
        "an expert-selection bias (bias_update_rate > 0 or selection_bias; only deepseek_v3 has one)"]
    with pytest.raises(hf.UnsupportedModelError, match="only deepseek_v3 has one"):
        hf.save(v2, tmp_path / "b", arch="deepseek_v2")
    assert list(tmp_path.iterdir()) == []


def test_uniform_pyramid_other_than_num_experts(tmp_path):
    """pyramid=[8] with moe.num_experts=4: 8 experts per layer; config.json writers that state moe.num_experts refuse."""
    granite = tiny(pyramid=[8], qkv_bias=True, o_bias=True, moe=dict(score_func="topk_softmax", norm_topk_prob=False))
    assert granite.cfg.experts_per_layer == [8, 8]
    with pytest.raises(hf.UnsupportedModelError, match=r"experts_per_layer=\[8, 8\] differs from moe.num_experts=4 "
                                                       r"\(.*accepted, moe.num_experts=8\)"):
        hf.save(granite, tmp_path / "a", arch="granitemoe")
    assert list(tmp_path.iterdir()) == []
    G = pytest.importorskip("moekit.gguf")
    mixtral = tiny(pyramid=[8])
    out = G.save(mixtral, tmp_path / "m.gguf")  # GGUF states the layers' own count (8)
    back = G.load(out)
    assert back.cfg.moe.num_experts == 8
    ids = torch.tensor([[3, 100, 7, 250, 42, 9]])
    with torch.no_grad():
        assert torch.equal(back(ids).logits, mixtral(ids).logits)


def test_refusals_are_moekit_errors():
    assert issubclass(hf.UnsupportedModelError, MoekitError)
