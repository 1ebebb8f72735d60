"""`moekit serve` under load: continuous batching vs one request at a time, a soak, malformed floods.

Two `moekit serve` subprocesses on loopback ports serve the same random
moekit checkpoint (4 layers, 8 experts top-2, hidden 256): one with
--max-batch 32 (continuous batching), one with --max-batch 1 (one request at
a time, the peer). Streaming clients (httpx, asyncio, in this process) measure
generated tokens/s, time to first token and inter-token latency at 1, 4, 16
and 32 concurrent clients; the two servers are run interleaved, round by
round, and the throughput ratio is the median of per-round paired ratios.
Then a soak (32 concurrent streams for 60 s; 10 s with --quick) counts errors
and reads the server's RSS at start and end, and 1000 malformed requests
check that the server answers 4xx, never 5xx, and stays healthy.
llama-cpp-python's OpenAI server (`python -m llama_cpp.server`, the
`llama-cpp-python[server]` extra) is a third peer where llama_cpp is
importable: it serves the same weights, exported by moekit.gguf's writer
(F32) from the model the moekit servers load, with the same one thread, and
runs interleaved with the moekit servers at every concurrency level.

Targets: throughput at 16 clients >= 4x one-at-a-time; soak 0 errors and RSS
growth <= 5%; malformed 0 5xx.

Not here: correctness (tests/test_server.py, tests/test_scheduler.py).
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import command_line, machine_info, markdown_table, paired_ratio, target, write_results  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
LEVELS = (1, 4, 16, 32)
NAME = "bench"


def build_checkpoint(d: Path) -> tuple[Path, Path | None]:
    """(the moekit checkpoint, its GGUF export (F32, moekit.gguf) when llama_cpp is importable, else None)."""
    import torch

    from moekit.checkpoints import save_checkpoint
    from moekit.config import MoEConfig, to_dict
    from moekit.data.text import Tokenizer
    from moekit.models.decoder import DecoderLM, ModelConfig
    from moekit.train.lm import RunConfig  # only to write the checkpoint's run config

    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=257, hidden_size=256, num_layers=4, num_heads=8, num_kv_heads=4, max_seq_len=256,
                      dense_hidden=512, moe=MoEConfig(num_experts=8, top_k=2, expert_hidden=512))
    model = DecoderLM(cfg).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(20)
    save_checkpoint(d / "run", 1, config=to_dict(RunConfig(model=cfg)), model_state=model.state_dict(),
                    optimizer_state=None, trainer_state={}, tokenizer=Tokenizer.byte_level())
    gguf_path = None
    if llama_cpp_available():
        from moekit import gguf

        gguf_path = gguf.save(model, d / "bench.gguf", Tokenizer.byte_level(), dtype="F32")
    return d / "run", gguf_path


def llama_cpp_available() -> bool:
    return all(importlib.util.find_spec(m) is not None for m in ("llama_cpp", "sse_starlette", "starlette_context",
                                                                  "pydantic_settings"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    health = "/health"
    extra: dict = {}  # request fields this server needs to decode as moekit does

    def __init__(self, checkpoint: Path, max_batch: int) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.start([sys.executable, "-m", "moekit", "serve", str(checkpoint), "--host", "127.0.0.1", "--port",
                    str(self.port), "--model-name", NAME, "--max-batch", str(max_batch), "--max-queue", "128"])

    def start(self, cmd: list[str]) -> None:
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
        self.proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

    def wait_healthy(self, timeout: float = 180) -> None:
        import httpx

        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{type(self).__name__} exited: {self.proc.stderr.read()[-2000:]}")
            try:
                if httpx.get(self.url + self.health, timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"{type(self).__name__} did not become healthy")

    def rss_mb(self) -> float:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return float("nan")

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return -9


class LlamaServer(Server):
    """llama-cpp-python's OpenAI server on the GGUF export, one thread (it serves one request at a time, the others wait)."""

    health = "/v1/models"
    extra = {"repeat_penalty": 1.0}  # llama-cpp-python's default is 1.1: plain greedy / sampling as moekit's

    def __init__(self, gguf_path: Path, n_ctx: int = 256) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.start([sys.executable, "-m", "llama_cpp.server", "--model", str(gguf_path), "--host", "127.0.0.1",
                    "--port", str(self.port), "--model_alias", NAME, "--n_ctx", str(n_ctx), "--n_threads", "1",
                    "--n_threads_batch", "1", "--verbose", "False",
                    "--interrupt_requests", "False"])  # its default cuts a running stream short when another request waits


