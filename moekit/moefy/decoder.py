"""Converting a dense moekit DecoderLM into an MoE DecoderLM.

The result is an ordinary `DecoderLM` whose FFNs are `MoELayer`s: upcycled
layers keep moekit's TopKRouter (renormalised top-k, so at step 0 every token
gets exactly the dense FFN); cluster / readme layers get experts sliced from
the dense weights, a shared expert for the always-on neurons, and a
`SelectorRouter` (or a `FixedRouter` fed by the decoupled router).
`decoder_calibration` turns token-id groups into the batches `plan.py` runs.

Not here: Hugging Face reading (hf_dense.py), saving (io.py), encoders.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from ..config import MoEConfig
from ..models.build import build_model
from ..models.decoder import DecoderLM
from .ffn import FFNWeights, ffn_weights, slice_in, slice_out
from .partition import Partition
from .plan import collect_ffn_inputs, plan_layer, trained_selector
from .routers import FixedRouter
from .spec import MoefyError, MoefySpec, split_widths

CALIB_SEQ_LEN = 128


def moe_config_for(model: DecoderLM, spec: MoefySpec) -> tuple[MoEConfig, int]:
    """(the MoEConfig of the converted layers, shared width)."""
    cfg = model.cfg
    shared, width = split_widths(cfg.dense_hidden, spec)
    moe = MoEConfig(hidden_size=cfg.hidden_size, num_experts=spec.experts, top_k=spec.top_k, expert_hidden=width,
                    activation=cfg.moe.activation, norm_topk_prob=True, num_shared_experts=1 if shared else 0,
                    shared_expert_hidden=shared)
    return moe, shared


def check_dense(model: DecoderLM) -> None:
    if any(layer.is_moe for layer in model.layers):
        raise MoefyError("the source model already has MoE layers; moefy converts dense models (every FFN dense)")


def decoder_calibration(model: DecoderLM, calib, seq_len: int = CALIB_SEQ_LEN) -> list:
    """Groups of token ids ([T] or [B, T] tensors, or lists of them) -> batches for collect_ffn_inputs."""
    groups = []
    for group in calib:
        seqs = group if isinstance(group, (list, tuple)) else [group]
        batches = []
        for ids in seqs:
            ids = torch.as_tensor(ids).long()
            rows = ids.reshape(-1)[: (ids.numel() // seq_len) * seq_len].view(-1, seq_len) if ids.dim() == 1 and ids.numel() > seq_len else ids.reshape(-1, ids.shape[-1])
            batches.append((lambda r=rows: model(r), None))
        groups.append(batches)
    return groups


def random_calibration(model: DecoderLM, seed: int, batches: int = 4) -> list:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.cfg.vocab_size, (batches, 2, min(64, model.cfg.max_seq_len)), generator=g)
    return [[(lambda r=r: model(r), None) for r in ids]]


@torch.no_grad()
def convert_decoder(model: DecoderLM, spec: MoefySpec, calib=None) -> DecoderLM:
    spec.check()
    check_dense(model)
    moe_cfg, shared = moe_config_for(model, spec)
    if spec.method == "readme" and not calib:
        raise MoefyError("the readme method needs calibration data (--calib PATH ..., one group per file or domain); none was given")
    model = model.eval()
    mlps = [layer.mlp for layer in model.layers]
    groups = collect_ffn_inputs(mlps, decoder_calibration(model, calib)) if calib else None
    train_inputs = groups or (collect_ffn_inputs(mlps, random_calibration(model, spec.seed)) if spec.method != "upcycle" else None)
    new = build_model(replace(model.cfg, ffn="moe", moe=moe_cfg))
    state = {k: v for k, v in model.state_dict().items() if ".mlp." not in k}
    new.load_state_dict(state, strict=False)
    for i, (old_layer, new_layer) in enumerate(zip(model.layers, new.layers)):
        fw = ffn_weights(old_layer.mlp)
        part = plan_layer(fw, spec, shared, [g[i] for g in groups] if groups else None)
        fill_moe(new_layer.mlp, fw, part)
        if part is not None:
            x_TD = torch.cat([g[i] for g in train_inputs])
            new_layer.mlp.router = FixedRouter(spec.experts, spec.top_k) if spec.router == "decoupled" else trained_selector(fw, part, spec, x_TD)
    new.moefy_manifest = {"spec": spec.to_dict(), "router": router_kind(spec)}
    return new.eval()


def router_kind(spec: MoefySpec) -> str:
    if spec.method == "upcycle":
        return "topk"
    return "fixed" if spec.router == "decoupled" else "selector"


def fill_moe(moe, fw: FFNWeights, part: Partition | None) -> None:
    """Copy the dense FFN into an MoELayer: whole (upcycle) or sliced by `part` (+ shared expert)."""
    E = moe.experts.num_experts
    dtype = moe.experts.w_in_EHD.dtype
    if part is None:
        everyone = torch.arange(fw.width)
        w_in, w_out = slice_in(fw, everyone), slice_out(fw, everyone)
        moe.experts.w_in_EHD.copy_(w_in.expand(E, *w_in.shape))
        moe.experts.w_out_EDF.copy_(w_out.expand(E, *w_out.shape))
        return
    moe.experts.w_in_EHD.copy_(torch.stack([slice_in(fw, idx) for idx in part.experts_EW]).to(dtype))
    moe.experts.w_out_EDF.copy_(torch.stack([slice_out(fw, idx) for idx in part.experts_EW]).to(dtype))
    if part.shared_S.numel():
        s = part.shared_S
        if fw.w_gate_FD is not None:
            moe.shared.gate_proj.weight.copy_(fw.w_gate_FD[s])
        moe.shared.up_proj.weight.copy_(fw.w_up_FD[s])
        moe.shared.down_proj.weight.copy_(fw.w_down_DF[:, s])
