"""train.device: the model and batches move to the device, autocast follows the parameters, clear refusals.

CPU is what runs here; the CUDA paths are marked `gpu` and skip without CUDA.
"""

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist

from moekit.errors import ConfigError
from moekit.models.decoder import DecoderLM, ModelConfig, lm_loss
from moekit.train.loop import TrainConfig, fit, resolve_device, to_device

CUDA = torch.cuda.is_available()
TINY = ModelConfig(vocab_size=40, hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=2, ffn="moe", dense_hidden=64)


def tiny_fit(tmp_path, device: str, precision: str = "fp32", steps: int = 2, seen=None, resume=False, run="run"):
    torch.manual_seed(0)
    model = DecoderLM(TINY)
    data = torch.randint(0, 40, (4, 17))

    def loss_fn(m, batch):
        out = m(batch[:, :-1])
        if seen is not None:
            seen.append((out.logits.dtype, batch.device, next(m.parameters()).device))
        return lm_loss(out, batch[:, 1:], 0.0, 0.0)[0], {}

    tc = TrainConfig(steps=steps, warmup_steps=0, min_lr_ratio=1.0, eval_every=0, save_every=1, precision=precision, device=device)
    fit(model, tc, batch_fn=lambda i: data, loss_fn=loss_fn, run_dir=tmp_path / run, config_dict={}, progress=False,
        resume=resume)
    return model


@pytest.mark.skipif(CUDA, reason="checks the refusal on a machine without CUDA")
def test_cuda_without_cuda_is_refused_before_anything_is_written(tmp_path):
    with pytest.raises(ConfigError, match=r"train.device='cuda' but no CUDA device is available.*train.device=cpu"):
        tiny_fit(tmp_path, "cuda")
    assert not (tmp_path / "run").exists()
    assert resolve_device("auto") == torch.device("cpu")


def test_unknown_device_is_named():
    with pytest.raises(ConfigError, match=r"device='tpu' is unknown: accepted values are auto, cpu, cuda"):
        TrainConfig(device="tpu")


def test_autocast_follows_the_parameters_not_the_machine(tmp_path, monkeypatch):
    # The old loop autocast on "cuda" whenever CUDA existed, so a CPU model trained in fp32 under precision=bf16.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    seen = []
    tiny_fit(tmp_path, "cpu", precision="bf16", seen=seen)
    assert [s[0] for s in seen] == [torch.bfloat16, torch.bfloat16]
    assert {s[2].type for s in seen} == {"cpu"}


def test_to_device_moves_every_tensor_of_a_nested_batch():
    meta = torch.device("meta")
    batch = {"x": torch.ones(2), "pair": (torch.zeros(1), [torch.ones(3), 7]), "name": "b"}
    moved = to_device(batch, meta)
    assert moved["x"].device == meta and moved["pair"][0].device == meta and moved["pair"][1][0].device == meta
    assert moved["pair"][1][1] == 7 and moved["name"] == "b" and isinstance(moved["pair"], tuple)


def test_gloo_expert_parallel_trains_on_the_cpu(tmp_path):
    from moekit.parallel import init_expert_parallel

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        parallel = init_expert_parallel(1)
        assert parallel.device == torch.device("cpu")
        assert resolve_device("auto", parallel) == torch.device("cpu")
        if CUDA:  # CUDA present but a gloo-only group: cuda is refused, naming NCCL
            with pytest.raises(ConfigError, match="needs the NCCL backend"):
                resolve_device("cuda", parallel)
    finally:
        dist.destroy_process_group()


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_cuda_training_moves_model_and_batches_and_resumes(tmp_path):
    seen = []
    model = tiny_fit(tmp_path, "auto", precision="bf16", steps=4, seen=seen, run="full")
    assert {s[1].type for s in seen} == {"cuda"} and {s[2].type for s in seen} == {"cuda"}
    assert {s[0] for s in seen} == {torch.bfloat16}  # autocast on the parameters' device
    assert next(model.parameters()).device.type == "cuda"
    from moekit.checkpoints import load_checkpoint

    state = load_checkpoint(tmp_path / "full").model_state
    assert {t.device.type for t in state.values()} == {"cpu"}  # checkpoints hold CPU tensors
    tiny_fit(tmp_path, "cuda", precision="bf16", steps=2, run="cut")  # a constant LR: 2 steps + a resume to 4
    tiny_fit(tmp_path, "cuda", precision="bf16", steps=4, resume=True, run="cut")  # must equal 4 steps
    loss = lambda run: [json.loads(l)["loss"] for l in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
    # CUDA scatter-adds are not bitwise deterministic: equal up to bf16 rounding
    assert len(loss("cut")) == 4 and loss("cut") == pytest.approx(loss("full"), rel=1e-2)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA or not dist.is_nccl_available(), reason="needs CUDA and NCCL")
def test_expert_parallel_under_torchrun_with_nccl_puts_the_rank_on_its_gpu(tmp_path):
    code = (
        "import torch, os\n"
        "from moekit.parallel import init_expert_parallel\n"
        "from moekit.train.loop import resolve_device\n"
        "with init_expert_parallel(1) as p:\n"
        "    d = resolve_device('auto', p)\n"
        "    assert d == torch.device('cuda', int(os.environ['LOCAL_RANK'])), d\n"
        "    print('DEVICE', d)\n"
    )
    script = tmp_path / "w.py"
    script.write_text(code)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "1", str(script)],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr
    assert "DEVICE cuda:0" in proc.stdout
