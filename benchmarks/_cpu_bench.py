"""Helpers of the CPU benchmarks (cpu_decode.py, memory.py): models in a cache, GGUF copies, child workers, floors.

- `MODELS`: the Mixtral-like configurations (the 100M one of benchmarks/generate.py, a ~1B one, and a
  tiny one for --quick), built with transformers' random init and saved once under CACHE (a directory
  in /tmp, reused across runs; `model_dir` / `gguf_path` build on first use).
- `Worker`: a child process (multiprocessing "spawn", so nothing of the parent's memory is inherited)
  that loads one side (moekit or llama.cpp) and answers timing requests; its peak RSS is read from its
  own /proc/self/status (VmHWM), which ru_maxrss cannot give (it is inherited across fork).
- `bandwidth_gbs` (a large tensor copy) and `active_bytes` give the weight-read floor of a decode step.

This file holds no benchmark of its own and no targets.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import os
import time
import traceback
from pathlib import Path

import torch

CACHE = Path(os.environ.get("MOEKIT_BENCH_CACHE", "/tmp/moekit_bench_cache"))
_LLAMA_COMMON = ("-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON "
                 "-DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF")  # the VM traps AMX: always off
# the two llama.cpp builds the benchmark runs: the best this CPU runs (AVX-512 + VNNI), installed in the venv
# (pyproject's bench extra), and the AVX2 one a laptop without AVX-512 runs, installed with pip --target DIR
LLAMA_BUILD_FLAGS = {
    "llama.cpp": _LLAMA_COMMON + " -DGGML_AVX512=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX512_VBMI=ON -DGGML_AVX512_BF16=ON -DGGML_AVX_VNNI=ON",
    "llama.cpp-avx2": _LLAMA_COMMON + " -DGGML_AVX512=OFF",
}
_COMMON = dict(max_position_embeddings=1024, eos_token_id=None, bos_token_id=None, pad_token_id=0,
               num_local_experts=8, num_experts_per_tok=2)
# HF Mixtral configurations. tiny and 1b have 16 experts (top-2) so that a 12.5% expert budget (2 experts
# per layer) still holds a token's top-k (memory.py); the 1b one is ~0.95B parameters, 95% of them experts.
MODELS = {
    "tiny": dict(_COMMON, vocab_size=512, hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, intermediate_size=256, num_local_experts=16),
    # = benchmarks/generate.py's "mixtral"
    "100m": dict(_COMMON, vocab_size=8192, hidden_size=512, num_hidden_layers=8, num_attention_heads=8,
                 num_key_value_heads=4, intermediate_size=896),
    "1b": dict(_COMMON, vocab_size=8192, hidden_size=1024, num_hidden_layers=12, num_attention_heads=16,
               num_key_value_heads=4, intermediate_size=1536, num_local_experts=16),
}
# moekit's widths and the GGUF type llama.cpp runs at the same width; moekit quantizes every weight
# the GGUF writer quantizes (scope="all": experts, attention, head; routers and norms stay fp32)
# "q4_k_m": both sides run the same Q4_K_M file (llama.cpp's own quantizer on moekit's F32 export); moekit
# keeps its Q4_K / Q6_K (and Q5_0 / Q8_0 fallback) blocks as they are (moekit.gguf)
WIDTHS = {"fp32": ("F32", None), "int8": ("Q8_0", dict(bits=8, scope="all")),
          "int4": ("Q4_0", dict(bits=4, group_size=32, scope="all")), "q4_k_m": ("Q4_K_M", "gguf")}


def _key(name: str) -> str:
    return f"{name}-{hashlib.sha1(json.dumps(MODELS[name], sort_keys=True).encode()).hexdigest()[:8]}"


def model_dir(name: str) -> Path:
    """The HF directory of model `name` (random weights, seed 0), built once into CACHE."""
    from transformers import AutoConfig, AutoModelForCausalLM

    path = CACHE / _key(name) / "hf"
    if (path / "DONE").is_file():
        return path
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model("mixtral", **MODELS[name]))
    model.save_pretrained(path)
    (path / "DONE").write_text("ok\n")
    return path


def gguf_path(name: str, gguf_type: str, model=None) -> Path:
    """Model `name` exported by moekit's own GGUF writer (moekit.gguf.save) at `gguf_type`, built once.

    `model`: the loaded moekit model to export (else it is loaded from model_dir).
    """
    import moekit.gguf as G
    from moekit.data.text import Tokenizer
    from moekit.infer import Engine

    path = CACHE / _key(name) / f"model-{gguf_type}.gguf"
    if path.is_file():
        return path
    if gguf_type == "Q4_K_M":  # llama.cpp's quantizer on the F32 export (needs the bench extra's llama-cpp-python)
        llama_quantize(gguf_path(name, "F32", model), path, "Q4_K_M")
        return path
    model = model if model is not None else Engine.load(model_dir(name)).model
    G.save(model, path, Tokenizer.byte_level(), dtype=gguf_type)
    return path


def llama_quantize(src: Path, dst: Path, ftype: str) -> None:
    """llama.cpp's own quantizer (llama_model_quantize), writing through a temporary file."""
    import ctypes

    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{ftype}")
    tmp = dst.with_suffix(".tmp")
    if llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), ctypes.byref(params)) != 0:
        raise RuntimeError(f"llama_model_quantize {src} -> {ftype} failed")
    tmp.replace(dst)