PROMPTS = ["def f(x):", "The quick brown fox", "import numpy as np\n", "hello", "class A:\n    def __init__(self):",
           "Once upon a time, ", "SELECT * FROM", "x = [i * i for i in range("]


async def stream_one(client, prompt: str, max_tokens: int, seed: int | None = None, extra: dict | None = None) -> dict:
    """One streamed completion: tokens, time to first text, gaps between text chunks, errors."""
    body = {"model": NAME, "prompt": prompt, "max_tokens": max_tokens, "stream": True,
            "stream_options": {"include_usage": True}, "temperature": 0 if seed is None else 0.8}
    if seed is not None:
        body["seed"] = seed
    body.update(extra or {})
    start = time.perf_counter()
    stamps, tokens, chunks, error, done = [], 0, 0, None, False
    async with client.stream("POST", "/v1/completions", json=body) as r:
        if r.status_code != 200:
            return {"error": f"HTTP {r.status_code}", "tokens": 0, "ttft": None, "gaps": []}
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                done = True
                break
            chunk = json.loads(line[6:])
            if "error" in chunk:
                error = chunk["error"]["message"]
            elif chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            elif chunk["choices"]:
                chunks += chunk["choices"][0].get("finish_reason") is None
                if chunk["choices"][0]["text"]:
                    stamps.append(time.perf_counter())
    if not done and error is None:
        error = "no [DONE]"
    tokens = tokens or chunks  # a server that sends no usage chunk (llama-cpp-python): one chunk per token
    ttft = stamps[0] - start if stamps else None
    return {"error": error, "tokens": tokens, "ttft": ttft, "gaps": [b - a for a, b in zip(stamps, stamps[1:])]}


async def load_level(url: str, concurrency: int, requests: int, max_tokens: int, extra: dict | None = None) -> dict:
    import httpx

    limits = httpx.Limits(max_connections=concurrency + 4)
    async with httpx.AsyncClient(base_url=url, timeout=300, limits=limits) as client:
        todo = list(range(requests))

        async def worker():
            out = []
            while todo:
                i = todo.pop()
                out.append(await stream_one(client, PROMPTS[i % len(PROMPTS)], max_tokens, None, extra))
            return out

        start = time.perf_counter()
        results = [r for rs in await asyncio.gather(*(worker() for _ in range(concurrency))) for r in rs]
        wall = time.perf_counter() - start
    ttfts = [r["ttft"] for r in results if r["ttft"] is not None]
    gaps = [g for r in results for g in r["gaps"]]
    tokens = sum(r["tokens"] for r in results)
    return {"tokens_per_s": tokens / wall, "tokens": tokens, "wall_s": wall,
            "errors": sum(r["error"] is not None for r in results),
            "ttft_p50_ms": 1000 * pct(ttfts, 50), "ttft_p95_ms": 1000 * pct(ttfts, 95),
            "itl_p50_ms": 1000 * pct(gaps, 50), "itl_p95_ms": 1000 * pct(gaps, 95)}


def pct(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, round(p / 100 * (len(values) - 1)))]


def compare(servers: dict[str, Server], rounds: int, max_tokens: int) -> dict:
    """Per level: each server's figures per round (interleaved, order rotating) and the paired ratios to "batched"."""
    out = {}
    for c in LEVELS:
        requests = 4 if c == 1 else 2 * c
        runs = {name: [] for name in servers}
        for r in range(rounds):
            order = list(servers.items())
            for name, server in order[r % len(order):] + order[: r % len(order)]:
                runs[name].append(asyncio.run(load_level(server.url, c, requests, max_tokens, server.extra)))
        out[c] = {"runs": runs}
        for peer in [n for n in servers if n != "batched"]:
            ratio = paired_ratio([1 / x["tokens_per_s"] for x in runs[peer]], [1 / x["tokens_per_s"] for x in runs["batched"]])
            ratios = [b["tokens_per_s"] / s["tokens_per_s"] for b, s in zip(runs["batched"], runs[peer])]
            key = "" if peer == "serial" else f"_{peer}"
            out[c][f"throughput_ratio{key}"], out[c][f"ratio_spread{key}"] = ratio, [min(ratios), max(ratios)]
        print(f"  {c:>2} clients: " + ", ".join(f"{n} {med(rs, 'tokens_per_s'):.1f} tok/s" for n, rs in runs.items())
              + f"; batched / serial {out[c]['throughput_ratio']:.2f}x", flush=True)
    return out


