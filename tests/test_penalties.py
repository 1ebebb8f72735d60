"""Repetition, presence and frequency penalties: the sampling rule, the engine, the scheduler, the server, the CLI.

Oracles: transformers' RepetitionPenaltyLogitsProcessor and OpenAI's formula computed by hand
(logits[t] -= presence * (count[t] > 0) + frequency * count[t], over generated tokens); the model's own
full forward recomputed every token with those rules applied by hand (greedy); each request alone.
"""

import asyncio

import pytest
import torch

from moekit.errors import ConfigError
from moekit.infer import SamplingConfig
from moekit.infer.sampling import Penalties, next_tokens

from test_scheduler import tiny_engine

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def engine():
    return tiny_engine()


def test_penalties_match_transformers_and_the_openai_formula():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    V = 11
    logits = torch.randn(2, V) * 3
    prompts = [[1, 2, 2], [7]]
    generated = [[3, 3, 1, 5], [7, 0, 0, 0]]
    c = SamplingConfig(repetition_penalty=1.7, presence_penalty=0.6, frequency_penalty=0.25)
    pen = Penalties(c, prompts)
    pen.apply(torch.zeros(2, V))  # the first step makes the tables
    for step in range(4):
        pen.record(torch.tensor([generated[0][step], generated[1][step]]))
    got = pen.apply(logits)

    history = torch.tensor([prompts[0] + generated[0], [7, 7] + prompts[1] + generated[1]])  # repeats: same set
    expected = transformers.RepetitionPenaltyLogitsProcessor(1.7)(history, logits.clone())
    for b, gen in enumerate(generated):
        for t in set(gen):
            expected[b, t] -= 0.6 + 0.25 * gen.count(t)
    torch.testing.assert_close(got, expected)


def test_bad_penalties_are_one_message():
    for kw, text in (({"repetition_penalty": 0}, "repetition_penalty=0 is invalid"),
                     ({"presence_penalty": float("nan")}, "presence_penalty=nan is invalid"),
                     ({"frequency_penalty": "1"}, "frequency_penalty='1' is invalid")):
        with pytest.raises(ConfigError, match=text):
            SamplingConfig(**kw)


@torch.no_grad()
def oracle(model, prompt, n, rep=1.0, presence=0.0, frequency=0.0):
    """Greedy decoding recomputing the whole sequence every token, penalties applied by hand."""
    ids, out = list(prompt), []
    for _ in range(n):
        logits = model(torch.tensor([ids])).logits[0, -1].float().clone()
        for t in set(ids):
            logits[t] = logits[t] * rep if logits[t] < 0 else logits[t] / rep
        for t in set(out):
            logits[t] -= presence + frequency * out.count(t)
        out.append(int(logits.argmax()))
        ids.append(out[-1])
    return out


SETTINGS = [dict(repetition_penalty=1.5), dict(presence_penalty=1.5), dict(frequency_penalty=0.7),
            dict(repetition_penalty=1.2, presence_penalty=0.5, frequency_penalty=0.5)]


def test_engine_greedy_with_penalties_matches_the_hand_computation(engine):
    prompts = [engine.encode(p) for p in ("def f(x):", "aaaa", "zz")]
    plain = [r.token_ids for r in engine.generate_ids(prompts, SamplingConfig(max_new_tokens=16, stop_token_ids=[]))]
    for kw in SETTINGS:
        cfg = SamplingConfig(max_new_tokens=16, stop_token_ids=[], **kw)
        got = [r.token_ids for r in engine.generate_ids(prompts, cfg)]  # a left-padded batch
        want = [oracle(engine.model, p, 16, kw.get("repetition_penalty", 1.0), kw.get("presence_penalty", 0.0),
                       kw.get("frequency_penalty", 0.0)) for p in prompts]
        assert got == want, kw
        assert got != plain, kw  # the penalties change these texts


