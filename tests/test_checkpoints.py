"""Tests for moekit.checkpoints: layout, atomic saves, pruning, resume, refusals and errors.

The resume oracle is an uninterrupted training run: 3 steps + save/load + 3 steps
must equal 6 steps bit for bit (model and AdamW state).
"""

import json
import os
import pickle

import pytest
import safetensors.torch
import torch
from torch import nn

from moekit.checkpoints import (
    Checkpoint,
    load_checkpoint,
    load_model_state,
    load_tensors,
    resolve_checkpoint,
    save_checkpoint,
    save_tensors,
    state_from_tensors,
    state_to_tensors,
)
from moekit.errors import CheckpointError, ConfigError


class TinyLM(nn.Module):
    """Embedding tied to the output head, so the state dict holds two names for one tensor."""

    def __init__(self, vocab=11, dim=8):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.mix = nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, ids):
        return self.head(self.norm(torch.relu(self.mix(self.embed(ids)))))


class FakeTokenizer:
    def save(self, directory):
        (directory / "tokenizer.json").write_text('{"fake": true}')


def _save(run, step, model=None, **kw):
    model = model or TinyLM()
    args = dict(config={"dim": 8}, model_state=model.state_dict(), optimizer_state=None, trainer_state={"step": step})
    args.update(kw)
    return save_checkpoint(run, step, **args)


