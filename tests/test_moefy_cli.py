"""`moekit moefy`: conversions from the command line, and one clear message for each bad request, nothing written."""

import os
import subprocess
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")

from moekit.cli.main import main  # noqa: E402
from moekit import moefy  # noqa: E402


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    d = tmp_path_factory.mktemp("src") / "llama"
    transformers.LlamaForCausalLM(cfg).eval().save_pretrained(d)
    from moekit.data.text import Tokenizer

    Tokenizer.byte_level().save(d)  # a tokenizer.json for the calibration text
    return d


@pytest.fixture(scope="module")
def calib_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("calib")
    (d / "prose.txt").write_text("The quick brown fox jumps over the lazy dog. " * 40)
    (d / "code.txt").write_text("def f(x):\n    return [i * i for i in range(x)]\n" * 40)
    return [str(d / "prose.txt"), str(d / "code.txt")]


def run_cli(args, capsys):
    code = main(["moefy", *map(str, args)])
    return code, capsys.readouterr()


def test_readme_and_upcycle_from_the_command_line(llama_dir, calib_files, tmp_path, capsys):
    out = tmp_path / "readme"
    code, io = run_cli([llama_dir, "--method", "readme", "--experts", "4", "--top-k", "1", "--shared-fraction", "0.25",
                        "--calib", *calib_files, "--out", out], capsys)
    assert code == 0, io.err
    model = moefy.load(out)
    assert model.layers[0].mlp.experts.w_out_EDF.shape == (4, 32, 9)  # 48 - 12 shared = 36 = 4 x 9
    hf = transformers.LlamaForCausalLM.from_pretrained(llama_dir).eval()
    up = tmp_path / "up"
    done = subprocess.run([sys.executable, "-m", "moekit", "moefy", str(llama_dir), "--method", "upcycle", "--experts", "4",
                           "--top-k", "2", "--out", str(up)], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": os.getcwd()})
    assert done.returncode == 0, done.stderr
    ids = torch.randint(0, 300, (1, 20))
    with torch.no_grad():
        torch.testing.assert_close(moefy.load(up)(ids).logits, hf(ids).logits, rtol=1e-4, atol=1e-4)
    # issue 25: commands that take moekit runs refused a moefy output with "config.json is missing"; now they name it
    for argv in (["inspect", up], ["convert", "--to", "hf", up, tmp_path / "hf"], ["quantize", up, "--bits", "8", "--out", tmp_path / "q"],
                 ["pregate", up, "--out", tmp_path / "p"]):
        code = main([str(a) for a in argv])
        err = capsys.readouterr().err
        assert code == 2 and "is a moefy output" in err and "moekit generate" in err and "Traceback" not in err, (argv, err)


@pytest.mark.parametrize("args,message", [
    (["--method", "upcycle", "--experts", "2", "--top-k", "3"], "top-k=3 is invalid: it must be between 1 and the number of experts (2)"),
    (["--method", "cluster", "--experts", "5", "--top-k", "1"], "5 experts do not divide the 48 routed FFN neurons"),
    (["--method", "readme", "--experts", "4", "--top-k", "1"], "the readme method needs calibration data"),
])
def test_bad_requests_one_message_nothing_written(llama_dir, tmp_path, capsys, args, message):
    out = tmp_path / "out"
    code, io = run_cli([llama_dir, *args, "--out", out], capsys)
    assert code == 2
    assert message in io.err and "Traceback" not in io.err and len(io.err.strip().splitlines()) == 1
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_unsupported_architecture_nothing_written(tmp_path, capsys):
    src = tmp_path / "gpt2"
    transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=32)).save_pretrained(src)
    out = tmp_path / "out"
    code, io = run_cli([src, "--method", "upcycle", "--experts", "2", "--top-k", "1", "--out", out], capsys)
    assert code == 2 and "model_type='gpt2' is not supported by moefy" in io.err
    assert not out.exists()


def test_decoupled_router_from_the_command_line(llama_dir, calib_files, tmp_path, capsys):
    out = tmp_path / "rm"
    code, io = run_cli([llama_dir, "--method", "readme", "--experts", "4", "--top-k", "1", "--calib", *calib_files,
                        "--router", "decoupled", "--rounds", "1", "--router-steps", "3", "--out", out], capsys)
    assert code == 0, io.err
    model = moefy.load(out)
    ids = torch.randint(0, 300, (1, 10))
    with torch.no_grad():
        routes = model.experts_for(ids).reshape(-1)
        assert all(torch.equal(r.expert_idx_N, routes) for r in model(ids).routings)