def med(runs: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in runs)


async def soak(server: Server, seconds: float, concurrency: int = 32) -> dict:
    import httpx

    rss_start = server.rss_mb()
    stop_at = time.perf_counter() + seconds
    rng = random.Random(0)
    async with httpx.AsyncClient(base_url=server.url, timeout=300,
                                 limits=httpx.Limits(max_connections=concurrency + 4)) as client:
        async def worker(w):
            results = []
            while time.perf_counter() < stop_at:
                seed = rng.randrange(1000) if w % 2 else None
                try:
                    results.append(await stream_one(client, rng.choice(PROMPTS), rng.randint(8, 48), seed))
                except Exception as e:  # noqa: BLE001 - counted as an error
                    results.append({"error": repr(e), "tokens": 0})
            return results

        results = [r for rs in await asyncio.gather(*(worker(w) for w in range(concurrency))) for r in rs]
    rss_end = server.rss_mb()
    errors = [r["error"] for r in results if r["error"] is not None]
    return {"seconds": seconds, "concurrency": concurrency, "requests": len(results), "errors": len(errors),
            "first_errors": errors[:5], "tokens": sum(r["tokens"] for r in results),
            "rss_start_mb": rss_start, "rss_end_mb": rss_end, "rss_growth": rss_end / rss_start - 1}


MALFORMED = [b"{bad", b"", b"[]", b"null", b"\xff\xfe", b"[" * 5000, b'{"model": "bench"}',
             b'{"model": "bench", "prompt": "x", "max_tokens": 0}', b'{"model": "bench", "prompt": "x", "max_tokens": "5"}',
             b'{"model": "nope", "prompt": "x"}', b'{"model": "bench", "prompt": "x", "temperature": -1}',
             b'{"model": "bench", "prompt": "x", "top_p": 0}', b'{"model": "bench", "prompt": 5}',
             b'{"model": "bench", "prompt": "x", "max_tokens": 100000}', b'{"model": "bench", "prompt": [[1, 9999]]}',
             b'{"model": "bench", "prompt": "x", "n": 0}', b'{"model": "bench", "prompt": "x", "stop": [""]}',
             b'{"model": "bench", "prompt": "x", "bogus": 1}', b'{"model": "bench", "messages": []}']
CHAT_MALFORMED = [b'{"model": "bench", "messages": []}', b'{"model": "bench", "messages": [{"role": "x", "content": "a"}]}',
                  b'{"model": "bench", "messages": "hi"}', b'{"model": "bench", "messages": [{"role": "user", "content": 1}]}']


async def malformed_flood(server: Server, total: int = 1000, concurrency: int = 16) -> dict:
    import httpx

    bodies = [("/v1/completions", b) for b in MALFORMED] + [("/v1/chat/completions", b) for b in CHAT_MALFORMED]
    statuses: dict[int, int] = {}
    async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
        todo = list(range(total))

        async def worker():
            while todo:
                path, body = bodies[todo.pop() % len(bodies)]
                r = await client.post(path, content=body, headers={"content-type": "application/json"})
                ok_envelope = set(r.json().get("error", {})) == {"message", "type", "param", "code"}
                key = r.status_code if ok_envelope else -r.status_code
                statuses[key] = statuses.get(key, 0) + 1

        await asyncio.gather(*(worker() for _ in range(concurrency)))
        healthy = (await client.get("/health")).status_code == 200
        ok = await client.post("/v1/completions", json={"model": NAME, "prompt": "hi", "max_tokens": 4})
    return {"requests": total, "statuses": {str(k): v for k, v in sorted(statuses.items())},
            "5xx": sum(v for k, v in statuses.items() if abs(k) >= 500),
            "without_envelope": sum(v for k, v in statuses.items() if k < 0),
            "healthy_after": healthy and ok.status_code == 200}