def _spin() -> None:  # pragma: no cover - runs in a child process until killed
    while True:
        pass


class BusyLoops:
    """`with BusyLoops(k):` k processes each spinning `while True: pass` (another program taking a core)."""

    def __init__(self, k: int):
        self.k, self.procs = k, []

    def __enter__(self):
        ctx = mp.get_context("spawn")
        self.procs = [ctx.Process(target=_spin, daemon=True) for _ in range(self.k)]
        for p in self.procs:
            p.start()
        time.sleep(0.5)  # (let them start spinning)
        return self

    def __exit__(self, *exc):
        for p in self.procs:
            p.kill()
            p.join(timeout=10)


def memory_status() -> dict:
    """VmHWM (peak resident), VmRSS and its anonymous / file-backed parts, in MB, from /proc/self/status."""
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key = line.split(":")[0]
        if key in ("VmHWM", "VmRSS", "RssAnon", "RssFile"):
            out[key] = int(line.split()[1]) / 1024
    return out


def bandwidth_gbs(threads: int, mb: int = 512, reps: int = 5) -> float:
    """GB/s of a large tensor copy (read + write bytes counted), best of `reps`, on `threads` threads."""
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        a = torch.ones(mb * 2**20 // 4)
        b = torch.empty_like(a)
        best = float("inf")
        for _ in range(reps):
            t = time.perf_counter()
            b.copy_(a)
            best = min(best, time.perf_counter() - t)
        return 2 * a.numel() * 4 / best / 1e9
    finally:
        torch.set_num_threads(old)


BYTES_PER_WEIGHT = {"fp32": 4.0, "int8": 1 + 4 / 4096, "int4": 0.5 + 4 / 32,  # moekit (int8: one fp32 scale per row)
                    "F32": 4.0, "Q8_0": 34 / 32, "Q4_0": 18 / 32,  # GGUF blocks of 32: fp16 scale + codes
                    "q4_k_m": 144 / 256, "Q4_K_M": 144 / 256}  # mostly Q4_K (some Q6_K: 210 / 256): a lower bound


def active_bytes(name: str, width: str) -> float:
    """Bytes a batch-1 decode step reads at `width`: attention, routers (fp32), top-k experts, head."""
    c = MODELS[name]
    D, L, V, F_ = c["hidden_size"], c["num_hidden_layers"], c["vocab_size"], c["intermediate_size"]
    hd = D // c["num_attention_heads"]
    attn = 2 * D * c["num_attention_heads"] * hd + 2 * D * c["num_key_value_heads"] * hd
    experts = c["num_experts_per_tok"] * 3 * D * F_
    router = c["num_local_experts"] * D
    per_w = BYTES_PER_WEIGHT[width]
    return L * ((attn + experts) * per_w + router * 4) + V * D * per_w


# ---------------------------------------------------------------- child workers


class Worker:
    """A child process holding one loaded side; `call(*request)` returns its reply (raising its error)."""

    def __init__(self, target, *args):
        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_serve, args=(child, target, args), daemon=True)
        self.proc.start()
        self.ready = self._recv()  # whatever the loader returned (load time, RSS after load)

    def _recv(self):
        kind, value = self.conn.recv()
        if kind == "error":
            raise RuntimeError(value)
        return value

    def call(self, *request):
        self.conn.send(request)
        return self._recv()

    def close(self) -> dict:
        """Stops the child; returns its final memory status."""
        try:
            mem = self.call("memory")
            self.conn.send(("stop",))
        finally:
            self.proc.join(timeout=30)
            if self.proc.is_alive():
                self.proc.kill()
        return mem


def _serve(conn, target, args) -> None:
    """Child side: `target(*args)` returns (ready_info, handler); then each request is handler(*request)."""
    try:
        info, handler = target(*args)
        conn.send(("ok", {**info, "after_load": memory_status()}))
    except BaseException:
        conn.send(("error", traceback.format_exc()))
        return
    while True:
        request = conn.recv()
        if request[0] == "stop":
            return
        try:
            conn.send(("ok", memory_status() if request[0] == "memory" else handler(*request)))
        except BaseException:
            conn.send(("error", traceback.format_exc()))
