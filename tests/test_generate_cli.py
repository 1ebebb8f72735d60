"""`moekit generate` (Hugging Face directories and moekit checkpoints) and `moekit convert --to hf`.

Most cases call `moekit.cli.main` in-process (fast); one subprocess run checks
end to end that a user mistake prints one line, no traceback, exit status 2.
"""

import json
import subprocess
import sys
from dataclasses import replace

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import AutoConfig, AutoModelForCausalLM  # noqa: E402

from moekit.cli.main import main  # noqa: E402
from moekit.data.text import Tokenizer  # noqa: E402
from moekit.infer import Engine  # noqa: E402


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    torch.manual_seed(0)
    cfg = AutoConfig.for_model(
        "qwen2_moe", vocab_size=260, hidden_size=32, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
        shared_expert_intermediate_size=24, max_position_embeddings=64, eos_token_id=256, initializer_range=0.2)
    path = tmp_path_factory.mktemp("qwen2moe")
    AutoModelForCausalLM.from_config(cfg).save_pretrained(path)
    Tokenizer.byte_level().save(path)
    return path


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A real (3-step) `moekit train` run of the tiny preset with a gated shared expert."""
    from moekit.train.lm import resolve_run_config, train_lm

    root = tmp_path_factory.mktemp("train")
    (root / "data.txt").write_text("def add(a, b):\n    return a + b\n" * 200)
    cfg = resolve_run_config("tiny", overrides=[
        "train.steps=3", "train.eval_every=3", "train.save_every=3", "train.eval_batches=1", "train.seq_len=32",
        "moe.num_shared_experts=1", "moe.shared_expert_gate=true", "train.device=cpu"], data=str(root / "data.txt"))
    train_lm(replace(cfg, train=replace(cfg.train, batch_size=2)), root / "run", progress=False)
    return root / "run"


def run_cli(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_generate_streams_text_from_a_hf_directory(hf_dir, capsys, monkeypatch):
    writes = []
    real_write = sys.stdout.write
    monkeypatch.setattr(sys.stdout, "write", lambda s: (writes.append(s), real_write(s))[1])
    code, out, err = run_cli(capsys, "generate", hf_dir, "--prompt", "def f", "--max-new-tokens", "12", "--temperature", "0")
    assert code == 0, err
    expected = Engine.load(hf_dir).generate(["def f"], max_new_tokens=12)[0].text
    assert out == "def f" + expected + "\n"
    assert len(writes) >= 6  # the prompt, then pieces as tokens arrive, not one block at the end


def test_generate_sampling_flags_and_seed(hf_dir, capsys):
    args = ["generate", hf_dir, "--prompt", "x", "--max-new-tokens", "10", "--temperature", "1.0", "--top-p", "0.9", "--top-k", "40"]
    a = run_cli(capsys, *args, "--seed", "3")
    b = run_cli(capsys, *args, "--seed", "3")
    assert a[0] == b[0] == 0 and a[1] == b[1]


def test_generate_and_convert_a_trained_moekit_checkpoint(trained_run, tmp_path, capsys):
    code, out, err = run_cli(capsys, "generate", trained_run, "--prompt", "def ", "--max-new-tokens", "8", "--temperature", "0")
    assert code == 0 and out.startswith("def "), err
    code, out, err = run_cli(capsys, "convert", "--to", "hf", "--arch", "qwen2_moe", trained_run, tmp_path / "hf")
    assert code == 0 and "hf" in out, err
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["model_type"] == "qwen2_moe"
    from moekit.train.lm import load_lm

    model, tokenizer, _ = load_lm(trained_run)
    ids = torch.tensor([tokenizer.encode("def add(a, b):")])
    ref = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    with torch.no_grad():
        torch.testing.assert_close(ref(ids).logits, model(ids).logits, atol=1e-4, rtol=1e-4)
    code, out2, err = run_cli(capsys, "generate", tmp_path / "hf", "--prompt", "def ", "--max-new-tokens", "8", "--temperature", "0")
    assert code == 0 and out2 == out_text(trained_run, capsys), err
    # issue 25: the export carries the chat format the checkpoint is served with (oracle: the server's fallback)
    from moekit.infer.chat import fallback_chat, load_chat_template, render_chat

    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
                {"role": "assistant", "content": "hello"}, {"role": "user", "content": "def f"}]
    assert render_chat(load_chat_template(tmp_path / "hf"), messages) == fallback_chat(messages)
    assert ref.config is not None and "chat_template" in json.loads((tmp_path / "hf" / "tokenizer_config.json").read_text())


def out_text(run, capsys):
    return run_cli(capsys, "generate", run, "--prompt", "def ", "--max-new-tokens", "8", "--temperature", "0")[1]


def test_convert_refuses_a_family_the_model_does_not_fit(trained_run, tmp_path, capsys):
    code, out, err = run_cli(capsys, "convert", "--to", "hf", "--arch", "mixtral", trained_run, tmp_path / "x")
    assert code == 2 and "does not fit arch='mixtral'" in err and "shared expert" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "x").exists()


def bad_dirs(hf_dir, tmp_path):
    import shutil

    llama = tmp_path / "llama"
    llama.mkdir()
    (llama / "config.json").write_text(json.dumps({"model_type": "llama"}))
    sharded = tmp_path / "sharded"
    model = AutoModelForCausalLM.from_pretrained(hf_dir)
    model.save_pretrained(sharded, max_shard_size="30KB")
    sorted(sharded.glob("model-*.safetensors"))[0].unlink()
    wrong = tmp_path / "wrong"
    shutil.copytree(hf_dir, wrong)
    cfg = json.loads((wrong / "config.json").read_text())
    (wrong / "config.json").write_text(json.dumps({**cfg, "moe_intermediate_size": 20}))
    return llama, sharded, wrong


def test_bad_input_gets_one_line_and_exit_status_2(hf_dir, tmp_path, capsys):
    llama, sharded, wrong = bad_dirs(hf_dir, tmp_path)
    capsys.readouterr()  # transformers' own progress bars while building the bad directories
    cases = [
        (["generate", llama, "--prompt", "hi"], "model_type='llama' is not supported; supported model types are mixtral, qwen2_moe, qwen3_moe, olmoe"),
        (["generate", sharded, "--prompt", "hi"], "are missing"),
        (["generate", wrong, "--prompt", "hi"], "has shape [16, 32] but the config needs [20, 32]"),
        (["generate", hf_dir, "--prompt", "x" * 80], "the prompt has 80 tokens but the model's context is 64 tokens"),
        (["generate", hf_dir, "--prompt", "hi", "--temperature", "-1"], "temperature=-1.0 is invalid"),
        (["generate", hf_dir, "--prompt", "hi", "--top-p", "0"], "top_p=0.0 is invalid: it must be in (0, 1]"),
        (["generate", hf_dir, "--prompt", "hi", "--top-p", "1.01"], "top_p=1.01 is invalid"),
        (["generate", hf_dir, "--prompt", "hi", "--dtype", "int4"], "dtype='int4' is unknown"),
        (["generate", hf_dir, "--prompt", "hi", "--chat"], "no chat template"),
        (["generate", tmp_path / "nope", "--prompt", "hi"], "does not exist"),
        (["convert", "--to", "hf", tmp_path / "nope", tmp_path / "out"], "does not exist"),
    ]
    if not torch.cuda.is_available():
        cases.append((["generate", hf_dir, "--prompt", "hi", "--device", "cuda"], "CUDA is not available"))
    for argv, message in cases:
        code, out, err = run_cli(capsys, *argv)
        assert code == 2, (argv, err)
        assert message in err, (message, err)
        assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
        assert out == "", out  # nothing printed before the mistake was found


def test_subprocess_end_to_end_no_traceback(hf_dir):
    bad = subprocess.run([sys.executable, "-m", "moekit", "generate", str(hf_dir), "--prompt", "hi", "--top-p", "2"],
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr and "top_p=2.0 is invalid" in bad.stderr
    good = subprocess.run([sys.executable, "-m", "moekit", "generate", str(hf_dir), "--prompt", "ab", "--max-new-tokens", "5"],
                          capture_output=True, text=True, timeout=300)
    assert good.returncode == 0 and good.stdout.startswith("ab"), good.stderr


def test_generate_says_when_the_context_clips_max_new_tokens(hf_dir, capsys):
    code, out, err = run_cli(capsys, "generate", hf_dir, "--prompt", "abc", "--max-new-tokens", "1000", "--temperature", "0")
    assert code == 0, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "--max-new-tokens 1000" in lines[0] and "at most 61 new tokens" in lines[0], err
    code, out, err = run_cli(capsys, "generate", hf_dir, "--prompt", "abc", "--max-new-tokens", "4", "--temperature", "0")
    assert code == 0 and err == ""


def test_generate_chat_on_a_moekit_checkpoint_uses_the_servers_fallback_format(trained_run, capsys):
    from moekit.server.generation import build_prompts
    from moekit.server.schemas import ChatCompletionRequest

    code, out, err = run_cli(capsys, "generate", trained_run, "--chat", "--prompt", "hi", "--max-new-tokens", "2",
                             "--system", "be brief", "--temperature", "0")
    assert code == 0 and err == "", err
    engine = Engine.load(trained_run)
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    served, stops = build_prompts(engine, ChatCompletionRequest(model="m", messages=messages))
    assert engine.encode("hi", chat=True, system="be brief") == served[0]
    assert engine.tokenizer.decode(served[0]).endswith("System: be brief\n\nUser: hi\n\nAssistant:")
    assert engine.chat_stops() == stops == ["\n\nUser:"]
    expected = engine.generate(["hi"], chat=True, system="be brief", max_new_tokens=2, temperature=0)[0].text
    assert out == expected + "\n"


def test_generate_without_a_prompt_is_a_chat_with_history(trained_run, capsys, monkeypatch):
    """Issue 25: an interactive chat. Oracle: the engine on chat_prompt's text of the same conversation."""
    import io

    from moekit.infer import Engine
    from moekit.infer.chat import chat_prompt

    monkeypatch.setattr("sys.stdin", io.StringIO("hi\nhow are you\n/reset\nbye\n"))
    code, out, err = run_cli(capsys, "generate", trained_run, "--max-new-tokens", "4", "--temperature", "0", "--system", "be brief")
    assert code == 0, err
    engine = Engine.load(trained_run)

    def reply(*turns):
        messages = [{"role": "system", "content": "be brief"}] + [
            {"role": "user" if i % 2 == 0 else "assistant", "content": t} for i, t in enumerate(turns)]
        text, special, stops = chat_prompt(messages, engine.chat_template, engine.special_tokens)
        ids = engine.tokenizer.backend.encode(text, add_special_tokens=special).ids
        return engine.generate([ids], max_new_tokens=4, temperature=0, stop=stops)[0].text

    first = reply("hi")
    second = reply("hi", first, "how are you")  # the history goes back to the model
    third = reply("bye")  # after /reset
    assert out == f"{first}\n{second}\n{third}\n"
    assert "history cleared" in err and "/exit" in err