def same_text(moekit: Server, llama: Server, max_tokens: int = 8) -> list[bool]:
    """Per prompt: does llama.cpp's greedy text continue as moekit's (not streamed)?

    The random byte-level model emits bytes that are not UTF-8: moekit writes U+FFFD for them, llama.cpp
    drops them (and may decode a few tokens past max_tokens to finish a character), so the check is that
    moekit's text without U+FFFD is a prefix of llama.cpp's.
    """
    import httpx

    def text(server, prompt):
        body = {"model": NAME, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, **server.extra}
        return httpx.post(server.url + "/v1/completions", json=body, timeout=120).json()["choices"][0]["text"]

    return [text(llama, p).startswith(text(moekit, p).replace("\ufffd", "")) for p in PROMPTS]


def llama_cpp_peer(ran: bool) -> str:
    if not ran:
        return ("llama-cpp-python with its server extra (llama_cpp, sse_starlette, starlette_context, pydantic_settings) "
                "is not installed on this machine: no llama.cpp server peer was run")
    import llama_cpp

    return (f"llama-cpp-python {llama_cpp.__version__} `python -m llama_cpp.server` (one thread, n_ctx 256, requests with repeat_penalty 1.0) on the same "
            "weights exported by moekit.gguf (F32), interleaved with the moekit servers: rows \"llama\"; it serves one "
            "request at a time")


def markdown(result: dict) -> str:
    rows = []
    for c, level in result["levels"].items():
        for name in level["runs"]:
            runs = level["runs"][name]
            rows.append([c, name, f"{med(runs, 'tokens_per_s'):.1f}", f"{med(runs, 'ttft_p50_ms'):.0f}",
                         f"{med(runs, 'ttft_p95_ms'):.0f}", f"{med(runs, 'itl_p50_ms'):.1f}",
                         f"{med(runs, 'itl_p95_ms'):.1f}", sum(r["errors"] for r in runs)])
    levels = markdown_table(["clients", "server", "tokens/s", "TTFT p50 ms", "TTFT p95 ms", "ITL p50 ms", "ITL p95 ms",
                             "errors"], rows)
    peer = [["batched / llama.cpp server", f"{lv['throughput_ratio_llama']:.2f}x",
             f"{lv['ratio_spread_llama'][0]:.2f}-{lv['ratio_spread_llama'][1]:.2f}x"] for lv in result["levels"].values()
            if "throughput_ratio_llama" in lv]
    ratios = markdown_table(["clients", "batched / one-at-a-time (paired median)", "per-round spread", *(
        ["vs", "paired median", "spread"] if peer else [])],
                            [[c, f"{lv['throughput_ratio']:.2f}x", f"{lv['ratio_spread'][0]:.2f}-{lv['ratio_spread'][1]:.2f}x",
                              *(peer[i] if peer else [])] for i, (c, lv) in enumerate(result["levels"].items())])
    t = markdown_table(["target", "value", "goal", "met"],
                       [[x["name"], x["value"], f"{x['direction']} {x['goal']}", "yes" if x["met"] else "no"]
                        for x in result["targets"]])
    s, m = result["soak"], result["malformed"]
    return f"""# moekit serve: continuous batching, soak, malformed requests

Command: `{result['command']}`. Machine: {result['machine']['cpu']}, {result['machine']['cores']} cores,
load average {result['machine']['load_average_1m']} at the end (this benchmark's own servers and clients
included; above ~2 other jobs shared the machine and depressed the absolute figures); the ratios pair the
servers round by round.

Model: random moekit checkpoint ({result['model']}), fp32, CPU, one torch thread per server. The moekit servers are
`moekit serve` subprocesses on 127.0.0.1: "batched" = --max-batch 32 (continuous batching), "serial" =
--max-batch 1 (one request at a time). Each client streams completions of {result['max_tokens']} tokens (greedy)
one after another; {result['rounds']} round(s) per level.

{t}

## Throughput and latency

{levels}

{ratios}

## Soak ({s['seconds']:.0f} s, {s['concurrency']} concurrent streams, mixed greedy / seeded sampling)

{s['requests']} requests, {s['tokens']} tokens, {s['errors']} errors; server RSS {s['rss_start_mb']:.1f} MB at
start, {s['rss_end_mb']:.1f} MB at end ({100 * s['rss_growth']:+.2f}%).

## Malformed requests

{m['requests']} malformed requests (bad JSON, wrong types, out-of-range values, unknown fields/models/roles),
16 at a time: statuses {m['statuses']}; 5xx: {m['5xx']}; answers without the OpenAI envelope:
{m['without_envelope']}; healthy and serving afterwards: {m['healthy_after']}.

At one client both servers run the same computation (a batch of one); a gap between them there is the
shared machine's noise (per-round figures are in the JSON), not batching overhead. TTFT is the time to the
first chunk carrying text: with this random byte-level model, bytes of an incomplete UTF-8 character are held
back, so it often spans a few tokens.

## Peers

{result['peer']}.{peer_parity(result)}
"""