def _train(model, opt, steps, first_step):
    for step in range(first_step, first_step + steps):
        g = torch.Generator().manual_seed(step)
        ids = torch.randint(0, 11, (4, 6), generator=g)
        loss = nn.functional.cross_entropy(model(ids[:, :-1]).flatten(0, 1), ids[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()


def _fresh(seed=0):
    torch.manual_seed(seed)
    model = TinyLM()
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1, betas=(0.8, 0.95))


# ---------------------------------------------------------------- layout and round trips


def test_layout_and_round_trip(tmp_path):
    model = TinyLM()
    path = _save(tmp_path, 100, model, tokenizer=FakeTokenizer(), config={"dim": 8, "name": "tiny"})
    assert path == tmp_path / "step-00000100"
    assert sorted(p.name for p in path.iterdir()) == ["config.json", "model.safetensors", "tokenizer.json", "trainer_state.json"]
    assert (tmp_path / "latest").read_text().strip() == "step-00000100"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp")]

    ckpt = load_checkpoint(tmp_path)
    assert isinstance(ckpt, Checkpoint) and ckpt.dir == path
    assert ckpt.config == {"dim": 8, "name": "tiny"} and ckpt.trainer_state == {"step": 100}
    assert ckpt.optimizer_state is None and ckpt.tokenizer_path == path / "tokenizer.json"
    for name, tensor in model.state_dict().items():
        assert torch.equal(ckpt.model_state[name], tensor)
    # the tied weight is stored once, and comes back as one tensor under both names
    stored = safetensors.torch.load_file(path / "model.safetensors")
    assert len(stored) == len(model.state_dict()) - 1
    assert ckpt.model_state["head.weight"] is ckpt.model_state["embed.weight"]


def test_overlapping_views_are_copied_not_aliased(tmp_path):
    base = torch.arange(12.0)
    state = {"all": base, "first": base[:6], "again": base, "t": base.view(3, 4).T}
    save_tensors(tmp_path / "x.safetensors", state)
    loaded, _ = load_tensors(tmp_path / "x.safetensors")
    for name, tensor in state.items():
        assert torch.equal(loaded[name], tensor), name
    assert loaded["again"] is loaded["all"]


def test_nested_state_round_trip_is_exact():
    state = {
        "state": {0: {"step": torch.tensor(3.0), "buf": torch.randn(2)}, 7: {"flag": None}},
        "param_groups": [{"params": [0, 7], "betas": (0.9, 0.999), "lr": 1e-3, "amsgrad": False, "eps": float("inf")}],
        "__tensor__": "tricky user key",
    }
    tensors, skeleton = state_to_tensors(state)
    back = state_from_tensors(tensors, json.loads(json.dumps(skeleton)))
    assert back["param_groups"] == state["param_groups"]
    assert isinstance(back["param_groups"][0]["betas"], tuple)
    assert set(back["state"]) == {0, 7} and back["state"][7] == {"flag": None}
    assert torch.equal(back["state"][0]["buf"], state["state"][0]["buf"])
    assert back["__tensor__"] == "tricky user key"


def test_resume_is_bitwise_equal_to_uninterrupted_training(tmp_path):
    model, opt = _fresh()
    _train(model, opt, 6, first_step=0)

    half, half_opt = _fresh()
    _train(half, half_opt, 3, first_step=0)
    save_checkpoint(
        tmp_path, 3, config={}, model_state=half.state_dict(), optimizer_state=half_opt.state_dict(), trainer_state={"step": 3}
    )
    ckpt = load_checkpoint(tmp_path)
    resumed, resumed_opt = _fresh(seed=99)  # different init: everything must come from the checkpoint
    load_model_state(resumed, ckpt.model_state)
    resumed_opt.load_state_dict(ckpt.optimizer_state)
    _train(resumed, resumed_opt, 3, first_step=ckpt.trainer_state["step"])

    for (name, a), b in zip(model.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
    ref, got = opt.state_dict(), resumed_opt.state_dict()
    assert ref["param_groups"] == got["param_groups"]
    for pid, slots in ref["state"].items():
        for key, value in slots.items():
            assert torch.equal(value, got["state"][pid][key]), (pid, key)


# ---------------------------------------------------------------- atomicity and pruning


def test_failure_during_write_leaves_nothing_behind(tmp_path, monkeypatch):
    good = _save(tmp_path, 1)
    before = sorted(p.name for p in tmp_path.iterdir())

    def broken_writer(*args, **kwargs):
        raise OSError("disk full (injected)")

    monkeypatch.setattr(safetensors.torch, "save_file", broken_writer)
    with pytest.raises(OSError, match="injected"):
        _save(tmp_path, 2)
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    assert (tmp_path / "latest").read_text().strip() == good.name
    assert resolve_checkpoint(tmp_path) == good


def test_failure_writing_optimizer_after_model_leaves_nothing(tmp_path, monkeypatch):
    _save(tmp_path, 1)
    real = safetensors.torch.save_file
    calls = []

    def fail_second(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("crash while writing the optimizer (injected)")
        return real(*args, **kwargs)

    monkeypatch.setattr(safetensors.torch, "save_file", fail_second)
    model, opt = _fresh()
    _train(model, opt, 1, 0)
    with pytest.raises(RuntimeError, match="injected"):
        _save(tmp_path, 2, model, optimizer_state=opt.state_dict())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step-00000001"]


def test_keep_last_prunes_oldest_and_resave_replaces(tmp_path):
    for step in (10, 20, 30, 40, 50):
        _save(tmp_path, step, keep_last=3)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step-00000030", "step-00000040", "step-00000050"]
    _save(tmp_path, 50, keep_last=3, trainer_state={"step": 50, "again": True})
    assert load_checkpoint(tmp_path).trainer_state == {"step": 50, "again": True}
    (tmp_path / ".tmp-step-00000060-crashed").mkdir()  # left by a killed process
    _save(tmp_path, 60, keep_last=None)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "latest", "step-00000030", "step-00000040", "step-00000050", "step-00000060"
    ]
    with pytest.raises(ConfigError, match="keep_last=0"):
        _save(tmp_path, 70, keep_last=0)


# ---------------------------------------------------------------- refusals and errors


def test_resolve_accepts_run_and_checkpoint_dirs(tmp_path):
    path = _save(tmp_path / "run", 5)
    assert resolve_checkpoint(tmp_path / "run") == path
    assert resolve_checkpoint(path) == path
    assert resolve_checkpoint(path / "model.safetensors") == path
    (tmp_path / "run" / "latest").unlink()
    assert resolve_checkpoint(tmp_path / "run") == path  # falls back to the highest step
    with pytest.raises(CheckpointError, match="does not exist"):
        resolve_checkpoint(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="neither a checkpoint directory"):
        resolve_checkpoint(tmp_path / "empty")
    (tmp_path / "run" / "latest").write_text("step-99999999\n")
    with pytest.raises(CheckpointError, match="names 'step-99999999'"):
        resolve_checkpoint(tmp_path / "run")


@pytest.mark.parametrize("name", ["pytorch_model.bin", "model.pt", "weights.pth", "state.pkl"])
def test_pickle_checkpoints_are_refused_without_unpickling(tmp_path, name):
    marker = tmp_path / "unpickled"
    # A payload that would create `marker` if anything unpickled it.
    payload = pickle.dumps(_Boom(str(marker)))
    (tmp_path / name).write_bytes(payload)
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match="refuses to load pickle.*safetensors"):
        load_checkpoint(tmp_path)
    with pytest.raises(CheckpointError, match="pickle"):
        load_checkpoint(tmp_path / name)
    assert not marker.exists()


class _Boom:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_truncated_or_corrupt_safetensors_names_the_file(tmp_path):
    path = _save(tmp_path, 1)
    weights = path / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) - 7])
    with pytest.raises(CheckpointError, match=r"model\.safetensors is not a readable safetensors file"):
        load_checkpoint(tmp_path)
    weights.write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match=r"model\.safetensors"):
        load_checkpoint(path)


