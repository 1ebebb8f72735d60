"""BERT-family sentence encoders (all-MiniLM-L6-v2 and kin), dense or converted to MoE.

`SentenceEncoder` computes what transformers' BertModel computes (post-norm
blocks, exact GELU, absolute positions) and `.encode(sentences)` what
sentence-transformers computes for a mean-pooling model: mean of the last
hidden states over real tokens, L2-normalised. Parameter names follow
Hugging Face's (`embeddings.*`, `encoder.layer.i.attention.*`), except that
each layer's FFN is `ffn.up_proj` / `ffn.down_proj` (from `intermediate.dense` /
`output.dense`) so it is read like any dense FFN and can be swapped for an
`EncoderMoE`. `convert_to_moe` is the encoder's side of `moefy.convert`.

Not here: reading directories and tokenizers (io.py), the MoE FFN (encoder_moe.py).
"""

from __future__ import annotations

import copy

import torch
import torch.nn as nn
import torch.nn.functional as F

from .encoder_moe import EncoderMoE
from .ffn import ffn_weights
from .plan import collect_ffn_inputs, plan_layer, trained_selector
from .spec import MoefySpec, split_widths


class BertFFN(nn.Module):
    def __init__(self, hidden: int, width: int):
        super().__init__()
        self.up_proj = nn.Linear(hidden, width)
        self.down_proj = nn.Linear(width, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.gelu(self.up_proj(x)))


class _Linear(nn.Module):
    """`dense` (+ `LayerNorm`): HF's BertSelfOutput / BertOutput naming."""

    def __init__(self, d_in: int, d_out: int, eps: float | None = None):
        super().__init__()
        self.dense = nn.Linear(d_in, d_out)
        if eps is not None:
            self.LayerNorm = nn.LayerNorm(d_out, eps=eps)


class BertLayer(nn.Module):
    def __init__(self, hf: dict):
        super().__init__()
        D, eps = hf["hidden_size"], hf.get("layer_norm_eps", 1e-12)
        self.heads = hf["num_attention_heads"]
        self.attention = nn.Module()
        self.attention.self = nn.Module()
        for name in ("query", "key", "value"):
            setattr(self.attention.self, name, nn.Linear(D, D))
        self.attention.output = _Linear(D, D, eps)
        self.ffn = BertFFN(D, hf["intermediate_size"])
        self.output = nn.Module()
        self.output.LayerNorm = nn.LayerNorm(D, eps=eps)

    def forward(self, x_BTD: torch.Tensor, mask_B11T: torch.Tensor) -> torch.Tensor:
        h = self.attend(x_BTD, mask_B11T)
        return self.finish(h, self.ffn(h))

    def attend(self, x_BTD: torch.Tensor, mask_B11T: torch.Tensor) -> torch.Tensor:
        """The attention half of the block: what enters the FFN."""
        B, T, D = x_BTD.shape
        att = self.attention.self
        q, k, v = (getattr(att, n)(x_BTD).view(B, T, self.heads, -1).transpose(1, 2) for n in ("query", "key", "value"))
        ctx = F.scaled_dot_product_attention(q, k, v, attn_mask=mask_B11T).transpose(1, 2).reshape(B, T, D)
        return self.attention.output.LayerNorm(self.attention.output.dense(ctx) + x_BTD)

    def finish(self, h_BTD: torch.Tensor, ffn_BTD: torch.Tensor) -> torch.Tensor:
        return self.output.LayerNorm(ffn_BTD + h_BTD)