def peer_parity(result: dict) -> str:
    parity = result.get("llama_same_greedy_text")
    if parity is None:
        return ""
    return (f" Same weights, same decoding: on {sum(parity)} of {len(parity)} prompts the llama.cpp server's greedy text "
            "(8 tokens, repeat_penalty 1.0, not streamed) continues as moekit's (moekit's U+FFFD for non-UTF-8 bytes "
            "removed: llama.cpp drops those bytes).")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="one round, 16-token requests, a 10 s soak")
    args = p.parse_args()
    rounds, max_tokens, soak_s = (1, 16, 10.0) if args.quick else (2, 32, 60.0)
    with tempfile.TemporaryDirectory() as tmp:
        ckpt, gguf_path = build_checkpoint(Path(tmp))
        batched, serial = Server(ckpt, 32), Server(ckpt, 1)
        servers = {"batched": batched, "serial": serial, **({"llama": LlamaServer(gguf_path)} if gguf_path else {})}
        try:
            for server in servers.values():  # wait for each, then warm it up
                server.wait_healthy()
                asyncio.run(load_level(server.url, 2, 2, 4))
            parity = same_text(batched, servers["llama"]) if "llama" in servers else None
            if parity is not None:
                print(f"llama.cpp server gives moekit's greedy text on {sum(parity)}/{len(parity)} prompts", flush=True)
            print("throughput and latency:", flush=True)
            levels = compare(servers, rounds, max_tokens)
            serial_code = serial.stop()
            if "llama" in servers:
                servers["llama"].stop()
            print(f"soak {soak_s:.0f} s ...", flush=True)
            soak_result = asyncio.run(soak(batched, soak_s))
            print(f"  {soak_result['errors']} errors, RSS {soak_result['rss_growth']:+.2%}", flush=True)
            flood = asyncio.run(malformed_flood(batched))
            print(f"malformed: {flood['statuses']}, healthy after: {flood['healthy_after']}", flush=True)
            batched_code = batched.stop()
        finally:
            for server in servers.values():
                if server.proc.poll() is None:
                    server.proc.kill()
    targets = [
        target("throughput at 16 clients, continuous batching / one at a time", levels[16]["throughput_ratio"], 4.0),
        target("soak errors", soak_result["errors"], 0, "<="),
        target("soak RSS growth (fraction)", soak_result["rss_growth"], 0.05, "<="),
        target("malformed requests answered 5xx", flood["5xx"] + flood["without_envelope"], 0, "<="),
        target("server healthy after malformed flood (1 = yes)", float(flood["healthy_after"]), 1.0),
        target("clean exit on SIGTERM (1 = both exit 0)", float(serial_code == 0 and batched_code == 0), 1.0),
    ]
    result = {"targets": targets, "machine": machine_info(), "command": command_line(), "quick": args.quick,
              "model": "4 layers, hidden 256, 8 experts top-2, expert_hidden 512, context 256, byte vocabulary",
              "rounds": rounds, "max_tokens": max_tokens, "levels": levels, "soak": soak_result,
              "malformed": flood, "peer": llama_cpp_peer(gguf_path is not None),
              "llama_same_greedy_text": parity}
    name = "serve_quick" if args.quick else "serve"
    paths = write_results(name, result, markdown(result))
    print(f"wrote {paths[0]} and {paths[1]}")
    for t in targets:
        print(f"  {'met' if t['met'] else 'MISSED'}: {t['name']} = {t['value']} (goal {t['direction']} {t['goal']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