def test_missing_or_bad_config_json(tmp_path):
    path = _save(tmp_path, 1)
    (path / "config.json").write_text("{truncated")
    with pytest.raises(CheckpointError, match=r"config\.json is not valid JSON"):
        load_checkpoint(path)
    os.remove(path / "config.json")
    with pytest.raises(CheckpointError, match=r"config\.json is missing"):
        load_checkpoint(path)


def test_load_model_state_names_shape_mismatch_and_key_differences():
    small, big = TinyLM(dim=8), TinyLM(dim=16)
    with pytest.raises(CheckpointError) as err:
        load_model_state(big, small.state_dict())
    message = str(err.value)
    assert "'embed.weight'" in message and "(11, 8) in the checkpoint" in message and "(11, 16) in the model" in message

    state = dict(small.state_dict())
    state.pop("mix.bias")
    state["extra.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointError, match=r"missing from the checkpoint: mix\.bias; not in the model: extra\.weight"):
        load_model_state(TinyLM(dim=8), state)

    fresh = TinyLM(dim=8)
    load_model_state(fresh, small.state_dict())
    assert torch.equal(fresh.mix.weight, small.mix.weight)


def test_atomic_directory_renames_on_success_and_leaves_nothing_on_error(tmp_path):
    from moekit.fileio import atomic_directory

    (tmp_path / "out").mkdir()  # an empty directory may be replaced
    with atomic_directory(tmp_path / "out") as tmp:
        (tmp / "a.txt").write_text("x")
        assert not (tmp_path / "out" / "a.txt").exists()  # nothing visible before the block ends
    assert (tmp_path / "out" / "a.txt").read_text() == "x"
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_directory(tmp_path / "sub" / "failed") as tmp:
            (tmp / "b.txt").write_text("y")
            raise RuntimeError("boom")
    assert not (tmp_path / "sub" / "failed").exists() and not list((tmp_path / "sub").iterdir())


def test_read_json_and_config_load_json_name_a_missing_or_broken_file(tmp_path):
    from moekit.config import MoEConfig, load_json
    from moekit.fileio import read_json

    assert read_json(tmp_path / "none.json", CheckpointError, missing=None) is None
    with pytest.raises(ConfigError, match=r"config file .*none.json does not exist"):
        load_json(MoEConfig, tmp_path / "none.json")
    (tmp_path / "bad.json").write_text("[1, 2")
    with pytest.raises(ConfigError, match=r"config file .*bad.json is not valid JSON: Expecting"):
        load_json(MoEConfig, tmp_path / "bad.json")
    with pytest.raises(CheckpointError, match=r"bad.json is not valid JSON: Expecting"):
        read_json(tmp_path / "bad.json", CheckpointError, missing="absent")
    (tmp_path / "ok.json").write_text(json.dumps({"num_experts": 4}))
    assert load_json(MoEConfig, tmp_path / "ok.json").num_experts == 4


@pytest.mark.parametrize("umask,dir_mode,file_mode", [(0o022, 0o755, 0o644), (0o027, 0o750, 0o640)])
def test_saved_checkpoints_honour_the_umask(tmp_path, umask, dir_mode, file_mode):
    old = os.umask(umask)
    try:
        path = _save(tmp_path / "run", 1, tokenizer=FakeTokenizer())
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == dir_mode
    files = [*path.iterdir(), tmp_path / "run" / "latest"]
    assert {f.name: f.stat().st_mode & 0o777 for f in files} == {f.name: file_mode for f in files}


def test_atomic_directory_output_honours_the_umask(tmp_path):
    """Every saver's directory (HF, moefy, quantized) and its 0600 files (as safetensors writes) get the umask's modes."""
    from moekit.fileio import atomic_directory

    old = os.umask(0o022)
    try:
        with atomic_directory(tmp_path / "out") as tmp:
            (tmp / "sub").mkdir(mode=0o700)
            (tmp / "sub" / "w.bin").write_bytes(b"x")
            (tmp / "sub" / "w.bin").chmod(0o600)
    finally:
        os.umask(old)
    modes = {p.name: p.stat().st_mode & 0o777 for p in [tmp_path / "out", *(tmp_path / "out").rglob("*")]}
    assert modes == {"out": 0o755, "sub": 0o755, "w.bin": 0o644}


def test_a_gguf_file_or_a_hugging_face_directory_is_named_as_one(tmp_path):
    """Issue 25: commands taking moekit runs refused other model formats without naming them."""
    from moekit.checkpoints import resolve_checkpoint

    gguf_file = tmp_path / "m.gguf"
    gguf_file.write_bytes(b"GGUF" + bytes(16))
    with pytest.raises(CheckpointError, match="is a GGUF file: this command takes moekit runs.*moekit generate"):
        resolve_checkpoint(gguf_file)
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text('{"model_type": "mixtral"}')
    with pytest.raises(CheckpointError, match="is a Hugging Face model directory, not a moekit run.*moekit generate"):
        resolve_checkpoint(tmp_path / "hf")
