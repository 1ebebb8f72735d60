"""Expert offloading (this package): expert weights live in a slow tier and are computed from a fixed fast tier.

`offload_model(model, ...)` is a transform on a built model. Every MoE
layer's stacked experts are replaced by a small stack of fast *slots*
(`OffloadedExperts`); the full weights stay in a slow tier:

- `DiskTier` (CPU): the checkpoint's safetensors file(s). Each expert is read
  with positional reads straight into its preallocated slot, and the page
  cache for the bytes read is dropped (posix_fadvise DONTNEED), so that the
  next miss on that expert is a real read. Every read checks that the file
  is still the one opened (inode, size, mtime, ctime) and that the full
  length arrived; otherwise it raises `SlowTierError`.
- `EmulatedLinkTier`: any tier behind a link of configurable bandwidth and
  latency, for reproducible experiments (the offloader models the link's
  time in its transfer queue). Its label always says "emulated".
- `MemoryTier`: host RAM (the base of the emulated link; tests).
- `CudaHostTier` (CUDA): pinned host memory, copied to the device slots on a
  copy stream, ordered by events (see prefetch.CudaTransferQueue).

- `GGUFTier`: a GGUF file's memory map, one expert's blocks copied as they
  are into GGUFExperts slots when it is loaded into a slot (Engine.load("x.gguf",
  expert_budget=...); dequantized by gguf into full-precision slots when the
  model was loaded dequantized, e.g. to requantize it).

Quantized experts (int8 / int4, moekit.quantize) are offloaded quantized:
every tier holds their codes and scales (LayerShape.parts()), the slots are
a `QuantizedExperts` computing with the same quantized kernels, budgets and
"bytes moved" count the packed bytes. Experts quantized at load from a
full-precision checkpoint go, one at a time, into a spill file that the disk
tier reads (requant.py). The low-bit fallback (fallback.py, HOBBIT) keeps an
int4 copy of every expert resident and computes a miss from it instead of
waiting; the statistics count those `fallbacks`.

The fast tier's size is an `--expert-budget`: bytes ("2GB") or a fraction of
all experts ("25%"), split across layers in proportion to their expert
counts. Each layer's slots form an `ExpertCache` (expert_cache.py) with a
replacement policy; a `Predictor` (prefetch.py) names the next layer's
experts when a router fires, and those are fetched in the background while
this layer computes. A layer's computation waits for exactly the experts
it uses; the time spent waiting is the stall time.

Correctness: a slot is used only after its transfer finished without error;
any transfer error (even of a prefetch nobody waits for) is re-raised at
the next layer, so generation stops with a clear error instead of
computing with a half-read expert. Offloaded generation gives bit-identical
outputs to all-resident generation (same kernel on the same weights; the
tests check greedy tokens on the disk, memory and emulated tiers for every policy and predictor; the CUDA
tier has one test, which runs only with a GPU).

The package: budget.py (sizes, budgets, errors), tiers.py, disk.py and
gguf_tier.py (slow tiers), requant.py (tiers converted from another: quantize
on read, spill files), fallback.py (the int4 copies), experts.py (the
OffloadedExperts storage), offloader.py (slots, caches, transfers,
statistics), stats.py (counters and the report), transform.py
(`offload_model`, `load_experts`). Not here: the cache policies
(infer/expert_cache.py), predictors and transfer queues (infer/prefetch.py),
the pre-gate heads (moekit.models.pregated, moekit.train.pregate),
generation (infer/engine.py).

Shape legend: E experts, S slots, H = 2F (SwiGLU) or F, D hidden, F expert
width, N assignments (tokens grouped by expert), T tokens.
"""

from .budget import (  # noqa: F401
    Budget, BudgetError, LayerShape, OffloadError, SlowTierError, format_bytes, parse_bandwidth, parse_bytes, parse_duration,
)
from .disk import DiskTier, checkpoint_files, read_safetensors_header  # noqa: F401
from .fallback import FALLBACK_SPEC  # noqa: F401
from .gguf_tier import GGUFTier  # noqa: F401
from .requant import ConvertingTier, spill  # noqa: F401
from .experts import OffloadedExperts  # noqa: F401
from .offloader import Offloader  # noqa: F401
from .stats import LayerStats, format_stats, summarize  # noqa: F401
from .tiers import CudaHostTier, EmulatedLinkTier, MemoryTier, SlowTier  # noqa: F401
from .transform import TIERS, find_moe_layers, layer_shapes, load_experts, offload_model  # noqa: F401