def test_scheduler_gives_each_penalised_request_its_solo_tokens(engine):
    from moekit.infer.scheduler import Scheduler

    from test_scheduler import run_all

    prompts = [engine.encode(p) for p in ("def f(x):", "aaaa", "zz", "hello world")]
    cfgs = [SamplingConfig(max_new_tokens=14, stop_token_ids=[], **kw) for kw in SETTINGS]
    cfgs[1] = SamplingConfig(max_new_tokens=14, stop_token_ids=[], temperature=0.9, seed=5, presence_penalty=1.0)
    done = run_all(Scheduler(engine, max_batch=4), prompts, cfgs, stagger=2)
    for i, (p, c) in enumerate(zip(prompts, cfgs)):
        assert done[i].token_ids == engine.generate_ids([p], c)[0].token_ids, i


def test_server_accepts_openai_penalties_and_a_seeded_request_is_the_same_alone_and_in_a_batch(engine):
    httpx = pytest.importorskip("httpx")
    openai = pytest.importorskip("openai")
    from moekit.server import ServerSettings, create_app

    app = create_app(engine, ServerSettings(model_name="tiny", max_batch=8))
    req = dict(model="tiny", prompt="sample", max_tokens=16, temperature=0.8, seed=77, presence_penalty=1.2,
               frequency_penalty=0.4, extra_body={"repetition_penalty": 1.3})

    async def go():
        http = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test")
        client = openai.AsyncOpenAI(base_url="http://test/v1", api_key="x", http_client=http, max_retries=0)
        alone = (await client.completions.create(**req)).choices[0].text
        others = [client.completions.create(model="tiny", prompt=p, max_tokens=10, temperature=0.9, seed=i,
                                            frequency_penalty=0.3 * i) for i, p in enumerate(["x", "abc", "longer"])]
        batch = await asyncio.gather(*others[:2], client.completions.create(**req), others[2])
        greedy = await client.completions.create(model="tiny", prompt="aaaa", max_tokens=12, temperature=0,
                                                 presence_penalty=1.5)
        return alone, batch[2].choices[0].text, greedy.choices[0].text

    try:
        alone, in_batch, greedy = asyncio.run(go())
    finally:
        app.state.server.shutdown()
    assert alone == in_batch
    cfg = SamplingConfig(max_new_tokens=16, temperature=0.8, seed=77, presence_penalty=1.2, frequency_penalty=0.4,
                         repetition_penalty=1.3)
    assert alone == engine.generate_ids([engine.encode("sample")], cfg)[0].text
    cfg = SamplingConfig(max_new_tokens=12, presence_penalty=1.5)
    assert greedy == engine.generate_ids([engine.encode("aaaa")], cfg)[0].text


def test_generate_cli_penalty_flags(tmp_path, capsys, engine):
    from moekit.checkpoints import save_checkpoint
    from moekit.cli.main import main
    from moekit.config import to_dict
    from moekit.train.lm import RunConfig

    run = tmp_path / "run"
    save_checkpoint(run, 1, config=to_dict(RunConfig(model=engine.model.cfg)), model_state=engine.model.state_dict(),
                    optimizer_state=None, trainer_state={}, tokenizer=engine.tokenizer)
    flags = ["--repetition-penalty", "1.3", "--presence-penalty", "0.8", "--frequency-penalty", "0.2"]
    assert main(["generate", str(run), "--prompt", "aaaa", "--max-new-tokens", "12", "--temperature", "0", *flags]) == 0
    out = capsys.readouterr().out
    cfg = SamplingConfig(max_new_tokens=12, repetition_penalty=1.3, presence_penalty=0.8, frequency_penalty=0.2)
    assert out == "aaaa" + engine.generate_ids([engine.encode("aaaa")], cfg)[0].text + "\n"
    assert main(["generate", str(run), "--prompt", "a", "--repetition-penalty", "0"]) == 2
    err = capsys.readouterr().err
    assert "repetition_penalty=0.0 is invalid" in err and "Traceback" not in err
