"""The loading flags `moekit generate` and `moekit serve` share, and the one function from them to an Engine.

`add_loading_flags(parser)` adds --dtype, --device, --quantize and the expert-offloading group
(--expert-budget, --prefetch, --cache, --pregate, --slow-tier, --link-bandwidth, --link-latency,
--low-bit-fallback) to a command's parser; `check_loading_flags(args)` refuses a bad combination
before anything is read; `load_options(args)` turns them into `moekit.infer.load.load`'s keyword
arguments, and `engine_from_flags(args)` loads the model with them. Both commands call these and
nothing else, so their loading cannot drift apart: which tier and whether to load lazily is decided
by the library (`moekit.infer.load.offload_plan`), not here. Nothing heavy is imported at parse time.

Not here: the commands' other flags (generate.py, serve.py), loading itself (moekit.infer.load).
"""

from __future__ import annotations

# = moekit.infer.prefetch.PREDICTORS less "oracle", which needs a routing trace recorded on the same generation
# (a library option: no command can record one before it generates); tests check the two agree.
PREDICTORS = ("none", "prefetch-all", "next-gate", "pregate", "lookahead")
POLICIES = ("lru", "lfu", "lfru", "belady", "lookahead")  # = moekit.infer.expert_cache.POLICIES
OFFLOAD_FLAGS = ("prefetch", "cache", "pregate", "slow_tier", "link_bandwidth", "low_bit_fallback")


def add_loading_flags(p) -> None:
    """Add the shared loading flags to the parser `p` of a command that takes a model."""
    p.add_argument("--dtype", default="float32", help="float32 (default), bfloat16, float16 or auto (config.json's)")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    p.add_argument("--quantize", choices=["int8", "int4"],
                   help="quantize the experts at load time: int8 (per channel) or int4 (group 32); see `moekit quantize`. "
                        "With --expert-budget the experts are offloaded quantized (fewer bytes per miss)")
    off = p.add_argument_group("expert offloading (run a model whose experts do not fit in fast memory)")
    off.add_argument("--expert-budget", metavar="SIZE",
                     help="fast memory for experts: bytes (300MB, 2GB) or a fraction of all experts (25%%); the rest "
                          "stay in the slow tier")
    off.add_argument("--prefetch", metavar="PREDICTOR",
                     help="how the next layer's experts are predicted and fetched early: none (default), prefetch-all, "
                          "next-gate, pregate, lookahead (known routes of a Read-ME model)")
    off.add_argument("--cache", metavar="POLICY",
                     help="expert cache policy: lru (default), lfu, lfru, belady (offline optimum; generate only: it runs "
                          "the prompt twice), lookahead (Belady over the routes known ahead)")
    off.add_argument("--pregate", metavar="DIR", help="pre-gate heads trained by `moekit pregate` (for --prefetch pregate)")
    off.add_argument("--slow-tier", metavar="TIER",
                     help="where the experts live: disk (default on CPU: the checkpoint's own files, read lazily), "
                          "emulated (a link of --link-bandwidth/--link-latency), cuda-host (default on CUDA: pinned "
                          "host memory)")
    off.add_argument("--link-bandwidth", metavar="RATE", help="emulated link bandwidth, e.g. 2GB/s")
    off.add_argument("--link-latency", metavar="TIME", default="0",
                     help="emulated link latency per transfer, e.g. 50us (default 0)")
    off.add_argument("--low-bit-fallback", action="store_true",
                     help="keep an int4 copy of every expert in fast memory and compute a missed expert from it instead of "
                          "waiting for its transfer (HOBBIT); the full copy loads in the background")


def check_loading_flags(args) -> None:
    """One clear error for offloading flags without a budget, or a predictor or policy that does not exist here."""
    from ..errors import ConfigError

    if args.expert_budget is None and any(getattr(args, name) for name in OFFLOAD_FLAGS):
        raise ConfigError("--prefetch, --cache, --pregate, --slow-tier, --link-bandwidth and --low-bit-fallback need "
                          "--expert-budget (e.g. --expert-budget 25%)")
    if args.prefetch is not None and args.prefetch not in PREDICTORS:
        why = (" needs a routing trace recorded on the same generation, which no command can record before it "
               "generates (it is a library option: moekit.infer.offload.offload_model(trace=...))"
               if args.prefetch == "oracle" else " is unknown")
        raise ConfigError(f"--prefetch {args.prefetch}{why}: accepted predictors are {', '.join(PREDICTORS)}")
    if args.cache is not None and args.cache not in POLICIES:
        raise ConfigError(f"--cache {args.cache} is an unknown cache policy: accepted policies are {', '.join(POLICIES)}")


def load_options(args) -> dict:
    """`moekit.infer.load.load`'s keyword arguments from the flags (--cache belady loads with lru: the command
    records the routing first, then switches; see generate.py)."""
    options = dict(dtype=args.dtype, device=args.device, quantize=args.quantize)
    if args.expert_budget is not None:
        options.update(expert_budget=args.expert_budget, tier=args.slow_tier,  # None: offload_plan's default
                       policy="lru" if args.cache in (None, "belady") else args.cache,
                       predictor=args.prefetch or "none", pregate=args.pregate, link_bandwidth=args.link_bandwidth,
                       link_latency=args.link_latency, low_bit_fallback=args.low_bit_fallback)
    return options


def engine_from_flags(args):
    """An Engine on `args.model`, loaded as the shared flags say (checked first)."""
    from ..infer.engine import Engine
    from ..infer.load import load

    check_loading_flags(args)
    return Engine(load(args.model, **load_options(args)))


__all__ = ["add_loading_flags", "check_loading_flags", "load_options", "engine_from_flags", "PREDICTORS", "POLICIES"]
