"""moekit.infer.chat: chat templates, special tokens and stop ids read from a model directory.

The files are written by hand here, so each expected value is read off the
file contents; the end-to-end check with a transformers-written model and the
engine is in test_hf.py (test_shared_dir_tokenizer_chat_template_and_stop_ids).
"""

import json
import subprocess
import sys
from types import SimpleNamespace

import pytest

from moekit.errors import CheckpointError, ConfigError
from moekit.infer.chat import load_chat_template, render_chat, special_tokens, stop_token_ids


def write(d, name, data):
    (d / name).write_text(data if isinstance(data, str) else json.dumps(data))


def test_chat_template_sources(tmp_path):
    assert load_chat_template(tmp_path) is None
    write(tmp_path, "tokenizer_config.json", {"chat_template": [{"name": "tool_use", "template": "T"},
                                                                {"name": "default", "template": "D"}]})
    assert load_chat_template(tmp_path) == "D"
    write(tmp_path, "tokenizer_config.json", {"chat_template": [{"name": "tool_use", "template": "T"}]})
    assert load_chat_template(tmp_path) == "T"
    write(tmp_path, "chat_template.jinja", "J")  # the file wins over tokenizer_config.json
    assert load_chat_template(tmp_path) == "J"


def test_special_tokens_take_strings_and_added_token_dicts(tmp_path):
    assert special_tokens(tmp_path) == {}
    write(tmp_path, "tokenizer_config.json", {"bos_token": {"content": "<s>", "lstrip": False}, "eos_token": "</s>",
                                              "pad_token": None, "model_max_length": 8})
    assert special_tokens(tmp_path) == {"bos_token": "<s>", "eos_token": "</s>"}
    write(tmp_path, "tokenizer_config.json", "{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        special_tokens(tmp_path)


def test_stop_ids_order_vocab_filter_and_fallbacks(tmp_path):
    tok = SimpleNamespace(vocab_size=100, eos_id=7)
    assert stop_token_ids(tmp_path) == []
    assert stop_token_ids(tmp_path, tok) == [7]  # nothing stored: the tokenizer's EOS
    write(tmp_path, "config.json", {"model_type": "mixtral", "eos_token_id": [3, 150]})
    write(tmp_path, "generation_config.json", {})  # present but without eos: config.json is next
    assert stop_token_ids(tmp_path) == [3, 150]
    assert stop_token_ids(tmp_path, tok) == [3]  # 150 lies outside the vocabulary
    write(tmp_path, "generation_config.json", {"eos_token_id": 200})
    assert stop_token_ids(tmp_path, tok) == [200]  # all outside: kept rather than none
    write(tmp_path, "generation_config.json", "{broken")
    assert stop_token_ids(tmp_path) == [3, 150]  # an unreadable generation_config.json counts as none


def test_render_chat_helpers_and_errors():
    template = "{% for m in messages %}{{ m | tojson }}{% endfor %}{% if add_generation_prompt %}>{% endif %}"
    assert render_chat(template, [{"role": "user", "content": "é"}]) == '{"role": "user", "content": "é"}>'
    assert render_chat(template, [], add_generation_prompt=False) == ""
    with pytest.raises(ConfigError, match="the chat template failed: no system role"):
        render_chat("{{ raise_exception('no system role') }}", [])


def test_hf_stays_below_infer_and_keeps_its_function_names():
    code = ("import sys, moekit.hf, moekit.hf.reader, moekit.hf.writer, moekit.hf.families; import moekit.hf as hf; "
            "assert not any(m.startswith('moekit.infer') for m in sys.modules), sorted(sys.modules); "
            "assert hf.load.__module__ == 'moekit.hf.reader' and callable(hf.load); "
            "assert hf.save.__module__ == 'moekit.hf.writer' and callable(hf.save)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