class SentenceEncoder(nn.Module):
    def __init__(self, hf: dict, tokenizer=None, max_seq_length: int = 256):
        super().__init__()
        D = hf["hidden_size"]
        self.hf_config, self.tokenizer, self.max_seq_length = hf, tokenizer, max_seq_length
        self.embeddings = nn.Module()
        self.embeddings.word_embeddings = nn.Embedding(hf["vocab_size"], D)
        self.embeddings.position_embeddings = nn.Embedding(hf["max_position_embeddings"], D)
        self.embeddings.token_type_embeddings = nn.Embedding(hf.get("type_vocab_size", 2), D)
        self.embeddings.LayerNorm = nn.LayerNorm(D, eps=hf.get("layer_norm_eps", 1e-12))
        self.encoder = nn.Module()
        self.encoder.layer = nn.ModuleList(BertLayer(hf) for _ in range(hf["num_hidden_layers"]))

    def forward(self, input_ids_BT: torch.Tensor, attention_mask_BT: torch.Tensor | None = None,
                token_type_ids_BT: torch.Tensor | None = None) -> torch.Tensor:
        """Last hidden states [B, T, D]."""
        if attention_mask_BT is None:
            attention_mask_BT = torch.ones_like(input_ids_BT)
        x = self.embed(input_ids_BT, token_type_ids_BT)
        mask = attention_mask_BT.bool()[:, None, None, :]
        for layer in self.encoder.layer:
            x = layer(x, mask)
        return x

    def embed(self, input_ids_BT: torch.Tensor, token_type_ids_BT: torch.Tensor | None = None) -> torch.Tensor:
        """[B, T, D] what enters the first layer (token + type + position embeddings, normalised)."""
        types = token_type_ids_BT if token_type_ids_BT is not None else torch.zeros_like(input_ids_BT)
        e = self.embeddings
        pos = e.position_embeddings(torch.arange(input_ids_BT.shape[1], device=input_ids_BT.device))[None]
        return e.LayerNorm(e.word_embeddings(input_ids_BT) + e.token_type_embeddings(types) + pos)

    def tokenize(self, sentences: list[str]) -> dict:
        return self.tokenizer(list(sentences), padding=True, truncation="longest_first", max_length=self.max_seq_length,
                              return_tensors="pt")

    @torch.no_grad()
    def encode(self, sentences: list[str] | str, batch_size: int = 32, normalize: bool = True) -> torch.Tensor:
        """[N, D] sentence embeddings: masked mean of the last hidden states, L2-normalised."""
        single = isinstance(sentences, str)
        sentences = [sentences] if single else list(sentences)
        out = []
        for i in range(0, len(sentences), batch_size):
            batch = self.tokenize(sentences[i : i + batch_size])
            h = self(batch["input_ids"], batch["attention_mask"], batch.get("token_type_ids"))
            m = batch["attention_mask"][..., None].to(h.dtype)
            emb = (h * m).sum(1) / m.sum(1).clamp_min(1e-9)
            out.append(F.normalize(emb, p=2, dim=1) if normalize else emb)
        emb = torch.cat(out) if out else torch.zeros(0, self.hf_config["hidden_size"])
        return emb[0] if single else emb

    def calibration(self, groups: list[list[str]], batch_size: int = 16) -> list:
        """Groups of sentences -> batches (run, keep-mask) for collect_ffn_inputs."""
        out = []
        for sentences in groups:
            batches = []
            for i in range(0, len(sentences), batch_size):
                t = self.tokenize(sentences[i : i + batch_size])
                batches.append((lambda t=t: self(t["input_ids"], t["attention_mask"], t.get("token_type_ids")), t["attention_mask"]))
            out.append(batches)
        return out

    def random_calibration(self, seed: int) -> list:
        g = torch.Generator().manual_seed(seed)
        ids = torch.randint(1000, self.hf_config["vocab_size"], (4, 8, 32), generator=g)
        return [[(lambda r=r: self(r), None) for r in ids]]

    @torch.no_grad()
    def convert_to_moe(self, spec: MoefySpec, calib=None) -> "SentenceEncoder":
        from .decoder import router_kind
        from .spec import MoefyError

        if spec.method == "readme" and not calib:
            raise MoefyError("the readme method needs calibration data (--calib PATH ..., one group per file or domain); none was given")
        shared, width = split_widths(self.hf_config["intermediate_size"], spec)
        self.eval()
        ffns = [layer.ffn for layer in self.encoder.layer]
        groups = collect_ffn_inputs(ffns, self.calibration(calib)) if calib else None
        train = groups or (collect_ffn_inputs(ffns, self.random_calibration(spec.seed)) if spec.method != "upcycle" else None)
        new = copy.deepcopy(self)
        kind = router_kind(spec)
        for i, layer in enumerate(new.encoder.layer):
            fw = ffn_weights(self.encoder.layer[i].ffn)
            part = plan_layer(fw, spec, shared, [g[i] for g in groups] if groups else None)
            layer.ffn = EncoderMoE(fw.w_up_FD.shape[1], spec.experts, spec.top_k, width, shared, kind)
            layer.ffn.fill(fw, part)
            if kind == "selector":
                layer.ffn.router = trained_selector(fw, part, spec, torch.cat([g[i] for g in train]))
        new.moefy_manifest = {"spec": spec.to_dict(), "router": kind}
        return new.eval()


def hf_state_to_encoder(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """HF BertModel tensor names -> SentenceEncoder names (pooler and position_ids dropped)."""
    out = {}
    for name, t in state.items():
        name = name.removeprefix("bert.")
        if name.startswith("pooler.") or name.endswith("position_ids"):
            continue
        out[name.replace(".intermediate.dense.", ".ffn.up_proj.").replace(".output.dense.", ".ffn.down_proj.")
               .replace(".attention.ffn.down_proj.", ".attention.output.dense.")] = t
    return out
