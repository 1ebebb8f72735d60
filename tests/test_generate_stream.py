"""Streaming with stop strings, OpenAI's setting names on Engine.generate, and `moekit generate`'s prompt flags.

Oracles: the final (non-streamed) text of the same generation, and the streamed pieces joined; the
greedy text generated without a stop string, cut by hand at the stop string.
"""

import io
import sys

import pytest

from moekit.errors import ConfigError
from moekit.infer import SamplingConfig

from test_scheduler import tiny_engine

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def engine():
    return tiny_engine(seed=3)  # (its texts have runs of whole characters to cut at)


PROMPTS = ["def f(x):", "hello world", "aaaa"]


def streamed(engine, prompts, cfg):
    pieces = {}
    results = engine.generate_ids([engine.encode(p) for p in prompts], cfg,
                                  on_token=lambda i, tok, text: pieces.setdefault(i, []).append(text))
    return results, pieces


def window(text: str, n: int) -> str:
    """n characters of text after its start, with no replacement character (a byte of a split character)."""
    start = next(i for i in range(1, len(text) - n) if "\ufffd" not in text[i : i + n])
    return text[start : start + n]


def test_a_stop_string_never_leaks_into_the_stream(engine):
    plain = [r.text for r in engine.generate_ids([engine.encode(p) for p in PROMPTS],
                                                 SamplingConfig(max_new_tokens=30, stop_token_ids=[]))]
    for k in range(len(PROMPTS)):
        stop = window(plain[k], 3)  # three characters after the start of prompt k's text
        results, pieces = streamed(engine, PROMPTS, SamplingConfig(max_new_tokens=30, stop_token_ids=[],
                                                                   stop_strings=[stop, "\x00never"]))
        assert results[k].text == plain[k][:plain[k].index(stop)] and results[k].finish_reason == "stop"
        for i, r in enumerate(results):
            sent = ""
            for piece in pieces[i]:
                sent += piece
                assert r.text.startswith(sent), (i, sent, r.text)  # never a character the final text lacks
            assert sent == r.text


def test_an_end_that_only_looked_like_a_stop_string_is_sent_at_the_end(engine):
    plain = engine.generate_ids([engine.encode(PROMPTS[0])], SamplingConfig(max_new_tokens=12, stop_token_ids=[]))[0].text
    cfg = SamplingConfig(max_new_tokens=12, stop_token_ids=[], stop_strings=[plain[-2:] + "\x01"])  # never completes
    results, pieces = streamed(engine, PROMPTS[:1], cfg)
    assert results[0].text == plain and "".join(pieces[0]) == plain and results[0].finish_reason == "length"


def test_engine_generate_takes_openai_names_and_names_the_settings_otherwise(engine):
    ours = engine.generate(PROMPTS[:2], max_new_tokens=9, stop_strings=["x"])
    openai_names = engine.generate(PROMPTS[:2], max_tokens=9, stop=["x"])
    assert [r.text for r in openai_names] == [r.text for r in ours]
    assert engine.generate(PROMPTS[:1], stop="o", max_tokens=9)[0].text == engine.generate(
        PROMPTS[:1], stop_strings=["o"], max_new_tokens=9)[0].text
    with pytest.raises(ConfigError, match="unknown generation setting 'maxtokens': the settings are max_new_tokens"):
        engine.generate(PROMPTS[:1], maxtokens=3)
    with pytest.raises(ConfigError, match="max_tokens and max_new_tokens are the same setting"):
        engine.generate(PROMPTS[:1], max_tokens=3, max_new_tokens=4)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, engine):
    from moekit.checkpoints import save_checkpoint
    from moekit.config import to_dict
    from moekit.train.lm import RunConfig

    run = tmp_path_factory.mktemp("gen") / "run"
    save_checkpoint(run, 1, config=to_dict(RunConfig(model=engine.model.cfg)), model_state=engine.model.state_dict(),
                    optimizer_state=None, trainer_state={}, tokenizer=engine.tokenizer)
    return run


def test_generate_cli_stop_prompt_from_stdin_and_system_without_chat(run_dir, engine, capsys, monkeypatch):
    from moekit.cli.main import main

    plain = engine.generate(["hello world"], max_new_tokens=20, stop_token_ids=[])[0].text
    stop = window(plain, 3)
    writes = []
    real_write = sys.stdout.write
    monkeypatch.setattr(sys.stdout, "write", lambda s: (writes.append(s), real_write(s))[1])
    monkeypatch.setattr(sys, "stdin", io.StringIO("hello world\n"))
    assert main(["generate", str(run_dir), "--prompt", "-", "--max-new-tokens", "20", "--temperature", "0",
                 "--stop", stop]) == 0
    out = capsys.readouterr().out
    want = engine.generate(["hello world"], max_new_tokens=20, stop=[stop])[0].text
    assert out == "hello world" + want + "\n" and stop not in out
    assert "".join(writes) == out and stop[:2] not in "".join(writes)[len("hello world"):]

    for argv, message in ((["--prompt", "hi", "--system", "be brief"], "--system is the system message of a chat"),
                          (["--prompt", "-"], "the prompt read from stdin is empty")):
        monkeypatch.setattr(sys, "stdin", io.StringIO(""))
        assert main(["generate", str(run_dir), *argv]) == 2
        captured = capsys.readouterr()
        assert message in captured.err and "Traceback" not in captured.err and captured.out == ""
